"""`baldro unlearn`: the unlearning recipe (forget set, retain set, objective, weighting, the reference model,
evaluation during training and at the end) from a resolved config.

Before any weights load, the recipe is validated (`baldro.recipes.validation.validate`) and the data files are read;
the run folder is claimed and resumed as `folders.py` describes.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig

from baldro.data.tofu import load_refusals
from baldro.distributed import (
    barrier,
    is_sharded,
    loads_sharded,
    zero_stage,
)
from baldro.models.loading import (
    load_model,
    resolve_device,
)
from baldro.recipes.common import (
    RAW_TEXT,
    benchmark_name,
    build_formatter,
    check_processes,
    encode_rows,
    is_main_process,
    load_model_and_tokenizer,
    raw_chunks,
    raw_texts,
    read_rows,
    training_args,
)
from baldro.recipes.config import as_recipe
from baldro.recipes.evaluate import eval_settings
from baldro.recipes.folders import run_folder, train_and_save
from baldro.recipes.schema import Recipe
from baldro.recipes.validation import strategy, validate, validate_model, weighting_args
from baldro.train.alternates import (
    ALTERNATES_FILE,
    generate_alternates,
    read_alternates,
    save_alternates,
)
from baldro.train.batching import (
    UnlearnCollator,
    UnlearnDataset,
)
from baldro.train.guard import (
    JsonlLogCallback,
)
from baldro.train.objectives import (
    PrimalDual,
    get_objective,
    get_retain_loss,
    set_trainable,
)
from baldro.train.trainers import (
    UnlearnTrainer,
)
from baldro.train.weighting import make_weighting

log = logging.getLogger(__name__)


def make_reference_model(model):
    """A frozen copy of the model before unlearning (pi_ref)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def _reference_model(recipe: Recipe, model, args):
    """pi_ref: a copy of the model, or (DeepSpeed ZeRO-3, FSDP with cpu_ram_efficient_loading, where this
    process holds only part of the weights) the same weights loaded again, partitioned the same way."""
    if not loads_sharded(args):
        return make_reference_model(model)
    m = recipe.model
    ref = load_model(
        m.path,
        dtype=m.dtype,
        device=m.device,
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
        seed=recipe.seed,
    )
    return ref.eval().requires_grad_(False)


def planned_steps(recipe: Recipe, n_samples: int, world_size: int = 1) -> int:
    """The optimizer steps of a run over `n_samples` forget samples, as transformers counts them (each
    process's epoch padded to whole global batches when there are several, `EpochSampler`)."""
    t = recipe.train
    if t.max_steps > 0:
        return t.max_steps
    b = t.per_device_train_batch_size
    batches = math.ceil(n_samples / (b * world_size)) if n_samples else 0
    per_epoch = max(batches // t.gradient_accumulation_steps + int(batches % t.gradient_accumulation_steps > 0), 1)
    return math.ceil(t.num_train_epochs * per_epoch)


def _check_eval_steps(recipe: Recipe, n_samples: int, world_size: int) -> None:
    """`train.eval_steps` within the run (TOFU: known before any weights load; MUSE checks it at step 0)."""
    from baldro.eval.trajectory import eval_interval

    if strategy(recipe.train.eval_strategy) == "steps":
        eval_interval(recipe.train.eval_steps, planned_steps(recipe, n_samples, world_size))


def trajectory_settings(recipe: Recipe) -> dict:
    """The evaluator's keyword arguments for evaluations during training: the final evaluation's, on the
    first `eval.trajectory_limit` rows (at most `eval.limit`), with `eval.trajectory_max_new_tokens`."""
    ev = recipe.eval
    limits = [n for n in (ev.trajectory_limit, ev.limit) if n is not None]
    settings = {**eval_settings(recipe), "limit": min(limits) if limits else None}
    if ev.trajectory_max_new_tokens is not None:
        if ev.benchmark == "muse":
            for key in ("verbmem_max_new_tokens", "knowmem_max_new_tokens"):
                settings[key] = min(settings[key], ev.trajectory_max_new_tokens)
        else:
            settings["max_new_tokens"] = ev.trajectory_max_new_tokens
    return settings


def _trajectory_callback(recipe: Recipe, tokenizer, formatter, run_dir: Path):
    """`train.eval_strategy`: the callback that evaluates during training (`baldro.eval.trajectory`)."""
    from baldro.eval.run import evaluate_during_training
    from baldro.eval.trajectory import (
        UTILITY_KEY,
        BestRule,
        EvalDuringTraining,
        lower_is_better,
    )

    t, ev = recipe.train, recipe.eval
    settings = trajectory_settings(recipe)
    rule = None
    if t.metric_for_best_model:
        greater = (
            t.greater_is_better if t.greater_is_better is not None else not lower_is_better(t.metric_for_best_model)
        )
        rule = BestRule(t.metric_for_best_model, greater, UTILITY_KEY[ev.benchmark], ev.utility_floor)
    return EvalDuringTraining(
        lambda model, out, quiet: evaluate_during_training(model, tokenizer, formatter, out, settings, quiet),
        run_dir,
        strategy(t.eval_strategy),
        t.eval_steps,
        ev.benchmark,
        rule=rule,
        patience=t.early_stopping_patience,
        load_best=t.load_best_model_at_end,
    )


def run_unlearn(cfg: Recipe | DictConfig | dict, extra_callbacks=()) -> Path:
    """Unlearning with a forget objective under a weighting plus a retain loss."""
    recipe = as_recipe(cfg)
    if recipe.method == "unierase":  # an edit, not training (docs/guides/unierase.md)
        from baldro.recipes.unierase import run_unierase

        return run_unierase(recipe)
    validate(recipe, "unlearn")  # names, arguments and ranges, before a (possibly large) model loads
    objective = get_objective(recipe.objective.name)
    objective_args = dict(recipe.objective.args)
    retain_loss = get_retain_loss(recipe.objective.retain_loss)
    benchmark = benchmark_name(recipe.data.benchmark)
    raw = benchmark in RAW_TEXT  # MUSE, WMDP: raw-text chunks, not QA pairs
    refusals = None
    if raw:
        corpus_texts = raw_texts(recipe, objective)
        make_weighting(recipe.weighting.name, n_samples=1, **weighting_args(recipe))  # rebuilt for the chunks
    else:
        forget_rows = read_rows(recipe.data, "forget_split")
        weighting = make_weighting(recipe.weighting.name, n_samples=len(forget_rows), **weighting_args(recipe))
        retain_rows = read_rows(recipe.data, "retain_split")
        if objective.needs_refusal:
            refusals = load_refusals(recipe.data.source, recipe.data.refusal_file)
    during = strategy(recipe.train.eval_strategy) != "no"
    eval_kwargs = eval_settings(recipe) if recipe.eval.at_end or during else None
    validate_model(recipe.model, recipe.train)
    args = training_args(recipe, Path(recipe.output_dir).expanduser())
    check_processes(recipe, args)
    if not raw:
        _check_eval_steps(recipe, len(forget_rows), args.world_size)

    with run_folder(recipe, "unlearn") as (run_dir, resume):
        model, tokenizer = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
        formatter = build_formatter(recipe.format, recipe.data, tokenizer)
        refusal_enc = None
        if raw:  # raw-text chunks; their indices are the forget sample ids
            forget_enc, retain_enc = raw_chunks(recipe, corpus_texts, tokenizer, model)
            weighting = make_weighting(recipe.weighting.name, n_samples=len(forget_enc), **weighting_args(recipe))
        else:
            forget_enc = encode_rows(formatter, forget_rows, "forget")
            retain_enc = encode_rows(formatter, retain_rows, "retain")
        if refusals is not None:
            picks = [refusals[(recipe.seed + i) % len(refusals)] for i in range(len(forget_rows))]
            refusal_enc = formatter.encode_many([r["question"] for r in forget_rows], picks, "refusal")
        alternate_enc = None
        if objective.needs.alternate:
            texts = _alternates(recipe, model, tokenizer, formatter, forget_rows, run_dir)
            flat = formatter.encode_many(
                [r["question"] for r, alts in zip(forget_rows, texts) for _ in alts],
                [a for alts in texts for a in alts],
                "alternate",
            )
            k = len(texts[0])
            alternate_enc = [flat[i * k : (i + 1) * k] for i in range(len(forget_rows))]
        n_trainable = set_trainable(model, recipe.objective.trainable_params_regex)

        needs_ref = objective.needs_reference or retain_loss.needs_reference
        # With LoRA the reference is the same model with its adapter disabled: no copy.
        ref_model = _reference_model(recipe, model, args) if needs_ref and not recipe.model.lora else None

        callbacks = [JsonlLogCallback(run_dir / "train_log.jsonl")]
        if recipe.balance.every_n_steps > 0:
            from baldro.eval.balance import BalanceTracker
            from baldro.eval.engine import score_sequences

            pad, bs = tokenizer.pad_token_id, recipe.balance.batch_size

            def forget_nll(m):
                scores = score_sequences(m, forget_enc, bs, pad, want=(), desc="balance", progress=False)
                return list(range(len(forget_enc))), [s.avg_loss for s in scores]

            callbacks.append(
                BalanceTracker(forget_nll, run_dir / "balance.jsonl", every_n_steps=recipe.balance.every_n_steps)
            )
        trajectory = _trajectory_callback(recipe, tokenizer, formatter, run_dir) if during else None
        if trajectory is not None:
            callbacks.append(trajectory)
        callbacks.extend(extra_callbacks)

        trainer = UnlearnTrainer(
            model=model,
            args=args,
            train_dataset=UnlearnDataset(
                forget_enc, retain_enc, refusal_enc, seed=recipe.seed, alternates=alternate_enc
            ),
            data_collator=UnlearnCollator(tokenizer.pad_token_id),
            callbacks=callbacks,
            objective=objective,
            objective_args=objective_args,
            weighting=weighting,
            retain_loss=retain_loss,
            gamma=recipe.objective.gamma,
            alpha=recipe.objective.alpha,
            ref_model=ref_model,
            ref_cache=recipe.objective.ref_cache,
            forget_log_path=run_dir / "forget_losses.jsonl",
            module_regex=recipe.objective.module_regex,
            primal_dual=_primal_dual(recipe),
        )
        if resume:
            trainer.restore_extra_state(resume)
        if trajectory is not None:
            trajectory.trainer = trainer  # its headline numbers go through trainer.log (report_to)
        train_and_save(
            trainer,
            recipe,
            tokenizer,
            run_dir,
            resume,
            {
                "name": recipe.name or f"{objective.name}_{recipe.weighting.name}",
                "kind": "unlearn",
                "seed": recipe.seed,
                "objective": objective.name,
                "objective_args": {**objective.defaults, **objective_args},
                "weighting": recipe.weighting.name,
                "weighting_args": weighting_args(recipe),
                "retain_loss": retain_loss.name,
                **({"module": trainer.module_name} if trainer.module_name else {}),
                **(
                    {"trainable_parameter_tensors": n_trainable}
                    if recipe.objective.trainable_params_regex is not None
                    else {}
                ),
                "forget_split": recipe.data.forget_split,
                "n_forget": len(forget_enc),
                **({"benchmark": benchmark, "chunk_length": recipe.data.chunk_length} if raw else {}),
            },
            more_info=trajectory.info if trajectory is not None else None,
        )
        if recipe.eval.at_end and trainer.is_world_process_zero():  # once, in the main process
            from baldro.eval.run import evaluate_final_model

            final = trainer.model
            if is_sharded(trainer.model_wrapped) or zero_stage(trainer.accelerator) == 3:
                # this process holds part of the weights: evaluate the saved model, on its own GPU
                device = recipe.model.device if recipe.model.device not in (None, "auto", "accelerate") else None
                final = load_model(
                    str(run_dir / "model"),
                    dtype=recipe.model.dtype,
                    device=str(resolve_device(device)),
                    attn_implementation=recipe.model.attn_implementation,
                    trust_remote_code=recipe.model.trust_remote_code,
                )
            evaluate_final_model(final, tokenizer, formatter, run_dir, eval_kwargs, recipe.eval.target_logs_path)
    return run_dir


def _primal_dual(recipe: Recipe) -> PrimalDual | None:
    o = recipe.objective
    if not o.primal_dual:
        return None
    return PrimalDual(o.alpha, o.retain_loss_eps, o.dual_step_size, o.dual_update_upon, o.dual_warmup_epochs)


def _alternates(recipe: Recipe, model, tokenizer, formatter, rows: list[dict], run_dir: Path) -> list[list[str]]:
    """AltPO's alternates: from objective.alternates.file, from the run folder, or generated there now
    (by the main process, before any weight changes; the others wait and read the file)."""
    a = recipe.objective.alternates
    if a.file is not None:
        return read_alternates(Path(a.file).expanduser(), rows)
    settings = {
        "n": a.n,
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "seed": recipe.seed,
        "model": str(recipe.model.path),
        "forget_split": recipe.data.forget_split,
    }
    path = run_dir / ALTERNATES_FILE
    if is_main_process() and not path.exists():
        start = time.time()
        texts = generate_alternates(
            model, tokenizer, formatter, rows, a.n, a.max_new_tokens, a.temperature, a.batch_size, recipe.seed
        )
        save_alternates(path, rows, texts, settings)
        log.info("alternates: %d x %d written to %s in %.0f s", len(rows), a.n, path, time.time() - start)
    barrier()
    return read_alternates(path, rows, settings)

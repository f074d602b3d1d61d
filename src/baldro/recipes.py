"""Runnable recipes: `finetune` and `unlearn` from a resolved config (the CLI's `baldro finetune|unlearn`).

Every run writes into its own folder: `config.yaml` (resolved), `train_log.jsonl` (per step),
`forget_losses.jsonl` (per-sample forget losses with sample ids), `run_info.json`, and the final model
in `model/` (safetensors); checkpoints for resuming go to `checkpoints/`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from baldro.config import as_recipe, dump_config
from baldro.data.formatting import QAFormatter
from baldro.data.tofu import load_refusals, load_split
from baldro.errors import BaldroError
from baldro.io import write_json_atomic, write_text_atomic
from baldro.models import load_model, load_tokenizer, save_model
from baldro.objectives import get_objective, get_retain_loss
from baldro.schema import DataConfig, EvalConfig, FormatConfig, ModelConfig, Recipe
from baldro.trainer import (
    EncodedDataset,
    JsonlLogCallback,
    QACollator,
    UnlearnCollator,
    UnlearnDataset,
    UnlearnTrainer,
    WeightingStateCallback,
)
from baldro.weighting import make_weighting

log = logging.getLogger(__name__)

# TrainingArguments that the trainers need as they are (the data collators build their own batches).
FIXED_TRAIN_ARGS = {"remove_unused_columns": False, "dataloader_drop_last": False}


def build_formatter(format: FormatConfig, data: DataConfig, tokenizer) -> QAFormatter:
    return QAFormatter(
        tokenizer,
        system_prompt=format.system_prompt,
        use_chat_template=format.use_chat_template,
        prompt_template=format.prompt_template,
        answer_suffix=format.answer_suffix,
        max_length=data.max_length,
        date_string=format.date_string,
    )


def load_model_and_tokenizer(m: ModelConfig, device: str | None = None):
    if not m.path:
        raise BaldroError("model.path is not set: give a hub id or a local folder (model.path=...)")
    model = load_model(
        m.path,
        dtype=m.dtype,
        device=device if device is not None else m.device,
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
        lora=m.lora,
        gradient_checkpointing=m.gradient_checkpointing,
    )
    tokenizer = load_tokenizer(m.tokenizer or m.path, m.trust_remote_code)
    return model, tokenizer


def _rows(data: DataConfig, split_key: str, fields=("question", "answer")) -> list[dict]:
    name = getattr(data, split_key)
    if not name:
        raise BaldroError(f"data.{split_key} is not set")
    rows = load_split(data.source, name, fields)
    return rows[: data.limit] if data.limit else rows


def _encode(formatter: QAFormatter, rows: list[dict], what: str):
    return formatter.encode_many([r["question"] for r in rows], [r["answer"] for r in rows], what)


def _training_args(recipe: Recipe, run_dir: Path):
    from transformers import TrainingArguments

    train = dataclasses.asdict(recipe.train)
    extra = train.pop("extra")
    valid = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in extra:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            raise BaldroError(f"train.extra.{key} is not a transformers TrainingArguments field"
                              + (f": did you mean {close[0]}?" if close else ""))
    args = {**train, **extra, **FIXED_TRAIN_ARGS, "seed": recipe.seed}
    # YAML 1.1 reads `save_strategy: no` as false (and the schema's str field then as "False").
    args = {k: ("no" if k.endswith("_strategy") and str(v).lower() == "false" else v) for k, v in args.items()}
    try:
        return TrainingArguments(output_dir=str(run_dir / "checkpoints"), **args)
    except (TypeError, ValueError) as e:
        raise BaldroError(f"bad train settings: {str(e).splitlines()[0]}") from None


def _prepare_run_dir(recipe: Recipe) -> Path:
    if not recipe.output_dir:
        raise BaldroError("output_dir is not set: give output_dir=PATH")
    run_dir = Path(recipe.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_config(recipe))
    return run_dir


def _resume_checkpoint(recipe: Recipe, run_dir: Path) -> str | None:
    resume = recipe.resume
    if not resume or str(resume).lower() == "false":
        return None
    if resume is not True and str(resume).lower() != "true":
        return str(resume)
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not ckpts:
        log.warning("resume=true but no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
        return None
    return str(ckpts[-1])


def _console_callbacks(trainer, recipe: Recipe) -> None:
    """`log_to_console: false` keeps the progress bar but drops the per-step dict printouts."""
    if not recipe.log_to_console:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        class QuietProgress(ProgressCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                pass

        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        if not trainer.args.disable_tqdm:
            trainer.add_callback(QuietProgress())


def _fresh_logs(run_dir: Path, resuming: bool, *names: str) -> None:
    if not resuming:
        for name in names:
            (run_dir / name).unlink(missing_ok=True)


def _train_and_save(trainer, recipe: Recipe, tokenizer, run_dir: Path, resume: str | None, info: dict) -> Path:
    """Train (or resume), then save the final model and `run_info.json` from the main process."""
    _console_callbacks(trainer, recipe)
    start = time.time()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.time() - start
    if trainer.is_world_process_zero():
        save_model(trainer.model, tokenizer, run_dir / "model", merge_lora=recipe.model.merge_lora)
        write_json_atomic(run_dir / "run_info.json", {**info, "train_time_s": elapsed, "status": "done"})
    return run_dir


def run_finetune(cfg: Recipe | DictConfig | dict, extra_callbacks=()) -> Path:
    """Supervised fine-tuning on QA pairs with answer-only loss (target: `full`, retain: `retainYY`)."""
    recipe = as_recipe(cfg)
    run_dir = _prepare_run_dir(recipe)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    formatter = build_formatter(recipe.format, recipe.data, tokenizer)
    train_rows = _rows(recipe.data, "train_split")
    for extra in recipe.data.extra_train_splits:
        train_rows += load_split(recipe.data.source, extra)
    dataset = EncodedDataset(_encode(formatter, train_rows, "training"))
    resume = _resume_checkpoint(recipe, run_dir)
    _fresh_logs(run_dir, resume is not None, "train_log.jsonl")
    from transformers import Trainer

    trainer = Trainer(
        model=model,
        args=_training_args(recipe, run_dir),
        train_dataset=dataset,
        data_collator=QACollator(tokenizer.pad_token_id),
        callbacks=[JsonlLogCallback(run_dir / "train_log.jsonl"), *extra_callbacks],
    )
    return _train_and_save(trainer, recipe, tokenizer, run_dir, resume, {
        "name": recipe.name or "finetune",
        "kind": "finetune",
        "seed": recipe.seed,
        "train_split": recipe.data.train_split,
        "n_train": len(dataset),
    })


def make_reference_model(model):
    """A frozen copy of the model before unlearning (pi_ref)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def run_unlearn(cfg: Recipe | DictConfig | dict, extra_callbacks=()) -> Path:
    """Unlearning with a forget objective under a weighting plus a retain loss."""
    recipe = as_recipe(cfg)
    objective = get_objective(recipe.objective.name)
    objective_args = dict(recipe.objective.args)
    objective.check_args(objective_args)
    retain_loss = get_retain_loss(recipe.objective.retain_loss)
    # Validate names and arguments before loading a (possibly large) model.
    muse = _benchmark(recipe.data.benchmark) == "muse"
    if muse:
        muse_texts = _muse_texts(recipe, objective)
        make_weighting(recipe.weighting.name, n_samples=1, **recipe.weighting.args)  # rebuilt for the chunks
    else:
        forget_rows = _rows(recipe.data, "forget_split")
        weighting = make_weighting(recipe.weighting.name, n_samples=len(forget_rows), **recipe.weighting.args)
        retain_rows = _rows(recipe.data, "retain_split")
        refusals = None
        if objective.needs_refusal:
            refusals = load_refusals(recipe.data.source, recipe.data.refusal_file)
    eval_kwargs = _eval_kwargs(recipe) if recipe.eval.at_end or recipe.eval.every_n_steps > 0 else None

    run_dir = _prepare_run_dir(recipe)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    formatter = build_formatter(recipe.format, recipe.data, tokenizer)
    refusal_enc = None
    if muse:  # raw-text chunks; their indices are the forget sample ids
        forget_enc, retain_enc = _muse_chunks(recipe, muse_texts, tokenizer, model)
        weighting = make_weighting(recipe.weighting.name, n_samples=len(forget_enc), **recipe.weighting.args)
    else:
        forget_enc = _encode(formatter, forget_rows, "forget")
        retain_enc = _encode(formatter, retain_rows, "retain")
        if refusals is not None:
            picks = [refusals[(recipe.seed + i) % len(refusals)] for i in range(len(forget_rows))]
            refusal_enc = formatter.encode_many([r["question"] for r in forget_rows], picks, "refusal")

    needs_ref = objective.needs_reference or retain_loss.needs_reference
    # With LoRA the reference is the same model with its adapter disabled: no copy.
    ref_model = make_reference_model(model) if needs_ref and not recipe.model.lora else None

    resume = _resume_checkpoint(recipe, run_dir)
    if resume:
        WeightingStateCallback.restore(weighting, resume)
    _fresh_logs(run_dir, resume is not None, "train_log.jsonl", "forget_losses.jsonl", "balance.jsonl")

    callbacks = [JsonlLogCallback(run_dir / "train_log.jsonl")]
    if weighting.stateful:
        callbacks.append(WeightingStateCallback(weighting))
    if recipe.balance.every_n_steps > 0:
        from baldro.balance import BalanceTracker
        from baldro.eval.engine import score_sequences

        pad, bs = tokenizer.pad_token_id, recipe.balance.batch_size

        def forget_nll(m):
            scores = score_sequences(m, forget_enc, bs, pad, want=(), desc="balance", progress=False)
            return list(range(len(forget_enc))), [s.avg_loss for s in scores]

        callbacks.append(BalanceTracker(forget_nll, run_dir / "balance.jsonl", every_n_steps=recipe.balance.every_n_steps))
    if recipe.eval.every_n_steps > 0:
        from baldro.eval.run import PeriodicEvalCallback

        callbacks.append(PeriodicEvalCallback(tokenizer, formatter, run_dir, recipe.eval.every_n_steps, eval_kwargs))
    callbacks.extend(extra_callbacks)

    trainer = UnlearnTrainer(
        model=model,
        args=_training_args(recipe, run_dir),
        train_dataset=UnlearnDataset(forget_enc, retain_enc, refusal_enc, seed=recipe.seed),
        data_collator=UnlearnCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
        objective=objective,
        objective_args=objective_args,
        weighting=weighting,
        retain_loss=retain_loss,
        gamma=recipe.objective.gamma,
        alpha=recipe.objective.alpha,
        ref_model=ref_model,
        forget_log_path=run_dir / "forget_losses.jsonl",
    )
    _train_and_save(trainer, recipe, tokenizer, run_dir, resume, {
        "name": recipe.name or f"{objective.name}_{recipe.weighting.name}",
        "kind": "unlearn",
        "seed": recipe.seed,
        "objective": objective.name,
        "objective_args": {**objective.defaults, **objective_args},
        "weighting": recipe.weighting.name,
        "weighting_args": dict(recipe.weighting.args),
        "retain_loss": retain_loss.name,
        "forget_split": recipe.data.forget_split,
        "n_forget": len(forget_enc),
        **({"benchmark": "muse", "chunk_length": recipe.data.chunk_length} if muse else {}),
    })
    if recipe.eval.at_end and trainer.is_world_process_zero():
        from baldro.eval.run import evaluate_final_model

        evaluate_final_model(trainer.model, tokenizer, formatter, run_dir, eval_kwargs, recipe.eval.target_logs_path)
    return run_dir


# ----------------------------------------------------------------------------- MUSE (raw text)
BENCHMARKS = ("tofu", "muse")


def _benchmark(name: str, key: str = "data.benchmark") -> str:
    if name not in BENCHMARKS:
        raise BaldroError(f"unknown {key} {name!r}: use one of {', '.join(BENCHMARKS)}")
    return name


def _muse_texts(recipe: Recipe, objective) -> tuple[str, str | None]:
    """The raw forget corpus and the raw retain corpus (None without a retain loss, alpha = 0)."""
    from baldro.data.muse import load_unlearn_texts

    if objective.needs_refusal:
        raise BaldroError(f"objective {objective.name!r} needs questions to refuse, but MUSE unlearns raw text: "
                          "use ga, graddiff, npo, simnpo, wga or satimp")
    return load_unlearn_texts(recipe.data.source, recipe.data.forget_split, recipe.data.retain_split,
                              need_retain=recipe.objective.alpha != 0)


def _muse_chunks(recipe: Recipe, texts: tuple[str, str | None], tokenizer, model):
    """The forget and retain corpora cut into `data.chunk_length`-token chunks (`data.limit`: the first N)."""
    from baldro.data.muse import chunk_tokens, model_context

    d, context = recipe.data, model_context(model)
    forget = chunk_tokens(tokenizer, texts[0], d.chunk_length, d.limit, context, what=f"forget ({d.forget_split})")
    retain = None
    if texts[1] is not None:
        retain = chunk_tokens(tokenizer, texts[1], d.chunk_length, d.limit, context, what=f"retain ({d.retain_split})")
    log.info("MUSE: %d forget and %s retain chunks of up to %d tokens", len(forget),
             len(retain) if retain is not None else "no", d.chunk_length)
    return forget, retain


# ----------------------------------------------------------------------------- evaluation
def _eval_kwargs(recipe: Recipe) -> dict:
    """The recipe's `eval` and `data` sections as `evaluate_tofu` / `evaluate_muse` keyword arguments
    (the MUSE ones with "benchmark": "muse", which `baldro.eval.run` dispatches on)."""
    ev: EvalConfig = recipe.eval
    if _benchmark(ev.benchmark, "eval.benchmark") != _benchmark(recipe.data.benchmark):
        raise BaldroError(f"eval.benchmark is {ev.benchmark} but data.benchmark is {recipe.data.benchmark}: set both "
                          f"to the benchmark of data.source (the configs/*/muse.yaml recipes set muse)")
    if ev.benchmark == "muse":
        return {
            "benchmark": "muse",
            "data_source": recipe.data.source,
            "retain_logs_path": ev.retain_logs_path,
            "batch_size": ev.batch_size,
            "verbmem_max_new_tokens": ev.verbmem_max_new_tokens,
            "knowmem_max_new_tokens": ev.knowmem_max_new_tokens,
            "max_length": recipe.data.chunk_length,
            "limit": ev.limit,
        }
    return {
        "data_source": recipe.data.source,
        "forget_split": recipe.data.forget_split or "forget10",
        "retain_logs_path": ev.retain_logs_path,
        "batch_size": ev.batch_size,
        "max_new_tokens": ev.max_new_tokens,
        "limit": ev.limit,
    }


def run_eval(cfg: Recipe | DictConfig | dict) -> Path:
    """Evaluate `model.path` on TOFU or MUSE (`eval.benchmark`); writes TOFU_EVAL.json /
    TOFU_SUMMARY.json or MUSE_EVAL.json / MUSE_SUMMARY.json to `output_dir`."""
    from baldro.eval.run import evaluate_into

    recipe = as_recipe(cfg)
    if not recipe.output_dir:
        raise BaldroError("output_dir is not set: give output_dir=PATH")
    kwargs = _eval_kwargs(recipe)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    out = Path(recipe.output_dir)
    write_text_atomic(out / "config.yaml", dump_config(recipe))
    return evaluate_into(model, tokenizer, build_formatter(recipe.format, recipe.data, tokenizer), out, kwargs,
                         recipe.eval.target_logs_path, model_path=recipe.model.path)

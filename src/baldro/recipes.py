"""Runnable recipes: `finetune` and `unlearn` from a resolved config (the CLI's `baldro finetune|unlearn`).

Every run writes into its own folder: `config.yaml` (resolved), `train_log.jsonl` (per step),
`forget_losses.jsonl` (per-sample forget losses with sample ids), `run_info.json`, and the final model
in `model/` (safetensors); checkpoints for resuming go to `checkpoints/`.

Before any weights load, the recipe is validated (`baldro.schema.validate`), the data files are read,
and the run folder is claimed: a lock keeps a second run out; a non-empty folder is refused unless the
run resumes it (`resume=true`) or replaces it (`overwrite=true`); a resume picks the newest complete
checkpoint, refuses a recipe that trains something else (`resume.force=true` overrides), and cuts the
logs back to the checkpoint's step, so that the resumed run writes what an uninterrupted one writes.
A non-finite loss or gradient marks the run failed in `run_info.json` and keeps its checkpoints.

Several processes (`accelerate launch`): the main process claims the folder and the others wait for
it; a launch whose processes do not form one run is refused; the final model is gathered by every
process (FSDP, ZeRO-3) and saved once; logs are written once (by the main process, from every
process's samples); a stateful weighting's state is checked to be one state and saved as
`weighting_state.pt`; the final evaluation runs once, in the main process (on the saved model when
the trained one is sharded).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import yaml
from omegaconf import DictConfig

from baldro.config import as_recipe, dump_config
from baldro.data.formatting import QAFormatter
from baldro.data.tofu import load_refusals, load_split
from baldro.distributed import (
    barrier,
    check_launched_world,
    full_state_dict,
    is_sharded,
    loads_sharded,
    shards_weights,
    zero_stage,
)
from baldro.errors import BaldroError
from baldro.eval.trajectory import BEST_DIR, EVALS_DIR, TRAJECTORY_FILE, truncate_outputs
from baldro.alternates import ALTERNATES_FILE, generate_alternates, read_alternates, save_alternates
from baldro.io import RunLock, truncate_jsonl, write_json_atomic, write_text_atomic
from baldro.models import load_model, load_tokenizer, resolve_device, save_model, set_flush_denormal
from baldro.objectives import PrimalDual, get_objective, get_retain_loss, set_trainable
from baldro.progress import train_progress_callback
from baldro.schema import (
    DataConfig,
    EvalConfig,
    FormatConfig,
    ModelConfig,
    Recipe,
    strategy,
    validate,
    validate_model,
    weighting_args,
)
from baldro.trainer import (
    CHECKPOINT_MARKER,
    OBJECTIVE_STATE_FILE,
    STAGING,
    WEIGHTING_STATE_FILE,
    EncodedDataset,
    FinetuneTrainer,
    JsonlLogCallback,
    NonFiniteError,
    QACollator,
    UnlearnCollator,
    UnlearnDataset,
    UnlearnTrainer,
    checkpoint_step,
    complete_checkpoints,
    is_complete_checkpoint,
)
from baldro.weighting import make_weighting

log = logging.getLogger(__name__)

# TrainingArguments that the trainers need as they are (the data collators build their own batches).
FIXED_TRAIN_ARGS = {"remove_unused_columns": False, "dataloader_drop_last": False}
# TrainConfig fields with transformers' names that baldro handles itself (`baldro.eval.trajectory`): the
# Trainer's own evaluation loop needs an eval dataset and would keep whole checkpoints for the best model.
BALDRO_TRAIN_KEYS = ("eval_strategy", "eval_steps", "metric_for_best_model", "greater_is_better",
                     "load_best_model_at_end", "early_stopping_patience")


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


def load_model_and_tokenizer(m: ModelConfig, device: str | None = None, seed: int = 0):
    if not m.path:
        raise BaldroError("model.path is not set: give a hub id or a local folder (model.path=...)")
    set_flush_denormal(m.flush_denormal)
    model = load_model(
        m.path,
        dtype=m.dtype,
        device=device if device is not None else m.device,
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
        lora=m.lora,
        gradient_checkpointing=m.gradient_checkpointing,
        seed=seed,
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


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.current_accelerator(check_available=True) is not None


def _training_args(recipe: Recipe, run_dir: Path):
    from transformers import TrainingArguments

    train = dataclasses.asdict(recipe.train)
    for key in BALDRO_TRAIN_KEYS:  # baldro evaluates during training itself (EvalDuringTraining), not the Trainer
        train.pop(key)
    extra = train.pop("extra")
    valid = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in extra:
        if key in BALDRO_TRAIN_KEYS:
            raise BaldroError(f"train.extra.{key}: baldro evaluates during training itself: set train.{key} instead")
        if key in ("eval_on_start", "eval_delay"):
            raise BaldroError(f"train.extra.{key} is not used: baldro evaluates at step 0 and at every "
                              "train.eval_strategy point: remove it")
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            raise BaldroError(f"train.extra.{key} is not a transformers TrainingArguments field"
                              + (f": did you mean {close[0]}?" if close else ""))
    args = {**train, **extra, **FIXED_TRAIN_ARGS, "seed": recipe.seed}
    if "dataloader_pin_memory" not in extra:  # pinned memory only helps a copy to an accelerator (torch warns otherwise)
        args["dataloader_pin_memory"] = _has_accelerator() and not recipe.train.use_cpu
    # YAML 1.1 reads `save_strategy: no` as false (and the schema's str field then as "False").
    args = {k: ("no" if k.endswith("_strategy") and str(v).lower() == "false" else v) for k, v in args.items()}
    try:
        return TrainingArguments(output_dir=str(run_dir / "checkpoints"), **args)
    except (TypeError, ValueError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        named = [f"train.{k}" if k in train else f"train.extra.{k}" for k, v in {**train, **extra}.items()
                 if isinstance(v, str) and len(v) > 1 and v in message]
        raise BaldroError(f"bad train settings{' (' + ', '.join(named) + ')' if named else ''}: {message}") from None


# ----------------------------------------------------------------------------- run folders
RUN_OUTPUTS = ("config.yaml", "run_info.json", "train_log.jsonl", "forget_losses.jsonl", "balance.jsonl", "model",
               "checkpoints", "eval", TRAJECTORY_FILE, EVALS_DIR, BEST_DIR, WEIGHTING_STATE_FILE,
               OBJECTIVE_STATE_FILE, ALTERNATES_FILE,
               "attack")  # baldro attack's default folder: the attacks of the model a new run replaces
# Recipe keys that do not change what a run trains: a resume may change them.
RESUME_FREE_KEYS = (
    "name", "output_dir", "resume", "overwrite", "log_to_console", "log_format", "eval", "balance",
    "model.base", "model.tofu_target", "model.device", "model.attn_implementation", "model.merge_lora",
    "model.gradient_checkpointing", "train.num_train_epochs", "train.max_steps", "train.logging_steps",
    "train.save_strategy", "train.save_steps", "train.save_total_limit", "train.disable_tqdm", "train.report_to",
    "train.dataloader_num_workers", "train.use_cpu",
    # evaluation during training: what is evaluated, and when a run stops early or which model it saves
    "train.eval_strategy", "train.eval_steps", "train.metric_for_best_model", "train.greater_is_better",
    "train.load_best_model_at_end", "train.early_stopping_patience",
)
_UNSET = object()


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _recipe_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_differences(saved: dict, current: dict, free_keys=RESUME_FREE_KEYS) -> list[str]:
    """`key (old -> new)` for every recipe key that changes what a run trains (not in `free_keys`)."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in free_keys):
            continue
        old, new = a.get(key, _UNSET), b.get(key, _UNSET)
        if old != new:
            show = lambda v: "unset" if v is _UNSET else repr(v)  # noqa: E731
            diffs.append(f"{key} ({show(old)} -> {show(new)})")
    return diffs


def _saved_recipe(checkpoint: Path | None, run_dir: Path) -> tuple[dict | None, str]:
    """The recipe that wrote a checkpoint (its marker), else the run folder's config.yaml."""
    if checkpoint is not None and (checkpoint / CHECKPOINT_MARKER).is_file():
        try:
            recipe = json.loads((checkpoint / CHECKPOINT_MARKER).read_text(encoding="utf-8")).get("recipe")
        except (OSError, ValueError):
            recipe = None
        if isinstance(recipe, dict):
            return recipe, str(checkpoint)
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            recipe = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            recipe = None
        if isinstance(recipe, dict):
            return recipe, str(config)
    return None, ""


def _resume_checkpoint(recipe: Recipe, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: `resume=PATH`, or with `resume=true` the newest complete one."""
    r = recipe.resume
    if r.checkpoint:
        ckpt = Path(r.checkpoint).expanduser()
        if not is_complete_checkpoint(ckpt):
            raise BaldroError(f"resume={r.checkpoint}: the checkpoint is incomplete (stopped while it was saved?): "
                              "pass resume=true to use the newest complete one")
        return ckpt
    if not r.enabled:
        return None
    root = run_dir / "checkpoints"
    complete = complete_checkpoints(root)
    skipped = sorted(p.name for p in root.glob("checkpoint-*") if p.is_dir() and p not in complete)
    skipped += [f"{STAGING}/{p.name}" for p in (root / STAGING).glob("checkpoint-*")]
    if skipped:
        log.warning("resume: skipping incomplete checkpoint(s) %s in %s", ", ".join(skipped), root)
    if not complete:
        log.warning("resume=true but no complete checkpoint in %s: starting from scratch", root)
        return None
    return complete[-1]


def _remove_outputs(run_dir: Path, outputs=RUN_OUTPUTS) -> None:
    """Delete what a run writes (not other files a user keeps in the folder)."""
    for name in outputs:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _truncate_logs(run_dir: Path, step: int) -> None:
    """Cut the logs back to a checkpoint's step: the resumed run writes the later rows again."""
    dropped = truncate_jsonl(run_dir / "train_log.jsonl", lambda r: r.get("step", 0) <= step)
    dropped += truncate_jsonl(run_dir / "forget_losses.jsonl", lambda r: r.get("step", 0) <= step)
    # BalanceTracker records the resumed step itself when it is one of its steps
    dropped += truncate_jsonl(run_dir / "balance.jsonl", lambda r: r.get("step", 0) < step)
    # the evaluation at a checkpoint's step ran before the checkpoint was saved: it stays
    dropped += truncate_outputs(run_dir, step)
    if dropped:
        log.info("resume: dropped %d log row(s) written after step %d", dropped, step)


def _claim_run_dir(recipe: Recipe, run_dir: Path, outputs=RUN_OUTPUTS, free_keys=RESUME_FREE_KEYS,
                   checkpoints: bool = True) -> str | None:
    """Check the folder against the recipe (main process, under the run lock); returns the checkpoint
    to resume from. A non-empty folder is refused unless it holds this run and the recipe resumes it,
    or the recipe says overwrite=true (which deletes `outputs`). A resume must not change a key outside
    `free_keys`. Without `checkpoints` (attacks) a resume keeps the folder as it is."""
    checkpoint = _resume_checkpoint(recipe, run_dir) if checkpoints else None
    resuming = recipe.resume.enabled or bool(recipe.resume.checkpoint)
    holds_run = (run_dir / "config.yaml").is_file()
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != RunLock.NAME) if run_dir.is_dir() else []
    if entries and not recipe.overwrite:
        if not resuming and holds_run:
            raise BaldroError(f"output_dir {run_dir} already holds a run: pass resume=true to continue it, "
                              "overwrite=true to replace it, or choose another output_dir")
        if not holds_run:
            raise BaldroError(f"output_dir {run_dir} is not empty ({len(entries)} entries, e.g. {entries[0]}) and holds no "
                              "baldro run: choose a new or empty folder, or pass overwrite=true")
    if recipe.overwrite:
        _remove_outputs(run_dir, outputs)
    elif resuming:
        saved, source = _saved_recipe(checkpoint, run_dir)
        if saved is not None and not recipe.resume.force:
            diffs = training_differences(saved, _recipe_dict(recipe), free_keys)
            if diffs:
                more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
                raise BaldroError(f"resume: the recipe differs from the one in {source} in what it trains: "
                                  f"{', '.join(diffs[:6])}{more}: resume with the same recipe, or pass "
                                  "resume.force=true to continue anyway")
    if resuming and not recipe.overwrite and checkpoints:
        shutil.rmtree(run_dir / "checkpoints" / STAGING, ignore_errors=True)
        if checkpoint is not None:
            step = checkpoint_step(checkpoint) or 0
            _truncate_logs(run_dir, step)
            log.info("resuming from %s (step %d)", checkpoint, step)
        else:
            _remove_outputs(run_dir)  # nothing to resume: start this run afresh
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_config(recipe))
    return str(checkpoint) if checkpoint is not None else None


@contextlib.contextmanager
def _run_folder(recipe: Recipe, kind: str, **claim):
    """Lock and claim the run folder (`claim`: `_claim_run_dir`'s options); yields (run_dir, checkpoint
    to resume from or None)."""
    run_dir = Path(recipe.output_dir).expanduser()
    if not _is_main_process():  # the main process claims the folder; the others follow it once it has
        barrier()
        checkpoint = _resume_checkpoint(recipe, run_dir)
        yield run_dir, str(checkpoint) if checkpoint is not None else None
        return
    with RunLock(run_dir, kind):
        checkpoint = _claim_run_dir(recipe, run_dir, **claim)
        barrier()
        yield run_dir, checkpoint


def _console_callbacks(trainer, recipe: Recipe) -> None:
    """The Trainer's bar and per-step dicts give way to baldro's progress policy (`progress.py`): a bar on
    a terminal, log lines elsewhere; each logging step's metrics as one line (`log_format`) unless
    `log_to_console: false`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(train_progress_callback(show_metrics=recipe.log_to_console, fmt=recipe.log_format))


def _train_and_save(trainer, recipe: Recipe, tokenizer, run_dir: Path, resume: str | None, info: dict,
                    more_info=None) -> Path:
    """Train (or resume), then save the final model and `run_info.json` from the main process (with
    `more_info()`, what is known after training). A non-finite loss or gradient marks the run failed (its
    checkpoints stay) and is a `BaldroError`."""
    _console_callbacks(trainer, recipe)
    trainer.checkpoint_info = {"recipe": _recipe_dict(recipe)}
    start = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteError as e:
        ckpts = complete_checkpoints(run_dir / "checkpoints")
        last = str(ckpts[-1]) if ckpts else None
        if trainer.is_world_process_zero():
            write_json_atomic(run_dir / "run_info.json", {
                **info, "status": "failed", "error": str(e), "failed_step": e.step, "last_checkpoint": last,
                "train_time_s": time.time() - start})
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (train.save_strategy=no)"
        raise BaldroError(f"{e}: the run stopped and is marked failed in {run_dir / 'run_info.json'}; {kept}; lower "
                          "train.learning_rate or use model.dtype=float32") from None
    elapsed = time.time() - start
    if more_info is not None:
        info = {**info, **more_info()}
        elapsed -= info.get("trajectory_eval_time_s", 0.0)  # train_time_s: the training alone
    # A sharded model (FSDP, ZeRO-3) is gathered by every process; the main process saves it once.
    state = full_state_dict(trainer.model_wrapped, trainer.accelerator)
    if trainer.is_world_process_zero():
        save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, run_dir / "model",
                   merge_lora=recipe.model.merge_lora, state_dict=state)
    del state
    if hasattr(trainer, "save_weighting_state"):
        trainer.save_weighting_state(run_dir / WEIGHTING_STATE_FILE)
    objective_state = trainer.objective_state() if hasattr(trainer, "objective_state") else {}
    if objective_state and trainer.is_world_process_zero():
        import torch

        tmp = run_dir / f".{OBJECTIVE_STATE_FILE}.tmp"
        torch.save(objective_state, tmp)
        os.replace(tmp, run_dir / OBJECTIVE_STATE_FILE)
        if "primal_dual" in objective_state:
            info = {**info, "dual_lambda_final": objective_state["primal_dual"]["lambda"]}
    if trainer.is_world_process_zero():
        write_json_atomic(run_dir / "run_info.json", {**info, "train_time_s": elapsed, "status": "done",
                                                      **({"processes": trainer.args.world_size}
                                                         if trainer.args.world_size > 1 else {})})
    barrier()
    return run_dir


def run_finetune(cfg: Recipe | DictConfig | dict, extra_callbacks=()) -> Path:
    """Supervised fine-tuning on QA pairs with answer-only loss (target: `full`, retain: `retainYY`)."""
    recipe = as_recipe(cfg)
    validate(recipe, "finetune")
    train_rows = _rows(recipe.data, "train_split")
    for extra in recipe.data.extra_train_splits:
        train_rows += load_split(recipe.data.source, extra)
    validate_model(recipe.model, recipe.train)
    args = _training_args(recipe, Path(recipe.output_dir).expanduser())
    _check_processes(recipe, args)
    with _run_folder(recipe, "finetune") as (run_dir, resume):
        model, tokenizer = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
        formatter = build_formatter(recipe.format, recipe.data, tokenizer)
        dataset = EncodedDataset(_encode(formatter, train_rows, "training"))
        trainer = FinetuneTrainer(
            model=model,
            args=args,
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


def _reference_model(recipe: Recipe, model, args):
    """pi_ref: a copy of the model, or (DeepSpeed ZeRO-3, FSDP with cpu_ram_efficient_loading, where this
    process holds only part of the weights) the same weights loaded again, partitioned the same way."""
    if not loads_sharded(args):
        return make_reference_model(model)
    m = recipe.model
    ref = load_model(m.path, dtype=m.dtype, device=m.device, attn_implementation=m.attn_implementation,
                     trust_remote_code=m.trust_remote_code, seed=recipe.seed)
    return ref.eval().requires_grad_(False)


def _check_processes(recipe: Recipe, args) -> None:
    """What a launch of several processes cannot do, refused on every process before training."""
    check_launched_world(args)
    how = strategy(recipe.train.eval_strategy)
    if how != "no" and args.world_size > 1 and shards_weights(args):
        raise BaldroError(f"train.eval_strategy={how} evaluates the model in memory on the main process, and under "
                          "FSDP or DeepSpeed ZeRO-3 each process holds only a shard of its weights: use DDP or "
                          "ZeRO-1/2 (configs/accelerate/ddp.yaml, zero2.yaml), or save checkpoints "
                          "(train.save_strategy=epoch) and evaluate them afterwards with baldro eval")


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
    settings = {**_eval_kwargs(recipe), "limit": min(limits) if limits else None}
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
    from baldro.eval.trajectory import UTILITY_KEY, BestRule, EvalDuringTraining, lower_is_better

    t, ev = recipe.train, recipe.eval
    settings = trajectory_settings(recipe)
    rule = None
    if t.metric_for_best_model:
        greater = (t.greater_is_better if t.greater_is_better is not None
                   else not lower_is_better(t.metric_for_best_model))
        rule = BestRule(t.metric_for_best_model, greater, UTILITY_KEY[ev.benchmark], ev.utility_floor)
    return EvalDuringTraining(
        lambda model, out, quiet: evaluate_during_training(model, tokenizer, formatter, out, settings, quiet),
        run_dir, strategy(t.eval_strategy), t.eval_steps, ev.benchmark, rule=rule,
        patience=t.early_stopping_patience, load_best=t.load_best_model_at_end)


def run_unlearn(cfg: Recipe | DictConfig | dict, extra_callbacks=()) -> Path:
    """Unlearning with a forget objective under a weighting plus a retain loss."""
    recipe = as_recipe(cfg)
    validate(recipe, "unlearn")  # names, arguments and ranges, before a (possibly large) model loads
    objective = get_objective(recipe.objective.name)
    objective_args = dict(recipe.objective.args)
    retain_loss = get_retain_loss(recipe.objective.retain_loss)
    benchmark = _benchmark(recipe.data.benchmark)
    raw = benchmark in RAW_TEXT  # MUSE, WMDP: raw-text chunks, not QA pairs
    refusals = None
    if raw:
        raw_texts = _raw_texts(recipe, objective)
        make_weighting(recipe.weighting.name, n_samples=1, **weighting_args(recipe))  # rebuilt for the chunks
    else:
        forget_rows = _rows(recipe.data, "forget_split")
        weighting = make_weighting(recipe.weighting.name, n_samples=len(forget_rows), **weighting_args(recipe))
        retain_rows = _rows(recipe.data, "retain_split")
        if objective.needs_refusal:
            refusals = load_refusals(recipe.data.source, recipe.data.refusal_file)
    during = strategy(recipe.train.eval_strategy) != "no"
    eval_kwargs = _eval_kwargs(recipe) if recipe.eval.at_end or during else None
    validate_model(recipe.model, recipe.train)
    args = _training_args(recipe, Path(recipe.output_dir).expanduser())
    _check_processes(recipe, args)
    if not raw:
        _check_eval_steps(recipe, len(forget_rows), args.world_size)

    with _run_folder(recipe, "unlearn") as (run_dir, resume):
        model, tokenizer = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
        formatter = build_formatter(recipe.format, recipe.data, tokenizer)
        refusal_enc = None
        if raw:  # raw-text chunks; their indices are the forget sample ids
            forget_enc, retain_enc = _raw_chunks(recipe, raw_texts, tokenizer, model)
            weighting = make_weighting(recipe.weighting.name, n_samples=len(forget_enc), **weighting_args(recipe))
        else:
            forget_enc = _encode(formatter, forget_rows, "forget")
            retain_enc = _encode(formatter, retain_rows, "retain")
        if refusals is not None:
            picks = [refusals[(recipe.seed + i) % len(refusals)] for i in range(len(forget_rows))]
            refusal_enc = formatter.encode_many([r["question"] for r in forget_rows], picks, "refusal")
        alternate_enc = None
        if objective.needs.alternate:
            texts = _alternates(recipe, model, tokenizer, formatter, forget_rows, run_dir)
            flat = formatter.encode_many([r["question"] for r, alts in zip(forget_rows, texts) for _ in alts],
                                         [a for alts in texts for a in alts], "alternate")
            k = len(texts[0])
            alternate_enc = [flat[i * k:(i + 1) * k] for i in range(len(forget_rows))]
        n_trainable = set_trainable(model, recipe.objective.trainable_params_regex)

        needs_ref = objective.needs_reference or retain_loss.needs_reference
        # With LoRA the reference is the same model with its adapter disabled: no copy.
        ref_model = _reference_model(recipe, model, args) if needs_ref and not recipe.model.lora else None

        callbacks = [JsonlLogCallback(run_dir / "train_log.jsonl")]
        if recipe.balance.every_n_steps > 0:
            from baldro.balance import BalanceTracker
            from baldro.eval.engine import score_sequences

            pad, bs = tokenizer.pad_token_id, recipe.balance.batch_size

            def forget_nll(m):
                scores = score_sequences(m, forget_enc, bs, pad, want=(), desc="balance", progress=False)
                return list(range(len(forget_enc))), [s.avg_loss for s in scores]

            callbacks.append(BalanceTracker(forget_nll, run_dir / "balance.jsonl",
                                            every_n_steps=recipe.balance.every_n_steps))
        trajectory = _trajectory_callback(recipe, tokenizer, formatter, run_dir) if during else None
        if trajectory is not None:
            callbacks.append(trajectory)
        callbacks.extend(extra_callbacks)

        trainer = UnlearnTrainer(
            model=model,
            args=args,
            train_dataset=UnlearnDataset(forget_enc, retain_enc, refusal_enc, seed=recipe.seed, alternates=alternate_enc),
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
        _train_and_save(trainer, recipe, tokenizer, run_dir, resume, {
            "name": recipe.name or f"{objective.name}_{recipe.weighting.name}",
            "kind": "unlearn",
            "seed": recipe.seed,
            "objective": objective.name,
            "objective_args": {**objective.defaults, **objective_args},
            "weighting": recipe.weighting.name,
            "weighting_args": weighting_args(recipe),
            "retain_loss": retain_loss.name,
            **({"module": trainer.module_name} if trainer.module_name else {}),
            **({"trainable_parameter_tensors": n_trainable}
               if recipe.objective.trainable_params_regex is not None else {}),
            "forget_split": recipe.data.forget_split,
            "n_forget": len(forget_enc),
            **({"benchmark": benchmark, "chunk_length": recipe.data.chunk_length} if raw else {}),
        }, more_info=trajectory.info if trajectory is not None else None)
        if recipe.eval.at_end and trainer.is_world_process_zero():  # once, in the main process
            from baldro.eval.run import evaluate_final_model

            final = trainer.model
            if is_sharded(trainer.model_wrapped) or zero_stage(trainer.accelerator) == 3:
                # this process holds part of the weights: evaluate the saved model, on its own GPU
                device = recipe.model.device if recipe.model.device not in (None, "auto", "accelerate") else None
                final = load_model(str(run_dir / "model"), dtype=recipe.model.dtype, device=str(resolve_device(device)),
                                   attn_implementation=recipe.model.attn_implementation,
                                   trust_remote_code=recipe.model.trust_remote_code)
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
    settings = {"n": a.n, "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "seed": recipe.seed,
                "model": str(recipe.model.path), "forget_split": recipe.data.forget_split}
    path = run_dir / ALTERNATES_FILE
    if _is_main_process() and not path.exists():
        start = time.time()
        texts = generate_alternates(model, tokenizer, formatter, rows, a.n, a.max_new_tokens, a.temperature,
                                    a.batch_size, recipe.seed)
        save_alternates(path, rows, texts, settings)
        log.info("alternates: %d x %d written to %s in %.0f s", len(rows), a.n, path, time.time() - start)
    barrier()
    return read_alternates(path, rows, settings)


# ----------------------------------------------------------------------------- MUSE (raw text)
BENCHMARKS = ("tofu", "muse", "wmdp")  # data.benchmark
RAW_TEXT = ("muse", "wmdp")  # unlearned as raw-text chunks


def _benchmark(name: str, key: str = "data.benchmark") -> str:
    if name not in BENCHMARKS:
        raise BaldroError(f"unknown {key} {name!r}: use one of {', '.join(BENCHMARKS)}")
    return name


def _raw_texts(recipe: Recipe, objective) -> tuple[str, str | None]:
    """The raw forget corpus and the raw retain corpus (None without a retain loss, alpha = 0): MUSE's
    raw/ splits or the WMDP corpora."""
    if recipe.data.benchmark == "wmdp":
        from baldro.data.wmdp import load_unlearn_texts
    else:
        from baldro.data.muse import load_unlearn_texts

    if objective.needs.preferred:
        raise BaldroError(f"objective {objective.name!r} needs questions to answer otherwise, but "
                          f"{recipe.data.benchmark.upper()} unlearns raw text: use ga, graddiff, npo, simnpo, wga, "
                          "satimp, rmu, undial, ceu or pdu")
    return load_unlearn_texts(recipe.data.source, recipe.data.forget_split, recipe.data.retain_split,
                              need_retain=recipe.objective.alpha != 0)


def _raw_chunks(recipe: Recipe, texts: tuple[str, str | None], tokenizer, model):
    """The forget and retain corpora cut into `data.chunk_length`-token chunks (`data.limit`: the first N)."""
    from baldro.data.muse import chunk_tokens, model_context

    d, context = recipe.data, model_context(model)
    forget = chunk_tokens(tokenizer, texts[0], d.chunk_length, d.limit, context, what=f"forget ({d.forget_split})")
    retain = None
    if texts[1] is not None:
        retain = chunk_tokens(tokenizer, texts[1], d.chunk_length, d.limit, context, what=f"retain ({d.retain_split})")
    log.info("%s: %d forget and %s retain chunks of up to %d tokens", d.benchmark.upper(), len(forget),
             len(retain) if retain is not None else "no", d.chunk_length)
    return forget, retain


# ----------------------------------------------------------------------------- evaluation
DEFAULT_EVAL_BATCH = 16  # eval.batch_size=null
OPENUNLEARNING_EVAL_BATCH = 32  # eval.batch_size=null with eval.compat=openunlearning (OpenUnlearning's TOFU batch)


def _lm_eval_stage(ev: EvalConfig) -> dict:
    """`eval.lm_eval` as `evaluate_lm_eval` keyword arguments (limit and batch size default to eval's)."""
    s = ev.lm_eval
    return {"tasks": list(s.tasks), "num_fewshot": s.num_fewshot, "limit": s.limit if s.limit is not None else ev.limit,
            "include_path": s.include_path, "batch_size": s.batch_size or ev.batch_size or DEFAULT_EVAL_BATCH,
            "apply_chat_template": s.apply_chat_template}


def _eval_kwargs(recipe: Recipe) -> dict:
    """The recipe's `eval` and `data` sections as `evaluate_tofu` / `evaluate_muse` / `evaluate_lm_eval`
    keyword arguments (with "benchmark": "muse" or "lm_eval", which `baldro.eval.run` dispatches on;
    "lm_eval": the extra stage's arguments when eval.lm_eval.tasks are set)."""
    ev: EvalConfig = recipe.eval
    if ev.benchmark not in ("lm_eval", *BENCHMARKS):
        raise BaldroError(f"unknown eval.benchmark {ev.benchmark!r}: use one of tofu, muse, lm_eval")
    if ev.benchmark == "lm_eval":
        return {"benchmark": "lm_eval", "tasks": list(ev.tasks), "num_fewshot": ev.num_fewshot, "limit": ev.limit,
                "include_path": ev.include_path, "batch_size": ev.batch_size or DEFAULT_EVAL_BATCH,
                "apply_chat_template": ev.apply_chat_template}
    if _benchmark(recipe.data.benchmark) == "wmdp":
        raise BaldroError(f"eval.benchmark={ev.benchmark} cannot evaluate the WMDP corpora: WMDP is evaluated with "
                          "lm-eval tasks, eval.benchmark=lm_eval eval.tasks=[wmdp_cyber,mmlu] (configs/unlearn/wmdp.yaml)")
    if ev.benchmark != recipe.data.benchmark:
        raise BaldroError(f"eval.benchmark is {ev.benchmark} but data.benchmark is {recipe.data.benchmark}: set both "
                          f"to the benchmark of data.source (the configs/*/muse.yaml recipes set muse)")
    stage = {"lm_eval": _lm_eval_stage(ev)} if ev.lm_eval.tasks else {}
    if ev.benchmark == "muse":
        return {**stage,
            "benchmark": "muse",
            "data_source": recipe.data.source,
            "retain_logs_path": ev.retain_logs_path,
            "batch_size": ev.batch_size or DEFAULT_EVAL_BATCH,
            "generation_batch_size": ev.generation_batch_size,
            "verbmem_max_new_tokens": ev.verbmem_max_new_tokens,
            "knowmem_max_new_tokens": ev.knowmem_max_new_tokens,
            "max_length": recipe.data.chunk_length,
            "limit": ev.limit,
        }
    return {
        **stage,
        "data_source": recipe.data.source,
        "forget_split": recipe.data.forget_split or "forget10",
        "retain_logs_path": ev.retain_logs_path,
        "batch_size": ev.batch_size or (OPENUNLEARNING_EVAL_BATCH if ev.compat == "openunlearning" else DEFAULT_EVAL_BATCH),
        "generation_batch_size": ev.generation_batch_size,
        "max_new_tokens": ev.max_new_tokens,
        "limit": ev.limit,
        "compat": ev.compat,
    }


def run_eval(cfg: Recipe | DictConfig | dict) -> Path:
    """Evaluate `model.path` on TOFU, MUSE or lm-eval tasks (`eval.benchmark`); writes TOFU_EVAL.json /
    TOFU_SUMMARY.json, MUSE_EVAL.json / MUSE_SUMMARY.json or LMEVAL_EVAL.json / LMEVAL_SUMMARY.json (and
    the lm-eval stage's files beside TOFU's or MUSE's) to `output_dir`."""
    from baldro.eval.run import evaluate_into

    recipe = as_recipe(cfg)
    validate(recipe, "eval")
    kwargs = _eval_kwargs(recipe)
    validate_model(recipe.model)
    out = Path(recipe.output_dir).expanduser()
    training = [n for n in ("train_log.jsonl", "checkpoints", "forget_losses.jsonl") if (out / n).exists()]
    if training:
        raise BaldroError(f"output_dir {out} holds a training run ({training[0]}): evaluate into {out / 'eval'} or "
                          "another folder, so that its config.yaml stays the run's")
    with RunLock(out, "eval"):
        model, tokenizer = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
        write_text_atomic(out / "config.yaml", dump_config(recipe))
        # lm-eval tasks format their own prompts (eval.apply_chat_template): no formatter
        formatter = None if kwargs.get("benchmark") == "lm_eval" else build_formatter(recipe.format, recipe.data, tokenizer)
        return evaluate_into(model, tokenizer, formatter, out, kwargs, recipe.eval.target_logs_path,
                             model_path=recipe.model.path)

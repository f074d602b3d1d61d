"""Runnable recipes: `finetune` and `unlearn` from a resolved config (the CLI's `baldro finetune|unlearn`).

Every run writes into its own folder: `config.yaml` (resolved), `train_log.jsonl` (per step),
`forget_losses.jsonl` (per-sample forget losses with sample ids), `run_info.json`, and the final model
in `model/` (safetensors); checkpoints for resuming go to `checkpoints/`.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from baldro.config import dump_config, to_container
from baldro.data.formatting import QAFormatter
from baldro.data.tofu import load_refusals, load_split
from baldro.errors import BaldroError
from baldro.io import write_json_atomic, write_text_atomic
from baldro.models import load_model, load_tokenizer, save_model
from baldro.objectives import get_objective, get_retain_loss
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

TRAIN_DEFAULTS = {
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-5,
    "num_train_epochs": 1,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "remove_unused_columns": False,
    "dataloader_drop_last": False,
}


def get(cfg, dotted: str, default=None):
    """cfg.a.b with a default when any part is missing or null."""
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def build_formatter(cfg, tokenizer) -> QAFormatter:
    fmt = to_container(get(cfg, "format", {}))
    return QAFormatter(
        tokenizer,
        system_prompt=fmt.get("system_prompt"),
        use_chat_template=fmt.get("use_chat_template"),
        prompt_template=fmt.get("prompt_template") or "Question: {question}\nAnswer: ",
        answer_suffix=fmt.get("answer_suffix") or "",
        max_length=int(get(cfg, "data.max_length", 512)),
    )


def load_model_and_tokenizer(cfg, device: str | None = None):
    m = to_container(get(cfg, "model", {}))
    if not m.get("path"):
        raise BaldroError("model.path is not set: give a hub id or a local folder (model.path=...)")
    model = load_model(
        m["path"],
        dtype=m.get("dtype", "auto"),
        device=device if device is not None else m.get("device"),
        attn_implementation=m.get("attn_implementation"),
        trust_remote_code=m.get("trust_remote_code", False),
        lora=m.get("lora"),
        gradient_checkpointing=m.get("gradient_checkpointing", False),
    )
    tokenizer = load_tokenizer(m.get("tokenizer") or m["path"], m.get("trust_remote_code", False))
    return model, tokenizer


def _rows(cfg, split_key: str, fields=("question", "answer")) -> list[dict]:
    name = get(cfg, f"data.{split_key}")
    if not name:
        raise BaldroError(f"data.{split_key} is not set")
    rows = load_split(get(cfg, "data.source", "locuslab/TOFU"), name, fields)
    limit = get(cfg, "data.limit")
    return rows[: int(limit)] if limit else rows


def _encode(formatter: QAFormatter, rows: list[dict], what: str):
    return formatter.encode_many([r["question"] for r in rows], [r["answer"] for r in rows], what)


def _training_args(cfg, run_dir: Path):
    from transformers import TrainingArguments

    train = {**TRAIN_DEFAULTS, **to_container(get(cfg, "train", {}))}
    # YAML 1.1 reads `save_strategy: no` as False; users mean the strategy "no".
    train = {k: ("no" if k.endswith("_strategy") and v is False else v) for k, v in train.items()}
    train.setdefault("seed", int(get(cfg, "seed", 0)))
    try:
        return TrainingArguments(output_dir=str(run_dir / "checkpoints"), **train)
    except (TypeError, ValueError) as e:
        raise BaldroError(f"bad train settings: {str(e).splitlines()[0]}") from None


def _prepare_run_dir(cfg) -> Path:
    out = get(cfg, "output_dir")
    if not out:
        raise BaldroError("output_dir is not set: give output_dir=PATH")
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    return run_dir


def _resume_checkpoint(cfg, run_dir: Path) -> str | None:
    resume = get(cfg, "resume", False)
    if not resume:
        return None
    if resume is not True and str(resume) != "true":
        return str(resume)
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not ckpts:
        log.warning("resume=true but no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
        return None
    return str(ckpts[-1])


def _console_callbacks(trainer, cfg) -> None:
    """`log_to_console: false` keeps the progress bar but drops the per-step dict printouts."""
    if get(cfg, "log_to_console", True) is False:
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


def _train_and_save(trainer, cfg, tokenizer, run_dir: Path, resume: str | None, info: dict) -> Path:
    """Train (or resume), then save the final model and `run_info.json` from the main process."""
    _console_callbacks(trainer, cfg)
    start = time.time()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.time() - start
    if trainer.is_world_process_zero():
        save_model(trainer.model, tokenizer, run_dir / "model", merge_lora=bool(get(cfg, "model.merge_lora", True)))
        write_json_atomic(run_dir / "run_info.json", {**info, "train_time_s": elapsed, "status": "done"})
    return run_dir


def run_finetune(cfg: DictConfig, extra_callbacks=()) -> Path:
    """Supervised fine-tuning on QA pairs with answer-only loss (target: `full`, retain: `retainYY`)."""
    run_dir = _prepare_run_dir(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg)
    formatter = build_formatter(cfg, tokenizer)
    train_rows = _rows(cfg, "train_split")
    for extra in get(cfg, "data.extra_train_splits", []) or []:
        train_rows += load_split(get(cfg, "data.source"), extra)
    dataset = EncodedDataset(_encode(formatter, train_rows, "training"))
    resume = _resume_checkpoint(cfg, run_dir)
    _fresh_logs(run_dir, resume is not None, "train_log.jsonl")
    from transformers import Trainer

    trainer = Trainer(
        model=model,
        args=_training_args(cfg, run_dir),
        train_dataset=dataset,
        data_collator=QACollator(tokenizer.pad_token_id),
        callbacks=[JsonlLogCallback(run_dir / "train_log.jsonl"), *extra_callbacks],
    )
    return _train_and_save(trainer, cfg, tokenizer, run_dir, resume, {
        "name": get(cfg, "name", "finetune"),
        "kind": "finetune",
        "train_split": get(cfg, "data.train_split"),
        "n_train": len(dataset),
    })


def make_reference_model(model):
    """A frozen copy of the model before unlearning (pi_ref)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def run_unlearn(cfg: DictConfig, extra_callbacks=()) -> Path:
    """Unlearning with a forget objective under a weighting plus a retain loss."""
    objective = get_objective(get(cfg, "objective.name", "npo"))
    objective_args = to_container(get(cfg, "objective.args", {}))
    objective.check_args(objective_args)
    retain_loss = get_retain_loss(get(cfg, "objective.retain_loss", "nll"))
    # Validate names and arguments before loading a (possibly large) model.
    forget_rows = _rows(cfg, "forget_split")
    weighting_name = get(cfg, "weighting.name", "mean")
    weighting = make_weighting(weighting_name, n_samples=len(forget_rows), **to_container(get(cfg, "weighting.args", {})))
    retain_rows = _rows(cfg, "retain_split")
    refusals = None
    if objective.needs_refusal:
        refusals = load_refusals(get(cfg, "data.source"), get(cfg, "data.refusal_file"))

    run_dir = _prepare_run_dir(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg)
    formatter = build_formatter(cfg, tokenizer)
    forget_enc = _encode(formatter, forget_rows, "forget")
    retain_enc = _encode(formatter, retain_rows, "retain")
    refusal_enc = None
    if refusals is not None:
        seed = int(get(cfg, "seed", 0))
        picks = [refusals[(seed + i) % len(refusals)] for i in range(len(forget_rows))]
        refusal_enc = formatter.encode_many([r["question"] for r in forget_rows], picks, "refusal")

    needs_ref = objective.needs_reference or retain_loss.needs_reference
    # With LoRA the reference is the same model with its adapter disabled: no copy.
    ref_model = make_reference_model(model) if needs_ref and not get(cfg, "model.lora") else None

    resume = _resume_checkpoint(cfg, run_dir)
    if resume:
        WeightingStateCallback.restore(weighting, resume)
    _fresh_logs(run_dir, resume is not None, "train_log.jsonl", "forget_losses.jsonl", "balance.jsonl")

    callbacks = [JsonlLogCallback(run_dir / "train_log.jsonl")]
    if weighting.stateful:
        callbacks.append(WeightingStateCallback(weighting))
    every = int(get(cfg, "balance.every_n_steps", 0) or 0)
    if every > 0:
        from baldro.balance import BalanceTracker

        from baldro.eval.engine import score_sequences

        pad, bs = tokenizer.pad_token_id, int(get(cfg, "balance.batch_size", 16))

        def forget_nll(m):
            scores = score_sequences(m, forget_enc, bs, pad, want=(), desc="balance", progress=False)
            return list(range(len(forget_enc))), [s.avg_loss for s in scores]

        callbacks.append(BalanceTracker(forget_nll, run_dir / "balance.jsonl", every_n_steps=every))
    every_eval = int(get(cfg, "eval.every_n_steps", 0) or 0)
    if every_eval > 0:
        from baldro.eval.run import PeriodicEvalCallback, eval_settings

        callbacks.append(PeriodicEvalCallback(tokenizer, formatter, run_dir, every_eval, eval_settings(cfg)))
    callbacks.extend(extra_callbacks)

    trainer = UnlearnTrainer(
        model=model,
        args=_training_args(cfg, run_dir),
        train_dataset=UnlearnDataset(forget_enc, retain_enc, refusal_enc, seed=int(get(cfg, "seed", 0))),
        data_collator=UnlearnCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
        objective=objective,
        objective_args=objective_args,
        weighting=weighting,
        retain_loss=retain_loss,
        gamma=float(get(cfg, "objective.gamma", 1.0)),
        alpha=float(get(cfg, "objective.alpha", 1.0)),
        ref_model=ref_model,
        forget_log_path=run_dir / "forget_losses.jsonl",
    )
    _train_and_save(trainer, cfg, tokenizer, run_dir, resume, {
        "name": get(cfg, "name") or f"{objective.name}_{weighting_name}",
        "kind": "unlearn",
        "objective": objective.name,
        "objective_args": {**objective.defaults, **objective_args},
        "weighting": weighting_name,
        "weighting_args": to_container(get(cfg, "weighting.args", {})),
        "retain_loss": retain_loss.name,
        "forget_split": get(cfg, "data.forget_split"),
        "n_forget": len(forget_enc),
    })
    if get(cfg, "eval.at_end", False) and trainer.is_world_process_zero():
        from baldro.eval.run import evaluate_final_model

        evaluate_final_model(trainer.model, tokenizer, formatter, run_dir, cfg)
    return run_dir

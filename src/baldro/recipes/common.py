"""What every recipe shares: the formatter, the model and tokenizer, the data rows and raw-text corpora, the
Trainer's arguments, the console's progress, and what a launch of several processes cannot do.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path

from baldro.data.formatting import QAFormatter
from baldro.data.tofu import load_split
from baldro.distributed import (
    check_launched_world,
    shards_weights,
)
from baldro.errors import BaldroError
from baldro.models.loading import (
    load_model,
    load_tokenizer,
    set_flush_denormal,
)
from baldro.progress import train_progress_callback
from baldro.recipes.schema import DataConfig, FormatConfig, ModelConfig, Recipe
from baldro.recipes.validation import strategy

log = logging.getLogger(__name__)

# TrainingArguments that the trainers need as they are (the data collators build their own batches).
FIXED_TRAIN_ARGS = {"remove_unused_columns": False, "dataloader_drop_last": False}
# TrainConfig fields with transformers' names that baldro handles itself (`baldro.eval.trajectory`): the
# Trainer's own evaluation loop needs an eval dataset and would keep whole checkpoints for the best model.
BALDRO_TRAIN_KEYS = (
    "eval_strategy",
    "eval_steps",
    "metric_for_best_model",
    "greater_is_better",
    "load_best_model_at_end",
    "early_stopping_patience",
)


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


def read_rows(data: DataConfig, split_key: str, fields=("question", "answer")) -> list[dict]:
    name = getattr(data, split_key)
    if not name:
        raise BaldroError(f"data.{split_key} is not set")
    rows = load_split(data.source, name, fields)
    return rows[: data.limit] if data.limit else rows


def encode_rows(formatter: QAFormatter, rows: list[dict], what: str):
    return formatter.encode_many([r["question"] for r in rows], [r["answer"] for r in rows], what)


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.current_accelerator(check_available=True) is not None


def training_args(recipe: Recipe, run_dir: Path):
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
            raise BaldroError(
                f"train.extra.{key} is not used: baldro evaluates at step 0 and at every "
                "train.eval_strategy point: remove it"
            )
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            raise BaldroError(
                f"train.extra.{key} is not a transformers TrainingArguments field"
                + (f": did you mean {close[0]}?" if close else "")
            )
    args = {**train, **extra, **FIXED_TRAIN_ARGS, "seed": recipe.seed}
    if (
        "dataloader_pin_memory" not in extra
    ):  # pinned memory only helps a copy to an accelerator (torch warns otherwise)
        args["dataloader_pin_memory"] = _has_accelerator() and not recipe.train.use_cpu
    # YAML 1.1 reads `save_strategy: no` as false (and the schema's str field then as "False").
    args = {k: ("no" if k.endswith("_strategy") and str(v).lower() == "false" else v) for k, v in args.items()}
    try:
        return TrainingArguments(output_dir=str(run_dir / "checkpoints"), **args)
    except (TypeError, ValueError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        named = [
            f"train.{k}" if k in train else f"train.extra.{k}"
            for k, v in {**train, **extra}.items()
            if isinstance(v, str) and len(v) > 1 and v in message
        ]
        raise BaldroError(f"bad train settings{' (' + ', '.join(named) + ')' if named else ''}: {message}") from None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def console_callbacks(trainer, recipe: Recipe) -> None:
    """The Trainer's bar and per-step dicts give way to baldro's progress policy (`progress.py`): a bar on
    a terminal, log lines elsewhere; each logging step's metrics as one line (`log_format`) unless
    `log_to_console: false`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(train_progress_callback(show_metrics=recipe.log_to_console, fmt=recipe.log_format))


def check_processes(recipe: Recipe, args) -> None:
    """What a launch of several processes cannot do, refused on every process before training."""
    check_launched_world(args)
    how = strategy(recipe.train.eval_strategy)
    if how != "no" and args.world_size > 1 and shards_weights(args):
        raise BaldroError(
            f"train.eval_strategy={how} evaluates the model in memory on the main process, and under "
            "FSDP or DeepSpeed ZeRO-3 each process holds only a shard of its weights: use DDP or "
            "ZeRO-1/2 (configs/accelerate/ddp.yaml, zero2.yaml), or save checkpoints "
            "(train.save_strategy=epoch) and evaluate them afterwards with baldro eval"
        )


# ----------------------------------------------------------------------------- MUSE (raw text)
BENCHMARKS = ("tofu", "muse", "wmdp")  # data.benchmark
RAW_TEXT = ("muse", "wmdp")  # unlearned as raw-text chunks


def benchmark_name(name: str, key: str = "data.benchmark") -> str:
    if name not in BENCHMARKS:
        raise BaldroError(f"unknown {key} {name!r}: use one of {', '.join(BENCHMARKS)}")
    return name


def raw_texts(recipe: Recipe, objective) -> tuple[str, str | None]:
    """The raw forget corpus and the raw retain corpus (None without a retain loss, alpha = 0): MUSE's
    raw/ splits or the WMDP corpora."""
    if recipe.data.benchmark == "wmdp":
        from baldro.data.wmdp import load_unlearn_texts
    else:
        from baldro.data.muse import load_unlearn_texts

    if objective.needs.preferred:
        raise BaldroError(
            f"objective {objective.name!r} needs questions to answer otherwise, but "
            f"{recipe.data.benchmark.upper()} unlearns raw text: use ga, graddiff, npo, simnpo, wga, "
            "satimp, rmu, undial, ceu or pdu"
        )
    return load_unlearn_texts(
        recipe.data.source, recipe.data.forget_split, recipe.data.retain_split, need_retain=recipe.objective.alpha != 0
    )


def raw_chunks(recipe: Recipe, texts: tuple[str, str | None], tokenizer, model):
    """The forget and retain corpora cut into `data.chunk_length`-token chunks (`data.limit`: the first N)."""
    from baldro.data.muse import chunk_tokens, model_context

    d, context = recipe.data, model_context(model)
    forget = chunk_tokens(tokenizer, texts[0], d.chunk_length, d.limit, context, what=f"forget ({d.forget_split})")
    retain = None
    if texts[1] is not None:
        retain = chunk_tokens(tokenizer, texts[1], d.chunk_length, d.limit, context, what=f"retain ({d.retain_split})")
    log.info(
        "%s: %d forget and %s retain chunks of up to %d tokens",
        d.benchmark.upper(),
        len(forget),
        len(retain) if retain is not None else "no",
        d.chunk_length,
    )
    return forget, retain

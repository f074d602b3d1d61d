"""Evaluation around `evaluate_tofu`, `evaluate_muse` and `evaluate_lm_eval`: into a folder with balance
metrics (TOFU), re-summarising against reference logs, and one evaluation during unlearning
(`evaluate_during_training`, which `baldro.eval.trajectory` calls). Knows nothing of recipes:
`baldro.recipes` turns a recipe into the keyword arguments used here (`settings`; `settings["benchmark"]`
= "muse" picks the MUSE evaluator, "lm_eval" the lm-evaluation-harness tasks, TOFU otherwise;
`settings["lm_eval"]`, when present, runs harness tasks as an extra stage of a TOFU or MUSE evaluation,
into the same folder)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from baldro.data.formatting import check_compat
from baldro.errors import BaldroError
from baldro.eval.summarize import format_table
from baldro.eval.tofu import evaluate_tofu, evaluate_tofu_openunlearning
from baldro.io import write_json_atomic

log = logging.getLogger(__name__)


def _evaluate(
    model, tokenizer, formatter, out_dir, settings: dict, info: dict | None = None, **extra
) -> tuple[dict, dict, str, dict | None]:
    """Run the benchmark's evaluator, then the lm-eval stage if any; returns (eval_log, summary,
    benchmark, the stage's summary or None). `settings["compat"]` = "openunlearning" picks
    `evaluate_tofu_openunlearning` (TOFU only); `info`, if given, is filled as `evaluate_tofu` fills it
    (the harness multiplies with torch's products)."""
    settings = dict(settings)
    benchmark = settings.pop("benchmark", "tofu")
    compat = settings.pop("compat", "none")
    stage = settings.pop("lm_eval", None)
    if benchmark == "lm_eval":
        from baldro.eval.lm_eval import evaluate_lm_eval

        if info is not None:
            info["linear_kernels"] = "torch"
        return (*evaluate_lm_eval(model, tokenizer, out_dir=out_dir, **settings, **extra), benchmark, None)
    if benchmark == "muse":
        from baldro.eval.muse import evaluate_muse

        if compat != "none":
            raise BaldroError(f"eval.compat={compat} is only implemented for TOFU: set eval.compat=none")
        eval_log, summary = evaluate_muse(model, tokenizer, formatter, out_dir=out_dir, info=info, **settings, **extra)
    else:
        fn = evaluate_tofu_openunlearning if check_compat(compat) == "openunlearning" else evaluate_tofu
        eval_log, summary = fn(model, tokenizer, formatter, out_dir=out_dir, info=info, **settings, **extra)
    stage_summary = None
    if stage and stage.get("tasks"):
        from baldro.eval.lm_eval import evaluate_lm_eval

        _, stage_summary = evaluate_lm_eval(
            model, tokenizer, out_dir=out_dir, key="eval.lm_eval.tasks", **stage, **extra
        )
    return eval_log, summary, benchmark, stage_summary


def add_balance(out_dir: Path, eval_log: dict, summary: dict, retain_logs_path=None, target_logs_path=None) -> dict:
    """Add the balance metrics (SPEC section 6) to a TOFU summary and rewrite TOFU_SUMMARY.json."""
    from baldro.eval.balance import balance_from_eval_logs
    from baldro.eval.summarize import load_eval_log, note_non_finite

    retain = load_eval_log(retain_logs_path) if retain_logs_path else None
    target = load_eval_log(target_logs_path) if target_logs_path else None
    balance = balance_from_eval_logs(eval_log, retain, target)
    note = balance.pop("balance_note", None)
    if note:
        log.info("balance: %s", note)
    notes = dict(getattr(summary, "notes", {}))
    summary = _with_notes({**summary, **balance}, notes)
    note_non_finite(eval_log, summary)
    write_json_atomic(Path(out_dir) / "TOFU_SUMMARY.json", dict(summary))
    return summary


def _with_notes(values: dict, notes: dict) -> dict:
    """A summary dict that keeps the notes saying why a metric is n/a (printed by `format_table`)."""
    from baldro.eval.summarize import Summary

    out = Summary("tofu")
    out.update(values)
    out.notes = dict(notes)
    return out


def _weights_note(model) -> str | None:
    """A note when the model's weights are not all finite (every score it gives is then NaN)."""
    from baldro.models.loading import count_nonfinite

    bad = count_nonfinite(model)
    if not bad:
        return None
    total = sum(p.numel() for p in model.parameters())
    note = (
        f"{bad} of {total} model weights are NaN or inf (a diverged training run?): metrics computed from "
        "its outputs are n/a or meaningless"
    )
    log.warning("%s", note)
    return note


def _add_weights_note(summary, note: str | None):
    if note is None:
        return summary
    summary = _with_notes(dict(summary), dict(getattr(summary, "notes", {})))
    summary.notes = {"model": note, **summary.notes}
    return summary


def resummarize(eval_dir: str | Path, retain_logs_path=None, target_logs_path=None) -> dict:
    """Recompute TOFU_SUMMARY.json of an evaluated model against reference logs (no model needed)."""
    from baldro.eval.summarize import load_eval_log, summarize_tofu

    eval_dir = Path(eval_dir)
    eval_log = load_eval_log(eval_dir / "TOFU_EVAL.json")
    reference = load_eval_log(retain_logs_path) if retain_logs_path else None
    summary = dict(summarize_tofu(eval_log, reference))
    return add_balance(eval_dir, eval_log, summary, retain_logs_path, target_logs_path)


def evaluate_model_dir(
    run_dir: str | Path,
    data_source,
    forget_split: str,
    max_new_tokens: int = 200,
    batch_size: int = 32,
    max_length: int = 512,
    progress: bool | None = None,
) -> Path:
    """Evaluate the model saved in `RUN_DIR/model` into `RUN_DIR/eval/`; returns that folder.

    Aggregates against reference models are left to `resummarize`, so evaluations run in any order.
    """
    from baldro.data.formatting import QAFormatter
    from baldro.models.loading import load_model, load_tokenizer

    run_dir = Path(run_dir)
    model = load_model(str(run_dir / "model"), dtype="float32", device="cpu")
    tokenizer = load_tokenizer(str(run_dir / "model"))
    out = run_dir / "eval"
    start = time.time()
    evaluate_tofu(
        model,
        tokenizer,
        QAFormatter(tokenizer, max_length=max_length),
        data_source,
        forget_split=forget_split,
        out_dir=out,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    _record_eval_time(run_dir, time.time() - start)
    return out


def _record_eval_time(run_dir: str | Path, seconds: float) -> None:
    info_path = Path(run_dir) / "run_info.json"
    if info_path.exists():
        write_json_atomic(info_path, {**json.loads(info_path.read_text()), "eval_time_s": seconds})


def evaluate_final_model(model, tokenizer, formatter, run_dir: Path, settings: dict, target_logs_path=None) -> dict:
    """`eval.at_end`: evaluate the unlearned model into RUN_DIR/eval/, with balance metrics when the
    retain (and target) model's logs are given (`settings["retain_logs_path"]`, `target_logs_path`)."""
    out = Path(run_dir) / "eval"
    start = time.time()
    note = _weights_note(model)
    eval_log, summary, benchmark, _ = _evaluate(model, tokenizer, formatter, out, settings)
    if benchmark == "tofu":
        summary = add_balance(out, eval_log, summary, settings["retain_logs_path"], target_logs_path)
    summary = _add_weights_note(summary, note)
    _record_eval_time(run_dir, time.time() - start)
    return summary


def evaluate_logged(
    model, tokenizer, formatter, out: Path, settings: dict, target_logs_path=None, model_path: str | None = None
) -> tuple[dict, dict, str, float, dict]:
    """Evaluate into `out` (TOFU_EVAL.json, TOFU_SUMMARY.json with balance metrics when reference logs
    are given, or MUSE_EVAL.json, MUSE_SUMMARY.json, or LMEVAL_EVAL.json, LMEVAL_SUMMARY.json, plus the
    lm-eval stage's files; eval_info.json with the time and the linear kernels, eval_timings.json with
    each stage's rows, sequences and seconds); returns (eval_log, summary, benchmark, seconds, the stages' timings)."""
    start = time.time()
    note = _weights_note(model)
    timings: dict = {}
    info: dict = {}
    eval_log, summary, benchmark, _ = _evaluate(model, tokenizer, formatter, out, settings, info=info, timings=timings)
    if benchmark == "tofu" and (settings["retain_logs_path"] or target_logs_path):
        summary = add_balance(out, eval_log, summary, settings["retain_logs_path"], target_logs_path)
    summary = _add_weights_note(summary, note)
    seconds = time.time() - start
    notes = {k: v for k, v in getattr(summary, "notes", {}).items() if k == "model" or summary.get(k) is None}
    write_json_atomic(
        out / "eval_info.json",
        {
            "model_path": model_path,
            "eval_time_s": seconds,
            **info,
            **({"notes": notes} if notes else {}),
        },
    )
    write_json_atomic(out / "eval_timings.json", {"total_s": seconds, "stages": timings})
    return eval_log, summary, benchmark, seconds, timings


def evaluate_into(
    model, tokenizer, formatter, out: Path, settings: dict, target_logs_path=None, model_path: str | None = None
) -> Path:
    """`baldro eval`: `evaluate_logged`, then print the summary table(s) and the time of every stage."""
    from baldro.eval.lm_eval import load_summary

    _, summary, benchmark, seconds, timings = evaluate_logged(
        model, tokenizer, formatter, out, settings, target_logs_path, model_path
    )
    stage_summary = load_summary(out) if (settings.get("lm_eval") or {}).get("tasks") else None
    print(format_table(summary))
    if stage_summary:
        print()
        print(format_table(stage_summary))
    stages = ", ".join(f"{g} {t['seconds']:.1f} s" for g, t in timings.items())
    name = "LMEVAL" if benchmark == "lm_eval" else benchmark.upper()
    also = f" and {out / 'LMEVAL_SUMMARY.json'}" if stage_summary else ""
    print(f"baldro eval: {out / f'{name}_SUMMARY.json'}{also} ({seconds:.1f} s: {stages})")
    return out


# The evaluators' loggers, quiet after the first evaluation during training (their notes and stage lines
# would repeat at every evaluation; the stages' seconds are in each evaluation's eval_timings.json).
_EVALUATOR_LOGGERS = (
    "baldro.eval.tofu",
    "baldro.eval.muse",
    "baldro.eval.suite",
    "baldro.eval.engine",
    "baldro.eval.generation",
    "baldro.eval.summarize",
)


def evaluate_during_training(
    model, tokenizer, formatter, out: Path, settings: dict, quiet: bool = False
) -> tuple[dict, str]:
    """One evaluation during unlearning (`baldro.eval.trajectory`): the model as it is in memory, in eval
    mode and with the random number generators left as they were (training goes on as without it), into
    `out` (the evaluator's files and eval_timings.json); returns (summary, benchmark). Its mode is restored.
    `quiet`: the evaluator logs only errors (a note on non-finite weights is still logged)."""
    import torch

    was_training = model.training
    timings: dict = {}
    start = time.time()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    loggers = [logging.getLogger(name) for name in _EVALUATOR_LOGGERS] if quiet else []
    levels = [lg.level for lg in loggers]
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            note = _weights_note(model)
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            _, summary, benchmark, _ = _evaluate(
                model, tokenizer, formatter, out, settings, timings=timings, progress=False
            )
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        model.train(was_training)
    write_json_atomic(Path(out) / "eval_timings.json", {"total_s": time.time() - start, "stages": timings})
    return _add_weights_note(summary, note), benchmark

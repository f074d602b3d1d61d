"""The report's Markdown tables: the columns of TOFU, MUSE and lm-eval runs, mean ± std over seeds, the
spread at equal forgetting and the attacks' table per method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from baldro.eval.metrics import finite_float
from baldro.report.runs import AttackRecord, RunRecord

# ----------------------------------------------------------------------------- formatting


def format_fq(value: Any) -> str:
    """Forget quality: 3 significant digits, scientific notation below 0.01; "n/a" when missing."""
    v = finite_float(value)
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    if abs(v) < 1e-2:
        return f"{v:.2e}"
    return f"{v:#.3g}"


def format_value(value: Any, digits: int = 3) -> str:
    v = finite_float(value)
    if v is None:
        return "n/a"
    if v != 0 and abs(v) < 10 ** (-digits):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


# (header, summary key, formatter)
COLUMNS: list[tuple[str, str, Any]] = [
    ("Forget quality", "forget_quality", format_fq),
    ("Model utility", "model_utility", format_value),
    ("Forget TR", "forget_truth_ratio", format_value),
    ("Forget prob", "forget_Q_A_Prob", format_value),
    ("Forget ROUGE-L", "forget_Q_A_ROUGE", format_value),
    ("TR std", "balance_tr_std", format_value),
    ("TR IQR", "balance_tr_iqr", format_value),
    ("Prob std", "balance_prob_std", format_value),
    ("Prob IQR", "balance_prob_iqr", format_value),
    ("Remembered", "balance_frac_remembered", format_value),
    ("Over-forgotten", "balance_frac_over_forgotten", format_value),
    ("Train time (s)", "train_time_s", lambda v: format_value(v, 1)),
]


# Runs that share a name (the same method under several seeds) are also summarised as mean ± std.
SEED_COLUMNS: list[tuple[str, str, Any]] = [
    ("Forget quality", "forget_quality", format_fq),
    ("KS D", "_ks_d", format_value),
    ("Model utility", "model_utility", format_value),
    ("Forget TR", "forget_truth_ratio", format_value),
    ("Forget prob", "forget_Q_A_Prob", format_value),
    ("Forget ROUGE-L", "forget_Q_A_ROUGE", format_value),
    ("Prob std at mean 0.3", "_spread_at_0.3", format_value),
    ("Prob std at mean 0.1", "_spread_at_0.1", format_value),
    ("Prob std (end)", "balance_prob_std", format_value),
    ("Remembered", "balance_frac_remembered", format_value),
    ("Over-forgotten", "balance_frac_over_forgotten", format_value),
    ("Train time (s)", "train_time_s", lambda v: format_value(v, 1)),
]


# MUSE runs (every run of the report a MUSE run): its metrics instead of TOFU's.
MUSE_COLUMNS: list[tuple[str, str, Any]] = [
    ("VerbMem (forget)", "forget_verbmem_ROUGE", format_value),
    ("KnowMem (forget)", "forget_knowmem_ROUGE", format_value),
    ("KnowMem (retain)", "retain_knowmem_ROUGE", format_value),
    ("PrivLeak", "privleak", lambda v: format_value(v, 1)),
    ("Min-K% AUC", "mia_min_k", format_value),
    ("Exact mem.", "exact_memorization", format_value),
    ("Extraction", "extraction_strength", format_value),
    ("Train time (s)", "train_time_s", lambda v: format_value(v, 1)),
]
MUSE_NOTE = (
    "MUSE metrics (OpenUnlearning's definitions): VerbMem = ROUGE-L F1 of the 128-token greedy continuation of "
    "forget-text prompts; KnowMem = ROUGE-L F1 of few-shot answers to questions on the forget / retain text; "
    "PrivLeak = relative difference in percent of the Min-K% membership AUC (privleak forget vs holdout) to the "
    "retrained model's (about 0 is best; the target model is near -100 on News); exact memorisation and "
    "extraction strength on the VerbMem texts. Lower VerbMem and forget KnowMem = more forgotten; retain "
    'KnowMem measures utility. "n/a" = not available.'
)


def lm_eval_columns(runs: Iterable[RunRecord]) -> list[tuple[str, str, Any]]:
    """One column per lm-eval task of any run: its first metric that is not a standard error
    (`wmdp_cyber/acc`, `mmlu/acc`), in the order the runs' summaries list them."""
    columns: dict[str, str] = {}
    for run in runs:
        for key in run.lm_eval:
            task, _, metric = str(key).rpartition("/")
            if task and task not in columns and "_stderr" not in metric:
                columns[task] = key
    return [(f"{task} {key.rpartition('/')[2]}", key, format_value) for task, key in columns.items()]


def format_step(value: Any) -> str:
    """A step (or a mean of steps, to one decimal)."""
    v = finite_float(value)
    return "n/a" if v is None else f"{int(v)}" if v.is_integer() else f"{v:.1f}"


# Runs that evaluated during unlearning with a train.metric_for_best_model: the step of the best evaluation.
BEST_STEP_COLUMN = ("Best step", "best_step", format_step)


def with_best_step(columns: list, runs: Iterable["RunRecord"]) -> list:
    """The columns with "Best step" before the train time, when a run has one."""
    if not any(r.info.get("best_step") is not None for r in runs):
        return list(columns)
    return [*columns[:-1], BEST_STEP_COLUMN, columns[-1]]


def mean_std(values: Iterable[Any], fmt=format_value) -> str:
    """ "mean ± sample std" of the finite values (the value alone for one, "n/a" for none)."""
    vals = [v for v in (finite_float(x) for x in values) if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(float(np.mean(vals)))} ± {fmt(float(np.std(vals, ddof=1)))}"


def seed_table(
    names: Sequence[str],
    seeds: Sequence[Sequence[Any]],
    values: Sequence[Sequence[dict]],
    columns: Sequence[tuple[str, str, Any]] = SEED_COLUMNS,
) -> list[str]:
    """Markdown table: per method, the number of runs (seeds) and mean ± std of every column's value."""
    md = [
        "| Method | Seeds | " + " | ".join(h for h, _, _ in columns) + " |",
        "| --- | ---: |" + " ---: |" * len(columns),
    ]
    for name, seed_list, vals in zip(names, seeds, values):
        cells = [mean_std((v.get(key) for v in vals), fmt) for _, key, fmt in columns]
        label = ",".join(str(x) for x in seed_list) if seed_list and None not in seed_list else str(len(vals))
        md.append(f"| {md_cell(name)} | {label} | " + " | ".join(cells) + " |")
    return md


def _seconds(value: Any) -> str:
    v = finite_float(value)
    return "n/a" if v is None else f"{v:.1f}" if v >= 0.95 else f"{v:.2f}"


def _before_after(summary: dict, key: str, fmt=format_value) -> str:
    values = summary.get("summary") or {}
    return f"{fmt((values.get('before') or {}).get(key))} → {fmt((values.get('after') or {}).get(key))}"


def attack_table(rec: AttackRecord) -> list[str]:
    """Markdown: one row per attack of a method (what came back, the headline numbers, the cost)."""
    muse = any(s.get("benchmark") == "muse" for _, s in rec.attacks)
    keys = (
        [
            ("VerbMem", "forget_verbmem_ROUGE"),
            ("KnowMem (forget)", "forget_knowmem_ROUGE"),
            ("KnowMem (retain)", "retain_knowmem_ROUGE"),
            ("PrivLeak", "privleak"),
        ]
        if muse
        else [
            ("Forget prob", "forget_Q_A_Prob"),
            ("Forget ROUGE-L", "forget_Q_A_ROUGE"),
            ("Model utility", "model_utility"),
        ]
    )
    md = [
        "| Attack | Came back | "
        + ("" if muse else "Forget quality | ")
        + " | ".join(h for h, _ in keys)
        + " | Attack (s) | Eval (s) |",
        "| --- | ---: |" + ("" if muse else " ---: |") + " ---: |" * len(keys) + " ---: | ---: |",
    ]
    for folder, s in rec.attacks:
        h = s.get("headline")
        came = (
            (
                f"{h['came_back']} of {h['forgotten_before']} ({h['metric']}"
                + (", held out" if h.get("scope") == "held_out" else "")
                + ")"
            )
            if h
            else "n/a"
        )
        cells = [md_cell(folder), came]
        if not muse:
            fq = (s.get("forget_quality") or {}).get("held_out" if h and h.get("scope") == "held_out" else "all")
            cells.append(
                f"{format_fq(fq.get('before'))} → {format_fq(fq.get('after'))}"
                if fq
                else _before_after(s, "forget_quality", format_fq)
            )
        cells += [_before_after(s, key) for _, key in keys]
        cost = s.get("cost") or {}
        cells += [_seconds(cost.get("attack_seconds")), _seconds(cost.get("eval_seconds"))]
        md.append("| " + " | ".join(cells) + " |")
    return md


def attack_section(records: Sequence[AttackRecord], plot: Path | None) -> list[str]:
    md = ["## Attacks", ""]
    if plot:
        md += [
            "![per-sample before vs after each attack](attacks.png)",
            "",
            "**How to read this.** One panel per unlearned model; each point is one forget sample, its "
            "answer probability (MUSE: VerbMem ROUGE) before the attack on the x-axis and after it on the "
            "y-axis. Points on the dotted diagonal did not move; points above it were brought back. The dashed "
            "red lines are the came-back threshold: a sample came back when it moves from the left of the "
            "vertical line to above the horizontal one. A balanced unlearning leaves no sample barely "
            "forgotten, so fewer points should cross.",
            "",
        ]
    for rec in records:
        where = ", ".join(f"`{p}`" for p in rec.paths)
        md += [f"### {md_cell(rec.name)}", "", f"Attacks in {where}.", ""] + attack_table(rec) + [""]
    md += [
        "*Came back*: forget samples that the attack moved from the forgotten to the remembered side of the "
        "threshold (default: the retain model's median per-sample value, see attack_summary.json's "
        "`thresholds`), of those forgotten before it; relearning on the held-out split counts only the samples "
        "it did not train on. Before → after: the unlearned model, then the attacked one. *Attack (s)*: the "
        "relearning's training or the quantized model's loading; *Eval (s)*: the evaluation that follows it.",
        "",
    ]
    return md


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def spread_table(methods: list[tuple[str, RunRecord]]) -> list[str]:
    """Markdown rows: per-sample probability spread when each run's mean answer probability reaches a level."""
    from baldro.eval.balance import SPREAD_LEVELS, spread_at_mean_forgetting

    with_balance = [(label, run) for label, run in methods if run.balance]
    if not with_balance:
        return []
    head = " | ".join(f"mean < {lvl:g}: step, mean, std | std at mean {lvl:g}" for lvl in SPREAD_LEVELS)
    md = [
        "Spread at equal mean forgetting, every run: the per-sample probability's std at the first scoring step "
        "where the run's mean answer probability falls below each level, and (bold) the std at a mean of exactly "
        "the level, interpolated between that step and the one before it (lower std = more even forgetting).",
        "",
        f"| Run | {head} |",
        "| --- |" + " ---: | ---: |" * len(SPREAD_LEVELS),
    ]
    for label, run in with_balance:
        cells = []
        for s in spread_at_mean_forgetting(run.balance):
            cells.append(
                "not reached | n/a"
                if s["step"] is None
                else f"{s['step']}, {format_value(s['prob_mean'])}, {format_value(s['prob_std'])} | "
                f"**{format_value(s['prob_std_at_level'])}**"
            )
        md.append(f"| {md_cell(label)} | " + " | ".join(cells) + " |")
    return md + [""]

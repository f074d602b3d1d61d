"""The study's report from its finished cells (`tofu_smollm2.py --report-only` rebuilds it).

`baldro report` over `<results>/cells/*` (the target and retain models as references) writes
`<results>/report/`: the per-cell table, the mean ± std over seeds per method, and the plots (every seed;
per-sample trajectories, spread and DRO weights of each method's first seed). `<results>/table.md` is the
mean ± std table alone, for experiments/RESULTS.md; `<results>/training.md` how each cell trained (gradient
norms, the retain and forget losses, the largest weight a weighting gave a sample) and its wall times.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from baldro.io import read_jsonl, write_text_atomic
from baldro.report.build import build_report

REFERENCES = ("target", "retain")


def finished_cells(results: Path) -> list[Path]:
    cells = results / "cells"
    done = (
        [p for p in sorted(cells.glob("*")) if (p / "eval" / "TOFU_SUMMARY.json").is_file()] if cells.is_dir() else []
    )
    return sorted(done, key=lambda p: (p.name not in REFERENCES, p.name))


def write_study_report(results: str | Path) -> Path | None:
    """Write report/ and table.md from the finished cells; None when no unlearning cell is finished."""
    results = Path(results).resolve()
    if results.is_relative_to(Path.cwd()):  # the report's rebuild command then works in any checkout
        results = results.relative_to(Path.cwd())
    cells = finished_cells(results)
    methods = [c for c in cells if c.name not in REFERENCES]
    if not methods:
        print(f"study report: no finished unlearning cell in {results / 'cells'} yet")
        return None
    refs = {c.name: c for c in cells if c.name in REFERENCES}
    report = build_report(
        methods, results / "report", retain_run=refs.get("retain"), target_run=refs.get("target"), by_seed=True
    )
    lines = report.read_text(encoding="utf-8").splitlines()
    table = [line for line in lines if line.startswith("| Method | Seeds |")]
    if table:
        start = lines.index(table[0])
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        write_text_atomic(results / "table.md", "\n".join(lines[start:end]) + "\n")
    write_text_atomic(results / "training.md", "\n".join(training_table(methods)) + "\n")
    print(f"study report: {len(methods)} finished cell(s); {report}")
    return report


def training_table(cells: list[Path], early_steps: int = 10) -> list[str]:
    """Markdown rows, one per cell, from its train_log.jsonl: the median gradient norm (before clipping)
    over the first ``early_steps`` optimizer steps and over all, the retain loss's median and largest
    value, the forget loss at the first and last step, the largest weight the weighting gave one
    sample of a batch (``mean``: 1/B), and the unlearning's and the evaluation's wall time."""

    md = [
        f"| Cell | Grad norm, median of steps 1-{early_steps} | Grad norm, median | Retain loss, median | "
        "Retain loss, max | Forget loss, first -> last | Largest sample weight | Train time (s) | Eval time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell in cells:
        rows = (
            [r for r in read_jsonl(cell / "train_log.jsonl") if "grad_norm" in r]
            if (cell / "train_log.jsonl").is_file()
            else []
        )
        times = []
        for info, key in (("run_info.json", "train_time_s"), ("eval/eval_info.json", "eval_time_s")):
            value = json.loads((cell / info).read_text()).get(key) if (cell / info).is_file() else None
            times.append(f"{value:.0f}" if isinstance(value, (int, float)) else "n/a")
        if not rows:
            md.append(f"| {cell.name} |" + " n/a |" * 6 + f" {times[0]} | {times[1]} |")
            continue
        grad = [r["grad_norm"] for r in rows]
        retain = [r["retain_loss"] for r in rows if r.get("retain_loss") is not None]
        weight = [r["weight_max"] for r in rows if r.get("weight_max") is not None]
        md.append(
            f"| {cell.name} | {statistics.median(grad[:early_steps]):.3g} | {statistics.median(grad):.3g} | "
            + (f"{statistics.median(retain):.3f} | {max(retain):.3f} | " if retain else "n/a | n/a | ")
            + f"{rows[0].get('forget_loss', float('nan')):.3g} -> {rows[-1].get('forget_loss', float('nan')):.3g} | "
            + (f"{max(weight):.3f} |" if weight else "n/a |")
            + f" {times[0]} | {times[1]} |"
        )
    return md

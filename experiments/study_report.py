"""The study's report from its finished cells (`tofu_smollm2.py --report-only` rebuilds it).

`baldro report` over `<results>/cells/*` (the target and retain models as references) writes
`<results>/report/`: the per-cell table, the mean ± std over seeds per method, and the plots (every seed;
per-sample trajectories, spread and DRO weights of each method's first seed). `<results>/table.md` is the
mean ± std table alone, for experiments/RESULTS.md.
"""

from __future__ import annotations

from pathlib import Path

from baldro.io import write_text_atomic
from baldro.report import build_report

REFERENCES = ("target", "retain")


def finished_cells(results: Path) -> list[Path]:
    cells = results / "cells"
    done = [p for p in sorted(cells.glob("*")) if (p / "eval" / "TOFU_SUMMARY.json").is_file()] if cells.is_dir() else []
    return sorted(done, key=lambda p: (p.name not in REFERENCES, p.name))


def write_study_report(results: str | Path) -> Path | None:
    """Write report/ and table.md from the finished cells; None when no unlearning cell is finished."""
    results = Path(results)
    cells = finished_cells(results)
    methods = [c for c in cells if c.name not in REFERENCES]
    if not methods:
        print(f"study report: no finished unlearning cell in {results / 'cells'} yet")
        return None
    refs = {c.name: c for c in cells if c.name in REFERENCES}
    report = build_report(methods, results / "report", retain_run=refs.get("retain"), target_run=refs.get("target"),
                          by_seed=True)
    lines = report.read_text(encoding="utf-8").splitlines()
    table = [line for line in lines if line.startswith("| Method | Seeds |")]
    if table:
        start = lines.index(table[0])
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        write_text_atomic(results / "table.md", "\n".join(lines[start:end]) + "\n")
    print(f"study report: {len(methods)} finished cell(s); {report}")
    return report

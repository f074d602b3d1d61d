"""Tables and plots of the SmolLM2 TOFU study from its finished cells (`tofu_smollm2.py --report-only`).

Reads `<results>/cells/<cell>/` (run folders without models) and writes into `<results>/`:
- `table.md`: per method, mean and standard deviation over seeds of every headline and balance metric,
  with the number of seeds;
- `cells.csv`: the same metrics for every cell;
- `seeds.png`: forget quality vs model utility (every seed, and the mean per method) and the spread at
  equal mean forgetting per method and seed;
- `report/`: `baldro report` (trajectories, spread and DRO-weight plots) of the seed-0 cells.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from baldro.balance import spread_at_mean_forgetting
from baldro.eval import metrics
from baldro.eval.summarize import load_eval_log, truth_ratios
from baldro.io import write_bytes_atomic, write_text_atomic
from baldro.report import build_report, load_run

# (column title, key, digits); keys starting with "_" are computed here, the rest read from the summary.
COLUMNS = [
    ("Forget quality", "forget_quality", None),
    ("KS D", "_ks_d", 3),
    ("Model utility", "model_utility", 3),
    ("Forget TR", "forget_truth_ratio", 3),
    ("Forget prob", "forget_Q_A_Prob", 3),
    ("Forget ROUGE-L", "forget_Q_A_ROUGE", 3),
    ("Prob std at mean < 0.3", "_spread_0.3", 3),
    ("Prob std at mean < 0.1", "_spread_0.1", 3),
    ("Prob std (end)", "balance_prob_std", 3),
    ("Remembered", "balance_frac_remembered", 3),
    ("Over-forgotten", "balance_frac_over_forgotten", 3),
    ("Train time (s)", "_train_time", 0),
    ("Eval time (s)", "_eval_time", 0),
]
REFERENCES = ("target", "retain")


def _cell_values(cell: Path, retain_tr: np.ndarray | None) -> dict:
    run = load_run(cell)
    v = dict(run.summary)
    v["_train_time"] = run.info.get("train_time_s")
    v["_eval_time"] = _eval_time(cell)
    if cell.name == "retain" and v.get("forget_quality") is None:
        v["forget_quality"] = 1.0  # the KS test of the retain model against itself
    if retain_tr is not None and run.eval_log is not None:
        tr = truth_ratios(load_eval_log(run.eval_log), "forget_truth_ratio")
        v["_ks_d"] = metrics.ks_statistic(tr, retain_tr) if tr is not None else None
    for s in spread_at_mean_forgetting(run.balance) if run.balance else []:
        v[f"_spread_{s['level']:g}"] = s["prob_std"]
    return v


def _eval_time(cell: Path) -> float | None:
    path = cell / "eval" / "eval_info.json"
    return json.loads(path.read_text(encoding="utf-8")).get("eval_time_s") if path.is_file() else None


def _fmt(x, digits) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if digits is None:  # forget quality spans decades
        return f"{x:.3g}" if x >= 1e-3 else f"{x:.2e}"
    return f"{x:.{digits}f}"


def _mean_std(values: list, digits) -> str:
    vals = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return _fmt(vals[0], digits)
    return f"{_fmt(float(np.mean(vals)), digits)} ± {_fmt(float(np.std(vals, ddof=1)), digits)}"


def _method_and_seed(name: str) -> tuple[str, int | None]:
    if "_seed" in name:
        method, seed = name.rsplit("_seed", 1)
        return method, int(seed)
    return name, None


def collect(results: Path) -> dict[str, dict]:
    """{cell name: values} for every finished cell (references first)."""
    cells_dir = results / "cells"
    finished = sorted(p for p in cells_dir.glob("*") if (p / "eval" / "TOFU_SUMMARY.json").is_file()) \
        if cells_dir.is_dir() else []
    retain_log = cells_dir / "retain" / "eval" / "TOFU_EVAL.json"
    retain_tr = truth_ratios(load_eval_log(retain_log), "forget_truth_ratio") if retain_log.is_file() else None
    order = {name: i for i, name in enumerate(REFERENCES)}
    finished.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    return {p.name: _cell_values(p, retain_tr) for p in finished}


def table(values: dict[str, dict]) -> str:
    groups: dict[str, list[tuple[int | None, dict]]] = {}
    for name, v in values.items():
        method, seed = _method_and_seed(name)
        groups.setdefault(method, []).append((seed, v))
    head = "| Method | Seeds | " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    lines = [head, "| --- | ---: |" + " ---: |" * len(COLUMNS)]
    for method, rows in groups.items():
        seeds = ",".join(str(s) for s, _ in rows if s is not None) or "-"
        cells = [_mean_std([v.get(key) for _, v in rows], digits) for _, key, digits in COLUMNS]
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(values: dict[str, dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["cell"] + [key for _, key, _ in COLUMNS])
    for name, v in values.items():
        w.writerow([name] + ["" if v.get(key) is None else f"{v[key]:.6g}" for _, key, _ in COLUMNS])
    write_text_atomic(path, buf.getvalue())


def plot_seeds(values: dict[str, dict], path: Path) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods: dict[str, list[dict]] = {}
    for name, v in values.items():
        method, seed = _method_and_seed(name)
        if seed is not None:
            methods.setdefault(method, []).append(v)
    if not methods:
        return None
    fig = Figure(figsize=(12, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax_fq, ax_spread = fig.subplots(1, 2)
    for i, (method, rows) in enumerate(methods.items()):
        fq = np.array([r.get("forget_quality") or np.nan for r in rows], dtype=float)
        mu = np.array([r.get("model_utility") or np.nan for r in rows], dtype=float)
        marker = "s" if method.startswith("simnpo") else ("^" if method.startswith("graddiff") else "o")
        pts = ax_fq.scatter(mu, fq, marker=marker, alpha=0.35, s=18)
        if np.isfinite(fq).any() and np.isfinite(mu).any():
            ax_fq.scatter([np.nanmean(mu)], [np.nanmean(fq)], marker=marker, s=70,
                          color=pts.get_facecolor()[0][:3], edgecolor="black", label=method)
        sp = [r.get("_spread_0.3") for r in rows]
        ys = [s for s in sp if s is not None]
        ax_spread.scatter([i] * len(ys), ys, marker=marker, color=pts.get_facecolor()[0][:3])
        if ys:
            ax_spread.hlines(np.mean(ys), i - 0.3, i + 0.3, color="black")
    for name, marker in (("target", "X"), ("retain", "*")):
        if name in values:
            v = values[name]
            ax_fq.scatter([v.get("model_utility")], [v.get("forget_quality") or 1.0], marker=marker, s=110,
                          color="black", label=name)
    ax_fq.set_yscale("log")
    ax_fq.set_xlabel("model utility")
    ax_fq.set_ylabel("forget quality (KS p-value, log)")
    ax_fq.set_title("Every seed (faint) and the mean per method")
    ax_fq.legend(fontsize=7, ncol=2)
    ax_spread.set_xticks(range(len(methods)), list(methods), rotation=45, ha="right", fontsize=8)
    ax_spread.set_ylabel("std of per-sample answer probability")
    ax_spread.set_title("Spread when the mean answer probability first falls below 0.3 (bar: mean)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
    return path


def write_study_report(results: str | Path) -> Path | None:
    """Write table.md, cells.csv, seeds.png and report/ from the finished cells; None when there are none."""
    results = Path(results)
    values = collect(results)
    if not values:
        print(f"study report: no finished cells in {results / 'cells'} yet")
        return None
    write_text_atomic(results / "table.md", table(values))
    write_csv(values, results / "cells.csv")
    plot_seeds(values, results / "seeds.png")
    seed0 = [results / "cells" / n for n in values if n in REFERENCES or n.endswith("_seed0")]
    if any(n.endswith("_seed0") for n in values):
        build_report(seed0, results / "report")
    n_cells = sum(1 for n in values if n not in REFERENCES)
    print(f"study report: {n_cells} finished cell(s); {results / 'table.md'}, {results / 'seeds.png'}")
    return results / "table.md"

"""The report's plots, drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch) and written atomically; each returns None when it has nothing to show.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from baldro.errors import BaldroError
from baldro.eval.metrics import finite_float
from baldro.eval.recovery import HEADLINE_METRIC
from baldro.io import write_bytes_atomic
from baldro.report.runs import AttackRecord, RunRecord

DPI = 120


# ----------------------------------------------------------------------------- plotting helpers
def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return write_bytes_atomic(path, buf.getvalue())


def _series(rows: Iterable[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, vals = [], []
    for r in rows:
        s, v = finite_float(r.get("step")), finite_float(r.get(key))
        if s is not None and v is not None:
            steps.append(s)
            vals.append(v)
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps)[order], np.asarray(vals)[order]


def _prob_matrix(balance_rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps [T], prob [T, n]) with samples matched by id; NaN where a sample was not scored."""
    rows = sorted((r for r in balance_rows if finite_float(r.get("step")) is not None), key=lambda r: r["step"])
    id_pos: dict[int, int] = {}
    for r in rows:
        for i in r.get("ids") or []:
            id_pos.setdefault(int(i), len(id_pos))
    mat = np.full((len(rows), len(id_pos)), np.nan)
    for t, r in enumerate(rows):
        ids = r.get("ids") or []
        if r.get("prob") is not None:
            vals = [np.nan if v is None else v for v in r["prob"]]
        else:
            vals = np.exp(-np.array([np.nan if v is None else v for v in (r.get("nll") or [])], dtype=float))
        for i, v in zip(ids, vals):
            mat[t, id_pos[int(i)]] = v
    return np.array([r["step"] for r in rows], dtype=float), mat


# ----------------------------------------------------------------------------- plots
def plot_fq_vs_mu(rows: list[dict[str, Any]], path: Path) -> tuple[Path | None, list[str]]:
    """rows: {"label", "kind" in {"method","target","retain"}, "fq", "mu", "fq_note"}."""
    pts = [r for r in rows if r["fq"] is not None and r["mu"] is not None]
    skipped = [r["label"] for r in rows if r not in pts]
    if not pts:
        return None, skipped
    positive = [r["fq"] for r in pts if r["fq"] > 0]
    floor = (min(positive) if positive else 1e-10) / 10
    fig = _new_figure(7.0, 5.0)
    ax = fig.add_subplot()
    style = {
        "target": dict(marker="X", s=140, color="tab:red", edgecolor="black", zorder=4),
        "retain": dict(marker="*", s=220, color="tab:green", edgecolor="black", zorder=4),
    }
    colors = iter(_palette(sum(r["kind"] == "method" for r in pts)))
    seen_kinds = set()
    for r in pts:
        fq = r["fq"] if r["fq"] > 0 else floor
        label = r["label"] + ("" if r["fq"] > 0 else " (FQ=0, drawn at floor)")
        if r["kind"] in style:
            kw = dict(style[r["kind"]])
            legend = f"{r['kind']} model" if r["kind"] not in seen_kinds else None
            seen_kinds.add(r["kind"])
            ax.scatter([r["mu"]], [fq], label=legend, **kw)
        else:
            ax.scatter([r["mu"]], [fq], s=60, color=next(colors), edgecolor="black", zorder=3, label=r["label"])
        ax.annotate(label, (r["mu"], fq), xytext=(6, 6), textcoords="offset points", fontsize=8)
    ax.set_yscale("log")
    ax.axhline(0.05, color="gray", linestyle="--", linewidth=1, label="p = 0.05")
    ax.set_xlabel("model utility (higher = better)")
    ax.set_ylabel("forget quality, KS p-value (log scale, higher = better)")
    ax.set_title("Forget quality vs model utility")
    ax.grid(True, which="major", alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path), skipped


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _grid(n: int) -> tuple[int, int]:
    ncols = min(3, n)
    return math.ceil(n / ncols), ncols


def plot_trajectories(methods: list[tuple[str, RunRecord]], path: Path, retain_median: float | None) -> Path | None:
    data = []
    for label, run in methods:
        steps, mat = _prob_matrix(run.balance)
        if steps.size and mat.size:
            data.append((label, steps, mat))
    if not data:
        return None
    from matplotlib import colormaps

    nrows, ncols = _grid(len(data))
    fig = _new_figure(4.6 * ncols, 3.6 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    finite = np.concatenate([m[np.isfinite(m) & (m > 0)] for _, _, m in data])
    floor = max(float(finite.min()) if finite.size else 1e-12, 1e-30)
    cmap = colormaps["viridis"]
    for k, (ax, (label, steps, mat)) in enumerate(zip(axes.flat, data)):
        mat = np.where(np.isfinite(mat), np.maximum(mat, floor), np.nan)
        start = mat[0]
        # colour each sample by its starting probability (rank), so crossings are visible
        ranks = np.argsort(np.argsort(np.nan_to_num(start, nan=floor)))
        denom = max(mat.shape[1] - 1, 1)
        alpha = 0.5 if mat.shape[1] <= 50 else 0.25
        for j in range(mat.shape[1]):
            ax.plot(steps, mat[:, j], color=cmap(ranks[j] / denom), linewidth=0.6, alpha=alpha)
        with warnings.catch_warnings():  # an all-NaN step gives NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(mat, axis=1)
        ax.plot(steps, median, color="black", linewidth=2.5, label="median")
        if retain_median is not None and retain_median > 0:
            ax.axhline(retain_median, color="tab:red", linestyle="--", linewidth=1.2, label="retain-model median")
        ax.set_yscale("log")
        ax.set_ylim(top=1.5)  # a probability: no headroom above 1
        ax.set_title(f"{label} ({mat.shape[1]} samples)")
        ax.set_xlabel("optimizer step")
        if k % ncols == 0:
            ax.set_ylabel("answer probability (log scale)")
        ax.grid(True, alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(data) :]:
        ax.set_visible(False)
    fig.suptitle("Per-sample forgetting trajectories (colour = rank of starting probability)")
    return _save(fig, path)


def plot_spread(methods: list[tuple[str, RunRecord]], path: Path) -> Path | None:
    from baldro.eval.balance import trajectory_spread

    data = []
    for label, run in methods:
        if run.balance:
            try:
                spread = [s for s in trajectory_spread(run.balance) if s["prob_mean"] is not None]
            except BaldroError:
                continue
            if spread:
                data.append((label, spread))
    if not data:
        return None
    fig = _new_figure(11.0, 4.3)
    ax_t, ax_m = fig.subplots(1, 2)
    for k, (color, (label, spread)) in enumerate(zip(_palette(len(data)), data)):
        # log scales: zero / missing spreads are not drawn
        steps = np.array([s["step"] for s in spread], dtype=float)
        mean = np.array([s["prob_mean"] for s in spread], dtype=float)
        std = np.array([np.nan if s["prob_std"] is None else s["prob_std"] for s in spread], dtype=float)
        std = np.where(std > 0, std, np.nan)
        mean = np.where(mean > 0, mean, np.nan)
        ls = LINESTYLES[k % len(LINESTYLES)]
        ax_t.plot(steps, std, color=color, linestyle=ls, marker=".", label=label)
        ax_m.plot(mean, std, color=color, linestyle=ls, marker=".", label=label)
        if np.isfinite(mean[-1]) and np.isfinite(std[-1]):
            ax_m.scatter([mean[-1]], [std[-1]], color=color, s=60, edgecolor="black", zorder=3)
    ax_t.set_title("Spread of per-sample probability over training")
    ax_t.set_xlabel("optimizer step")
    ax_t.set_ylabel("std of answer probability (log scale)")
    ax_t.set_yscale("log")
    ax_m.set_title("Spread vs mean forgetting (big dot = end)")
    ax_m.set_xlabel("mean answer probability, log scale (training runs right to left)")
    ax_m.set_ylabel("std of answer probability (log scale)")
    ax_m.set_xscale("log")
    ax_m.set_yscale("log")
    ax_m.invert_xaxis()
    for ax in (ax_t, ax_m):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


LINESTYLES = ["-", "--", "-.", ":"]  # overlapping curves stay visible

WEIGHT_PANELS = [
    ("weight_max", "largest weight in the batch", "max weight (1/B = uniform)"),
    ("weight_entropy", "entropy of the batch weights", "entropy, nats (log B = uniform)"),
    ("weight_nonzero", "samples with non-zero weight", "non-zero weights"),
]


def plot_dro_weights(methods: list[tuple[str, RunRecord]], path: Path) -> Path | None:
    panels = [p for p in WEIGHT_PANELS if any(_series(run.train_log, p[0])[0].size for _, run in methods)]
    if not panels:
        return None
    fig = _new_figure(4.6 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = dict(zip([label for label, _ in methods], _palette(len(methods))))
    for ax, (key, title, ylabel) in zip(axes, panels):
        for k, (label, run) in enumerate(methods):
            steps, vals = _series(run.train_log, key)
            if steps.size:
                ax.plot(
                    steps,
                    vals,
                    color=colors[label],
                    linestyle=LINESTYLES[k % len(LINESTYLES)],
                    linewidth=1.4,
                    label=label,
                )
        if key == "weight_nonzero":
            from matplotlib.ticker import MaxNLocator

            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Effective DRO weights over training")
    return _save(fig, path)


def plot_seeds(groups: dict[str, list[int]], values: list[dict[str, Any]], path: Path) -> Path | None:
    fig = _new_figure(12, 4.5)
    ax_fq, ax_spread = fig.subplots(1, 2)
    colours = _palette(len(groups))
    for i, (name, ix) in enumerate(groups.items()):
        vals = [values[j] for j in ix]
        fq = np.array([finite_float(v.get("forget_quality")) or np.nan for v in vals], dtype=float)
        mu = np.array([finite_float(v.get("model_utility")) or np.nan for v in vals], dtype=float)
        ok = np.isfinite(fq) & np.isfinite(mu) & (fq > 0)
        ax_fq.scatter(mu[ok], fq[ok], color=colours[i], alpha=0.35, s=18)
        if ok.any():
            ax_fq.scatter(
                [mu[ok].mean()], [np.exp(np.log(fq[ok]).mean())], color=colours[i], s=70, edgecolor="black", label=name
            )
        spread = [v for v in (finite_float(x.get("_spread_at_0.3")) for x in vals) if v is not None]
        ax_spread.scatter([i] * len(spread), spread, color=colours[i])
        if spread:
            ax_spread.hlines(float(np.mean(spread)), i - 0.3, i + 0.3, color="black")
    ax_fq.set_yscale("log")
    ax_fq.axhline(0.05, color="grey", linestyle="--", linewidth=0.8)
    ax_fq.set(xlabel="model utility", ylabel="forget quality (log)", title="Every seed and the mean per method")
    if ax_fq.get_legend_handles_labels()[0]:  # no labelled point when no seed has a positive forget quality
        ax_fq.legend(fontsize=7, ncol=2)
    ax_spread.set_xticks(range(len(groups)), list(groups), rotation=45, ha="right", fontsize=8)
    ax_spread.set(ylabel="std of per-sample answer probability", title="Spread when the mean answer probability is 0.3")
    return _save(fig, path)


def plot_attacks(records: Sequence[AttackRecord], path: Path) -> Path | None:
    """Per-sample headline value before (x) vs after (y) every attack, one panel per method."""
    panels = []
    for rec in records:
        points = []
        for folder, summary in rec.attacks:
            metric = HEADLINE_METRIC.get(summary.get("benchmark", "tofu"), "prob")
            rows = (summary.get("per_sample") or {}).get(metric) or {}
            before = np.array([finite_float(v) for v in rows.get("before", [])], dtype=float)
            after = np.array([finite_float(v) for v in rows.get("after", [])], dtype=float)
            if before.size and before.size == after.size:
                t = ((summary.get("thresholds") or {}).get(metric) or {}).get("value")
                points.append((folder, before, after, finite_float(t), metric))
        if points:
            panels.append((rec.name, points))
    if not panels:
        return None
    nrows, ncols = _grid(len(panels))
    fig = _new_figure(4.8 * ncols, 4.4 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (name, points) in zip(axes.flat, panels):
        metric = points[0][4]
        log_scale = metric == "prob"
        values = np.concatenate([np.concatenate([b, a]) for _, b, a, _, _ in points])
        values = values[np.isfinite(values) & (values > 0 if log_scale else True)]
        low = float(values.min()) / 2 if log_scale and values.size else 0.0
        for (folder, before, after, _t, _), colour in zip(points, _palette(len(points))):
            ax.scatter(
                np.maximum(before, low) if log_scale else before,
                np.maximum(after, low) if log_scale else after,
                s=14,
                alpha=0.7,
                color=colour,
                label=folder,
            )
        ax.plot([low, 1], [low, 1], color="grey", linewidth=1, linestyle=":")
        t = points[0][3]
        if t is not None and t > low:
            ax.axhline(t, color="tab:red", linestyle="--", linewidth=1, label=f"came-back threshold {t:.3g}")
            ax.axvline(t, color="tab:red", linestyle="--", linewidth=1)
        if log_scale:
            ax.set_xscale("log")
            ax.set_yscale("log")
        label = {"prob": "answer probability", "verbmem": "VerbMem ROUGE-L F1"}.get(metric, metric)
        ax.set(xlabel=f"{label} before the attack", ylabel=f"{label} after", title=name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Per-sample before vs after each attack", fontsize=10)
    return _save(fig, path)


# (summary key, panel title, log scale), per benchmark
TRAJECTORY_PANELS = {
    "tofu": [
        ("forget_quality", "forget quality (KS p-value, higher = better)", True),
        ("model_utility", "model utility (higher = better)", False),
        ("forget_Q_A_Prob", "forget probability (lower = more forgotten)", True),
    ],
    "muse": [
        ("forget_verbmem_ROUGE", "VerbMem on the forget set (lower = more forgotten)", False),
        ("forget_knowmem_ROUGE", "KnowMem on the forget set (lower = more forgotten)", False),
        ("retain_knowmem_ROUGE", "KnowMem on the retain set (utility, higher = better)", False),
    ],
}


def _group_series(runs: Sequence[RunRecord], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, low, high) of `key` over the runs of one method, at the steps every run evaluated."""
    series = [dict(zip(*_series(r.trajectory, key))) for r in runs]
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    vals = np.array([[s[t] for t in common] for s in series], dtype=float).reshape(len(series), len(common))
    return (np.asarray(common, dtype=float), vals.mean(axis=0), vals.min(axis=0), vals.max(axis=0))


def plot_eval_trajectories(groups: dict[str, list[RunRecord]], benchmark: str, path: Path) -> Path | None:
    """One panel per headline metric; one line per method (its seeds' min-max shaded), the best step starred."""
    panels = [
        p
        for p in TRAJECTORY_PANELS[benchmark]
        if any(_series(r.trajectory, p[0])[0].size for runs in groups.values() for r in runs)
    ]
    if not panels:
        return None
    fig = _new_figure(4.8 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = dict(zip(groups, _palette(len(groups))))
    for ax, (key, title, log) in zip(axes, panels):
        for k, (name, runs) in enumerate(groups.items()):
            steps, mean, low, high = _group_series(runs, key)
            if not steps.size:
                continue
            positive = (mean > 0) if log else np.ones_like(mean, dtype=bool)
            label = name + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
            ax.plot(
                steps[positive],
                mean[positive],
                color=colours[name],
                linestyle=LINESTYLES[k % len(LINESTYLES)],
                marker=".",
                linewidth=1.4,
                label=label,
            )
            if len(runs) > 1:
                ok = positive & (low > 0) if log else positive
                ax.fill_between(steps[ok], low[ok], high[ok], color=colours[name], alpha=0.2, linewidth=0)
            else:
                best = finite_float(runs[0].info.get("best_step"))
                at = dict(zip(steps, mean))
                if best is not None and best in at and (at[best] > 0 or not log):
                    ax.scatter([best], [at[best]], marker="*", s=160, color=colours[name], edgecolor="black", zorder=4)
        if log:
            ax.set_yscale("log")
        if key == "forget_quality":
            ax.axhline(0.05, color="gray", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Evaluations during unlearning (star = best step)")
    return _save(fig, path)

"""Markdown + PNG report comparing unlearning runs (``baldro report RUN_DIR... --out DIR``).

`build_report` reads run directories written by the trainers (``run_info.json``,
``train_log.jsonl``, ``forget_losses.jsonl``, ``balance.jsonl``, ``eval/TOFU_SUMMARY.json``,
``eval/TOFU_EVAL.json``, or for MUSE runs ``eval/MUSE_SUMMARY.json``, and ``eval/LMEVAL_SUMMARY.json``
of lm-eval tasks, one column per task; every file but one of run_info.json / eval/ is optional) and writes
``report.md`` with a results table and four plots:

- ``fq_vs_mu.png``: forget quality vs model utility, one point per run;
- ``trajectories.png``: per-sample answer probability over training, one panel per method;
- ``spread.png``: spread of the per-sample probability vs mean probability over training;
- ``dro_weights.png``: the effective DRO weights (max weight, entropy, non-zero count) over training;
- ``attacks.png`` (when a run has ``RUN/attack/``, or an attack folder of ``baldro attack`` is passed):
  per-sample forget probability (MUSE: VerbMem) before vs after every attack, one panel per method, with
  a table per method of what each attack brought back and what it cost.
- ``eval_trajectory.png``: forget quality, model utility and forget probability (MUSE: VerbMem, forget and
  retain KnowMem) against the step, from each run's ``eval_trajectory.jsonl`` (evaluations during
  unlearning); runs that share a name are one line, their seeds' range shaded. The best step of each run
  (``run_info.json`` ``best_step``) is a column of the tables.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch) and written atomically; a plot with nothing to show is left out and the report says why.
"""

from __future__ import annotations

import io
import json
import math
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from baldro.balance import balance_from_eval_logs
from baldro.errors import BaldroError
from baldro.eval import metrics
from baldro.eval.recovery import ATTACK_SUMMARY, HEADLINE_METRIC, load_attack_summaries
from baldro.eval.summarize import truth_ratios
from baldro.io import read_jsonl, write_bytes_atomic, write_text_atomic

DPI = 120
REFERENCE_NAMES = ("target", "retain")
LMEVAL_SUMMARY = "LMEVAL_SUMMARY.json"  # baldro.eval.lm_eval.SUMMARY_FILE (read without importing the harness)


# ----------------------------------------------------------------------------- loading
@dataclass
class RunRecord:
    """Everything the report needs from one run directory (missing files give empty values)."""

    path: Path
    name: str
    info: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    eval_log: Path | None = None
    train_log: list[dict[str, Any]] = field(default_factory=list)
    balance: list[dict[str, Any]] = field(default_factory=list)
    forget_losses: list[dict[str, Any]] = field(default_factory=list)
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # eval_trajectory.jsonl
    benchmark: str = "tofu"  # "muse" when the run's summary is eval/MUSE_SUMMARY.json, "lm_eval" when it has only lm-eval's
    lm_eval: dict[str, Any] = field(default_factory=dict)  # eval/LMEVAL_SUMMARY.json: {"TASK/METRIC": value}

    def load_eval_log(self) -> dict[str, Any] | None:
        """The parsed eval/TOFU_EVAL.json (None when the run has none)."""
        if self.eval_log is None:
            return None
        return _read_json(self.eval_log)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BaldroError(f"{path} is not valid JSON ({e}); re-run the step that writes it") from None
    except OSError as e:
        raise BaldroError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return [r for r in read_jsonl(path) if isinstance(r, dict)]
    except json.JSONDecodeError as e:
        raise BaldroError(f"{path} has a malformed line ({e}); fix or delete the line") from None


def load_run(run_dir: str | Path) -> RunRecord:
    """Load a run directory: one with ``run_info.json`` and/or an eval summary in ``eval/`` (TOFU, MUSE, lm-eval)."""
    path = Path(run_dir)
    if not path.exists():
        raise BaldroError(f"run directory {path} does not exist; pass the folder a training or eval run wrote")
    if not path.is_dir():
        raise BaldroError(f"{path} is a file, not a run directory; pass the folder that holds run_info.json")
    info_path, summary_path = path / "run_info.json", path / "eval" / "TOFU_SUMMARY.json"
    benchmark = "tofu"
    if not summary_path.is_file() and (path / "eval" / "MUSE_SUMMARY.json").is_file():
        summary_path, benchmark = path / "eval" / "MUSE_SUMMARY.json", "muse"
    lm_path = path / "eval" / LMEVAL_SUMMARY
    if not summary_path.is_file() and lm_path.is_file():
        benchmark = "lm_eval"
    if not info_path.is_file() and not summary_path.is_file() and not lm_path.is_file():
        raise BaldroError(
            f"{path} is not a run directory (no run_info.json and no eval/TOFU_SUMMARY.json, MUSE_SUMMARY.json or "
            f"{LMEVAL_SUMMARY}); pass the folder a training or eval run wrote"
        )
    info = _read_json(info_path) if info_path.is_file() else {}
    summary = _read_json(summary_path) if summary_path.is_file() else {}
    lm_eval = _read_json(lm_path) if lm_path.is_file() else {}
    if not isinstance(lm_eval, dict):
        raise BaldroError(f"{lm_path} must hold a JSON object {{TASK/METRIC: value}}; re-run the evaluation")
    if isinstance(info, dict) and "seed" not in info and (path / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
        if isinstance(config, dict) and isinstance(config.get("seed"), int):
            info = {**info, "seed": config["seed"]}
    if not isinstance(info, dict):
        raise BaldroError(f"{info_path} must hold a JSON object; re-run the step that writes it")
    if not isinstance(summary, dict):
        raise BaldroError(f"{summary_path} must hold a JSON object {{metric: value}}; re-run the evaluation")
    eval_log = path / "eval" / "TOFU_EVAL.json"
    return RunRecord(
        path=path,
        name=str(info.get("name") or path.name),
        info=info,
        summary=summary,
        eval_log=eval_log if eval_log.is_file() else None,
        train_log=_read_rows(path / "train_log.jsonl"),
        balance=_read_rows(path / "balance.jsonl"),
        forget_losses=_read_rows(path / "forget_losses.jsonl"),
        trajectory=_read_rows(path / "eval_trajectory.jsonl"),
        benchmark=benchmark,
        lm_eval=lm_eval,
    )


@dataclass
class AttackRecord:
    """The attacks of one unlearned model: an attack folder of ``baldro attack`` (``RUN/attack``)."""

    paths: list[Path]
    name: str
    attacks: list[tuple[str, dict]]  # (folder, attack_summary.json), in folder order


def is_attack_folder(path: str | Path) -> bool:
    """A folder that ``baldro attack`` wrote (its attack_info.json, or an attack's summary)."""
    path = Path(path)
    return (path / "attack_info.json").is_file() or any(path.glob(f"*/{ATTACK_SUMMARY}"))


def load_attacks(path: str | Path, name: str | None = None) -> AttackRecord | None:
    """The attacks in an attack folder (None when it holds no finished attack)."""
    path = Path(path)
    attacks = load_attack_summaries(path)
    if not attacks:
        return None
    info = _read_json(path / "attack_info.json") if (path / "attack_info.json").is_file() else {}
    name = name or (info.get("name") if isinstance(info, dict) else None) or attacks[0][1].get("name") \
        or path.parent.name
    return AttackRecord([path], str(name), attacks)


# ----------------------------------------------------------------------------- formatting
_num = metrics.finite_float


def format_fq(value: Any) -> str:
    """Forget quality: 3 significant digits, scientific notation below 0.01; "n/a" when missing."""
    v = _num(value)
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    if abs(v) < 1e-2:
        return f"{v:.2e}"
    return f"{v:#.3g}"


def format_value(value: Any, digits: int = 3) -> str:
    v = _num(value)
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
    "KnowMem measures utility. \"n/a\" = not available."
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
    v = _num(value)
    return "n/a" if v is None else f"{int(v)}" if v.is_integer() else f"{v:.1f}"


# Runs that evaluated during unlearning with a train.metric_for_best_model: the step of the best evaluation.
BEST_STEP_COLUMN = ("Best step", "best_step", format_step)


def _with_best_step(columns: list, runs: Iterable["RunRecord"]) -> list:
    """The columns with "Best step" before the train time, when a run has one."""
    if not any(r.info.get("best_step") is not None for r in runs):
        return list(columns)
    return [*columns[:-1], BEST_STEP_COLUMN, columns[-1]]


def mean_std(values: Iterable[Any], fmt=format_value) -> str:
    """"mean ± sample std" of the finite values (the value alone for one, "n/a" for none)."""
    vals = [v for v in (_num(x) for x in values) if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(float(np.mean(vals)))} ± {fmt(float(np.std(vals, ddof=1)))}"


def seed_groups(labelled: Sequence[tuple[str, RunRecord]]) -> dict[str, list[int]]:
    """Method name -> positions of its runs (in order), for runs that share a run_info name."""
    groups: dict[str, list[int]] = {}
    for i, (_, run) in enumerate(labelled):
        groups.setdefault(run.name, []).append(i)
    return groups


def seed_table(names: Sequence[str], seeds: Sequence[Sequence[Any]], values: Sequence[Sequence[dict]],
               columns: Sequence[tuple[str, str, Any]] = SEED_COLUMNS) -> list[str]:
    """Markdown table: per method, the number of runs (seeds) and mean ± std of every column's value."""
    md = ["| Method | Seeds | " + " | ".join(h for h, _, _ in columns) + " |",
          "| --- | ---: |" + " ---: |" * len(columns)]
    for name, seed_list, vals in zip(names, seeds, values):
        cells = [mean_std((v.get(key) for v in vals), fmt) for _, key, fmt in columns]
        label = ",".join(str(x) for x in seed_list) if seed_list and None not in seed_list else str(len(vals))
        md.append(f"| {_md_cell(name)} | {label} | " + " | ".join(cells) + " |")
    return md


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
        s, v = _num(r.get("step")), _num(r.get(key))
        if s is not None and v is not None:
            steps.append(s)
            vals.append(v)
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps)[order], np.asarray(vals)[order]


def _prob_matrix(balance_rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps [T], prob [T, n]) with samples matched by id; NaN where a sample was not scored."""
    rows = sorted((r for r in balance_rows if _num(r.get("step")) is not None), key=lambda r: r["step"])
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
def _plot_fq_vs_mu(rows: list[dict[str, Any]], path: Path) -> tuple[Path | None, list[str]]:
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


def _plot_trajectories(
    methods: list[tuple[str, RunRecord]], path: Path, retain_median: float | None
) -> Path | None:
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
    for ax in list(axes.flat)[len(data):]:
        ax.set_visible(False)
    fig.suptitle("Per-sample forgetting trajectories (colour = rank of starting probability)")
    return _save(fig, path)


def _plot_spread(methods: list[tuple[str, RunRecord]], path: Path) -> Path | None:
    from baldro.balance import trajectory_spread

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


def _plot_dro_weights(methods: list[tuple[str, RunRecord]], path: Path) -> Path | None:
    panels = [
        p for p in WEIGHT_PANELS if any(_series(run.train_log, p[0])[0].size for _, run in methods)
    ]
    if not panels:
        return None
    fig = _new_figure(4.6 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = dict(zip([label for label, _ in methods], _palette(len(methods))))
    for ax, (key, title, ylabel) in zip(axes, panels):
        for k, (label, run) in enumerate(methods):
            steps, vals = _series(run.train_log, key)
            if steps.size:
                ax.plot(steps, vals, color=colors[label], linestyle=LINESTYLES[k % len(LINESTYLES)],
                        linewidth=1.4, label=label)
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


def _plot_seeds(groups: dict[str, list[int]], values: list[dict[str, Any]], path: Path) -> Path | None:
    fig = _new_figure(12, 4.5)
    ax_fq, ax_spread = fig.subplots(1, 2)
    colours = _palette(len(groups))
    for i, (name, ix) in enumerate(groups.items()):
        vals = [values[j] for j in ix]
        fq = np.array([_num(v.get("forget_quality")) or np.nan for v in vals], dtype=float)
        mu = np.array([_num(v.get("model_utility")) or np.nan for v in vals], dtype=float)
        ok = np.isfinite(fq) & np.isfinite(mu) & (fq > 0)
        ax_fq.scatter(mu[ok], fq[ok], color=colours[i], alpha=0.35, s=18)
        if ok.any():
            ax_fq.scatter([mu[ok].mean()], [np.exp(np.log(fq[ok]).mean())], color=colours[i], s=70,
                          edgecolor="black", label=name)
        spread = [v for v in (_num(x.get("_spread_at_0.3")) for x in vals) if v is not None]
        ax_spread.scatter([i] * len(spread), spread, color=colours[i])
        if spread:
            ax_spread.hlines(float(np.mean(spread)), i - 0.3, i + 0.3, color="black")
    ax_fq.set_yscale("log")
    ax_fq.axhline(0.05, color="grey", linestyle="--", linewidth=0.8)
    ax_fq.set(xlabel="model utility", ylabel="forget quality (log)", title="Every seed and the mean per method")
    if ax_fq.get_legend_handles_labels()[0]:  # no labelled point when no seed has a positive forget quality
        ax_fq.legend(fontsize=7, ncol=2)
    ax_spread.set_xticks(range(len(groups)), list(groups), rotation=45, ha="right", fontsize=8)
    ax_spread.set(ylabel="std of per-sample answer probability",
                  title="Spread when the mean answer probability is 0.3")
    return _save(fig, path)


def merge_attacks(records: Sequence[AttackRecord]) -> list[AttackRecord]:
    """One record per method name: the attack folders of one unlearned model (e.g. a relearning run and
    its retain-only control written to two folders) in one table and one panel."""
    merged: dict[str, AttackRecord] = {}
    for rec in records:
        if rec.name not in merged:
            merged[rec.name] = AttackRecord(list(rec.paths), rec.name, list(rec.attacks))
            continue
        have = merged[rec.name]
        seen = {folder for folder, _ in have.attacks}
        have.paths += rec.paths
        have.attacks += [(f"{folder} ({rec.paths[0]})" if folder in seen else folder, s) for folder, s in rec.attacks]
    return list(merged.values())


def _seconds(value: Any) -> str:
    v = _num(value)
    return "n/a" if v is None else f"{v:.1f}" if v >= 0.95 else f"{v:.2f}"


def _plot_attacks(records: Sequence[AttackRecord], path: Path) -> Path | None:
    """Per-sample headline value before (x) vs after (y) every attack, one panel per method."""
    panels = []
    for rec in records:
        points = []
        for folder, summary in rec.attacks:
            metric = HEADLINE_METRIC.get(summary.get("benchmark", "tofu"), "prob")
            rows = (summary.get("per_sample") or {}).get(metric) or {}
            before = np.array([_num(v) for v in rows.get("before", [])], dtype=float)
            after = np.array([_num(v) for v in rows.get("after", [])], dtype=float)
            if before.size and before.size == after.size:
                t = ((summary.get("thresholds") or {}).get(metric) or {}).get("value")
                points.append((folder, before, after, _num(t), metric))
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
        for (folder, before, after, t, _), colour in zip(points, _palette(len(points))):
            ax.scatter(np.maximum(before, low) if log_scale else before, np.maximum(after, low) if log_scale else after,
                       s=14, alpha=0.7, color=colour, label=folder)
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
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Per-sample before vs after each attack", fontsize=10)
    return _save(fig, path)


def _before_after(summary: dict, key: str, fmt=format_value) -> str:
    values = summary.get("summary") or {}
    return f"{fmt((values.get('before') or {}).get(key))} → {fmt((values.get('after') or {}).get(key))}"


def attack_table(rec: AttackRecord) -> list[str]:
    """Markdown: one row per attack of a method (what came back, the headline numbers, the cost)."""
    muse = any(s.get("benchmark") == "muse" for _, s in rec.attacks)
    keys = ([("VerbMem", "forget_verbmem_ROUGE"), ("KnowMem (forget)", "forget_knowmem_ROUGE"),
             ("KnowMem (retain)", "retain_knowmem_ROUGE"), ("PrivLeak", "privleak")] if muse else
            [("Forget prob", "forget_Q_A_Prob"), ("Forget ROUGE-L", "forget_Q_A_ROUGE"),
             ("Model utility", "model_utility")])
    md = ["| Attack | Came back | " + ("" if muse else "Forget quality | ") + " | ".join(h for h, _ in keys)
          + " | Attack (s) | Eval (s) |",
          "| --- | ---: |" + ("" if muse else " ---: |") + " ---: |" * len(keys) + " ---: | ---: |"]
    for folder, s in rec.attacks:
        h = s.get("headline")
        came = (f"{h['came_back']} of {h['forgotten_before']} ({h['metric']}"
                + (", held out" if h.get("scope") == "held_out" else "") + ")") if h else "n/a"
        cells = [_md_cell(folder), came]
        if not muse:
            fq = (s.get("forget_quality") or {}).get("held_out" if h and h.get("scope") == "held_out" else "all")
            cells.append(f"{format_fq(fq.get('before'))} → {format_fq(fq.get('after'))}" if fq else
                         _before_after(s, "forget_quality", format_fq))
        cells += [_before_after(s, key) for _, key in keys]
        cost = s.get("cost") or {}
        cells += [_seconds(cost.get("attack_seconds")), _seconds(cost.get("eval_seconds"))]
        md.append("| " + " | ".join(cells) + " |")
    return md


def _attack_section(records: Sequence[AttackRecord], plot: Path | None) -> list[str]:
    md = ["## Attacks", ""]
    if plot:
        md += ["![per-sample before vs after each attack](attacks.png)", "",
               "**How to read this.** One panel per unlearned model; each point is one forget sample, its "
               "answer probability (MUSE: VerbMem ROUGE) before the attack on the x-axis and after it on the "
               "y-axis. Points on the dotted diagonal did not move; points above it were brought back. The dashed "
               "red lines are the came-back threshold: a sample came back when it moves from the left of the "
               "vertical line to above the horizontal one. A balanced unlearning leaves no sample barely "
               "forgotten, so fewer points should cross.", ""]
    for rec in records:
        where = ", ".join(f"`{p}`" for p in rec.paths)
        md += [f"### {_md_cell(rec.name)}", "", f"Attacks in {where}.", ""] + attack_table(rec) + [""]
    md += ["*Came back*: forget samples that the attack moved from the forgotten to the remembered side of the "
           "threshold (default: the retain model's median per-sample value, see attack_summary.json's "
           "`thresholds`), of those forgotten before it; relearning on the held-out split counts only the samples "
           "it did not train on. Before → after: the unlearned model, then the attacked one. *Attack (s)*: the "
           "relearning's training or the quantized model's loading; *Eval (s)*: the evaluation that follows it.", ""]
    return md




# (summary key, panel title, log scale), per benchmark
TRAJECTORY_PANELS = {
    "tofu": [("forget_quality", "forget quality (KS p-value, higher = better)", True),
             ("model_utility", "model utility (higher = better)", False),
             ("forget_Q_A_Prob", "forget probability (lower = more forgotten)", True)],
    "muse": [("forget_verbmem_ROUGE", "VerbMem on the forget set (lower = more forgotten)", False),
             ("forget_knowmem_ROUGE", "KnowMem on the forget set (lower = more forgotten)", False),
             ("retain_knowmem_ROUGE", "KnowMem on the retain set (utility, higher = better)", False)],
}


def _group_series(runs: Sequence[RunRecord], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, low, high) of `key` over the runs of one method, at the steps every run evaluated."""
    series = [dict(zip(*_series(r.trajectory, key))) for r in runs]
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    vals = np.array([[s[t] for t in common] for s in series], dtype=float).reshape(len(series), len(common))
    return (np.asarray(common, dtype=float), vals.mean(axis=0), vals.min(axis=0), vals.max(axis=0))


def _plot_eval_trajectories(groups: dict[str, list[RunRecord]], benchmark: str, path: Path) -> Path | None:
    """One panel per headline metric; one line per method (its seeds' min-max shaded), the best step starred."""
    panels = [p for p in TRAJECTORY_PANELS[benchmark]
              if any(_series(r.trajectory, p[0])[0].size for runs in groups.values() for r in runs)]
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
            ax.plot(steps[positive], mean[positive], color=colours[name], linestyle=LINESTYLES[k % len(LINESTYLES)],
                    marker=".", linewidth=1.4, label=label)
            if len(runs) > 1:
                ok = positive & (low > 0) if log else positive
                ax.fill_between(steps[ok], low[ok], high[ok], color=colours[name], alpha=0.2, linewidth=0)
            else:
                best = _num(runs[0].info.get("best_step"))
                at = dict(zip(steps, mean))
                if best is not None and best in at and (at[best] > 0 or not log):
                    ax.scatter([best], [at[best]], marker="*", s=160, color=colours[name], edgecolor="black",
                               zorder=4)
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


# ----------------------------------------------------------------------------- report
def _as_run(run: str | Path | RunRecord) -> RunRecord:
    return run if isinstance(run, RunRecord) else load_run(run)


def _split_references(
    runs: list[RunRecord], retain: RunRecord | None, target: RunRecord | None
) -> tuple[list[RunRecord], RunRecord | None, RunRecord | None]:
    """Pull runs named "target" / "retain" out of `runs` (when not given explicitly); dedupe by path."""
    found: dict[str, list[RunRecord]] = {"target": [], "retain": []}
    methods = []
    given_paths = {r.path.resolve() for r in (retain, target) if r is not None}
    for r in runs:
        if r.path.resolve() in given_paths:
            continue
        if r.name in found:
            found[r.name].append(r)
        else:
            methods.append(r)
    for kind in REFERENCE_NAMES:
        explicit = target if kind == "target" else retain
        cands = found[kind]
        if explicit is not None:
            methods.extend(cands)  # an explicit reference wins; others show as ordinary rows
            continue
        if len(cands) > 1:
            raise BaldroError(
                f"{len(cands)} runs are named {kind!r} ({', '.join(str(c.path) for c in cands)}); "
                f"pass only one {kind} run"
            )
        if cands:
            if kind == "target":
                target = cands[0]
            else:
                retain = cands[0]
    return methods, retain, target


def _labels(runs: list[RunRecord]) -> list[str]:
    names = [r.name for r in runs]
    out = []
    for r in runs:
        label = r.name if names.count(r.name) == 1 else f"{r.name} ({r.path.name})"
        status = r.info.get("status")
        if status not in (None, "done"):
            label += f" [{status}]"
        out.append(label)
    return out


def _ks_and_spread(run: RunRecord, retain_tr) -> dict[str, Any]:
    """The KS statistic D behind forget quality, and the spread at equal mean forgetting."""
    from baldro.balance import spread_at_mean_forgetting

    out: dict[str, Any] = {}
    if retain_tr is not None and run.eval_log is not None:
        tr = truth_ratios(run.load_eval_log(), "forget_truth_ratio")
        out["_ks_d"] = metrics.ks_statistic(tr, retain_tr) if tr is not None and len(tr) else None
    for spread in spread_at_mean_forgetting(run.balance) if run.balance else []:
        out[f"_spread_at_{spread['level']:g}"] = spread["prob_std_at_level"]
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _spread_table(methods: list[tuple[str, RunRecord]]) -> list[str]:
    """Markdown rows: per-sample probability spread when each run's mean answer probability reaches a level."""
    from baldro.balance import SPREAD_LEVELS, spread_at_mean_forgetting

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
            cells.append("not reached | n/a" if s["step"] is None else
                         f"{s['step']}, {format_value(s['prob_mean'])}, {format_value(s['prob_std'])} | "
                         f"**{format_value(s['prob_std_at_level'])}**")
        md.append(f"| {_md_cell(label)} | " + " | ".join(cells) + " |")
    return md + [""]


def build_report(
    run_dirs: Sequence[str | Path | RunRecord],
    out_dir: str | Path,
    retain_run: str | Path | RunRecord | None = None,
    target_run: str | Path | RunRecord | None = None,
    by_seed: bool | None = None,
    attacks: Sequence[AttackRecord] = (),
) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots; return the path of report.md.

    Runs that share a name are one method under several seeds: ``by_seed`` (default: when a name
    repeats) adds their mean ± std table and plot, and the per-sample plots show each method's first run.

    ``run_dirs`` are the methods to compare (runs among them named "target" / "retain" are used as
    the references when ``target_run`` / ``retain_run`` are not given). Balance metrics missing from
    a run's summary are computed from its eval log against the references' eval logs. ``attacks``:
    what ``baldro attack`` found for each method (the Attacks section).
    """
    runs = [_as_run(r) for r in run_dirs]
    retain = _as_run(retain_run) if retain_run is not None else None
    target = _as_run(target_run) if target_run is not None else None
    methods, retain, target = _split_references(runs, retain, target)
    if not methods and retain is None and target is None and not attacks:
        raise BaldroError("no runs to report; pass at least one run directory")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BaldroError(f"--out {out} is a file; pass a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    attacks = merge_attacks(attacks)
    if not runs and retain is None and target is None:  # attack folders alone
        md = ["# baldro attack report", "", *_attack_section(attacks, _plot_attacks(attacks, out / "attacks.png"))]
        return write_text_atomic(out / "report.md", "\n".join(md))
    every = [r for r in [*methods, retain, target] if r is not None]
    is_muse = all(r.benchmark == "muse" for r in every)
    only_lm_eval = all(r.benchmark == "lm_eval" for r in every)  # e.g. WMDP runs: the harness's tasks only
    lm_columns = lm_eval_columns(every)
    train_time = [c for c in COLUMNS if c[1] == "train_time_s"]
    base = train_time if only_lm_eval else MUSE_COLUMNS if is_muse else COLUMNS
    columns = _with_best_step([*base[:-1], *lm_columns, base[-1]], methods)  # lm-eval tasks before the training time

    ref_logs = {
        "retain": retain.load_eval_log() if retain is not None else None,
        "target": target.load_eval_log() if target is not None else None,
    }
    rows: list[tuple[str, str, RunRecord]] = []  # (label, kind, run)
    if target is not None:
        rows.append(("target (reference)", "target", target))
    if retain is not None:
        rows.append(("retain (reference)", "retain", retain))
    method_labels = _labels(methods)
    rows += [(label, "method", r) for label, r in zip(method_labels, methods)]

    retain_tr = truth_ratios(ref_logs["retain"], "forget_truth_ratio") if ref_logs["retain"] is not None else None
    values: list[dict[str, Any]] = []
    notes: list[str] = []
    for label, kind, run in rows:
        v: dict[str, Any] = {**run.summary, **run.lm_eval}
        v["train_time_s"] = run.info.get("train_time_s")
        v["best_step"] = run.info.get("best_step")
        needs = [k for _, k, _ in columns if k.startswith("balance_") and _num(v.get(k)) is None]
        if needs and run.eval_log is not None:
            try:
                computed = balance_from_eval_logs(run.load_eval_log(), ref_logs["retain"], ref_logs["target"])
            except BaldroError as e:
                notes.append(f"{label}: {e}")
            else:
                for k in needs:
                    v[k] = computed.get(k)
                if computed.get("balance_note"):
                    notes.append(f"{label}: {computed['balance_note']}")
        if kind == "retain" and _num(v.get("forget_quality")) is None:
            v["forget_quality"] = 1.0  # KS test of the retain model against itself
            v["_fq_by_definition"] = True
        v.update(_ks_and_spread(run, retain_tr))
        values.append(v)

    # ---- plots
    plots: dict[str, Path | None] = {}
    fq_rows = [
        {"label": label if kind == "method" else kind, "kind": kind,
         "fq": _num(v.get("forget_quality")), "mu": _num(v.get("model_utility"))}
        for (label, kind, _), v in zip(rows, values)
    ]
    plots["fq_vs_mu"], fq_skipped = _plot_fq_vs_mu(fq_rows, out / "fq_vs_mu.png")
    retain_median = None
    if ref_logs["retain"] is not None:
        probs = (ref_logs["retain"].get("forget_Q_A_Prob") or {}).get("value_by_index") or {}
        arr = np.array([_num((p or {}).get("prob")) if isinstance(p, dict) else None for p in probs.values()], dtype=float)
        arr = arr[np.isfinite(arr)]
        retain_median = float(np.median(arr)) if arr.size else None
    labelled = list(zip(method_labels, methods))
    groups = seed_groups(labelled)
    has_seeds = any(len(ix) > 1 for ix in groups.values()) if by_seed is None else by_seed
    if has_seeds:  # one run per method (its first seed) in the per-sample plots, to keep them readable
        labelled = [(name, labelled[ix[0]][1]) for name, ix in groups.items()]
    n_refs = len(rows) - len(methods)
    method_values = values[n_refs:]
    plots["seeds"] = _plot_seeds(groups, method_values, out / "seeds.png") if has_seeds else None
    plots["trajectories"] = _plot_trajectories(labelled, out / "trajectories.png", retain_median)
    plots["spread"] = _plot_spread(labelled, out / "spread.png")
    plots["dro_weights"] = _plot_dro_weights(labelled, out / "dro_weights.png")
    plots["attacks"] = _plot_attacks(attacks, out / "attacks.png")
    by_name: dict[str, list[RunRecord]] = {}
    for run in methods:
        if run.trajectory:
            by_name.setdefault(run.name, []).append(run)
    plots["eval_trajectory"] = _plot_eval_trajectories(by_name, "muse" if is_muse else "tofu",
                                                       out / "eval_trajectory.png")
    for name, p in plots.items():  # a stale plot from an earlier report must not linger
        stale = out / f"{name}.png"
        if p is None and stale.exists():
            stale.unlink()

    # ---- markdown
    md: list[str] = ["# baldro unlearning report", ""]
    all_dirs = [str(r.path) for _, _, r in rows]
    md += [
        f"Runs: {len(methods)} method(s)"
        + (f", target model `{target.path}`" if target else ", no target model")
        + (f", retain model `{retain.path}`" if retain else ", no retain model")
        + ".",
        "",
        "Rebuild this report with:",
        "",
        "```bash",
        "baldro report " + " ".join(shlex.quote(d) for d in all_dirs) + " --out " + shlex.quote(str(out)),
        "```",
        "",
        "## Results",
        "",
        "| Method | " + " | ".join(h for h, _, _ in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for (label, kind, run), v in zip(rows, values):
        cells = [fmt(v.get(key)) for _, key, fmt in columns]
        if v.get("_fq_by_definition") and not is_muse and not only_lm_eval:
            cells[0] += " (by definition)"
        md.append(f"| {_md_cell(label)} | " + " | ".join(cells) + " |")
    if lm_columns:
        md += ["", "lm-eval columns: each task's first metric in eval/LMEVAL_SUMMARY.json (lm-evaluation-harness; a "
                   "group's aggregate, e.g. MMLU's accuracy over its subjects); for WMDP, lower accuracy on the "
                   "hazardous questions (chance: 0.25) and unchanged MMLU is the aim."]
    md += [""] if only_lm_eval else ["", MUSE_NOTE, ""] if is_muse else [
        "",
        "Forget quality is the KS-test p-value between the run's and the retain model's per-sample forget "
        "truth ratios (higher = closer to never having seen the forget set); model utility is the harmonic "
        "mean of nine retain / real-authors / world-facts scores. *Balance* columns (SPEC section 6): "
        "std and inter-quartile range of the per-sample forget truth ratio (TR) and answer probability at the "
        "end of training; *Remembered* = fraction of forget samples whose probability is above the retain "
        "model's median; *Over-forgotten* = fraction whose probability fell below 1e-3 of the target "
        "model's or whose greedy answer has ROUGE-L recall 0 (gibberish). Lower spread at equal mean "
        "forgetting = better balance. \"n/a\" = not available.",
        "",
    ]
    if notes:
        md += ["Notes:", ""] + [f"- {_md_cell(n)}" for n in notes] + [""]

    if has_seeds:
        names = list(groups)
        md += ["## Mean ± std over seeds", ""]
        seed_base = train_time if only_lm_eval else MUSE_COLUMNS if is_muse else SEED_COLUMNS
        md += seed_table(names, [[methods[i].info.get("seed") for i in groups[n]] for n in names],
                         [[method_values[i] for i in groups[n]] for n in names],
                         _with_best_step([*seed_base[:-1], *lm_columns, seed_base[-1]], methods))
        md += [
            "",
            "Runs with the same name are one method under several seeds: mean ± sample standard deviation. "
            "*KS D* is the KS statistic behind forget quality (the largest gap between the two truth-ratio "
            "distributions). *Prob std at mean x*: the std of the per-sample answer probability when the "
            "run's mean probability is x, interpolated between the scoring steps either side of x (spread at "
            "equal mean forgetting; lower = more even; n/a = x not reached).",
            "",
        ]
        if plots["seeds"]:
            md += ["![every seed](seeds.png)", "",
                   "**How to read this.** Left: forget quality against model utility, every seed (faint) and "
                   "the mean of each method (outlined). Right: the spread at equal mean forgetting of every "
                   "seed, the bar its mean; methods whose points overlap cannot be told apart at this number "
                   "of seeds.", ""]

    md += ["## Evaluations during unlearning", ""]
    if plots["eval_trajectory"]:
        best = sorted({f"`{r.info['metric_for_best_model']}`" for r in methods if r.info.get("metric_for_best_model")})
        md += [
            "![evaluations during unlearning](eval_trajectory.png)",
            "",
            "**How to read this.** The benchmark's evaluation of each run's model at step 0 (the starting model) and "
            "at every evaluation point (`train.eval_strategy`; its rows may be a subset, `eval.trajectory_limit`, so "
            "the numbers can differ from the final evaluation's). Runs that share a name are one line, the mean of "
            "their seeds at the steps they all evaluated, with the seeds' range shaded. A star marks a run's best "
            "step"
            + (f" (the best {', '.join(best)} among evaluations whose utility stays above `eval.utility_floor` x "
               "step 0's; *Best step* in the tables)" if best else "")
            + ". Unlearning often over-shoots: forget quality rises, then falls while utility decays.",
            "",
        ]
    else:
        md += ["No run has an eval_trajectory.jsonl (train.eval_strategy=no), so there is no plot of evaluations "
               "during unlearning.", ""]

    md += ["## Forget quality vs model utility", ""]
    if plots["fq_vs_mu"]:
        md += [
            "![forget quality vs model utility](fq_vs_mu.png)",
            "",
            "**How to read this.** Each point is one run; up and to the right is better (forgets like the "
            "retain model while keeping utility). The green star is the retain model (the ideal, forget quality "
            "1 by definition), the red cross the target model before unlearning. The y-axis is logarithmic: "
            "forget quality is a p-value, and points above the dashed p = 0.05 line cannot be told apart from "
            "the retain model by the KS test.",
            "",
        ]
        if fq_skipped:
            md += [f"Not plotted (forget quality or model utility missing): {', '.join(fq_skipped)}.", ""]
    else:
        md += ["No run has both forget quality and model utility, so there is no plot.", ""]

    md += ["## Per-sample forgetting trajectories", ""]
    if plots["trajectories"]:
        md += [
            "![per-sample forgetting trajectories](trajectories.png)",
            "",
            "**How to read this.** One panel per method; each thin line is one forget sample's answer "
            "probability exp(-mean token NLL) over optimizer steps (log scale), coloured by its rank at the "
            "start (yellow = best remembered). The bold black line is the median"
            + (", the dashed red line the retain model's median forget probability (samples above it count "
               "as still remembered)" if retain_median is not None else "")
            + ". Asynchronous forgetting shows as a fan: some lines dive by orders of magnitude early "
            "(over-forgetting) while others stay high. A balanced method (DRO up-weights the still-remembered, "
            "high-loss samples) keeps the bundle narrow and brings the top lines down together.",
            "",
        ]
    else:
        md += ["No run has a balance.jsonl (per-sample scores during training), so there is no trajectory plot.", ""]

    md += ["## Spread of forgetting over training", ""]
    if plots["spread"]:
        md += [
            "![spread of forgetting](spread.png)",
            "",
            "**How to read this.** Left: the standard deviation of the per-sample answer probability at each "
            "scoring step. Right: the same standard deviation against the mean probability, so methods are "
            "compared at equal mean forgetting (training moves right to left; the big dot is the end). A curve "
            "lower on the right panel forgets more evenly for the same amount of forgetting.",
            "",
        ]
    else:
        md += ["No run has a balance.jsonl, so there is no spread plot.", ""]
    md += _spread_table(list(zip(method_labels, methods)))

    md += ["## Effective DRO weights", ""]
    if plots["dro_weights"]:
        md += [
            "![effective DRO weights](dro_weights.png)",
            "",
            "**How to read this.** Per optimizer step, how concentrated the weighting of the batch's forget "
            "losses is: the largest single weight, the entropy of the weights and the number of samples with a "
            "non-zero weight (the panels present in the logs). Plain averaging (ERM) is flat at 1/B, log B and B. "
            "BalDRO-DV raises the max weight and lowers the entropy when a few samples are still remembered; "
            "BalDRO-G keeps only the hardest k samples. Weights that return toward uniform late in training mean "
            "the forget losses have evened out.",
            "",
        ]
    else:
        md += ["No run logs weight_max / weight_entropy / weight_nonzero in train_log.jsonl, so there is no weight plot.", ""]
    if attacks:
        md += _attack_section(attacks, plots["attacks"])

    return write_text_atomic(out / "report.md", "\n".join(md))


def report_main(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> Path:
    """CLI entry (``baldro report RUN_DIR... [--out DIR]``): runs named "target" / "retain" (by
    run_info name) become the references; a run's ``RUN/attack`` folder, or an attack folder passed
    itself, adds the Attacks section. ``out_dir`` defaults to ``./report``."""
    if not run_dirs:
        raise BaldroError("baldro report needs at least one run directory: baldro report RUN_DIR... --out DIR")
    runs, attacks = [], []
    for d in run_dirs:
        if is_attack_folder(d) and not (Path(d) / "run_info.json").is_file():  # baldro attack's output folder
            record = load_attacks(d)
        else:
            runs.append(load_run(d))
            record = load_attacks(Path(d) / "attack", runs[-1].name) if (Path(d) / "attack").is_dir() else None
        if record is not None:
            attacks.append(record)
    return build_report(runs, Path(out_dir) if out_dir is not None else Path("report"), attacks=attacks)

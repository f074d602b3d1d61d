"""Recompute every aggregate of an eval log from its per-sample values (`baldro summarize`).

Works on our logs and on OpenUnlearning's `TOFU_EVAL.json` / `MUSE_EVAL.json`
(`{metric: {"agg_value", "value_by_index": {"0": {...}}}}`; MIA entries
`{"forget": {...}, "holdout": {...}, "auc", "agg_value"}`), against any reference log (the retain
model's for TOFU forget quality and PrivLeak, the retrained model's for MUSE PrivLeak). Every
number goes through `baldro.eval.metrics`, so there is one definition of each metric.

Over 500 lines for a reason: every aggregate of both benchmarks' logs, OpenUnlearning's layout included, is
recomputed here, in one place, from the per-sample values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from baldro.errors import BaldroError
from baldro.eval import metrics as M
from baldro.io import write_json_atomic

TOFU = "tofu"
MUSE = "muse"

# OpenUnlearning's `ref_value` for PrivLeak when no reference log is given (chance-level AUC).
DEFAULT_REFERENCE_AUC = 0.5
PRIVLEAK_ATTACK = "mia_min_k"

# name -> (correct/paraphrased key, perturbed key, aggregator); the per-sample TR is stored under name.
TOFU_TRUTH_RATIOS: dict[str, tuple[str, str, Callable]] = {
    "forget_truth_ratio": ("forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", M.truth_ratio_closer_to_1),
    "retain_Truth_Ratio": ("retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob", M.truth_ratio_true_better),
    "ra_Truth_Ratio": ("ra_Q_A_Prob", "ra_Q_A_PERT_Prob", M.truth_ratio_true_better),
    "wf_Truth_Ratio": ("wf_Q_A_Prob", "wf_Q_A_PERT_Prob", M.truth_ratio_true_better),
}
TOFU_NORMALISED = {
    "ra_Q_A_Prob_normalised": ("ra_Q_A_Prob", "ra_Q_A_PERT_Prob"),
    "wf_Q_A_Prob_normalised": ("wf_Q_A_Prob", "wf_Q_A_PERT_Prob"),
}
MODEL_UTILITY_COMPONENTS = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
)
# Which ROUGE variant each benchmark reports (SPEC section 5).
ROUGE_FIELD = {TOFU: "rougeL_recall", MUSE: "rougeL_f1"}

_TOFU_HEAD = (
    "forget_quality",
    "model_utility",
    "forget_truth_ratio",
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "exact_memorization",
    "extraction_strength",
)
_TOFU_SETS = ("forget", "retain", "ra", "wf")
_MUSE_HEAD = (
    "forget_verbmem_ROUGE",
    "forget_knowmem_ROUGE",
    "retain_knowmem_ROUGE",
    "exact_memorization",
    "extraction_strength",
)


class Summary(dict):
    """`{metric: float | None}` in OpenUnlearning's summary layout. `notes` maps a metric to one
    line saying why it is missing or what it was computed against, when that is not obvious."""

    def __init__(self, benchmark: str):
        super().__init__()
        self.benchmark = benchmark
        self.notes: dict[str, str] = {}

    def put(self, name: str, value: float | None, note: str | None = None) -> None:
        self[name] = None if value is None else float(value)
        if note:
            self.notes[name] = note


# --- reading per-sample values ------------------------------------------------------------------


def _rows(log: dict, key: str) -> dict[str, dict] | None:
    """The per-sample dicts of `log[key]` in logged order (None entries dropped, as upstream)."""
    entry = log.get(key)
    if not isinstance(entry, dict):
        return None
    vbi = entry.get("value_by_index")
    if not isinstance(vbi, dict):
        return None
    rows = {i: r for i, r in vbi.items() if isinstance(r, dict)}
    return rows or None


def _is_missing(x: Any) -> bool:
    if x is None:
        return True
    if isinstance(x, list):
        return len(x) == 0 or any(_is_missing(v) for v in x)
    return isinstance(x, float) and math.isnan(x)


def _column(rows: dict[str, dict], field: str) -> tuple[list[str], list]:
    """Indices and values of `field` over the rows that have it."""
    idx = [i for i, r in rows.items() if not _is_missing(r.get(field))]
    return idx, [rows[i][field] for i in idx]


def _row_means(values: list) -> np.ndarray:
    """One number per sample: scalars stay, lists (several answers) are averaged."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except ValueError:  # ragged lists
        return np.array([np.mean(np.asarray(v, dtype=np.float64)) for v in values])
    return arr if arr.ndim == 1 else arr.mean(axis=tuple(range(1, arr.ndim)))


def _probs(rows: dict[str, dict]) -> tuple[list[str], np.ndarray] | None:
    """Per-sample (length-normalised) probabilities, several answers averaged per sample.

    The logged `prob` is used when present: it is the same exp(-avg_loss), but evaluated by the
    model code in float32, and OpenUnlearning's aggregates are means of exactly those numbers
    (recomputing exp in float64 moves them by up to ~1e-8)."""
    idx, probs = _column(rows, "prob")
    if idx:
        return idx, [np.asarray(p, dtype=np.float64) for p in probs]
    idx, losses = _column(rows, "avg_loss")
    if idx:
        return idx, [M.probability(np.asarray(v, dtype=np.float64)) for v in losses]
    return None


def _pair(a: tuple[list[str], list], b: tuple[list[str], list]) -> tuple[list, list]:
    """Values of two columns on their common sample indices, in the first one's order."""
    b_map = dict(zip(*b))
    common = [i for i in a[0] if i in b_map]
    a_map = dict(zip(*a))
    return [a_map[i] for i in common], [b_map[i] for i in common]


def truth_ratios(log: dict, name: str) -> np.ndarray | None:
    """Per-sample truth ratios of one TOFU set, recomputed from the average losses when the log
    has them, else the per-sample scores logged under `name` (OpenUnlearning stores the raw TR)."""
    correct_key, wrong_key, _ = TOFU_TRUTH_RATIOS[name]
    correct, wrong = _rows(log, correct_key), _rows(log, wrong_key)
    if correct and wrong:
        c, w = _pair(_column(correct, "avg_loss"), _column(wrong, "avg_loss"))
        if c:
            return M.truth_ratio(np.asarray(c, dtype=np.float64), _row_means(w))
    rows = _rows(log, name)
    if rows:
        _, scores = _column(rows, "score")
        if scores:
            return np.asarray(scores, dtype=np.float64)
    return None


def _mean_score(log: dict, key: str, field: str = "score") -> float | None:
    rows = _rows(log, key)
    if not rows:
        return None
    _, vals = _column(rows, field)
    return float(np.mean(np.asarray(vals, dtype=np.float64))) if vals else None


def _rouge_mean(log: dict, key: str, field: str) -> float | None:
    """Mean per-sample ROUGE; rescored from `generation`/`ground_truth` if the field is absent."""
    rows = _rows(log, key)
    if not rows:
        return None
    idx, vals = _column(rows, field)
    texts = [
        r for r in rows.values() if isinstance(r.get("generation"), str) and isinstance(r.get("ground_truth"), str)
    ]
    if len(texts) > len(idx):
        vals = [s[field] for s in M.rouge([r["generation"] for r in texts], [r["ground_truth"] for r in texts])]
    return float(np.mean(vals)) if vals else None


def mia_auc_of(log: dict, key: str) -> float | None:
    """AUC of one MIA entry, recomputed from its per-sample forget and holdout scores."""
    entry = log.get(key)
    if not isinstance(entry, dict):
        return None
    scores = []
    for split in ("forget", "holdout"):
        rows = _rows(entry, split)
        if not rows:
            return None
        _, vals = _column(rows, "score")
        if not vals:
            return None
        scores.append(vals)
    return M.mia_auc(scores[0], scores[1])


def _mia_keys(log: dict) -> list[str]:
    keys = [k for k, v in log.items() if k.startswith("mia_") and isinstance(v, dict) and "forget" in v]
    preferred = ["mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"]
    return [k for k in preferred if k in keys] + sorted(k for k in keys if k not in preferred)


# --- shared pieces ------------------------------------------------------------------------------


def _memorisation_and_mia(log: dict, reference_log: dict | None, out: Summary, ref_name: str) -> None:
    for key in ("exact_memorization", "extraction_strength"):
        value = _mean_score(log, key)
        if value is not None:
            out.put(key, value)
    for key in _mia_keys(log):
        auc = mia_auc_of(log, key)
        if auc is not None:
            out.put(key, auc)

    auc = out.get(PRIVLEAK_ATTACK)
    if auc is None:
        out.put("privleak", None, f"no per-sample {PRIVLEAK_ATTACK} scores in this log")
    elif reference_log is None:
        out.put(
            "privleak",
            M.privleak(auc, DEFAULT_REFERENCE_AUC),
            f"no reference log: against AUC {DEFAULT_REFERENCE_AUC} (OpenUnlearning's default); "
            f"pass the {ref_name} model's log for the real PrivLeak",
        )
    else:
        ref_auc = mia_auc_of(reference_log, PRIVLEAK_ATTACK)
        if ref_auc is None:
            out.put("privleak", None, f"the reference log has no per-sample {PRIVLEAK_ATTACK} scores")
        else:
            out.put("privleak", M.privleak(auc, ref_auc))


def _note_disagreements(log: dict, out: Summary) -> None:
    """Flag aggregates whose recomputed value differs from the one written in the log."""
    for key, value in out.items():
        entry = log.get(key)
        logged = entry.get("agg_value") if isinstance(entry, dict) else None
        if value is None or not isinstance(logged, (int, float)) or key in out.notes:
            continue
        if not math.isclose(value, logged, rel_tol=1e-6, abs_tol=1e-9):
            out.notes[key] = f"recomputed {value:.7g}, the log says {logged:.7g}"


# --- TOFU and MUSE ------------------------------------------------------------------------------


def summarize_tofu(eval_log: dict, reference_log: dict | None = None) -> Summary:
    """TOFU summary: OpenUnlearning's headline metrics plus every per-set aggregate that the log's
    per-sample values allow. `reference_log` is the retain model's log (forget quality, PrivLeak)."""
    out = Summary(TOFU)
    aggs: dict[str, float] = {}

    for name, (_, _, aggregate) in TOFU_TRUTH_RATIOS.items():
        tr = truth_ratios(eval_log, name)
        if tr is not None and tr.size:
            aggs[name] = aggregate(tr)
    for name, (correct_key, wrong_key) in TOFU_NORMALISED.items():
        correct, wrong = _rows(eval_log, correct_key), _rows(eval_log, wrong_key)
        pc = _probs(correct) if correct else None
        pw = _probs(wrong) if wrong else None
        if pc and pw:
            c, w = _pair(pc, pw)
            if c:
                aggs[name] = float(np.mean(M.normalised_probability_from_probs(c, _stack(w))))
                continue
        value = _mean_score(eval_log, name, "prob")
        if value is not None:
            aggs[name] = value
    for key in eval_log:
        if key.endswith("_Prob") and key not in aggs:
            rows = _rows(eval_log, key)
            probs = _probs(rows) if rows else None
            if probs:
                aggs[key] = float(np.mean(_row_means(probs[1])))
        elif key.endswith("_ROUGE"):
            value = _rouge_mean(eval_log, key, ROUGE_FIELD[TOFU])
            if value is not None:
                aggs[key] = value

    # forget quality
    if reference_log is None:
        out.put("forget_quality", None, "needs the retain model's eval log (--reference)")
    else:
        mine = truth_ratios(eval_log, "forget_truth_ratio")
        ref = truth_ratios(reference_log, "forget_truth_ratio")
        if mine is None or ref is None:
            which = "this log" if mine is None else "the reference log"
            out.put("forget_quality", None, f"{which} has no per-sample forget truth ratios")
        elif len(mine) != len(ref):
            out.put(
                "forget_quality",
                None,
                f"the reference has {len(ref)} forget samples, this log {len(mine)}: "
                "use the retain model of the matching split (forget01/05/10 with retain99/95/90)",
            )
        else:
            out.put("forget_quality", M.forget_quality(mine, ref))

    missing = [k for k in MODEL_UTILITY_COMPONENTS if k not in aggs]
    if len(missing) == len(MODEL_UTILITY_COMPONENTS):
        out.put("model_utility", None, "no retain, real-authors or world-facts metrics (an eval.forget_only log?)")
    elif missing:
        out.put("model_utility", None, "missing " + ", ".join(missing))
    else:
        out.put("model_utility", M.model_utility(aggs[k] for k in MODEL_UTILITY_COMPONENTS))

    for key in _TOFU_HEAD[2:5]:
        if key in aggs:
            out.put(key, aggs[key])
    _memorisation_and_mia(eval_log, reference_log, out, "retain")
    for prefix in _TOFU_SETS:
        for key in sorted(aggs, key=_tofu_set_order):
            if key.startswith(prefix + "_") and key not in out:
                out.put(key, aggs[key])
    for key in aggs:  # anything else (unusual split names)
        if key not in out:
            out.put(key, aggs[key])
    _note_disagreements(eval_log, out)
    note_non_finite(eval_log, out)
    return out


def non_finite_entries(log: dict) -> list[str]:
    """Metrics whose per-sample entries exist but hold no finite number (NaN scores: a model whose
    outputs are not finite, e.g. one whose training diverged)."""
    bad = []
    for key in log:
        rows = _rows(log, key)
        if not rows:
            continue
        numbers = [v for r in rows.values() for f, v in r.items() if f not in ("generation", "ground_truth", "input")]
        if numbers and all(_is_missing(v) or (isinstance(v, float) and not math.isfinite(v)) for v in numbers):
            bad.append(key)
    return bad


def note_non_finite(log: dict, out: Summary) -> None:
    """Say why metrics are n/a when the per-sample values behind them are NaN."""
    bad = sorted(non_finite_entries(log))
    if not bad:
        return
    why = (
        f"the per-sample values of {', '.join(bad[:4])}{' and others' if len(bad) > 4 else ''} are all NaN: the "
        "model's outputs are not finite (a diverged training run?)"
    )
    sources = {
        "forget_quality": [k for k in bad if k.startswith("forget_")],
        "model_utility": [k for k in bad if k.startswith(("retain_", "ra_", "wf_"))],
        "privleak": [k for k in bad if k.startswith("mia_")],
    }
    for key, value in out.items():
        if value is None and (sources.get(key, True) if key not in out.notes else sources.get(key)):
            if "are all NaN" not in out.notes.get(key, ""):
                out.notes[key] = f"{out.notes[key]}; {why}" if key in out.notes else why


def _tofu_set_order(key: str) -> tuple[int, str]:
    order = ("_Q_A_Prob", "_Q_A_PARA_Prob", "_Q_A_PERT_Prob", "_Q_A_Prob_normalised", "_Q_A_ROUGE")
    for i, suffix in enumerate(order):
        if key.endswith(suffix):
            return i, key
    return len(order), key


def _stack(values: list) -> np.ndarray:
    """(N, K) from per-sample lists of K wrong-answer probabilities."""
    return np.stack([np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in values])


def summarize_muse(eval_log: dict, reference_log: dict | None = None) -> Summary:
    """MUSE summary: VerbMem / KnowMem ROUGE-L F1, memorisation, MIA AUCs and PrivLeak against
    `reference_log` (the retrained model's log)."""
    out = Summary(MUSE)
    rouge_keys = [k for k in _MUSE_HEAD if k.endswith("_ROUGE")]
    rouge_keys += sorted(k for k in eval_log if k.endswith("_ROUGE") and k not in rouge_keys)
    for key in rouge_keys:
        value = _rouge_mean(eval_log, key, ROUGE_FIELD[MUSE])
        if value is not None:
            out.put(key, value)
    _memorisation_and_mia(eval_log, reference_log, out, "retrained")
    _note_disagreements(eval_log, out)
    return out


# --- entry points -------------------------------------------------------------------------------


def detect_benchmark(eval_log: dict) -> str:
    """'tofu' or 'muse', from the metric names of an eval log."""
    keys = list(eval_log)
    if any("knowmem" in k or "verbmem" in k for k in keys):
        return MUSE
    if any(k in TOFU_TRUTH_RATIOS or "_Q_A_" in k or k in ("model_utility", "forget_quality") for k in keys):
        return TOFU
    raise BaldroError(
        "cannot tell whether this eval log is TOFU or MUSE (no *_Q_A_*, truth-ratio, knowmem or "
        "verbmem metrics); pass the benchmark explicitly"
    )


def check_eval_log(log: Any, what: str = "eval log") -> dict:
    """`log` itself if it looks like a per-sample eval log, else a BaldroError saying what it is."""
    if not isinstance(log, dict) or not log:
        raise BaldroError(f"{what} is not an eval log: expected a JSON object of metrics, got {type(log).__name__}")
    entries = [v for v in log.values() if isinstance(v, dict)]
    if not entries and all(isinstance(v, (int, float)) or v is None for v in log.values()):
        raise BaldroError(
            f"{what} is a summary (one number per metric), not an eval log: pass the *_EVAL.json "
            "file with per-sample values"
        )
    if not any("value_by_index" in v or "forget" in v for v in entries):
        raise BaldroError(
            f"{what} is not an eval log: no metric has per-sample values "
            '({"metric": {"agg_value": ..., "value_by_index": {"0": {...}}}})'
        )
    for key, entry in log.items():
        for sub, e in [(key, entry)] + [
            (f"{key}.{k}", v) for k, v in (entry.items() if isinstance(entry, dict) else ())
        ]:
            vbi = e.get("value_by_index") if isinstance(e, dict) else None
            if vbi is not None and not isinstance(vbi, dict):
                raise BaldroError(
                    f"{what}: {sub}.value_by_index is a {type(vbi).__name__}, not an object keyed by sample index "
                    '({"0": {...}, "1": {...}}): convert it, e.g. {str(i): row for i, row in enumerate(rows)}'
                )
    return log


def summarize(eval_log: dict, reference_log: dict | None = None, benchmark: str | None = None) -> Summary:
    """Summary of `eval_log` (TOFU or MUSE, detected from its keys unless `benchmark` is given)."""
    check_eval_log(eval_log)
    benchmark = (benchmark or detect_benchmark(eval_log)).lower()
    if benchmark not in (TOFU, MUSE):
        raise BaldroError(f"unknown benchmark {benchmark!r}: use 'tofu' or 'muse'")
    if reference_log is not None:
        check_eval_log(reference_log, "the reference log")
        try:
            ref_benchmark = detect_benchmark(reference_log)
        except BaldroError:
            ref_benchmark = benchmark
        if ref_benchmark != benchmark:
            raise BaldroError(f"the eval log is {benchmark.upper()} but the reference log is {ref_benchmark.upper()}")
    if benchmark == TOFU:
        return summarize_tofu(eval_log, reference_log)
    return summarize_muse(eval_log, reference_log)


def format_table(summary: dict) -> str:
    """Aligned two-column text table (metric, value); notes, if any, listed below it."""
    rows = [("metric", "value")]
    for name, value in summary.items():
        rows.append((name, "n/a" if value is None else f"{value:.7g}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.insert(1, "-" * width + "  " + "-" * max(len(v) for _, v in rows))
    notes = getattr(summary, "notes", None)
    if notes:
        lines.append("")
        lines += [f"{name}: {note}" for name, note in notes.items()]
    return "\n".join(lines)


def _eval_file(path: Path) -> Path:
    if path.is_dir():
        found = [path / n for n in ("TOFU_EVAL.json", "MUSE_EVAL.json") if (path / n).is_file()]
        if len(found) != 1:
            raise BaldroError(f"{path} is a folder without exactly one TOFU_EVAL.json or MUSE_EVAL.json in it")
        return found[0]
    return path


def load_eval_log(path: str | Path, what: str = "eval log") -> dict:
    """Read and check an eval log (a file, or a folder holding TOFU_EVAL.json / MUSE_EVAL.json)."""
    path = Path(path)
    if not path.exists():
        raise BaldroError(f"{what} not found: {path}")
    path = _eval_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            log = json.load(f)
    except json.JSONDecodeError as e:
        raise BaldroError(f"{what} {path} is not JSON: {e.msg} at line {e.lineno}") from None
    except UnicodeDecodeError:
        raise BaldroError(f"{what} {path} is not JSON: not UTF-8 text") from None
    return check_eval_log(log, f"{what} {path}")


# The entries whose samples a reference log is compared on (the forget set, then MUSE's forget set).
_SAMPLE_ENTRIES = (
    "forget_Q_A_PARA_Prob",
    "forget_truth_ratio",
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_knowmem_ROUGE",
    "forget_verbmem_ROUGE",
)


def _samples(log: dict, key: str) -> dict[str, Any] | None:
    """Sample index -> what identifies the sample (its ground-truth answer where logged)."""
    rows = _rows(log, key)
    if rows is None:
        return None
    return {i: r.get("ground_truth") for i, r in rows.items()}


def check_same_samples(eval_log: dict, reference_log: dict) -> None:
    """The reference log scores the same samples as the eval log (same indices and, where both logs
    have them, the same ground-truth answers); else a BaldroError saying how many differ."""
    for key in _SAMPLE_ENTRIES:
        mine, ref = _samples(eval_log, key), _samples(reference_log, key)
        if mine is None or ref is None:
            continue
        differ = len(set(mine) ^ set(ref))
        differ += sum(
            1 for i in set(mine) & set(ref) if mine[i] is not None and ref[i] is not None and mine[i] != ref[i]
        )
        if differ:
            raise BaldroError(
                f"the reference log's samples do not match the eval log's: {differ} of {len(set(mine) | set(ref))} "
                f"sample ids differ in {key} (this log {len(mine)}, the reference {len(ref)}): use the reference "
                "model's log of the same split and limit"
            )
        return


def run_summarize(eval_json: str | Path, reference: str | Path | None = None, out: str | Path | None = None) -> Summary:
    """`baldro summarize EVAL_JSON [--reference REF] [--out OUT]`: print the table, write the
    summary JSON atomically to `out` (same layout as OpenUnlearning's *_SUMMARY.json)."""
    if out is not None and Path(out).is_dir():
        raise BaldroError(f"--out {out} is a folder: give a file path, e.g. {Path(out) / 'SUMMARY.json'}")
    log = load_eval_log(eval_json, "eval log")
    ref = load_eval_log(reference, "reference log") if reference is not None else None
    if ref is not None:
        check_same_samples(log, ref)
    summary = summarize(log, ref)
    print(format_table(summary))
    if out is not None:
        write_json_atomic(out, dict(summary))
    return summary

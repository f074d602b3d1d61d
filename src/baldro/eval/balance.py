"""Balance of forgetting across forget samples (SPEC section 6).

BalDRO claims to fix *asynchronous* forgetting: with a plain mean over the batch some forget samples
collapse early (and turn into gibberish) while others are still remembered at the end. This module
measures that:

- `balance_metrics` / `balance_from_eval_logs`: the spread of the per-sample forget truth ratio and
  answer probability at the end of training, the fraction of samples still remembered and the
  fraction over-forgotten. Every key starts with ``balance_``.
- `trajectory_spread`: the spread of the per-sample probability over training steps.
- `BalanceTracker`: a `transformers.TrainerCallback` that scores every forget sample every N optimizer
  steps and appends one row per scoring to ``RUN_DIR/balance.jsonl``.

Conventions (pinned here so that numbers are comparable across runs):

- standard deviation: population (``ddof=0``);
- inter-quartile range: ``percentile(75) - percentile(25)`` with numpy's default linear
  interpolation;
- truth ratio: the raw per-sample ``TR = P(perturbed) / P(paraphrased)`` as stored in
  ``forget_truth_ratio[i]["score"]`` (the values the forget-quality KS test compares), not the
  aggregate's ``min(TR, 1/TR)``;
- non-finite or missing (None) per-sample values are left out of the statistic that needs them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from transformers import TrainerCallback

from baldro.errors import BaldroError
from baldro.io import append_jsonl

#: a sample is over-forgotten when its probability falls below this fraction of the target model's
OVER_FORGOTTEN_RATIO = 1e-3

BALANCE_KEYS = (
    "balance_tr_std",
    "balance_tr_iqr",
    "balance_prob_std",
    "balance_prob_iqr",
    "balance_frac_remembered",
    "balance_frac_over_forgotten",
)
"""The numeric keys returned by `balance_metrics` (plus the string-or-None ``balance_note``)."""


# ----------------------------------------------------------------------------- pure metrics
def _as_array(name: str, values: Any) -> np.ndarray:
    """1-D float array; None entries become NaN."""
    if isinstance(values, np.ndarray):
        arr = values.astype(float, copy=False)
    else:
        try:
            arr = np.array([np.nan if v is None else v for v in values], dtype=float)
        except (TypeError, ValueError) as e:
            raise BaldroError(
                f"balance: `{name}` must be a list of numbers ({e}); pass one float per forget sample"
            ) from None
    if arr.ndim != 1:
        raise BaldroError(
            f"balance: `{name}` must be one-dimensional (got shape {arr.shape}); pass one float per forget sample"
        )
    return arr


def _std(arr: np.ndarray) -> float | None:
    finite = arr[np.isfinite(arr)]
    if not finite.size:
        return None
    return 0.0 if np.ptp(finite) == 0 else float(np.std(finite))  # exact 0, not rounding noise


def _iqr(arr: np.ndarray) -> float | None:
    finite = arr[np.isfinite(arr)]
    if not finite.size:
        return None
    q75, q25 = np.percentile(finite, [75, 25])
    return float(q75 - q25)


def balance_metrics(
    prob: Sequence[float] | np.ndarray,
    truth_ratio: Sequence[float] | np.ndarray | None = None,
    rouge_recall: Sequence[float] | np.ndarray | None = None,
    retain_prob_median: float | None = None,
    target_prob: Sequence[float] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Balance of forgetting over the forget set at one point in time (SPEC section 6).

    All arrays are per forget sample, in the same order:

    - ``prob``: the unlearned model's answer probability exp(-nll) (required);
    - ``truth_ratio``: its raw per-sample truth ratio (optional);
    - ``rouge_recall``: its ROUGE-L recall of the greedy answer (optional);
    - ``retain_prob_median``: the median forget-set answer probability of the retain model (optional);
    - ``target_prob``: the target model's answer probability on each sample (optional).

    Returns ``balance_tr_std``, ``balance_tr_iqr``, ``balance_prob_std``, ``balance_prob_iqr``,
    ``balance_frac_remembered`` (fraction with ``prob > retain_prob_median``),
    ``balance_frac_over_forgotten`` (fraction with ``prob < 1e-3 * target_prob`` or ROUGE-L recall 0)
    and ``balance_note`` (None, or a sentence saying which quantity could not be computed fully and
    why). A value that cannot be computed is None.
    """
    p = _as_array("prob", prob)
    n = p.size
    if n == 0:
        raise BaldroError("balance: `prob` is empty; pass one answer probability per forget sample")

    def aligned(name: str, values: Any) -> np.ndarray | None:
        if values is None:
            return None
        arr = _as_array(name, values)
        if arr.size != n:
            raise BaldroError(
                f"balance: `{name}` has {arr.size} values but `prob` has {n}; "
                "pass one value per forget sample, in the same order"
            )
        return arr

    tr = aligned("truth_ratio", truth_ratio)
    rouge = aligned("rouge_recall", rouge_recall)
    target = aligned("target_prob", target_prob)
    notes: list[str] = []

    out: dict[str, Any] = {
        "balance_tr_std": _std(tr) if tr is not None else None,
        "balance_tr_iqr": _iqr(tr) if tr is not None else None,
        "balance_prob_std": _std(p),
        "balance_prob_iqr": _iqr(p),
    }
    if tr is None:
        notes.append("no per-sample truth ratio: truth-ratio spread not computed")

    # fraction still remembered
    if retain_prob_median is None or not math.isfinite(float(retain_prob_median)):
        out["balance_frac_remembered"] = None
        notes.append("no retain-model reference: frac_remembered not computed")
    else:
        ok = np.isfinite(p)
        out["balance_frac_remembered"] = float(np.mean(p[ok] > float(retain_prob_median))) if ok.any() else None

    # fraction over-forgotten: either criterion that can be evaluated fires
    if target is None and rouge is None:
        out["balance_frac_over_forgotten"] = None
        notes.append("no target-model reference and no ROUGE-L: frac_over_forgotten not computed")
    else:
        flagged = np.zeros(n, dtype=bool)
        evaluable = np.zeros(n, dtype=bool)
        if target is not None:
            ok = np.isfinite(p) & np.isfinite(target)
            flagged |= ok & (p < OVER_FORGOTTEN_RATIO * np.where(ok, target, 0.0))
            evaluable |= ok
            if not ok.all():
                notes.append(
                    f"{int((~ok).sum())} of {n} samples lack a target-model probability: only ROUGE-L decides for them"
                )
        else:
            notes.append("no target-model reference: frac_over_forgotten uses only the ROUGE-L == 0 criterion")
        if rouge is not None:
            ok = np.isfinite(rouge)
            flagged |= ok & (np.where(ok, rouge, 1.0) == 0.0)
            evaluable |= ok
        else:
            notes.append("no ROUGE-L: frac_over_forgotten uses only the probability criterion")
        m = int(evaluable.sum())
        out["balance_frac_over_forgotten"] = float(flagged[evaluable].sum() / m) if m else None

    out["balance_note"] = "; ".join(notes) if notes else None
    return out


# ----------------------------------------------------------------------------- eval logs
def _per_sample(log: Mapping[str, Any] | None, metric: str, field: str) -> dict[str, Any] | None:
    """{index: value} of ``log[metric]["value_by_index"][index][field]``; None when absent."""
    if not isinstance(log, Mapping):
        return None
    entry = log.get(metric)
    if not isinstance(entry, Mapping):
        return None
    by_index = entry.get("value_by_index")
    if not isinstance(by_index, Mapping) or not by_index:
        return None
    out = {}
    for idx, rec in by_index.items():
        value = rec.get(field) if isinstance(rec, Mapping) else None
        if isinstance(value, (list, tuple)):  # not a scalar per sample: unusable here
            value = None
        out[str(idx)] = value
    return out


def _index_key(idx: str):
    return (0, int(idx), "") if idx.lstrip("-").isdigit() else (1, 0, idx)


def balance_from_eval_logs(
    eval_log: Mapping[str, Any],
    retain_eval_log: Mapping[str, Any] | None = None,
    target_eval_log: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`balance_metrics` from OpenUnlearning-style TOFU_EVAL.json dicts (the forget-set entries).

    Reads ``forget_Q_A_Prob[i]["prob"]``, ``forget_truth_ratio[i]["score"]`` and
    ``forget_Q_A_ROUGE[i]["rougeL_recall"]`` from ``eval_log``; the retain model's median
    ``forget_Q_A_Prob`` from ``retain_eval_log``; the target model's per-sample ``forget_Q_A_Prob``
    (matched by sample index) from ``target_eval_log``. A missing reference or metric gives None
    values and a ``balance_note``, never an error. Raises `BaldroError` only when ``eval_log`` has no
    per-sample ``forget_Q_A_Prob``.
    """
    prob_by_index = _per_sample(eval_log, "forget_Q_A_Prob", "prob")
    if prob_by_index is None:
        raise BaldroError(
            "balance: the eval log has no per-sample forget_Q_A_Prob "
            "(expected {'forget_Q_A_Prob': {'value_by_index': {'0': {'prob': ...}}}}); "
            "run the TOFU evaluation with the forget probability metric"
        )
    indices = sorted(prob_by_index, key=_index_key)
    prob = [prob_by_index[i] for i in indices]

    def take(by_index: dict[str, Any] | None) -> list[Any] | None:
        return None if by_index is None else [by_index.get(i) for i in indices]

    tr = take(_per_sample(eval_log, "forget_truth_ratio", "score"))
    rouge = take(_per_sample(eval_log, "forget_Q_A_ROUGE", "rougeL_recall"))
    notes: list[str] = []

    retain_median = None
    if retain_eval_log is not None:
        retain_probs = _per_sample(retain_eval_log, "forget_Q_A_Prob", "prob")
        if retain_probs is None:
            notes.append("the retain eval log has no per-sample forget_Q_A_Prob")
        else:
            vals = np.array([np.nan if v is None else v for v in retain_probs.values()], dtype=float)
            vals = vals[np.isfinite(vals)]
            if vals.size:
                retain_median = float(np.median(vals))
            else:
                notes.append("the retain eval log's forget_Q_A_Prob has no finite values")

    target = None
    if target_eval_log is not None:
        target_by_index = _per_sample(target_eval_log, "forget_Q_A_Prob", "prob")
        if target_by_index is None:
            notes.append("the target eval log has no per-sample forget_Q_A_Prob")
        else:
            target = take(target_by_index)

    out = balance_metrics(prob, tr, rouge, retain_median, target)
    if out["balance_note"]:
        notes.append(out["balance_note"])
    out["balance_note"] = "; ".join(notes) if notes else None
    return out


# ----------------------------------------------------------------------------- trajectories
def trajectory_spread(balance_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Spread of the per-sample answer probability over training, one entry per balance row.

    Each row is a ``balance.jsonl`` row ``{"step", "ids", "nll", "prob"}`` (``prob`` falls back to
    exp(-nll) when absent). Returns ``[{"step", "prob_mean", "prob_std", "prob_iqr"}]`` sorted by step
    (population std, linear-interpolation IQR; non-finite values left out; None when none is finite).
    """
    out = []
    for k, row in enumerate(balance_rows):
        if "step" not in row:
            raise BaldroError(
                f"balance: row {k} has no 'step'; expected balance.jsonl rows {{'step', 'ids', 'nll', 'prob'}}"
            )
        if row.get("prob") is not None:
            p = _as_array("prob", row["prob"])
        elif row.get("nll") is not None:
            p = np.exp(-_as_array("nll", row["nll"]))
        else:
            raise BaldroError(f"balance: row {k} (step {row['step']}) has neither 'prob' nor 'nll'")
        finite = p[np.isfinite(p)]
        out.append(
            {
                "step": int(row["step"]),
                "prob_mean": float(np.mean(finite)) if finite.size else None,
                "prob_std": _std(p),
                "prob_iqr": _iqr(p),
            }
        )
    out.sort(key=lambda r: r["step"])
    return out


SPREAD_LEVELS = (0.3, 0.1)


def spread_at_mean_forgetting(
    balance_rows: Sequence[Mapping[str, Any]], levels: Sequence[float] = SPREAD_LEVELS
) -> list[dict[str, Any]]:
    """Spread at equal mean forgetting, per level: the first scoring step whose mean answer probability
    is below the level, with that step's mean, std and IQR, and ``prob_std_at_level``, the std at a mean
    of exactly the level (None entries when never reached).

    Methods compared at the same level have forgotten the same amount on average, so a lower std
    there means more even forgetting (SPEC section 6: lower spread at equal mean forgetting). The
    first step below a level can lie well below it (a method whose mean falls fast between two
    scoring steps is read further along, where spreads are smaller), so ``prob_std_at_level``
    interpolates the std linearly in the mean between that step and the one before it (None when
    the first scored step is already below the level).
    """
    spread = [s for s in trajectory_spread(balance_rows) if s["prob_mean"] is not None]
    out = []
    for level in levels:
        k = next((i for i, s in enumerate(spread) if s["prob_mean"] < level), None)
        if k is None:
            out.append(
                {
                    "level": level,
                    "step": None,
                    "prob_mean": None,
                    "prob_std": None,
                    "prob_iqr": None,
                    "prob_std_at_level": None,
                }
            )
            continue
        hit = spread[k]
        at_level = None
        if k > 0 and hit["prob_std"] is not None and spread[k - 1]["prob_std"] is not None:
            before = spread[k - 1]
            t = (before["prob_mean"] - level) / (before["prob_mean"] - hit["prob_mean"])
            at_level = before["prob_std"] + t * (hit["prob_std"] - before["prob_std"])
        out.append({"level": level, **hit, "prob_std_at_level": at_level})
    return out


# ----------------------------------------------------------------------------- callback
ScoreFn = Callable[[Any], tuple[Sequence[int], Sequence[float]]]


class BalanceTracker(TrainerCallback):
    """Records every forget sample's NLL and answer probability during unlearning.

    ``score_fn(model) -> (ids, nll)`` scores the whole forget set (the trainer provides it). It is
    called at train begin (step 0, or a resumed step that is a multiple of ``every_n_steps``, so that a
    resumed run writes the rows an uninterrupted one writes), every ``every_n_steps`` optimizer steps and
    at train end (unless that step was just recorded), with the model in eval mode under
    ``torch.inference_mode``; the model's previous train/eval mode is restored afterwards, also when
    ``score_fn`` raises. Every process calls ``score_fn`` (distributed models may need all ranks for
    a forward pass); only the main process (``state.is_world_process_zero``) appends the row
    ``{"step", "ids", "nll", "prob"}`` to ``output_path`` (``RUN_DIR/balance.jsonl``).
    """

    def __init__(self, score_fn: ScoreFn, output_path: str | Path, every_n_steps: int = 1):
        if not callable(score_fn):
            raise BaldroError("BalanceTracker: score_fn must be callable as score_fn(model) -> (ids, nll)")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise BaldroError(f"BalanceTracker: every_n_steps must be an integer >= 1 (got {every_n_steps!r})")
        self.score_fn = score_fn
        self.output_path = Path(output_path)
        self.every_n_steps = every_n_steps
        self.last_step: int | None = None

    # -- the one place that scores and writes
    def record(self, model: Any, step: int, is_main_process: bool = True) -> dict[str, Any] | None:
        """Score the forget set now; append and return the row (None on non-main processes)."""
        if model is None:
            raise BaldroError(
                "BalanceTracker: the Trainer passed no model to the callback; attach it with Trainer(callbacks=[...])"
            )
        was_training = bool(getattr(model, "training", False))
        try:
            if hasattr(model, "eval"):
                model.eval()
            import torch

            with torch.inference_mode():
                result = self.score_fn(model)
        finally:
            if hasattr(model, "train"):
                model.train(was_training)
        try:
            ids, nll = result
            ids = [int(i) for i in ids]
            nll = [float(x) for x in nll]
        except (TypeError, ValueError) as e:
            raise BaldroError(
                f"BalanceTracker: score_fn must return (ids: list[int], nll: list[float]) ({e})"
            ) from None
        if len(ids) != len(nll):
            raise BaldroError(
                f"BalanceTracker: score_fn returned {len(ids)} ids but {len(nll)} nll values; return one nll per id"
            )
        self.last_step = int(step)
        if not is_main_process:
            return None
        with np.errstate(over="ignore"):
            prob = [float(v) for v in np.exp(-np.asarray(nll, dtype=float))]
        row = {"step": int(step), "ids": ids, "nll": nll, "prob": prob}
        append_jsonl(self.output_path, row)
        return row

    # -- TrainerCallback hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self.record(model, state.global_step, state.is_world_process_zero)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every_n_steps == 0 and step != self.last_step:
            self.record(model, step, state.is_world_process_zero)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.last_step:
            self.record(model, state.global_step, state.is_world_process_zero)

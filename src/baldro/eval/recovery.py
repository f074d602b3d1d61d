"""What an attack brought back, sample by sample: an unlearned model's eval log (before) against the
attacked model's (after). Pure functions of eval logs in OpenUnlearning's layout; `baldro.recipes.attack` writes
their result into each attack's attack_summary.json and `baldro.report` reads it.

Per-sample metrics: TOFU's forget answer probability, ROUGE-L recall and truth ratio; MUSE's VerbMem and
forget KnowMem ROUGE-L F1 (`METRICS`). A sample *came back* under a metric when the attack moved it from
the forgotten side of a threshold to the remembered side: a probability or ROUGE from <= t to > t, a truth
ratio from >= t to < t (a model that knows an answer prefers it to the perturbed ones). Per metric, t is

1. `attack.thresholds.METRIC` when set;
2. else the median of the retain model's per-sample values (`eval.retain_logs_path`): a sample above it
   is remembered better than by a model that never saw it (SPEC section 6's "remembered");
3. else the metric's default, about the median of the retain (TOFU) and retrained (MUSE) models'
   published logs in shared/data/reference_logs: TOFU Llama-2-7b-chat and Llama-3.x retain models,
   probability 0.07-0.13, ROUGE-L recall 0.32-0.37, truth ratio 0.71-0.81; MUSE Llama-2-7b retrained,
   VerbMem 0.15-0.18, KnowMem 0.17-0.29.

Scopes: "all" samples; after a relearning on forget samples also "trained" (the samples it fine-tuned
on) and "held_out" (the others, Deeb & Roger's measure). Forget quality on a scope is the KS test of its
samples' truth ratios against the retain model's truth ratios of the same samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from baldro.errors import BaldroError
from baldro.eval import metrics

ATTACK_SUMMARY = "attack_summary.json"


@dataclass(frozen=True)
class SampleMetric:
    """A per-sample forget metric: where the eval log keeps it and which way is "remembered"."""

    name: str
    key: str  # the eval log entry
    field: str  # the per-sample field
    higher_remembers: bool
    default_threshold: float


METRICS: dict[str, tuple[SampleMetric, ...]] = {
    "tofu": (
        SampleMetric("prob", "forget_Q_A_Prob", "prob", True, 0.1),
        SampleMetric("rouge", "forget_Q_A_ROUGE", "rougeL_recall", True, 0.35),
        SampleMetric("truth_ratio", "forget_truth_ratio", "score", False, 0.75),
    ),
    "muse": (
        SampleMetric("verbmem", "forget_verbmem_ROUGE", "rougeL_f1", True, 0.15),
        SampleMetric("knowmem", "forget_knowmem_ROUGE", "rougeL_f1", True, 0.2),
    ),
}
HEADLINE_METRIC = {"tofu": "prob", "muse": "verbmem"}
# model-level numbers copied from the summaries, before and after
SUMMARY_KEYS = {
    "tofu": ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio"),
    "muse": ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak"),
}


def metric_names(benchmark: str) -> tuple[str, ...]:
    return tuple(m.name for m in METRICS[benchmark])


def _metric(benchmark: str, name: str) -> SampleMetric:
    return next(m for m in METRICS[benchmark] if m.name == name)


def _number(value: Any) -> float | None:
    """A per-sample value as one finite float (a list of several answers' values: their mean)."""
    if isinstance(value, (list, tuple)):
        value = float(np.mean(value)) if value and all(_number(v) is not None for v in value) else None
    return metrics.finite_float(value)


def _index_key(i: str):
    return (0, int(i), "") if str(i).isdigit() else (1, 0, str(i))


def per_sample(log: Mapping | None, metric: SampleMetric) -> dict[str, float]:
    """Sample index -> the metric's finite value in `log` (in index order; empty when the log lacks it)."""
    entry = (log or {}).get(metric.key)
    rows = entry.get("value_by_index") if isinstance(entry, dict) else None
    if not isinstance(rows, dict):
        return {}
    out = {}
    for i in sorted(rows, key=_index_key):
        value = _number(rows[i].get(metric.field)) if isinstance(rows[i], dict) else None
        if value is not None:
            out[str(i)] = value
    return out


def threshold(
    metric: SampleMetric, reference_log: Mapping | None = None, override: float | None = None, index=None
) -> tuple[float, str]:
    """(threshold, where it comes from): the override, the median of the reference model's values (on
    the samples `index` when it has them), or the default."""
    if override is not None:
        return float(override), "attack.thresholds"
    ref = per_sample(reference_log, metric)
    values = [ref[i] for i in index if i in ref] if index is not None else []
    values = values or list(ref.values())
    if values:
        return float(np.median(values)), "median of the retain model's per-sample values"
    return metric.default_threshold, "default (no retain model log)"


def remembered(values, t: float, higher_remembers: bool) -> np.ndarray:
    """Which samples are on the remembered side of `t`."""
    v = np.asarray(values, dtype=np.float64)
    return v > t if higher_remembers else v < t


def came_back(before, after, t: float, higher_remembers: bool) -> dict[str, int]:
    """Counts over paired samples: forgotten before, came back (forgotten before, remembered after),
    remembered after, and lost (remembered before, forgotten after)."""
    b, a = remembered(before, t, higher_remembers), remembered(after, t, higher_remembers)
    return {
        "n": int(b.size),
        "forgotten_before": int((~b).sum()),
        "came_back": int((~b & a).sum()),
        "remembered_after": int(a.sum()),
        "lost": int((b & ~a).sum()),
    }


def forget_quality_on(log: Mapping, reference_log: Mapping | None, indices) -> float | None:
    """Forget quality (KS-test p-value) of `log`'s truth ratios on `indices` against the reference
    model's truth ratios on the same samples; None without a reference or common samples."""
    if reference_log is None:
        return None
    tr = _metric("tofu", "truth_ratio")
    mine, ref = per_sample(log, tr), per_sample(reference_log, tr)
    common = [i for i in indices if i in mine and i in ref]
    if not common:
        return None
    return metrics.forget_quality([mine[i] for i in common], [ref[i] for i in common])


def recovery(
    before_log: Mapping,
    after_log: Mapping,
    benchmark: str,
    reference_log: Mapping | None = None,
    thresholds: Mapping[str, float] | None = None,
    trained: set[str] | None = None,
    headline_scope: str = "all",
) -> dict[str, Any]:
    """Per-sample before vs after of every metric of `benchmark`, the came-back counts per scope, and
    (TOFU) forget quality per scope. `trained`: the forget sample indices a relearning trained on
    (adds the "trained" and "held_out" scopes); `headline_scope`: the scope of the headline count."""
    if benchmark not in METRICS:
        raise BaldroError(f"unknown benchmark {benchmark!r}: use one of {', '.join(METRICS)}")
    thresholds = dict(thresholds or {})
    out: dict[str, Any] = {"thresholds": {}, "came_back": {}, "per_sample": {}}
    for m in METRICS[benchmark]:
        before, after = per_sample(before_log, m), per_sample(after_log, m)
        index = [i for i in before if i in after]
        if not index:
            continue
        t, source = threshold(m, reference_log, thresholds.get(m.name), index)
        out["thresholds"][m.name] = {
            "value": t,
            "source": source,
            "remembered": f"{'>' if m.higher_remembers else '<'} {t:.6g}",
        }
        b = np.array([before[i] for i in index])
        a = np.array([after[i] for i in index])
        rows = {"index": index, "before": b.tolist(), "after": a.tolist()}
        counts = {"all": came_back(b, a, t, m.higher_remembers)}
        if trained is not None:
            mask = np.array([i in trained for i in index], dtype=bool)
            rows["trained"] = mask.tolist()
            counts["trained"] = came_back(b[mask], a[mask], t, m.higher_remembers)
            counts["held_out"] = came_back(b[~mask], a[~mask], t, m.higher_remembers)
        out["per_sample"][m.name] = rows
        out["came_back"][m.name] = counts
    name = HEADLINE_METRIC[benchmark]
    if name in out["came_back"]:
        c = out["came_back"][name][headline_scope]
        out["headline"] = {
            "metric": name,
            "scope": headline_scope,
            "came_back": c["came_back"],
            "forgotten_before": c["forgotten_before"],
            "n": c["n"],
        }
    if benchmark == "tofu" and reference_log is not None:
        scopes = {"all": None}
        if trained is not None:
            scopes.update(trained=True, held_out=False)
        index = list(per_sample(before_log, _metric("tofu", "truth_ratio")))
        out["forget_quality"] = {
            scope: {
                when: forget_quality_on(
                    log, reference_log, [i for i in index if flag is None or (i in trained) == flag]
                )
                for when, log in (("before", before_log), ("after", after_log))
            }
            for scope, flag in scopes.items()
        }
    return out


def summary_values(summary: Mapping, benchmark: str) -> dict[str, float | None]:
    """The model-level numbers of a summary that an attack report shows (`SUMMARY_KEYS`)."""
    return {k: _number(summary.get(k)) for k in SUMMARY_KEYS[benchmark]}


def load_attack_summaries(folder: str | Path) -> list[tuple[str, dict]]:
    """(attack name, attack_summary.json) for every attack folder under `folder`, in name order."""
    found = []
    for path in sorted(Path(folder).glob(f"*/{ATTACK_SUMMARY}")):
        try:
            found.append((path.parent.name, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError) as e:
            raise BaldroError(
                f"{path} is not readable JSON ({e}): rerun the attack (baldro attack ... resume=true)"
            ) from None
    return found

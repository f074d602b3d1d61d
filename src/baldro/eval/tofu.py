"""TOFU evaluation, written in OpenUnlearning's `TOFU_EVAL.json` / `TOFU_SUMMARY.json` layout.

Three layers, each replaceable on its own:

1. model scoring (`baldro.eval.engine`) and greedy generation (`baldro.eval.generation`). With
   `shared_forward=True` every text is run through the model once, whatever number of metrics
   read it (the forget answers serve Q_A_Prob, EM, ES and the four MIA attacks), texts of all
   sets that need the same outputs go through one length-sorted call, and the teacher-forced
   argmax over each reference answer drafts the generation from its question (the tokens a model
   reproduces from the reference are not decoded again). With `shared_forward=False` every metric
   runs its own passes, as an unoptimised tool does (the benchmark's baseline); the numbers are
   the same.
2. per-sample assembly (`assemble_tofu_eval_log`): OpenUnlearning's keys and per-sample fields.
3. aggregation (`baldro.eval.summarize.summarize_tofu`): the summary, forget quality, model
   utility and privleak, from the per-sample log (and the retain model's log).

Sets and keys (as in OpenUnlearning's TOFU_EVAL.json):

| set | split | keys |
| --- | --- | --- |
| forget | `forgetXX_perturbed` | forget_Q_A_Prob, forget_Q_A_PARA_Prob, forget_Q_A_PERT_Prob, forget_Q_A_ROUGE, forget_truth_ratio |
| retain | `retain_perturbed` | retain_Q_A_Prob, retain_Q_A_PARA_Prob, retain_Q_A_PERT_Prob, retain_Q_A_ROUGE, retain_Truth_Ratio |
| real authors | `real_authors_perturbed` | ra_Q_A_Prob, ra_Q_A_PERT_Prob, ra_Q_A_Prob_normalised, ra_Q_A_ROUGE, ra_Truth_Ratio |
| world facts | `world_facts_perturbed` | wf_Q_A_Prob, wf_Q_A_PERT_Prob, wf_Q_A_Prob_normalised, wf_Q_A_ROUGE, wf_Truth_Ratio |
| forget + holdout | `forgetXX_perturbed` (question, answer) and `holdoutXX` | exact_memorization, extraction_strength, mia_loss, mia_zlib, mia_min_k, mia_min_k_plus_plus |

The truth ratio compares perturbed answers with the *paraphrased* answer on forget/retain and with
the *original* answer on real authors/world facts (those sets have no paraphrase; the published logs
confirm it: ra_Truth_Ratio = P(perturbed) / ra_Q_A_Prob). `forgetXX_perturbed` holds the same
question/answer pairs as `forgetXX` in the same order, so one pass over its answers serves the
forget-set probability, memorisation and MIA metrics.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from baldro.data.formatting import IGNORE_INDEX, EncodedQA, QAFormatter
from baldro.data.tofu import holdout_split_for, load_split, retain_split_for
from baldro.errors import BaldroError
from baldro.eval import engine, generation, metrics
from baldro.eval.summarize import summarize_tofu
from baldro.io import write_json_atomic

logger = logging.getLogger(__name__)

EVAL_FILE = "TOFU_EVAL.json"
SUMMARY_FILE = "TOFU_SUMMARY.json"
MIA_K = 0.4  # OpenUnlearning's TOFU Min-K% / Min-K%++ fraction


@dataclass(frozen=True)
class TofuSet:
    """One TOFU evaluation set: its split, key prefix and truth-ratio definition."""

    key: str
    split: str
    prefix: str
    paraphrase: bool  # forget/retain: TR against the paraphrase; ra/wf: against the answer
    truth_ratio_key: str
    forget_like: bool  # TR aggregate: closer_to_1 (forget) or true_better (the others)

    @property
    def fields(self) -> tuple[str, ...]:
        extra = ("paraphrased_answer",) if self.paraphrase else ()
        return ("question", "answer", *extra, "perturbed_answer")


def tofu_sets(forget_split: str = "forget10") -> list[TofuSet]:
    retain_split_for(forget_split)  # validates the name
    return [
        TofuSet("forget", f"{forget_split}_perturbed", "forget_", True, "forget_truth_ratio", True),
        TofuSet("retain", "retain_perturbed", "retain_", True, "retain_Truth_Ratio", False),
        TofuSet("ra", "real_authors_perturbed", "ra_", False, "ra_Truth_Ratio", False),
        TofuSet("wf", "world_facts_perturbed", "wf_", False, "wf_Truth_Ratio", False),
    ]


# ---------------------------------------------------------------------------------------- data
@dataclass
class TofuEvalData:
    """Rows of every evaluation set (first `limit` rows of each) and the holdout set."""

    forget_split: str
    sets: list[TofuSet]
    rows: dict[str, list[dict]]  # set key (and "holdout") -> rows

    def n_rows(self, key: str) -> int:
        return len(self.rows[key])


def load_tofu_eval_data(data_source, forget_split: str = "forget10", limit: int | None = None) -> TofuEvalData:
    """Load the evaluation splits through `load_split` (local TOFU folder, hub id or synthetic folder)."""
    if limit is not None and limit < 1:
        raise BaldroError(f"limit must be a positive number of rows, got {limit}")
    sets = tofu_sets(forget_split)
    rows: dict[str, list[dict]] = {}
    for s in sets:
        rows[s.key] = load_split(data_source, s.split, s.fields)[:limit]
        _check_perturbed(rows[s.key], s.split)
    rows["holdout"] = load_split(data_source, holdout_split_for(forget_split), ("question", "answer"))[:limit]
    return TofuEvalData(forget_split, sets, rows)


def _check_perturbed(rows: list[dict], split: str) -> None:
    counts = set()
    for i, r in enumerate(rows):
        p = r["perturbed_answer"]
        if isinstance(p, str) or not isinstance(p, Sequence) or len(p) == 0:
            raise BaldroError(f"{split} row {i}: perturbed_answer must be a non-empty list of answers, got {p!r:.80}")
        counts.add(len(p))
    if len(counts) > 1:
        raise BaldroError(
            f"{split}: rows have different numbers of perturbed answers {sorted(counts)}: the truth ratio needs "
            "the same number per question; fix the split"
        )


# ------------------------------------------------------------------------------------- encoding
@dataclass
class _SetTexts:
    answer: list[EncodedQA]
    prompts: list[list[int]]
    inputs: list[str]
    ground_truths: list[str]
    para: list[EncodedQA] | None = None
    pert: list[EncodedQA] = field(default_factory=list)  # flattened: row-major, K per row
    k: int = 0


def _encode(formatter: QAFormatter, data: TofuEvalData) -> dict[str, _SetTexts]:
    tok = formatter.tokenizer
    out: dict[str, _SetTexts] = {}
    for s in data.sets:
        rows = data.rows[s.key]
        qs = [r["question"] for r in rows]
        prompts = [formatter.encode_prompt(q) for q in qs]
        t = _SetTexts(
            answer=formatter.encode_many(qs, [r["answer"] for r in rows], what=f"{s.split} answer"),
            prompts=prompts,
            inputs=[tok.decode(p, skip_special_tokens=True) for p in prompts],
            ground_truths=[str(r["answer"]).strip() for r in rows],
        )
        if s.paraphrase:
            t.para = formatter.encode_many(qs, [r["paraphrased_answer"] for r in rows], what=f"{s.split} paraphrase")
        t.k = len(rows[0]["perturbed_answer"])
        pq = [q for q, r in zip(qs, rows) for _ in r["perturbed_answer"]]  # a question's K answers are adjacent
        pa = [a for r in rows for a in r["perturbed_answer"]]
        t.pert = formatter.encode_many(pq, pa, what=f"{s.split} perturbed")
        out[s.key] = t
    hold = data.rows["holdout"]
    out["holdout"] = _SetTexts(
        answer=formatter.encode_many(
            [r["question"] for r in hold], [r["answer"] for r in hold], what=f"{holdout_split_for(data.forget_split)} answer"
        ),
        prompts=[],
        inputs=[],
        ground_truths=[],
    )
    return out


def _source_texts(texts: dict[str, _SetTexts]) -> dict[str, list[EncodedQA]]:
    src = {}
    for key, t in texts.items():
        src[f"{key}/answer"] = t.answer
        if t.para is not None:
            src[f"{key}/para"] = t.para
        if t.pert:
            src[f"{key}/pert"] = t.pert
    return src


# -------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class _MetricNeed:
    group: str  # timing group of the benchmark
    sources: tuple[str, ...]
    want: frozenset


def _metric_plan(sets: list[TofuSet]) -> dict[str, _MetricNeed]:
    """Which texts every metric reads and which model outputs it needs (truth ratio and normalised
    probability derive from the probability metrics, as OpenUnlearning's pre_compute does)."""
    plan: dict[str, _MetricNeed] = {}
    none: frozenset = frozenset()
    for s in sets:
        plan[f"{s.prefix}Q_A_Prob"] = _MetricNeed("probability", (f"{s.key}/answer",), none)
        if s.paraphrase:
            plan[f"{s.prefix}Q_A_PARA_Prob"] = _MetricNeed("probability", (f"{s.key}/para",), none)
        plan[f"{s.prefix}Q_A_PERT_Prob"] = _MetricNeed("probability", (f"{s.key}/pert",), none)
    plan["exact_memorization"] = _MetricNeed("memorization", ("forget/answer",), frozenset({"argmax"}))
    plan["extraction_strength"] = _MetricNeed("memorization", ("forget/answer",), frozenset({"argmax"}))
    mia = ("forget/answer", "holdout/answer")
    plan["mia_loss"] = _MetricNeed("mia", mia, none)
    plan["mia_zlib"] = _MetricNeed("mia", mia, none)
    plan["mia_min_k"] = _MetricNeed("mia", mia, frozenset({"logp"}))
    plan["mia_min_k_plus_plus"] = _MetricNeed("mia", mia, frozenset({"logp", "vocab_stats"}))
    return plan


class _Timer:
    """Accumulates seconds, sequences and distinct dataset rows per timing group."""

    def __init__(self, n_rows: dict[str, int]):
        self.n_rows = n_rows
        self.seconds: dict[str, float] = defaultdict(float)
        self.sequences: dict[str, int] = defaultdict(int)
        self.sets: dict[str, set] = defaultdict(set)

    def run(self, group: str, sources: Sequence[str], n_sequences: int, fn: Callable):
        t0 = time.perf_counter()
        out = fn()
        self.seconds[group] += time.perf_counter() - t0
        self.sequences[group] += n_sequences
        self.sets[group].update(s.split("/")[0] for s in sources)
        return out

    def result(self) -> dict[str, dict]:
        return {
            g: {
                "rows": sum(self.n_rows[k] for k in self.sets[g]),
                "sequences": self.sequences[g],
                "seconds": self.seconds[g],
            }
            for g in self.seconds
        }


def _score_groups(
    model, sources: dict[str, list[EncodedQA]], calls: list[tuple[str, tuple[str, ...], frozenset]], timer: _Timer,
    batch_size: int, pad_token_id: int, sort_by_length: bool, progress: bool | None, share_prompts: bool = False,
) -> list[dict[str, list[engine.SequenceScore]]]:
    """Run each call (group, sources, want) as ONE scoring call over its concatenated sources:
    `score_sequences`, or with `share_prompts` `score_sequences_shared_prompts` (the answers of one
    question, e.g. its paraphrased and perturbed answers, scored against one encoding of its prompt)."""
    results = []
    for group, names, want in calls:
        encoded = [e for n in names for e in sources[n]]
        if share_prompts:
            def fn(encoded=encoded, want=want, group=group):
                return engine.score_sequences_shared_prompts(
                    model, encoded, batch_size, pad_token_id, want=want, desc=f"scoring ({group})", progress=progress,
                )
        else:
            def fn(encoded=encoded, want=want, group=group):
                return engine.score_sequences(
                    model, encoded, batch_size, pad_token_id, want=want, desc=f"scoring ({group})",
                    sort_by_length=sort_by_length, progress=progress,
                )
        scores = timer.run(group, names, len(encoded), fn)
        split, pos = {}, 0
        for n in names:
            split[n] = scores[pos : pos + len(sources[n])]
            pos += len(sources[n])
        results.append(split)
    return results


def score_tofu(
    model, sources: dict[str, list[EncodedQA]], plan: dict[str, _MetricNeed], timer: _Timer, *,
    batch_size: int, pad_token_id: int, shared_forward: bool, sort_by_length: bool, progress: bool | None,
    draft_sources: Sequence[str] = (),
) -> tuple[dict[str, dict[str, list[engine.SequenceScore]]], dict[str, list[engine.SequenceScore]]]:
    """(metric -> source -> per-sequence scores, draft source -> scores). Shared: every source scored
    once (with the union of the outputs its metrics need, and the argmax for `draft_sources`),
    sources needing the same outputs batched together. Naive: one set of passes per metric, and no
    drafts."""
    if not shared_forward:
        out = {}
        for metric, need in plan.items():
            (split,) = _score_groups(
                model, sources, [(need.group, need.sources, need.want)], timer,
                batch_size, pad_token_id, sort_by_length, progress,
            )
            out[metric] = split
        return out, {}
    want: dict[str, set] = defaultdict(set)
    groups: dict[str, set] = defaultdict(set)
    for need in plan.values():
        for s in need.sources:
            want[s] |= need.want
            groups[s].add(need.group)
    for s in draft_sources:  # the argmax of the reference answers drafts the generations
        want[s].add("argmax")
    # Two calls: texts that need token-level log-probs or vocabulary statistics, and the others
    # (each scored with the union of its texts' outputs: an argmax nobody reads costs little).
    token_level = {s for s in want if want[s] - {"argmax"}}
    by_want: dict[frozenset, list[str]] = defaultdict(list)
    for s in want:  # plan order: deterministic
        same = token_level if s in token_level else set(want) - token_level
        by_want[frozenset().union(*(want[x] for x in same))].append(s)
    calls = []
    for w, names in by_want.items():
        g = "+".join(sorted(set().union(*(groups[n] for n in names))))
        calls.append((g, tuple(names), w))
    merged: dict[str, list[engine.SequenceScore]] = {}
    # Shared forward also means each question's prompt is encoded once for all of its answers.
    splits = _score_groups(
        model, sources, calls, timer, batch_size, pad_token_id, sort_by_length, progress, share_prompts=True,
    )
    for split in splits:
        merged.update(split)
    by_metric = {metric: {s: merged[s] for s in need.sources} for metric, need in plan.items()}
    return by_metric, {s: merged[s] for s in draft_sources}


def _draft_prefixes(
    texts: _SetTexts, scores: Sequence[engine.SequenceScore], eos_ids: Sequence[int], max_new_tokens: int,
    min_margin: float,
) -> list[generation.GreedyPrefix | None]:
    """What the teacher-forced pass over each reference answer tells of the greedy generation from
    its prompt (None where the scored text is not exactly the generation prompt + the answer)."""
    out: list[generation.GreedyPrefix | None] = []
    for prompt, e, sc in zip(texts.prompts, texts.answer, scores):
        if sc.argmax is None or not engine.is_prompt_plus_answer(e) or list(e.input_ids[: e.prompt_len]) != prompt:
            out.append(None)
            continue
        draft = e.input_ids[e.prompt_len :]
        out.append(generation.greedy_prefix(draft, sc.argmax, sc.argmax_margin, eos_ids, max_new_tokens, min_margin))
    return out


def generate_tofu(
    model, tokenizer, texts: dict[str, _SetTexts], sets: list[TofuSet], timer: _Timer, *,
    batch_size: int, max_new_tokens: int, shared_forward: bool, sort_by_length: bool, progress: bool | None,
    drafts: dict[str, list[engine.SequenceScore]] | None = None,
) -> dict[str, list[str]]:
    """Greedy generations for ROUGE: one call over all sets (shared) or one per set (naive). With
    `drafts` (the reference answers' teacher-forced scores, "{set}/answer" -> scores), decoding
    starts after the tokens those scores already determine (`generation.greedy_prefix`)."""
    keys = [s.key for s in sets]
    chunks = [keys] if shared_forward else [[k] for k in keys]
    eos_ids = generation.eos_ids(model, tokenizer)
    min_margin = generation.draft_min_margin(engine.model_dtype(model))
    out: dict[str, list[str]] = {}
    for ks in chunks:
        prompts = [p for k in ks for p in texts[k].prompts]

        def run(ks=ks, prompts=prompts):
            prefixes = None
            if drafts:
                prefixes = [
                    pre for k in ks
                    for pre in (_draft_prefixes(texts[k], drafts[f"{k}/answer"], eos_ids, max_new_tokens, min_margin)
                                if f"{k}/answer" in drafts else [None] * len(texts[k].prompts))
                ]
            return generation.generate(
                model, tokenizer, prompts, max_new_tokens, batch_size, desc=f"generating ({'+'.join(ks)})",
                sort_by_length=sort_by_length, progress=progress, prefixes=prefixes,
            )

        gens = timer.run("rouge", [f"{k}/prompt" for k in ks], len(prompts), run)
        pos = 0
        for k in ks:
            out[k] = gens[pos : pos + len(texts[k].prompts)]
            pos += len(texts[k].prompts)
    return out


# ------------------------------------------------------------------------------------- assembly
def _f(x) -> float | None:
    """A JSON number (None for NaN/inf, as OpenUnlearning writes a missing score)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def _by_index(entries: Sequence[dict]) -> dict[str, dict]:
    return {str(i): e for i, e in enumerate(entries)}


def _avg_losses(scores: Sequence[engine.SequenceScore]) -> np.ndarray:
    return np.array([s.avg_loss for s in scores], dtype=np.float64)


def _prob_entry(scores: Sequence[engine.SequenceScore]) -> tuple[dict, np.ndarray]:
    loss = _avg_losses(scores)
    prob = metrics.probability(loss)
    entries = [{"prob": _f(p), "avg_loss": _f(a)} for p, a in zip(prob, loss)]
    return {"agg_value": _mean(prob), "value_by_index": _by_index(entries)}, loss


def _pert_entry(scores: Sequence[engine.SequenceScore], k: int) -> tuple[dict, np.ndarray]:
    loss = _avg_losses(scores).reshape(-1, k)
    prob = metrics.probability(loss)
    entries = [{"prob": [_f(v) for v in p], "avg_loss": [_f(v) for v in a]} for p, a in zip(prob, loss)]
    return {"agg_value": _mean(prob.mean(axis=1)), "value_by_index": _by_index(entries)}, loss


def _score_entry(values, agg: float | None = None) -> dict:
    vals = [_f(v) for v in values]
    return {"agg_value": _mean(vals) if agg is None else agg, "value_by_index": _by_index([{"score": v} for v in vals])}


def _label_texts(tokenizer, encoded: Sequence[EncodedQA]) -> list[str]:
    """The scored text of each sequence (labels, special tokens skipped): what ZLib compresses."""
    return [tokenizer.decode([t for t in e.labels if t != IGNORE_INDEX], skip_special_tokens=True) for e in encoded]


def _mia_entry(name: str, scores: dict[str, list[engine.SequenceScore]], label_texts: dict[str, list[str]]) -> dict:
    parts = {}
    for side in ("forget", "holdout"):
        sc = scores[f"{side}/answer"]
        if name == "mia_loss":
            v = metrics.mia_loss(_avg_losses(sc))
        elif name == "mia_zlib":
            v = metrics.mia_zlib(_avg_losses(sc), label_texts[side])
        else:
            lp, mask = engine.pad_aligned(sc, "token_logp")
            mask = metrics.without_last_position(mask)
            if name == "mia_min_k":
                v = metrics.min_k(lp, mask, k=MIA_K)
            else:
                mu, _ = engine.pad_aligned(sc, "vocab_mean")
                sd, _ = engine.pad_aligned(sc, "vocab_std", pad_value=1.0)
                v = metrics.min_k_plus_plus(lp, mu, sd, mask, k=MIA_K)
        parts[side] = v
    auc = metrics.mia_auc(parts["forget"], parts["holdout"])
    return {
        "forget": _score_entry(parts["forget"]),
        "holdout": _score_entry(parts["holdout"]),
        "auc": auc,
        "agg_value": auc,
    }


def _memorization(name: str, scores: Sequence[engine.SequenceScore]) -> dict:
    pred, mask = engine.pad_aligned(scores, "argmax", pad_value=-1)
    target, _ = engine.pad_aligned(scores, "targets", pad_value=-1)
    mask = metrics.without_last_position(mask)
    fn = metrics.exact_memorization if name == "exact_memorization" else metrics.extraction_strength
    return _score_entry(fn(pred, target, mask).tolist())


def assemble_tofu_eval_log(
    data: TofuEvalData,
    texts: dict[str, _SetTexts],
    scores: dict[str, dict[str, list[engine.SequenceScore]]],
    generations: dict[str, list[str]],
    tokenizer,
) -> dict:
    """Per-sample TOFU eval log (OpenUnlearning keys and fields), without the model-level metrics
    (forget_quality, model_utility, privleak), which `summarize_tofu` computes."""
    log: dict[str, dict] = {}
    for s in data.sets:
        t = texts[s.key]
        p = s.prefix
        log[f"{p}Q_A_Prob"], answer_loss = _prob_entry(scores[f"{p}Q_A_Prob"][f"{s.key}/answer"])
        if s.paraphrase:
            log[f"{p}Q_A_PARA_Prob"], correct_loss = _prob_entry(scores[f"{p}Q_A_PARA_Prob"][f"{s.key}/para"])
        else:
            correct_loss = answer_loss
        log[f"{p}Q_A_PERT_Prob"], pert_loss = _pert_entry(scores[f"{p}Q_A_PERT_Prob"][f"{s.key}/pert"], t.k)
        tr = metrics.truth_ratio(correct_loss, pert_loss)
        agg = metrics.truth_ratio_closer_to_1(tr) if s.forget_like else metrics.truth_ratio_true_better(tr)
        log[s.truth_ratio_key] = _score_entry(tr, agg=agg)
        if not s.paraphrase:
            norm = metrics.normalised_probability(answer_loss, pert_loss)
            log[f"{p}Q_A_Prob_normalised"] = {
                "agg_value": _mean(norm),
                "value_by_index": _by_index([{"prob": _f(v)} for v in norm]),
            }
        rouge = metrics.rouge(generations[s.key], t.ground_truths)
        entries = [
            {**r, "input": i, "ground_truth": g, "generation": gen}
            for r, i, g, gen in zip(rouge, t.inputs, t.ground_truths, generations[s.key])
        ]
        log[f"{p}Q_A_ROUGE"] = {"agg_value": _mean(r["rougeL_recall"] for r in rouge), "value_by_index": _by_index(entries)}
    for name in ("exact_memorization", "extraction_strength"):
        log[name] = _memorization(name, scores[name]["forget/answer"])
    label_texts = {side: _label_texts(tokenizer, texts[side].answer) for side in ("forget", "holdout")}
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"):
        log[name] = _mia_entry(name, scores[name], label_texts)
    return log


# --------------------------------------------------------------------------- reference and summary
def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", str(s)).strip()


def load_retain_log(path, data: TofuEvalData | None = None) -> dict:
    """Read the retain model's TOFU_EVAL.json (OpenUnlearning layout) and check that it fits."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_FILE
    if not path.exists():
        raise BaldroError(f"retain model log {path} not found: point retain_logs_path at the retain model's {EVAL_FILE}")
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BaldroError(f"retain model log {path} is not valid JSON ({e}): regenerate it") from None
    tr = log.get("forget_truth_ratio") if isinstance(log, dict) else None
    if not isinstance(tr, dict) or not tr.get("value_by_index"):
        raise BaldroError(
            f"retain model log {path} has no per-sample forget_truth_ratio: use a TOFU_EVAL.json of the retain "
            "model evaluated on the same forget split"
        )
    gts = (log.get("forget_Q_A_ROUGE") or {}).get("value_by_index") or {}
    if data is not None and gts:
        ours = [_norm_text(r["answer"]) for r in data.rows["forget"]]
        pairs = [(ours[i], _norm_text(gts[str(i)].get("ground_truth", ""))) for i in range(min(len(ours), 20)) if str(i) in gts]
        if pairs and sum(a == b for a, b in pairs) * 2 < len(pairs):
            raise BaldroError(
                f"retain model log {path} was evaluated on other forget questions than {data.forget_split}: "
                f"use the retain model's log for {data.forget_split} (retain split {retain_split_for(data.forget_split)})"
            )
    return log


HEADLINE = ("forget_quality", "model_utility", "privleak")


def restrict_log(log: dict, n_rows: dict[str, int]) -> dict:
    """A copy of an eval log keeping only per-sample entries of the first rows of each set.

    With `limit`, the retain model's full log is cut to the same questions, so that forget quality
    (a KS test) and privleak compare the same samples. `n_rows` maps a set (forget, retain, ra, wf,
    holdout) to its number of evaluated rows."""
    prefix_set = {"forget_": "forget", "retain_": "retain", "ra_": "ra", "wf_": "wf"}

    def cut(entry: dict, n: int) -> dict:
        vbi = entry.get("value_by_index")
        if not isinstance(vbi, dict):
            return entry
        keep = {k: v for k, v in vbi.items() if not (k.isdigit() and int(k) >= n)}
        return {**entry, "value_by_index": keep}

    out = {}
    for key, entry in log.items():
        if not isinstance(entry, dict):
            out[key] = entry
        elif key.startswith("mia_") and "forget" in entry:
            out[key] = {**entry}
            for side in ("forget", "holdout"):
                if isinstance(entry.get(side), dict):
                    out[key][side] = cut(entry[side], n_rows[side])
        elif key in ("exact_memorization", "extraction_strength"):
            out[key] = cut(entry, n_rows["forget"])
        else:
            which = next((v for p, v in prefix_set.items() if key.startswith(p)), None)
            out[key] = cut(entry, n_rows[which]) if which else entry
    return out


def evaluate_tofu(
    model,
    tokenizer,
    formatter: QAFormatter,
    data_source,
    forget_split: str = "forget10",
    out_dir=None,
    retain_logs_path=None,
    batch_size: int = 16,
    max_new_tokens: int = 200,
    limit: int | None = None,
    shared_forward: bool = True,
    sort_by_length: bool = True,
    timings: dict | None = None,
    progress: bool | None = None,
) -> tuple[dict, dict]:
    """Evaluate `model` on TOFU; returns (eval_log, summary) in OpenUnlearning's layout.

    Args:
        data_source: TOFU folder (one JSON/JSON-lines file per config), hub id or synthetic folder.
        out_dir: when given, TOFU_EVAL.json and TOFU_SUMMARY.json are written there (atomically).
        retain_logs_path: the retain model's TOFU_EVAL.json on the same forget split; needed for
            forget quality (None otherwise) and used as the privleak reference.
        limit: evaluate only the first `limit` rows of every set (quick runs, tests).
        shared_forward: one forward pass per text for all metrics, which also drafts the
            generations (False: per-metric passes).
        sort_by_length: length-sorted batches and continuous, speculative generation (False: input
            order and `model.generate` on fixed batches).
        timings: if a dict is given, it is filled with {group: {rows, sequences, seconds}}.
    """
    data = load_tofu_eval_data(data_source, forget_split, limit)
    reference_log = load_retain_log(retain_logs_path, data) if retain_logs_path else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise BaldroError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")
    texts = _encode(formatter, data)
    timer = _Timer({k: len(v) for k, v in data.rows.items()})
    plan = _metric_plan(data.sets)
    common = dict(shared_forward=shared_forward, sort_by_length=sort_by_length, progress=progress)
    draft_sources = [f"{s.key}/answer" for s in data.sets] if shared_forward else []
    scores, drafts = score_tofu(
        model, _source_texts(texts), plan, timer, batch_size=batch_size, pad_token_id=pad_id,
        draft_sources=draft_sources, **common,
    )
    generations = generate_tofu(
        model, tokenizer, texts, data.sets, timer, batch_size=batch_size, max_new_tokens=max_new_tokens,
        drafts=drafts, **common,
    )
    eval_log = assemble_tofu_eval_log(data, texts, scores, generations, tokenizer)
    if reference_log is None:
        logger.warning(
            "forget_quality is not computed (None): it needs the retain model's per-sample forget truth "
            "ratios; pass retain_logs_path=<retain model's TOFU_EVAL.json>"
        )
    elif limit is not None:
        reference_log = restrict_log(reference_log, timer.n_rows)
    summary = summarize_tofu(eval_log, reference_log)
    for key, note in getattr(summary, "notes", {}).items():
        if key != "forget_quality" or reference_log is not None:
            logger.info("%s: %s", key, note)
    for key in HEADLINE:
        eval_log[key] = {"agg_value": summary.get(key)}
    eval_log = dict(sorted(eval_log.items()))
    if timings is not None:
        timings.update(timer.result())
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json_atomic(out_dir / EVAL_FILE, eval_log, indent=4)
        write_json_atomic(out_dir / SUMMARY_FILE, dict(summary), indent=4)
    return eval_log, summary


def diff_eval_logs(a, b, rtol: float = 1e-5, atol: float = 1e-7, path: str = "") -> list[str]:
    """Where two eval logs differ: numbers beyond the tolerance, other values, missing keys.

    Used to check that the optimised evaluation (shared forward pass, length-sorted batches) gives
    the numbers of the naive one: batch composition only changes float rounding."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in the {'first' if k in a else 'second'} log" for k in sorted(set(a) ^ set(b))]
        for k in a:
            if k in b:
                out += diff_eval_logs(a[k], b[k], rtol, atol, f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_eval_logs(x, y, rtol, atol, f"{path}[{i}]")]
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=rtol, abs_tol=atol) else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r:.80} vs {b!r:.80}"]

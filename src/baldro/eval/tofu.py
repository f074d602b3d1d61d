"""TOFU evaluation, written in OpenUnlearning's `TOFU_EVAL.json` / `TOFU_SUMMARY.json` layout.

What is TOFU's lives here: its sets (`tofu_sets`), their rows (`load_tofu_eval_data`) and encoded
texts, the metric plan, the per-sample assembly (`assemble_tofu_eval_log`) and the retain model's
log (`load_retain_log`, `restrict_log`). Scoring, generation, timing, the benchmark-independent log
entries and the JSON files come from `baldro.eval.suite` (whose docstring describes the layers and
`shared_forward`); aggregation from `baldro.eval.summarize.summarize_tofu`. With
`shared_forward=True` the forget answers are run once for Q_A_Prob, EM, ES and the four MIA attacks.

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

`evaluate_tofu_openunlearning` (`eval.compat=openunlearning`) reproduces OpenUnlearning's evaluator,
quirks included (SPEC section 4 says why baldro's default differs): attention masks
`input_ids != pad_token_id` (which hide the EOS-valued template tokens inside each sequence),
right-padded teacher-forced passes without position ids, left-padded generation with positions
`cumsum(mask) - 1`, batches of `batch_size` in dataset order, the text split at the prompt's token
count, and ROUGE against the decoded full conversation with the decoded prompt removed
(`openunlearning_rouge_texts`). The fast paths that this mask invalidates (shared prompts, drafted
generations, continuous batching) are off in that mode.

Over 500 lines for a reason: TOFU's items, its metric plan and its OpenUnlearning-compatible variant read
together; the parts a second benchmark reuses are already in `suite.py`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from baldro.data.formatting import (
    EncodedQA,
    QAFormatter,
    check_compat,
    openunlearning_decode,
)
from baldro.data.tofu import holdout_split_for, load_split, retain_split_for
from baldro.errors import BaldroError
from baldro.eval import metrics
from baldro.eval.generation import DraftKV
from baldro.eval.kernels import linear_kernels, prepacked_linears
from baldro.eval.suite import (
    MIA_ATTACKS,
    MetricNeed,
    Scores,
    StageTimer,
    avg_losses,
    by_index,
    diff_eval_logs,
    finite_mean,
    generate_sets,
    json_number,
    label_texts,
    memorization_entry,
    mia_entry,
    pad_token_id,
    prob_entry,
    score_entry,
    score_metrics,
    with_headline,
    write_eval_files,
)
from baldro.eval.summarize import summarize_tofu

__all__ = [  # diff_eval_logs is re-exported from baldro.eval.suite
    "EVAL_FILE",
    "HEADLINE",
    "MIA_K",
    "SUMMARY_FILE",
    "TofuEvalData",
    "TofuSet",
    "assemble_tofu_eval_log",
    "diff_eval_logs",
    "evaluate_tofu",
    "evaluate_tofu_openunlearning",
    "generate_tofu",
    "load_retain_log",
    "load_tofu_eval_data",
    "openunlearning_rouge_texts",
    "restrict_log",
    "score_tofu",
    "tofu_sets",
]

logger = logging.getLogger(__name__)

EVAL_FILE = "TOFU_EVAL.json"
SUMMARY_FILE = "TOFU_SUMMARY.json"
HEADLINE = ("forget_quality", "model_utility", "privleak")  # model-level keys of the summary, copied into the log
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


def tofu_sets(forget_split: str = "forget10", forget_only: bool = False) -> list[TofuSet]:
    """The evaluation sets: forget, retain, real authors, world facts (`forget_only`: the forget set alone)."""
    retain_split_for(forget_split)  # validates the name
    forget = TofuSet("forget", f"{forget_split}_perturbed", "forget_", True, "forget_truth_ratio", True)
    if forget_only:
        return [forget]
    return [
        forget,
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


def load_tofu_eval_data(
    data_source, forget_split: str = "forget10", limit: int | None = None, forget_only: bool = False
) -> TofuEvalData:
    """Load the evaluation splits through `load_split` (local TOFU folder, hub id or synthetic folder); the
    holdout set (privleak's other side) always, the utility sets unless `forget_only`."""
    if limit is not None and limit < 1:
        raise BaldroError(f"limit must be a positive number of rows, got {limit}")
    sets = tofu_sets(forget_split, forget_only)
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


def openunlearning_rouge_texts(tokenizer, prompt_ids: Sequence[int], full_ids: Sequence[int]) -> tuple[str, str]:
    """(input, ground truth) of a ROUGE row as OpenUnlearning writes them: the decoded prompt, and the
    decoded full conversation with every occurrence of that prompt text removed, stripped (both
    decoded by `formatting.openunlearning_decode`: special tokens skipped, " 's" becomes "'s")."""
    text = openunlearning_decode(tokenizer, prompt_ids)
    return text, openunlearning_decode(tokenizer, full_ids).replace(text, "").strip()


def _encode(formatter: QAFormatter, data: TofuEvalData, compat: str = "none") -> dict[str, _SetTexts]:
    tok = formatter.tokenizer
    out: dict[str, _SetTexts] = {}
    for s in data.sets:
        rows = data.rows[s.key]
        qs = [r["question"] for r in rows]
        prompts = [formatter.encode_prompt(q) for q in qs]
        t = _SetTexts(
            answer=formatter.encode_many(qs, [r["answer"] for r in rows], what=f"{s.split} answer", compat=compat),
            prompts=prompts,
            inputs=[tok.decode(p, skip_special_tokens=True) for p in prompts],
            ground_truths=[str(r["answer"]).strip() for r in rows],
        )
        if compat == "openunlearning":
            pairs = [
                openunlearning_rouge_texts(tok, p, formatter.encode(q, r["answer"], compat=compat).input_ids)
                for p, q, r in zip(prompts, qs, rows)
            ]
            t.inputs, t.ground_truths = [i for i, _ in pairs], [g for _, g in pairs]
        if s.paraphrase:
            t.para = formatter.encode_many(
                qs, [r["paraphrased_answer"] for r in rows], what=f"{s.split} paraphrase", compat=compat
            )
        t.k = len(rows[0]["perturbed_answer"])
        pq = [q for q, r in zip(qs, rows) for _ in r["perturbed_answer"]]  # a question's K answers are adjacent
        pa = [a for r in rows for a in r["perturbed_answer"]]
        t.pert = formatter.encode_many(pq, pa, what=f"{s.split} perturbed", compat=compat)
        out[s.key] = t
    hold = data.rows["holdout"]
    out["holdout"] = _SetTexts(
        answer=formatter.encode_many(
            [r["question"] for r in hold],
            [r["answer"] for r in hold],
            what=f"{holdout_split_for(data.forget_split)} answer",
            compat=compat,
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
def _metric_plan(sets: list[TofuSet]) -> dict[str, MetricNeed]:
    """Which texts every metric reads and which model outputs it needs (truth ratio and normalised
    probability derive from the probability metrics, as OpenUnlearning's pre_compute does)."""
    plan: dict[str, MetricNeed] = {}
    none: frozenset = frozenset()
    for s in sets:
        plan[f"{s.prefix}Q_A_Prob"] = MetricNeed("probability", (f"{s.key}/answer",), none)
        if s.paraphrase:
            plan[f"{s.prefix}Q_A_PARA_Prob"] = MetricNeed("probability", (f"{s.key}/para",), none)
        plan[f"{s.prefix}Q_A_PERT_Prob"] = MetricNeed("probability", (f"{s.key}/pert",), none)
    plan["exact_memorization"] = MetricNeed("memorization", ("forget/answer",), frozenset({"argmax"}))
    plan["extraction_strength"] = MetricNeed("memorization", ("forget/answer",), frozenset({"argmax"}))
    mia = ("forget/answer", "holdout/answer")
    plan["mia_loss"] = MetricNeed("mia", mia, none)
    plan["mia_zlib"] = MetricNeed("mia", mia, none)
    plan["mia_min_k"] = MetricNeed("mia", mia, frozenset({"logp"}))
    plan["mia_min_k_plus_plus"] = MetricNeed("mia", mia, frozenset({"logp", "vocab_stats"}))
    return plan


score_tofu = score_metrics  # TOFU scores through the generic planner, with `_metric_plan`


def generate_tofu(
    model,
    tokenizer,
    texts: dict[str, _SetTexts],
    sets: list[TofuSet],
    timer: StageTimer,
    *,
    batch_size: int,
    max_new_tokens: int,
    shared_forward: bool,
    sort_by_length: bool,
    progress: bool | None,
    drafts: dict[str, Scores] | None = None,
    compat: str = "none",
    generation_batch_size: int | None = None,
    draft_kv: DraftKV | None = None,
) -> dict[str, list[str]]:
    """Greedy generations for ROUGE (`suite.generate_sets`, timed as "rouge"). `drafts`: the
    reference answers' teacher-forced scores ("{set}/answer" -> scores) that start the decoding;
    `draft_kv`: their keys/values, kept by the scoring pass."""
    keys = [s.key for s in sets]
    by_set = {k: (texts[k].answer, drafts[f"{k}/answer"]) for k in keys if f"{k}/answer" in (drafts or {})}
    return generate_sets(
        model,
        tokenizer,
        {k: texts[k].prompts for k in keys},
        timer,
        group="rouge",
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        shared_forward=shared_forward,
        sort_by_length=sort_by_length,
        progress=progress,
        drafts=by_set,
        compat=compat,
        generation_batch_size=generation_batch_size,
        draft_kv=draft_kv,
    )


# ------------------------------------------------------------------------------------- assembly
def _pert_entry(scores: Scores, k: int) -> tuple[dict, np.ndarray]:
    """The perturbed answers' entry (K probabilities per question) and their [N, K] average losses."""
    loss = avg_losses(scores).reshape(-1, k)
    prob = metrics.probability(loss)
    entries = [
        {"prob": [json_number(v) for v in p], "avg_loss": [json_number(v) for v in a]} for p, a in zip(prob, loss)
    ]
    return {"agg_value": finite_mean(prob.mean(axis=1)), "value_by_index": by_index(entries)}, loss


def assemble_tofu_eval_log(
    data: TofuEvalData,
    texts: dict[str, _SetTexts],
    scores: dict[str, dict[str, Scores]],
    generations: dict[str, list[str]],
    tokenizer,
) -> dict:
    """Per-sample TOFU eval log (OpenUnlearning keys and fields), without the model-level metrics
    (forget_quality, model_utility, privleak), which `summarize_tofu` computes."""
    log: dict[str, dict] = {}
    for s in data.sets:
        t = texts[s.key]
        p = s.prefix
        log[f"{p}Q_A_Prob"], answer_loss = prob_entry(scores[f"{p}Q_A_Prob"][f"{s.key}/answer"])
        if s.paraphrase:
            log[f"{p}Q_A_PARA_Prob"], correct_loss = prob_entry(scores[f"{p}Q_A_PARA_Prob"][f"{s.key}/para"])
        else:
            correct_loss = answer_loss
        log[f"{p}Q_A_PERT_Prob"], pert_loss = _pert_entry(scores[f"{p}Q_A_PERT_Prob"][f"{s.key}/pert"], t.k)
        tr = metrics.truth_ratio(correct_loss, pert_loss)
        agg = metrics.truth_ratio_closer_to_1(tr) if s.forget_like else metrics.truth_ratio_true_better(tr)
        log[s.truth_ratio_key] = score_entry(tr, agg=agg)
        if not s.paraphrase:
            norm = metrics.normalised_probability(answer_loss, pert_loss)
            log[f"{p}Q_A_Prob_normalised"] = {
                "agg_value": finite_mean(norm),
                "value_by_index": by_index([{"prob": json_number(v)} for v in norm]),
            }
        rouge = metrics.rouge(generations[s.key], t.ground_truths)
        entries = [
            {**r, "input": i, "ground_truth": g, "generation": gen}
            for r, i, g, gen in zip(rouge, t.inputs, t.ground_truths, generations[s.key])
        ]
        log[f"{p}Q_A_ROUGE"] = {
            "agg_value": finite_mean(r["rougeL_recall"] for r in rouge),
            "value_by_index": by_index(entries),
        }
    for name in ("exact_memorization", "extraction_strength"):
        log[name] = memorization_entry(name, scores[name]["forget/answer"])
    sides = ("forget", "holdout")
    side_texts = {side: label_texts(tokenizer, texts[side].answer) for side in sides}
    for name in MIA_ATTACKS:
        log[name] = mia_entry(name, {side: scores[name][f"{side}/answer"] for side in sides}, side_texts, k=MIA_K)
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
        raise BaldroError(
            f"retain model log {path} not found: point retain_logs_path at the retain model's {EVAL_FILE}"
        )
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
        pairs = [
            (ours[i], _norm_text(gts[str(i)].get("ground_truth", "")))
            for i in range(min(len(ours), 20))
            if str(i) in gts
        ]
        if pairs and sum(a == b for a, b in pairs) * 2 < len(pairs):
            raise BaldroError(
                f"retain model log {path} was evaluated on other forget questions than {data.forget_split}: "
                f"use the retain model's log for {data.forget_split} (retain split {retain_split_for(data.forget_split)})"
            )
    return log


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
            out[key] = cut(entry, n_rows[which]) if which in n_rows else entry
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
    generation_batch_size: int | None = None,
    forget_only: bool = False,
    prepack_weights: bool | None = None,
    info: dict | None = None,
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
        generation_batch_size: rows decoded at once by continuous batching (None: 3 x `batch_size`,
            `generation.DECODE_BATCH_FACTOR`); fixed-batch decoding uses `batch_size`.
        forget_only: only the forget set (and the holdout set, for privleak): no retain, real-authors or
            world-facts metrics, so model_utility is None; what an attack's verdict needs, at about a quarter
            of the time.
        prepack_weights: linear layers multiply on weights prepacked for oneDNN on a CPU
            (`baldro.eval.kernels`; None: when the copies fit in memory; False: torch's own products).
        info: if a dict is given, it is filled with how the evaluation ran: {"linear_kernels":
            "onednn_prepacked" or "torch"}.

    `evaluate_tofu_openunlearning` takes the same arguments and reproduces OpenUnlearning's evaluator.
    """
    return _evaluate_tofu(
        model,
        tokenizer,
        formatter,
        data_source,
        forget_split=forget_split,
        out_dir=out_dir,
        retain_logs_path=retain_logs_path,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        limit=limit,
        shared_forward=shared_forward,
        sort_by_length=sort_by_length,
        timings=timings,
        progress=progress,
        generation_batch_size=generation_batch_size,
        forget_only=forget_only,
        prepack_weights=prepack_weights,
        info=info,
    )


def evaluate_tofu_openunlearning(model, tokenizer, formatter: QAFormatter, data_source, **kwargs) -> tuple[dict, dict]:
    """`evaluate_tofu` as OpenUnlearning's evaluator computes it, quirks included (`eval.compat=openunlearning`,
    module docstring): same arguments, `batch_size` 32 by default (OpenUnlearning's); texts are scored
    and decoded in dataset order whatever `sort_by_length` says, without the shortcuts its mask breaks."""
    kwargs.setdefault("batch_size", 32)
    return _evaluate_tofu(model, tokenizer, formatter, data_source, compat="openunlearning", **kwargs)


def _evaluate_tofu(
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
    compat: str = "none",
    generation_batch_size: int | None = None,
    forget_only: bool = False,
    prepack_weights: bool | None = None,
    info: dict | None = None,
) -> tuple[dict, dict]:
    """`evaluate_tofu` (compat "none") or `evaluate_tofu_openunlearning` (compat "openunlearning")."""
    check_compat(compat)
    data = load_tofu_eval_data(data_source, forget_split, limit, forget_only)
    reference_log = load_retain_log(retain_logs_path, data) if retain_logs_path else None
    pad_id = pad_token_id(tokenizer)
    texts = _encode(formatter, data, compat)
    timer = StageTimer({k: len(v) for k, v in data.rows.items()}, model)
    plan = _metric_plan(data.sets)
    if compat != "none":
        sort_by_length = False
    common = dict(shared_forward=shared_forward, sort_by_length=sort_by_length, progress=progress, compat=compat)
    draft_sources = [f"{s.key}/answer" for s in data.sets] if shared_forward and compat == "none" else []
    # continuous decoding (sort_by_length) resumes drafts on the keys/values their scoring pass kept
    draft_kv = DraftKV.for_model(model, tokenizer, max_new_tokens) if draft_sources and sort_by_length else None
    with prepacked_linears(model, False if compat != "none" else prepack_weights, rows_hint=batch_size) as packed:
        if info is not None:
            info["linear_kernels"] = linear_kernels(packed)
        scores, drafts = score_tofu(
            model,
            _source_texts(texts),
            plan,
            timer,
            batch_size=batch_size,
            pad_token_id=pad_id,
            draft_sources=draft_sources,
            draft_kv=draft_kv,
            **common,
        )
        generations = generate_tofu(
            model,
            tokenizer,
            texts,
            data.sets,
            timer,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            drafts=drafts,
            generation_batch_size=generation_batch_size,
            draft_kv=draft_kv,
            **common,
        )
    if draft_kv is not None:
        logger.info("decoding resumed %d drafted rows on their teacher-forced keys/values", draft_kv.taken)
        draft_kv.clear()
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
    eval_log = with_headline(eval_log, summary, HEADLINE)
    if timings is not None:
        timings.update(timer.result())
    if out_dir is not None:
        write_eval_files(out_dir, {EVAL_FILE: eval_log, SUMMARY_FILE: dict(summary)})
    return eval_log, summary

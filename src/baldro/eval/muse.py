"""MUSE evaluation, written in OpenUnlearning's `MUSE_EVAL.json` / `MUSE_SUMMARY.json` layout.

What is MUSE's lives here: its sets (`load_muse_eval_data`), their encoded texts and prompts, the
metric plan, the per-sample assembly (`assemble_muse_eval_log`) and the retrained model's log
(`load_reference_log`). Scoring, generation (drafts, continuous batching), timing, the log entries and
the JSON files come from `baldro.eval.suite`, the metric definitions from `baldro.eval.metrics`, the
aggregation (ROUGE means, MIA AUCs, PrivLeak) from `baldro.eval.summarize.summarize_muse`.

Sets and keys (OpenUnlearning's MUSE settings):

| key | set | how |
| --- | --- | --- |
| forget_verbmem_ROUGE | `verbmem/forget` | greedy continuation of `prompt`, 128 new tokens, ROUGE-L F1 against `gt` |
| exact_memorization, extraction_strength | `verbmem/forget` | teacher-forced over prompt + " " + gt, gt scored |
| forget_knowmem_ROUGE, retain_knowmem_ROUGE | `knowmem/forget_qa`, `knowmem/retain_qa` | few-shot prompt (the `_icl` pairs as earlier turns), up to 32 new tokens cut at "\\n\\n", "\\nQuestion", "Question:", ROUGE-L F1 |
| mia_loss, mia_zlib, mia_min_k, mia_min_k_plus_plus | `privleak/forget` (members) vs `privleak/holdout` | each text's first `max_length` tokens, one pass for all four; Min-K% k = 0.4 |
| privleak | | relative difference of the Min-K% AUC to the retrained model's (`retain_logs_path`) |

With `shared_forward=True` the VerbMem texts are run once for EM, ES and the generation drafts
(the teacher-forced argmax over the true continuation: tokens a model reproduces are not decoded
again), and the privleak texts once for the four attacks; `shared_forward=False` runs every metric's
own passes (the naive baseline of `benchmarks/eval_muse.py`), with the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from baldro.data.formatting import EncodedQA, QAFormatter
from baldro.data.muse import (
    check_chunk_length,
    encode_completion,
    encode_text,
    load_knowmem,
    load_privleak,
    load_verbmem,
    model_context,
)
from baldro.errors import BaldroError
from baldro.eval import metrics
from baldro.eval.generation import DraftKV
from baldro.eval.kernels import linear_kernels, prepacked_linears
from baldro.eval.suite import (
    MIA_ATTACKS,
    MetricNeed,
    Scores,
    StageTimer,
    by_index,
    finite_mean,
    generate_sets,
    label_texts,
    memorization_entry,
    mia_entry,
    pad_token_id,
    score_metrics,
    with_headline,
    write_eval_files,
)
from baldro.eval.summarize import detect_benchmark, load_eval_log, summarize_muse

logger = logging.getLogger(__name__)

EVAL_FILE = "MUSE_EVAL.json"
SUMMARY_FILE = "MUSE_SUMMARY.json"
HEADLINE = ("privleak",)  # model-level key of the summary, copied into the log (as OpenUnlearning does)
MIA_K = 0.4  # OpenUnlearning's MUSE Min-K% / Min-K%++ fraction
VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")  # OpenUnlearning's KnowMem stopwords
MIA_MAX_LENGTH = 2048  # tokens of each privleak text (OpenUnlearning's MUSE_MIA max_length)
KNOWMEM_SETS = ("forget", "retain")


@dataclass
class MuseEvalData:
    verbmem: list[dict]  # {prompt, gt}
    knowmem: dict[str, tuple[list[dict], list[dict]]]  # forget/retain -> (questions, in-context examples)
    privleak: dict[str, list[str]]  # forget (members) / holdout (non-members) -> texts

    def n_rows(self) -> dict[str, int]:
        """Rows per timing set (the part of a source name before "/")."""
        return {
            "verbmem": len(self.verbmem),
            **{f"knowmem_{k}": len(v[0]) for k, v in self.knowmem.items()},
            **{f"privleak_{k}": len(v) for k, v in self.privleak.items()},
        }


def load_muse_eval_data(data_source, limit: int | None = None) -> MuseEvalData:
    """The evaluation sets from a MUSE folder or hub id; `limit`: the first N rows of every set."""
    if limit is not None and limit < 1:
        raise BaldroError(f"limit must be a positive number of rows, got {limit}")
    return MuseEvalData(
        verbmem=load_verbmem(data_source, limit),
        knowmem={k: load_knowmem(data_source, k, limit) for k in KNOWMEM_SETS},
        privleak={k: load_privleak(data_source, k, limit) for k in ("forget", "holdout")},
    )


# ------------------------------------------------------------------------------------- encoding
@dataclass
class _Generated:
    """One generation set: prompts, their decoded text ("input") and the ground truths."""

    prompts: list[list[int]]
    inputs: list[str]
    ground_truths: list[str]


@dataclass
class MuseTexts:
    verbmem: list[EncodedQA]  # prompt + " " + gt, gt scored
    generation: dict[str, _Generated]  # verbmem, knowmem_forget, knowmem_retain
    privleak: dict[str, list[EncodedQA]]  # forget / holdout texts, every token scored


def encode_muse(formatter: QAFormatter, data: MuseEvalData, max_length: int = MIA_MAX_LENGTH) -> MuseTexts:
    """Encode every set: VerbMem and the MIA texts as raw text (no chat template, as OpenUnlearning),
    KnowMem prompts with the formatter (chat template or plain "Question: ...\\nAnswer: "), the
    in-context pairs as earlier turns."""
    tok = formatter.tokenizer
    verbmem = [encode_completion(tok, r["prompt"], r["gt"]) for r in data.verbmem]
    gen = {
        "verbmem": _Generated(
            prompts=[list(e.input_ids[: e.prompt_len]) for e in verbmem],
            inputs=[tok.decode(e.input_ids[: e.prompt_len], skip_special_tokens=True) for e in verbmem],
            ground_truths=[r["gt"].strip() for r in data.verbmem],
        )
    }
    for k, (rows, icl) in data.knowmem.items():
        history = [(r["question"], r["answer"]) for r in icl]
        prompts = [formatter.encode_prompt(r["question"], history) for r in rows]
        gen[f"knowmem_{k}"] = _Generated(
            prompts=prompts,
            inputs=[tok.decode(p, skip_special_tokens=True) for p in prompts],
            ground_truths=[r["answer"].strip() for r in rows],
        )
    privleak = {k: [encode_text(tok, t, max_length) for t in texts] for k, texts in data.privleak.items()}
    return MuseTexts(verbmem, gen, privleak)


def source_texts(texts: MuseTexts) -> dict[str, list[EncodedQA]]:
    return {"verbmem/text": texts.verbmem, **{f"privleak_{k}/text": v for k, v in texts.privleak.items()}}


def metric_plan() -> dict[str, MetricNeed]:
    """Which texts every teacher-forced metric reads and which model outputs it needs."""
    none: frozenset = frozenset()
    plan = {
        "exact_memorization": MetricNeed("memorization", ("verbmem/text",), frozenset({"argmax"})),
        "extraction_strength": MetricNeed("memorization", ("verbmem/text",), frozenset({"argmax"})),
    }
    mia = ("privleak_forget/text", "privleak_holdout/text")
    plan["mia_loss"] = MetricNeed("mia", mia, none)
    plan["mia_zlib"] = MetricNeed("mia", mia, none)
    plan["mia_min_k"] = MetricNeed("mia", mia, frozenset({"logp"}))
    plan["mia_min_k_plus_plus"] = MetricNeed("mia", mia, frozenset({"logp", "vocab_stats"}))
    return plan


def generate_muse(
    model,
    tokenizer,
    texts: MuseTexts,
    timer: StageTimer,
    *,
    batch_size: int,
    verbmem_max_new_tokens: int,
    knowmem_max_new_tokens: int,
    shared_forward: bool,
    sort_by_length: bool,
    progress: bool | None,
    drafts: dict[str, Scores] | None = None,
    generation_batch_size: int | None = None,
    draft_kv: DraftKV | None = None,
) -> dict[str, list[str]]:
    """VerbMem continuations (timed as "verbmem", drafted from the teacher-forced VerbMem pass when
    `drafts` holds it, resumed on the keys/values `draft_kv` kept) and KnowMem answers (timed as
    "knowmem", cut at the stopwords)."""
    common = dict(
        batch_size=batch_size,
        shared_forward=shared_forward,
        sort_by_length=sort_by_length,
        progress=progress,
        generation_batch_size=generation_batch_size,
    )
    g = texts.generation
    verb_drafts = {"verbmem": (texts.verbmem, drafts["verbmem/text"])} if drafts and "verbmem/text" in drafts else None
    out = generate_sets(
        model,
        tokenizer,
        {"verbmem": g["verbmem"].prompts},
        timer,
        group="verbmem",
        max_new_tokens=verbmem_max_new_tokens,
        drafts=verb_drafts,
        draft_kv=draft_kv,
        **common,
    )
    out.update(
        generate_sets(
            model,
            tokenizer,
            {k: g[k].prompts for k in g if k.startswith("knowmem_")},
            timer,
            group="knowmem",
            max_new_tokens=knowmem_max_new_tokens,
            stop_strings=KNOWMEM_STOP,
            **common,
        )
    )
    return out


# ------------------------------------------------------------------------------------- assembly
def rouge_entry(gen: _Generated, generations: list[str]) -> dict:
    """A ROUGE entry in OpenUnlearning's layout; MUSE aggregates ROUGE-L F1 (SPEC section 5)."""
    rouge = metrics.rouge(generations, gen.ground_truths)
    entries = [
        {**r, "input": i, "ground_truth": g, "generation": t}
        for r, i, g, t in zip(rouge, gen.inputs, gen.ground_truths, generations)
    ]
    return {"agg_value": finite_mean(r["rougeL_f1"] for r in rouge), "value_by_index": by_index(entries)}


def assemble_muse_eval_log(
    texts: MuseTexts,
    scores: dict[str, dict[str, Scores]],
    generations: dict[str, list[str]],
    tokenizer,
) -> dict:
    """Per-sample MUSE eval log (OpenUnlearning keys and fields), without privleak, which
    `summarize_muse` computes."""
    log = {
        "forget_verbmem_ROUGE": rouge_entry(texts.generation["verbmem"], generations["verbmem"]),
        "forget_knowmem_ROUGE": rouge_entry(texts.generation["knowmem_forget"], generations["knowmem_forget"]),
        "retain_knowmem_ROUGE": rouge_entry(texts.generation["knowmem_retain"], generations["knowmem_retain"]),
    }
    for name in ("exact_memorization", "extraction_strength"):
        log[name] = memorization_entry(name, scores[name]["verbmem/text"])
    sides = ("forget", "holdout")
    side_texts = {s: label_texts(tokenizer, texts.privleak[s]) for s in sides}
    for name in MIA_ATTACKS:
        log[name] = mia_entry(name, {s: scores[name][f"privleak_{s}/text"] for s in sides}, side_texts, k=MIA_K)
    return log


# ----------------------------------------------------------------------------------- reference
def load_reference_log(path, n_rows: dict[str, int] | None = None) -> dict:
    """The retrained model's MUSE_EVAL.json (a file or its folder), its MIA entries cut to the first
    `n_rows["forget"]` / `n_rows["holdout"]` samples when the evaluation is limited, so that PrivLeak
    compares AUCs over the same texts."""
    if Path(path).is_dir():
        path = Path(path) / EVAL_FILE
    log = load_eval_log(path, "retrained model log")
    try:
        kind = detect_benchmark(log)
    except BaldroError:
        kind = "muse" if "mia_min_k" in log else "unknown"
    if kind != "muse":
        raise BaldroError(
            f"retrained model log {path} is a {kind.upper()} log: point eval.retain_logs_path at "
            f"the retrained model's {EVAL_FILE}"
        )
    if not isinstance(log.get("mia_min_k"), dict) or "forget" not in log["mia_min_k"]:
        raise BaldroError(f"retrained model log {path} has no per-sample mia_min_k scores: PrivLeak needs them")
    if n_rows is None:
        return log
    out = dict(log)
    for key, entry in log.items():
        if key.startswith("mia_") and isinstance(entry, dict) and "forget" in entry:
            out[key] = dict(entry)
            for side in ("forget", "holdout"):
                vbi = (entry.get(side) or {}).get("value_by_index")
                if isinstance(vbi, dict):
                    kept = {k: v for k, v in vbi.items() if not (k.isdigit() and int(k) >= n_rows[side])}
                    out[key][side] = {**entry[side], "value_by_index": kept}
    return out


# ----------------------------------------------------------------------------------- evaluator
def evaluate_muse(
    model,
    tokenizer,
    formatter: QAFormatter,
    data_source,
    out_dir=None,
    retain_logs_path=None,
    batch_size: int = 16,
    verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
    max_length: int = MIA_MAX_LENGTH,
    limit: int | None = None,
    shared_forward: bool = True,
    sort_by_length: bool = True,
    timings: dict | None = None,
    progress: bool | None = None,
    generation_batch_size: int | None = None,
    prepack_weights: bool | None = None,
    info: dict | None = None,
) -> tuple[dict, dict]:
    """Evaluate `model` on MUSE; returns (eval_log, summary) in OpenUnlearning's layout.

    Args:
        data_source: a MUSE folder (`shared/data/muse/books`) or hub id (`muse-bench/MUSE-Books`).
        out_dir: when given, MUSE_EVAL.json and MUSE_SUMMARY.json are written there (atomically).
        retain_logs_path: the retrained model's MUSE_EVAL.json: the PrivLeak reference (None: against
            AUC 0.5, OpenUnlearning's default).
        max_length: tokens of each privleak text (the recipe's `data.chunk_length`).
        limit: evaluate only the first `limit` rows of every set (quick runs, tests).
        shared_forward, sort_by_length, timings, progress, generation_batch_size, prepack_weights, info:
            as in `baldro.eval.tofu.evaluate_tofu`.
    """
    check_chunk_length(tokenizer, max_length, model_context(model))
    data = load_muse_eval_data(data_source, limit)
    n_rows = data.n_rows()
    reference_log = None
    if retain_logs_path:
        ref_rows = {"forget": n_rows["privleak_forget"], "holdout": n_rows["privleak_holdout"]}
        reference_log = load_reference_log(retain_logs_path, ref_rows if limit is not None else None)
    pad_id = pad_token_id(tokenizer)
    texts = encode_muse(formatter, data, max_length)
    _warn_beyond_context(model, texts, verbmem_max_new_tokens)
    timer = StageTimer(n_rows, model)
    common = dict(shared_forward=shared_forward, sort_by_length=sort_by_length, progress=progress)
    draft_kv = (
        DraftKV.for_model(model, tokenizer, verbmem_max_new_tokens) if shared_forward and sort_by_length else None
    )
    with prepacked_linears(model, prepack_weights, rows_hint=batch_size) as packed:
        if info is not None:
            info["linear_kernels"] = linear_kernels(packed)
        scores, drafts = score_metrics(
            model,
            source_texts(texts),
            metric_plan(),
            timer,
            batch_size=batch_size,
            pad_token_id=pad_id,
            draft_sources=["verbmem/text"] if shared_forward else [],
            draft_kv=draft_kv,
            **common,
        )
        generations = generate_muse(
            model,
            tokenizer,
            texts,
            timer,
            batch_size=batch_size,
            verbmem_max_new_tokens=verbmem_max_new_tokens,
            knowmem_max_new_tokens=knowmem_max_new_tokens,
            drafts=drafts,
            generation_batch_size=generation_batch_size,
            draft_kv=draft_kv,
            **common,
        )
    if draft_kv is not None:
        logger.info("decoding resumed %d drafted rows on their teacher-forced keys/values", draft_kv.taken)
        draft_kv.clear()
    eval_log = assemble_muse_eval_log(texts, scores, generations, tokenizer)
    summary = summarize_muse(eval_log, reference_log)
    for key, note in summary.notes.items():
        logger.info("%s: %s", key, note)
    eval_log = with_headline(eval_log, summary, HEADLINE)
    stages = timer.result()
    for group, t in stages.items():
        logger.info("stage %s: %d rows, %d sequences, %.1f s", group, t["rows"], t["sequences"], t["seconds"])
    if timings is not None:
        timings.update(stages)
    if out_dir is not None:
        write_eval_files(out_dir, {EVAL_FILE: eval_log, SUMMARY_FILE: dict(summary)})
    return eval_log, summary


def _warn_beyond_context(model, texts: MuseTexts, budget: int) -> None:
    context = model_context(model)
    if not context:
        return
    longest = max((len(p) for g in texts.generation.values() for p in g.prompts), default=0) + budget
    longest = max([longest] + [len(e.input_ids) for e in texts.verbmem])
    if longest > context:
        logger.warning(
            "MUSE prompts plus their continuations reach %d tokens, beyond the model's context of %d: "
            "its numbers there are extrapolated",
            longest,
            context,
        )

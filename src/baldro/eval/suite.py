"""Benchmark-independent parts of an evaluator: what TOFU uses and a MUSE evaluator would reuse.

An evaluator (`baldro.eval.tofu`) builds its items (named lists of encoded texts and generation
prompts) and a metric plan, then runs three layers, each replaceable on its own:

1. model outputs: `score_metrics` scores the texts through `baldro.eval.engine` and
   `generate_sets` decodes greedily through `baldro.eval.generation`, timed per stage by a
   `StageTimer`. With `shared_forward=True` every text is run through the model once, whatever
   number of metrics read it, texts that need the same outputs go through one length-sorted call,
   each question's prompt is encoded once for all of its answers, and the teacher-forced argmax over
   a reference answer drafts the generation from its question (the tokens a model reproduces from
   the reference are not decoded again). With `shared_forward=False` every metric runs its own
   passes, as an unoptimised tool does (the benchmark's baseline); the numbers are the same.
   With `compat="openunlearning"` both build their batches as OpenUnlearning does (see
   `baldro.eval.engine` and `baldro.eval.generation`): every text set is scored on its own, in
   input order, with no shared prompts and no drafted generations (neither is valid under its
   attention mask); a text is still run once for all the metrics that read it.
2. per-sample assembly: the benchmark's keys, built from the entry helpers here (`prob_entry`,
   `score_entry`, `memorization_entry`, `mia_entry`) in OpenUnlearning's layout.
3. aggregation (`baldro.eval.summarize`), then `with_headline` and `write_eval_files`.

`diff_eval_logs` compares two logs (the optimised against the naive evaluation, a run against a
published log); `numeric_differences` measures by how much their numbers differ.

Over 500 lines for a reason: the orchestration every evaluator shares (stages, timing, drafted generation,
JSON output, comparisons of logs) is one sequence of steps.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from baldro.data.formatting import IGNORE_INDEX, EncodedQA
from baldro.errors import BaldroError
from baldro.eval import engine, generation, metrics
from baldro.io import write_json_atomic

Scores = list[engine.SequenceScore]


def pad_token_id(tokenizer) -> int:
    """The id that pads scoring batches: the tokenizer's pad token, else its EOS token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise BaldroError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")
    return pad_id


# ---------------------------------------------------------------------------------------- timing
class StageTimer:
    """Accumulates seconds, sequences, distinct dataset rows and model input tokens per timing group.

    `n_rows` maps a set (the part of a source name before "/") to its number of rows. With `model`,
    a hook on its input embeddings counts the token positions every forward pass reads (padding and
    rejected proposals included): the work a stage did, next to the tokens it needed."""

    def __init__(self, n_rows: dict[str, int], model=None):
        self.n_rows = n_rows
        self.model = model
        self.seconds: dict[str, float] = defaultdict(float)
        self.sequences: dict[str, int] = defaultdict(int)
        self.sets: dict[str, set] = defaultdict(set)
        self.tokens: dict[str, int] = defaultdict(int)

    def _count_tokens(self, group: str):
        embed = getattr(self.model, "get_input_embeddings", lambda: None)() if self.model is not None else None
        if embed is None:
            return None

        def count(_module, args):
            if args and isinstance(args[0], torch.Tensor):
                self.tokens[group] += args[0].numel()

        return embed.register_forward_pre_hook(count)

    def run(self, group: str, sources: Sequence[str], n_sequences: int, fn: Callable):
        hook = self._count_tokens(group)
        t0 = time.perf_counter()
        try:
            out = fn()
        finally:
            if hook is not None:
                hook.remove()
        self.seconds[group] += time.perf_counter() - t0
        self.sequences[group] += n_sequences
        self.sets[group].update(s.split("/")[0] for s in sources)
        return out

    def result(self) -> dict[str, dict]:
        out = {}
        for g in self.seconds:
            out[g] = {
                "rows": sum(self.n_rows[k] for k in self.sets[g]),
                "sequences": self.sequences[g],
                "seconds": self.seconds[g],
            }
            if self.model is not None:
                out[g]["model_tokens"] = self.tokens[g]
        return out


# --------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class MetricNeed:
    """What one metric reads: its timing group, the text sources ("{set}/{texts}") and the model
    outputs it needs beyond `avg_loss` (a subset of `engine.WANT_ALL`)."""

    group: str
    sources: tuple[str, ...]
    want: frozenset


def score_groups(
    model,
    sources: dict[str, list[EncodedQA]],
    calls: list[tuple[str, tuple[str, ...], frozenset]],
    timer: StageTimer,
    batch_size: int,
    pad_token_id: int,
    sort_by_length: bool,
    progress: bool | None,
    share_prompts: bool = False,
    compat: str = "none",
    keep_kv: engine.KeepKV | None = None,
) -> list[dict[str, Scores]]:
    """Run each call (group, sources, want) as ONE scoring call over its concatenated sources:
    `score_sequences`, or with `share_prompts` `score_sequences_shared_prompts` (the answers of one
    question, e.g. its paraphrased and perturbed answers, scored against one encoding of its prompt).
    With `compat="openunlearning"`: one `score_sequences` call per source, in input order, with
    OpenUnlearning's batches (as its evaluator scores each dataset). `keep_kv`: offered the keys/values
    of the sequences it expects (shared prompts only)."""
    results = []
    for group, names, want in calls:
        encoded = [e for n in names for e in sources[n]]
        if compat != "none":

            def fn(names=names, want=want, group=group):
                return [
                    s
                    for n in names
                    for s in engine.score_sequences(
                        model,
                        sources[n],
                        batch_size,
                        pad_token_id,
                        want=want,
                        desc=f"scoring ({group})",
                        sort_by_length=False,
                        progress=progress,
                        compat=compat,
                    )
                ]
        elif share_prompts:

            def fn(encoded=encoded, want=want, group=group):
                return engine.score_sequences_shared_prompts(
                    model,
                    encoded,
                    batch_size,
                    pad_token_id,
                    want=want,
                    desc=f"scoring ({group})",
                    progress=progress,
                    keep_kv=keep_kv,
                )
        else:

            def fn(encoded=encoded, want=want, group=group):
                return engine.score_sequences(
                    model,
                    encoded,
                    batch_size,
                    pad_token_id,
                    want=want,
                    desc=f"scoring ({group})",
                    sort_by_length=sort_by_length,
                    progress=progress,
                )

        scores = timer.run(group, names, len(encoded), fn)
        split, pos = {}, 0
        for n in names:
            split[n] = scores[pos : pos + len(sources[n])]
            pos += len(sources[n])
        results.append(split)
    return results


def score_metrics(
    model,
    sources: dict[str, list[EncodedQA]],
    plan: dict[str, MetricNeed],
    timer: StageTimer,
    *,
    batch_size: int,
    pad_token_id: int,
    shared_forward: bool,
    sort_by_length: bool,
    progress: bool | None,
    draft_sources: Sequence[str] = (),
    compat: str = "none",
    draft_kv: generation.DraftKV | None = None,
) -> tuple[dict[str, dict[str, Scores]], dict[str, Scores]]:
    """(metric -> source -> per-sequence scores, draft source -> scores). Shared: every source scored
    once (with the union of the outputs its metrics need, and the argmax for `draft_sources`),
    sources needing the same outputs batched together. Naive: one set of passes per metric, and no
    drafts. `compat="openunlearning"`: OpenUnlearning's batches (`score_groups`), no drafts. `draft_kv`
    keeps the draft sources' keys/values that their generations will need (`generation.DraftKV`)."""
    if compat != "none":
        draft_sources = ()
    if draft_kv is not None:
        draft_kv.expect(e.input_ids for s in draft_sources for e in sources[s])
    if not shared_forward:
        out = {}
        for metric, need in plan.items():
            (split,) = score_groups(
                model,
                sources,
                [(need.group, need.sources, need.want)],
                timer,
                batch_size,
                pad_token_id,
                sort_by_length,
                progress,
                compat=compat,
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
    merged: dict[str, Scores] = {}
    # Shared forward also means each question's prompt is encoded once for all of its answers.
    splits = score_groups(
        model,
        sources,
        calls,
        timer,
        batch_size,
        pad_token_id,
        sort_by_length,
        progress,
        share_prompts=True,
        compat=compat,
        keep_kv=draft_kv if draft_sources else None,
    )
    for split in splits:
        merged.update(split)
    by_metric = {metric: {s: merged[s] for s in need.sources} for metric, need in plan.items()}
    return by_metric, {s: merged[s] for s in draft_sources}


# ------------------------------------------------------------------------------------ generation
def draft_prefixes(
    prompts: Sequence[Sequence[int]],
    references: Sequence[EncodedQA],
    scores: Sequence[engine.SequenceScore],
    eos_ids: Sequence[int],
    max_new_tokens: int,
    min_margin: float,
) -> list[generation.GreedyPrefix | None]:
    """What the teacher-forced pass over each reference (prompt + answer) tells of the greedy
    generation from its prompt (None where the scored text is not exactly the prompt + an answer)."""
    out: list[generation.GreedyPrefix | None] = []
    for prompt, e, sc in zip(prompts, references, scores):
        if sc.argmax is None or not engine.is_prompt_plus_answer(e) or list(e.input_ids[: e.prompt_len]) != prompt:
            out.append(None)
            continue
        draft = e.input_ids[e.prompt_len :]
        out.append(generation.greedy_prefix(draft, sc.argmax, sc.argmax_margin, eos_ids, max_new_tokens, min_margin))
    return out


def generate_sets(
    model,
    tokenizer,
    prompts: dict[str, list[list[int]]],
    timer: StageTimer,
    *,
    group: str,
    batch_size: int,
    max_new_tokens: int,
    shared_forward: bool,
    sort_by_length: bool,
    progress: bool | None,
    drafts: Mapping[str, tuple[Sequence[EncodedQA], Scores]] | None = None,
    stop_strings: Sequence[str] = (),
    compat: str = "none",
    generation_batch_size: int | None = None,
    draft_kv: generation.DraftKV | None = None,
) -> dict[str, list[str]]:
    """Greedy generations from every set's prompts (set -> texts): one call over all sets (shared)
    or one per set (naive), timed as `group`. With `drafts` (set -> its reference texts, prompt +
    answer in prompt order, and their teacher-forced scores), decoding starts after the tokens those
    scores already determine (`generation.greedy_prefix`). `stop_strings` cut every text at the
    first of them (`generation.generate`). `compat="openunlearning"`: one call per set, in input
    order, OpenUnlearning's decoding, no drafts (`generation.generate`). `generation_batch_size`: rows
    that continuous decoding runs at once (`generation.generate`'s `decode_batch_size`). `draft_kv`: the
    drafts' keys/values that `score_metrics` kept, taken by the decoder."""
    keys = list(prompts)
    if compat != "none":
        drafts, shared_forward, sort_by_length = None, False, False
    chunks = [keys] if shared_forward else [[k] for k in keys]
    eos_ids = generation.eos_ids(model, tokenizer)
    min_margin = generation.draft_min_margin(engine.model_dtype(model))
    out: dict[str, list[str]] = {}
    for ks in chunks:
        flat = [p for k in ks for p in prompts[k]]

        def run(ks=ks, flat=flat):
            prefixes = None
            if drafts:
                prefixes = [
                    pre
                    for k in ks
                    for pre in (
                        draft_prefixes(prompts[k], *drafts[k], eos_ids, max_new_tokens, min_margin)
                        if k in drafts
                        else [None] * len(prompts[k])
                    )
                ]
            return generation.generate(
                model,
                tokenizer,
                flat,
                max_new_tokens,
                batch_size,
                desc=f"generating ({'+'.join(ks)})",
                sort_by_length=sort_by_length,
                progress=progress,
                prefixes=prefixes,
                stop_strings=stop_strings,
                compat=compat,
                decode_batch_size=generation_batch_size,
                draft_kv=draft_kv if drafts else None,
            )

        gens = timer.run(group, [f"{k}/prompt" for k in ks], len(flat), run)
        pos = 0
        for k in ks:
            out[k] = gens[pos : pos + len(prompts[k])]
            pos += len(prompts[k])
    return out


# ------------------------------------------------------------------------------- log entries
def json_number(x) -> float | None:
    """A JSON number (None for NaN/inf, as OpenUnlearning writes a missing score)."""
    x = float(x)
    return x if math.isfinite(x) else None


def finite_mean(values) -> float | None:
    """The mean of the finite values (None when there are none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def by_index(entries: Sequence[dict]) -> dict[str, dict]:
    """OpenUnlearning's `value_by_index`: per-sample entries keyed "0", "1", ..."""
    return {str(i): e for i, e in enumerate(entries)}


def avg_losses(scores: Sequence[engine.SequenceScore]) -> np.ndarray:
    return np.array([s.avg_loss for s in scores], dtype=np.float64)


def prob_entry(scores: Sequence[engine.SequenceScore]) -> tuple[dict, np.ndarray]:
    """A probability metric's entry (per-sample prob and avg_loss) and the average losses."""
    loss = avg_losses(scores)
    prob = metrics.probability(loss)
    entries = [{"prob": json_number(p), "avg_loss": json_number(a)} for p, a in zip(prob, loss)]
    return {"agg_value": finite_mean(prob), "value_by_index": by_index(entries)}, loss


def score_entry(values, agg: float | None = None) -> dict:
    """An entry of per-sample scores; the aggregate is their mean unless `agg` is given."""
    vals = [json_number(v) for v in values]
    return {
        "agg_value": finite_mean(vals) if agg is None else agg,
        "value_by_index": by_index([{"score": v} for v in vals]),
    }


def label_texts(tokenizer, encoded: Sequence[EncodedQA]) -> list[str]:
    """The scored text of each sequence (labels, special tokens skipped): what ZLib compresses."""
    return [tokenizer.decode([t for t in e.labels if t != IGNORE_INDEX], skip_special_tokens=True) for e in encoded]


MIA_ATTACKS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")


def mia_entry(name: str, scores: Mapping[str, Scores], texts: Mapping[str, list[str]], k: float) -> dict:
    """A membership-inference entry: attack `name` (one of MIA_ATTACKS) on the "forget" (members)
    and "holdout" sides (their scores and label texts), and its AUC; `k` is the Min-K% fraction."""
    parts = {}
    for side in ("forget", "holdout"):
        sc = scores[side]
        if name == "mia_loss":
            v = metrics.mia_loss(avg_losses(sc))
        elif name == "mia_zlib":
            v = metrics.mia_zlib(avg_losses(sc), texts[side])
        else:
            lp, mask = engine.pad_aligned(sc, "token_logp")
            mask = metrics.without_last_position(mask)
            if name == "mia_min_k":
                v = metrics.min_k(lp, mask, k=k)
            else:
                mu, _ = engine.pad_aligned(sc, "vocab_mean")
                sd, _ = engine.pad_aligned(sc, "vocab_std", pad_value=1.0)
                v = metrics.min_k_plus_plus(lp, mu, sd, mask, k=k)
        parts[side] = v
    auc = metrics.mia_auc(parts["forget"], parts["holdout"])
    return {
        "forget": score_entry(parts["forget"]),
        "holdout": score_entry(parts["holdout"]),
        "auc": auc,
        "agg_value": auc,
    }


def memorization_entry(name: str, scores: Sequence[engine.SequenceScore]) -> dict:
    """exact_memorization or extraction_strength from the teacher-forced argmax."""
    pred, mask = engine.pad_aligned(scores, "argmax", pad_value=-1)
    target, _ = engine.pad_aligned(scores, "targets", pad_value=-1)
    mask = metrics.without_last_position(mask)
    fn = metrics.exact_memorization if name == "exact_memorization" else metrics.extraction_strength
    return score_entry(fn(pred, target, mask).tolist())


# ----------------------------------------------------------------------------------- the log
def with_headline(eval_log: dict, summary: Mapping, keys: Sequence[str]) -> dict:
    """The eval log with the summary's model-level `keys` as {"agg_value": ...} entries, keys sorted
    (OpenUnlearning's layout)."""
    log = dict(eval_log)
    for key in keys:
        log[key] = {"agg_value": summary.get(key)}
    return dict(sorted(log.items()))


def write_eval_files(out_dir, files: Mapping[str, dict]) -> None:
    """Write each {file name: JSON object} into `out_dir`, atomically (a reader never sees half a file)."""
    out_dir = Path(out_dir)
    for name, obj in files.items():
        write_json_atomic(out_dir / name, obj, indent=4)


# Two evaluations "give the same numbers" when every pair is within this (float32 rounding of another
# batch composition); `diff_eval_logs` and `numeric_differences` default to it, the benchmarks import it.
RTOL, ATOL = 1e-5, 1e-7


def diff_eval_logs(a, b, rtol: float = RTOL, atol: float = ATOL) -> list[str]:
    """Where two eval logs differ: numbers beyond the tolerance, other values, missing keys.

    Used to check that the optimised evaluation (shared forward pass, length-sorted batches) gives
    the numbers of the naive one: batch composition only changes float rounding."""
    out = []
    for path, x, y in _aligned_leaves(a, b, ""):
        if x is _MISSING or y is _MISSING:
            out.append(f"{path}: only in the {'second' if x is _MISSING else 'first'} log")
        elif isinstance(x, list) and isinstance(y, list):
            out.append(f"{path}: {len(x)} vs {len(y)} items")
        elif _is_number(x) and _is_number(y):
            if not (math.isclose(x, y, rel_tol=rtol, abs_tol=atol) or (math.isnan(x) and math.isnan(y))):
                out.append(f"{path}: {x!r} vs {y!r}")
        elif x != y:
            out.append(f"{path}: {x!r:.80} vs {y!r:.80}")
    return out


def numeric_differences(a, b, atol: float = ATOL) -> tuple[int, list[tuple[str, float]]]:
    """How many numbers two eval logs hold at the same place, and those that differ by more than
    ``atol``, each with its relative difference |x - y| / max(|x|, |y|), largest first.

    Measures float rounding between two evaluations (another batch size, the optimised mode);
    non-numeric values, keys in only one log and lists of unequal length are `diff_eval_logs`'s business."""
    n, diffs = 0, []
    for path, x, y in _aligned_leaves(a, b, ""):
        if not (_is_number(x) and _is_number(y)):
            continue
        n += 1
        if not (math.isfinite(x) and math.isfinite(y)):
            if not (x == y or (math.isnan(x) and math.isnan(y))):
                diffs.append((path, math.inf))
        elif abs(x - y) > atol:
            diffs.append((path, abs(x - y) / max(abs(x), abs(y))))
    diffs.sort(key=lambda d: -d[1])
    return n, diffs


_MISSING = object()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _aligned_leaves(a, b, path: str):
    """(path, x, y) for every leaf two nested logs hold at the same place, in the first log's order.

    A key in one log only gives its value and ``_MISSING`` (keys only in the second log come first,
    sorted); two lists of unequal length are one leaf (the lists themselves)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(b) - set(a)):
            yield f"{path}/{k}", _MISSING, b[k]
        for k in a:
            yield from _aligned_leaves(a[k], b[k], f"{path}/{k}") if k in b else [(f"{path}/{k}", a[k], _MISSING)]
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _aligned_leaves(x, y, f"{path}[{i}]")
    else:
        yield path, a, b

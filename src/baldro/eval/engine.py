"""The shared model-scoring engine: teacher-forced scores (benchmark-independent).

Two entry points serve every evaluation (TOFU, MUSE); greedy generation is in `baldro.eval.generation`.

- `score_sequences` runs ONE teacher-forced forward pass per sequence and derives from it everything
  that needs the log-probabilities of that text: the mean token NLL (`avg_loss`), the per-token
  log-probs (Min-K%), the teacher-forced argmax (exact memorisation, extraction strength) and the
  vocabulary mean/std of the log-probs at every scored position (Min-K%++). The logits of the scored
  positions are processed in chunks (`_vocab_chunk_stats`), so no [B, T, V] log-softmax is ever
  materialised, and the LM head is only applied from the first scored position on (`logits_to_keep`)
  when the model supports it.
- `score_continuations` gives the numbers of `score_sequences` for many answers of one prompt with
  the prompt run once: its KV cache is shared by the answers (`score_sequences_shared_prompts` groups
  EncodedQA sequences by prompt tokens and falls back to `score_sequences` for lone answers and for
  models whose cache is not a full-attention DynamicCache; `baldro.eval.kv_cache` reads and builds
  the caches).

Both sort the inputs by length (less padding) and return results in input order; `sort_by_length=False`
keeps the input order (the unoptimised baseline of `benchmarks/eval_tofu.py`). Attention masks mark
padding positions, never a token id (SPEC section 4), except with `compat="openunlearning"`:
`score_sequences` then builds its batches as OpenUnlearning does (`formatting.openunlearning_batch`:
right padding, mask `input_ids != pad_token_id`, no position ids). Prompt sharing is not valid under
that mask (its prompts run left padded, with positions that skip masked tokens), so
`score_sequences_shared_prompts` falls back to plain `score_sequences` batches in that mode.

Over 500 lines for a reason: one forward pass per sequence serves every teacher-forced metric; the batching
and length-bucketing that make it fast belong with it.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch

from baldro.data.formatting import (
    IGNORE_INDEX,
    EncodedQA,
    check_compat,
    openunlearning_batch,
    pad_batch,
)
from baldro.errors import BaldroError
from baldro.eval.kv_cache import (
    KeysValues,
    cache_from_layers,
    cache_kwarg,
    cache_layers,
    output_cache,
)
from baldro.eval.metrics import logprob_moments
from baldro.progress import LogProgress, progress_bar  # noqa: F401  (the evaluator's progress)

WANT_ALL = ("logp", "argmax", "vocab_stats")
_VALID_WANT = frozenset(WANT_ALL)
# Elements of one [rows, V] chunk of logits (64 MB in float64): bounds the memory of the statistics.
CHUNK_ELEMENTS = 1 << 23


@dataclass
class SequenceScore:
    """Teacher-forced scores of one sequence, on its scored (label != -100) positions only, in order.

    `avg_loss` is the mean token NLL over all scored positions (OpenUnlearning's `avg_loss`). The
    tensors are 1-D over the n scored positions (CPU, float64 / int64), or None when not requested.
    The log-probs are exact to about 2e-7 and the vocabulary moments are computed in float64 from the
    model's logits: Min-K%++ standardises log p(y) - E[log p], a difference of two close numbers that
    a float32 log-softmax (~1e-6 at log p ~ -10) would make depend on the batch composition.
    """

    avg_loss: float
    n_tokens: int
    targets: torch.Tensor  # [n] label token ids
    token_logp: torch.Tensor | None = None  # [n] log p(label)
    argmax: torch.Tensor | None = None  # [n] teacher-forced argmax of the logits
    argmax_margin: torch.Tensor | None = None  # [n] top-1 minus top-2 logit (how sure the argmax is)
    vocab_mean: torch.Tensor | None = None  # [n] E_{v~p}[log p(v)]
    vocab_std: torch.Tensor | None = None  # [n] sqrt(Var_{v~p}[log p(v)])

    @property
    def prob(self) -> float:
        """Length-normalised probability exp(-avg_loss)."""
        return float(torch.exp(torch.tensor(-self.avg_loss, dtype=torch.float64)))


class KeepKV(Protocol):
    """Keeps keys/values of scored sequences for later decoding (`generation.DraftKV`).

    `expects(tokens)`: whether the sequence `tokens` may be kept (the scorer then asks the model for its
    cache). `offer(tokens, prompt_len, score, row_kv, bytes_per_position)`: after scoring, keep what it
    wants of the sequence's keys/values, read with `row_kv(n)` (its first n positions, a copy)."""

    def expects(self, tokens: Sequence[int]) -> bool: ...

    def offer(
        self,
        tokens: Sequence[int],
        prompt_len: int,
        score: SequenceScore,
        row_kv: Callable[[int], list[KeysValues]],
        bytes_per_position: int,
    ) -> None: ...


def offer_rows(
    keep_kv: KeepKV,
    cache,
    real: torch.Tensor,
    rows: Sequence[tuple[Sequence[int], int, SequenceScore]],
) -> None:
    """Offer each row (tokens, prompt length, score) of a batch's `cache` to `keep_kv`; `real` [B, W]
    marks each row's real positions among the cache's (in order)."""
    layers = cache_layers(cache)
    if layers is None:
        return
    per_position = sum(
        k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size() for k, v in layers
    )
    device = layers[0][0].device
    for b, (tokens, prompt_len, score) in enumerate(rows):
        if not keep_kv.expects(tokens):
            continue

        def row_kv(n: int, b=b) -> list[KeysValues]:
            at = real[b].nonzero().squeeze(1)[:n].to(device)
            return [(k[b : b + 1, :, at], v[b : b + 1, :, at]) for k, v in layers]  # indexing copies

        keep_kv.offer(tokens, prompt_len, score, row_kv, per_position)


# ------------------------------------------------------------------------------------------ helpers
def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's floating-point weights (float32 when it has none)."""
    for p in getattr(model, "parameters", lambda: iter(()))():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Put `model` in eval mode (no dropout) and restore its previous mode afterwards."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def supports_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def length_batches(lengths: Sequence[int], batch_size: int, sort_by_length: bool = True) -> list[list[int]]:
    """Batches of indices; longest first when sorted (an out-of-memory error shows up at once)."""
    if batch_size < 1:
        raise BaldroError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    if sort_by_length:
        order.sort(key=lambda i: -lengths[i])  # stable: ties keep input order
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_aligned(
    scores: Sequence[SequenceScore], field: str, pad_value: float | int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one per-position field of many scores into an aligned [N, T] tensor and its bool mask
    (the layout of the token-level metrics in `baldro.eval.metrics`)."""
    rows = []
    for s in scores:
        v = getattr(s, field)
        if v is None:
            raise BaldroError(f"score field {field!r} was not computed: pass it in `want` of score_sequences")
        rows.append(v)
    n = max((len(r) for r in rows), default=0)
    dtype = rows[0].dtype if rows else torch.float32
    out = torch.full((len(rows), max(n, 1)), pad_value, dtype=dtype)
    mask = torch.zeros((len(rows), max(n, 1)), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return out, mask


# -------------------------------------------------------------------------------- teacher forcing
def _vocab_chunk_stats(logits: torch.Tensor, targets: torch.Tensor, want: frozenset) -> dict[str, torch.Tensor]:
    """Per-row statistics of a [rows, V] chunk of logits.

    log p(target) is logit - logsumexp, the sum of exp(logit - max) taken in the logits' dtype: exact
    to ~2e-7 (below the float32 rounding of the logits themselves) at a third of the cost of a float64
    log-softmax, which converting every vocabulary entry would need. The vocabulary moments (Min-K%++)
    are computed from a float64 log-softmax (`metrics.logprob_moments`), where rounding would
    otherwise dominate a difference of two close numbers. The argmax comes with the top two logits
    (`top_two`: one pass for the maximum, the argmax and the margin)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # half-precision sums over a vocabulary lose three decimal digits
    out: dict[str, torch.Tensor] = {}
    if "argmax" in want:
        top, out["argmax"], out["argmax_margin"] = top_two(logits)
    else:
        top = logits.amax(-1)
    shifted = logits - top[:, None]
    lse = top.double() + shifted.exp_().sum(-1).double().log()  # in place: one [rows, V] buffer
    out["token_logp"] = logits.gather(1, targets[:, None]).squeeze(1).double() - lse
    if "vocab_stats" in want:
        out["vocab_mean"], out["vocab_std"] = logprob_moments(torch.log_softmax(logits.double(), dim=-1))
    return out


def top_two(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, argmax, max minus runner-up in float64) over the last dim of [rows, V] logits.

    The argmax is the first maximum, as `torch.argmax` and greedy decoding pick it (on a tie the
    margin is 0); one top-2 pass costs less than `argmax` alone on a CPU."""
    if logits.shape[-1] == 1:
        inf = torch.full((logits.shape[0],), torch.inf, dtype=torch.float64, device=logits.device)
        return logits[:, 0], torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device), inf
    values, index = logits.topk(2, dim=-1)
    top, argmax = values[:, 0], index[:, 0]
    tie = values[:, 0] == values[:, 1]
    if bool(tie.any()):  # topk does not promise the first of equal values
        argmax = argmax.clone()
        argmax[tie] = logits[tie].argmax(-1)
    best = values.double()
    return top, argmax, best[:, 0] - best[:, 1]


def _score_batch(
    model,
    batch: Sequence[EncodedQA],
    pad_token_id: int,
    want: frozenset,
    keep_ok: bool,
    compat: str = "none",
    keep_kv: KeepKV | None = None,
):
    device = model_device(model)
    keeping = keep_kv is not None and any(keep_kv.expects(e.input_ids) for e in batch)
    if compat == "openunlearning":  # mask from the token ids; no position ids (the model numbers columns 0..T-1)
        ids, attn, _ = openunlearning_batch([e.input_ids for e in batch], pad_token_id, side="right")
    else:
        ids, attn = pad_batch([e.input_ids for e in batch], pad_token_id, side="right")
    labels, _ = pad_batch([e.labels for e in batch], IGNORE_INDEX, side="right")
    tgt = labels[:, 1:]  # logits at position t predict the label at t + 1
    mask = tgt != IGNORE_INDEX
    T = ids.shape[1]
    has = mask.any(1)
    first = int(mask.to(torch.int8).argmax(1)[has].min()) if bool(has.any()) else 0
    kwargs = {"input_ids": ids.to(device), "attention_mask": attn.to(device), "use_cache": keeping}
    offset = 0
    if keep_ok and first > 0:  # skip the LM head on prompt positions nobody scores
        kwargs["logits_to_keep"] = T - first
        offset = first
    out = model(**kwargs)
    logits = out.logits  # [B, T - offset, V]; column j is position offset + j
    cache = output_cache(out) if keeping else None
    del out
    rows_b, rows_t = mask[:, offset:].nonzero(as_tuple=True)  # row-major: each sequence contiguous
    targets = tgt[:, offset:][rows_b, rows_t]
    vocab = logits.shape[-1]
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    parts: dict[str, list[torch.Tensor]] = {}
    rb, rt, tg = rows_b.to(device), rows_t.to(device), targets.to(device)
    for start in range(0, len(rows_b), chunk):
        sl = slice(start, start + chunk)
        stats = _vocab_chunk_stats(logits[rb[sl], rt[sl]], tg[sl], want)
        for k, v in stats.items():
            parts.setdefault(k, []).append(v.cpu())
    del logits
    empty = {"argmax": torch.zeros(0, dtype=torch.long)}  # other fields default to float64
    flat = {k: torch.cat(v) for k, v in parts.items()}
    counts = mask.sum(1).tolist()
    results = []
    pos = 0
    for n in counts:
        sl = slice(pos, pos + n)
        pos += n

        def field(name: str, needed: str):
            if needed not in want:
                return None
            return flat[name][sl].clone() if name in flat else empty.get(name, torch.zeros(0, dtype=torch.float64))

        tok = flat["token_logp"][sl] if flat else torch.zeros(0, dtype=torch.float64)
        results.append(
            SequenceScore(
                avg_loss=float(-tok.sum() / n) if n else float("nan"),
                n_tokens=n,
                targets=targets[sl].clone(),
                token_logp=field("token_logp", "logp"),
                argmax=field("argmax", "argmax"),
                argmax_margin=field("argmax_margin", "argmax"),
                vocab_mean=field("vocab_mean", "vocab_stats"),
                vocab_std=field("vocab_std", "vocab_stats"),
            )
        )
    if keeping:
        rows = [(e.input_ids, e.prompt_len, r) for e, r in zip(batch, results)]
        offer_rows(keep_kv, cache, attn.bool(), rows)
    return results


def _check_score_args(want: Iterable[str], pad_token_id: int | None) -> frozenset:
    want = frozenset(want)
    unknown = want - _VALID_WANT
    if unknown:
        raise BaldroError(f"unknown score field(s) {sorted(unknown)}: use any of {list(WANT_ALL)}")
    if pad_token_id is None:
        raise BaldroError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token)")
    return want


def score_sequences(
    model,
    encoded: Sequence[EncodedQA],
    batch_size: int,
    pad_token_id: int,
    want: Iterable[str] = WANT_ALL,
    desc: str = "scoring",
    sort_by_length: bool = True,
    progress: bool | None = None,
    compat: str = "none",
    keep_kv: KeepKV | None = None,
) -> list[SequenceScore]:
    """Score every sequence with one teacher-forced forward pass; results in input order.

    Args:
        encoded: sequences with labels -100 on unscored (prompt) positions.
        want: any of "logp" (per-token log-probs), "argmax" (teacher-forced predictions and their
            top-1/top-2 logit margin) and
            "vocab_stats" (vocabulary mean/std of the log-probs); `avg_loss` is always computed.
        sort_by_length: batch sequences of similar length together (less padding).
        progress: show a tqdm bar (None: only on a terminal).
        compat: "openunlearning" builds the batches as OpenUnlearning's evaluator does (module docstring).
        keep_kv: offered the keys/values of the sequences it expects (`KeepKV`), for decoding later.
    """
    want = _check_score_args(want, pad_token_id)
    check_compat(compat)
    results: list[SequenceScore | None] = [None] * len(encoded)
    keep_ok = supports_logits_to_keep(model)
    batches = length_batches([len(e.input_ids) for e in encoded], batch_size, sort_by_length)
    with eval_mode(model), torch.inference_mode(), progress_bar(len(encoded), desc, progress) as bar:
        for idx in batches:
            batch = [encoded[i] for i in idx]
            for i, r in zip(idx, _score_batch(model, batch, pad_token_id, want, keep_ok, compat, keep_kv)):
                results[i] = r
            bar.update(len(idx))
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------- shared-prompt scoring
def _continuation_stats(rows: torch.Tensor, targets: torch.Tensor, want: frozenset) -> dict[str, torch.Tensor]:
    """_vocab_chunk_stats over the [n, V] logits `rows` (a view is fine: chunks are sliced, not
    copied), in chunks; results on the CPU."""
    chunk = max(1, CHUNK_ELEMENTS // rows.shape[-1])
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, rows.shape[0], chunk):
        sl = slice(start, start + chunk)
        for k, v in _vocab_chunk_stats(rows[sl], targets[sl], want).items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


@dataclass
class _EncodedPrompts:
    """A batch of prompts run once, LEFT padded: what their continuations attend to."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [G, heads, P, d]
    attn: torch.Tensor  # [G, P] 1 on real prompt positions (CPU)
    lengths: torch.Tensor  # [G] real prompt lengths (CPU)
    last_logits: torch.Tensor  # [G, V] logits of the last prompt position: predict the first answer token


def _encode_prompts(
    model, prompts: Sequence[Sequence[int]], pad_token_id: int, keep_ok: bool
) -> _EncodedPrompts | None:
    """Run the prompts with `use_cache=True`; None when the cache cannot be shared."""
    device = model_device(model)
    ids, attn = pad_batch(prompts, pad_token_id, side="left")  # the last prompt position is the last column
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    kwargs = {
        "input_ids": ids.to(device),
        "attention_mask": attn.to(device),
        "position_ids": pos.to(device),
        "use_cache": True,
    }
    if keep_ok:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    layers = cache_layers(output_cache(out))
    if layers is None:
        return None
    return _EncodedPrompts(layers, attn, attn.sum(1), out.logits[:, -1])


def _score_continuation_batch(
    model,
    prompts: _EncodedPrompts,
    owner: Sequence[int],
    conts: Sequence[Sequence[int]],
    pad_token_id: int,
    want: frozenset,
    cache_arg: str,
    prompt_tokens: Sequence[Sequence[int]] = (),
    keep_kv: KeepKV | None = None,
) -> list[SequenceScore]:
    """Score continuation i of prompt row owner[i] against the prompts' cached keys/values; with
    `keep_kv`, offer it each sequence `prompt_tokens[i] + conts[i]` it expects."""
    device = model_device(model)
    sel = torch.tensor(owner, dtype=torch.long)
    lengths = [len(c) for c in conts]
    width = max(lengths) - 1  # a continuation's last token predicts nothing that is scored
    keeping = keep_kv is not None and any(keep_kv.expects([*p, *c]) for p, c in zip(prompt_tokens, conts))
    sel_d = sel.to(device)
    cache = cache_from_layers([(k[sel_d], v[sel_d]) for k, v in prompts.layers]) if width > 0 or keeping else None
    real = prompts.attn[sel]  # [N, positions]: 1 on the real prompt (and answer) positions of the cache
    cont_logits = None
    if width > 0:
        ids, c_attn = pad_batch([list(c[:-1]) or [pad_token_id] for c in conts], pad_token_id, side="right")
        c_attn[torch.tensor(lengths) <= 1] = 0  # a one-token continuation has no position of its own here
        real = torch.cat([real, c_attn[:, :width]], dim=1)  # prompt + answer positions
        pos = prompts.lengths[sel, None] + torch.arange(width)[None, :]  # continue after the real prompt
        out = model(
            input_ids=ids[:, :width].to(device),
            attention_mask=real.to(device),
            position_ids=pos.to(device),
            use_cache=True,
            **{cache_arg: cache},
        )
        cont_logits = out.logits  # [N, width, V]
        cache = output_cache(out) if keeping else None
        del out
    # Token 0 of continuation i is predicted by its prompt's last position, token t > 0 by column t - 1
    # of its pass. The statistics run on the padded [N * width, V] logits as they are (padding costs
    # less than copying the scored rows out of a tensor this size) and the scored rows are picked after.
    first = _continuation_stats(
        prompts.last_logits[sel.to(prompts.last_logits.device)],
        torch.tensor([c[0] for c in conts], device=device),
        want,
    )
    rest = None
    if cont_logits is not None:
        nxt, _ = pad_batch([list(c[1:]) for c in conts], 0, side="right")  # [N, width]: each column's target
        rest = _continuation_stats(cont_logits.reshape(-1, cont_logits.shape[-1]), nxt.view(-1).to(device), want)
        del cont_logits
    tgt = torch.tensor([t for c in conts for t in c], dtype=torch.long)
    stats: dict[str, torch.Tensor] = {}
    for k, v in first.items():
        pieces = []
        for i, n in enumerate(lengths):
            pieces.append(v[i : i + 1])
            if n > 1:
                pieces.append(rest[k][i * width : i * width + n - 1])
        stats[k] = torch.cat(pieces)
    results = []
    pos_ = 0
    for n in lengths:
        sl = slice(pos_, pos_ + n)
        pos_ += n
        results.append(
            SequenceScore(
                avg_loss=float(-stats["token_logp"][sl].sum() / n),
                n_tokens=n,
                targets=tgt[sl].clone(),
                token_logp=stats["token_logp"][sl].clone() if "logp" in want else None,
                argmax=stats["argmax"][sl].clone() if "argmax" in want else None,
                argmax_margin=stats["argmax_margin"][sl].clone() if "argmax" in want else None,
                vocab_mean=stats["vocab_mean"][sl].clone() if "vocab_stats" in want else None,
                vocab_std=stats["vocab_std"][sl].clone() if "vocab_stats" in want else None,
            )
        )
    if keeping:
        rows = [([*p, *c], len(p), r) for p, c, r in zip(prompt_tokens, conts, results)]
        offer_rows(keep_kv, cache, real.bool(), rows)
    return results


def score_continuations(
    model,
    prompt_ids: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
    pad_token_id: int,
    want: Iterable[str] = WANT_ALL,
    desc: str = "scoring",
    progress: bool | None = None,
    keep_kv: KeepKV | None = None,
) -> list[list[SequenceScore]] | None:
    """Score every continuation of every prompt, each prompt run through the model ONCE.

    `continuations[g]` are non-empty token-id continuations of `prompt_ids[g]` (every token scored);
    the result `[g][j]` is the SequenceScore of `prompt_ids[g] + continuations[g][j]`, the numbers of
    `score_sequences` on that sequence with labels -100 on the prompt. Up to `batch_size` prompts (of
    similar lengths) run left padded with `use_cache=True`; the logits of their last position give
    each continuation's first token. Their continuations, sorted by length, then run in batches of
    up to `batch_size` (right padded, without their last token) against the cached keys/values
    selected for each continuation: attention masks cover the real prompt and answer positions,
    position ids continue after each real prompt length. Returns None when the model's cache cannot
    be shared (not a full-attention DynamicCache): the caller then uses `score_sequences`. `keep_kv`:
    as in `score_sequences`.
    """
    want = _check_score_args(want, pad_token_id)
    if batch_size < 1:
        raise BaldroError(f"batch_size must be >= 1, got {batch_size}")
    if len(prompt_ids) != len(continuations):
        raise BaldroError(f"{len(prompt_ids)} prompts but {len(continuations)} lists of continuations")
    if any(len(p) == 0 for p in prompt_ids) or any(len(c) == 0 for cs in continuations for c in cs):
        raise BaldroError("cannot score continuations of an empty prompt, or empty continuations")
    results: list[list[SequenceScore | None]] = [[None] * len(cs) for cs in continuations]
    keep_ok = supports_logits_to_keep(model)
    cache_arg = cache_kwarg(model)
    chunks = length_batches([len(p) for p in prompt_ids], batch_size)
    total = sum(len(cs) for cs in continuations)
    with eval_mode(model), torch.inference_mode(), progress_bar(total, desc, progress) as bar:
        for chunk in chunks:
            chunk = [g for g in chunk if continuations[g]]
            if not chunk:
                continue
            encoded = _encode_prompts(model, [prompt_ids[g] for g in chunk], pad_token_id, keep_ok)
            if encoded is None:
                return None
            items = [(row, j) for row, g in enumerate(chunk) for j in range(len(continuations[g]))]
            lens = [len(continuations[chunk[row]][j]) for row, j in items]
            for idx in length_batches(lens, batch_size):
                batch = [items[i] for i in idx]
                scores = _score_continuation_batch(
                    model,
                    encoded,
                    [row for row, _ in batch],
                    [continuations[chunk[row]][j] for row, j in batch],
                    pad_token_id,
                    want,
                    cache_arg,
                    [prompt_ids[chunk[row]] for row, _ in batch],
                    keep_kv,
                )
                for (row, j), s in zip(batch, scores):
                    results[chunk[row]][j] = s
                bar.update(len(batch))
            del encoded
    return results  # type: ignore[return-value]


def is_prompt_plus_answer(e: EncodedQA) -> bool:
    """Labels -100 on exactly the first `prompt_len` tokens and the token ids after them (an answer)."""
    p = e.prompt_len
    return (
        0 < p < len(e.input_ids)
        and all(x == IGNORE_INDEX for x in e.labels[:p])
        and list(e.labels[p:]) == list(e.input_ids[p:])
    )


def score_sequences_shared_prompts(
    model,
    encoded: Sequence[EncodedQA],
    batch_size: int,
    pad_token_id: int,
    want: Iterable[str] = WANT_ALL,
    desc: str = "scoring",
    progress: bool | None = None,
    compat: str = "none",
    keep_kv: KeepKV | None = None,
) -> list[SequenceScore]:
    """`score_sequences` (length-sorted), with the sequences that share a prompt (the same
    `input_ids[:prompt_len]`, answers scored from `prompt_len` on) scored by `score_continuations`:
    their prompt is encoded once. Other sequences, and every sequence of a model whose cache cannot be
    shared, go through `score_sequences`. Results in input order. `keep_kv`: as in `score_sequences`.

    With `compat="openunlearning"` nothing is shared (the prompt's cache would be built under
    another mask and other positions than OpenUnlearning's right-padded pass): every sequence goes
    through `score_sequences` in input order."""
    if check_compat(compat) != "none":
        return score_sequences(
            model,
            encoded,
            batch_size,
            pad_token_id,
            want=want,
            desc=desc,
            sort_by_length=False,
            progress=progress,
            compat=compat,
        )
    want = frozenset(want)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(encoded):
        if is_prompt_plus_answer(e):
            groups.setdefault(tuple(e.input_ids[: e.prompt_len]), []).append(i)
    shared = [(k, v) for k, v in groups.items() if len(v) > 1]  # a lone answer gains nothing from the cache
    results: list[SequenceScore | None] = [None] * len(encoded)
    if shared:
        scored = score_continuations(
            model,
            [list(k) for k, _ in shared],
            [[encoded[i].input_ids[encoded[i].prompt_len :] for i in v] for _, v in shared],
            batch_size,
            pad_token_id,
            want=want,
            desc=desc,
            progress=progress,
            keep_kv=keep_kv,
        )
        if scored is not None:
            for (_, v), rs in zip(shared, scored):
                for i, r in zip(v, rs):
                    results[i] = r
    rest = [i for i, r in enumerate(results) if r is None]
    if rest:
        for i, r in zip(
            rest,
            score_sequences(
                model,
                [encoded[i] for i in rest],
                batch_size,
                pad_token_id,
                want=want,
                desc=desc,
                progress=progress,
                keep_kv=keep_kv,
            ),
        ):
            results[i] = r
    return results  # type: ignore[return-value]

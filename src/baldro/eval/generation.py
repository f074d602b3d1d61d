"""Greedy generation for the evaluators: exact greedy decoding, made cheap in these ways.

- Drafts from a teacher-forced pass (`greedy_prefix`): an evaluator that already scored prompt +
  reference answer knows the teacher-forced argmax at every answer position. Greedy decoding
  reproduces the reference as long as that argmax equals the next reference token, so those tokens
  (and an EOS right after them) need no decoding; a model that memorised an answer costs nothing.
  That pass has also computed the keys/values of the prompt and the drafted tokens: `DraftKV` keeps
  them, and a drafted row joins the decoding batch on them instead of running its prompt again.
- Continuous batching (`_continuous_greedy`): a row leaves the batch when it stops and a waiting
  prompt takes its place, instead of a fixed batch running until its longest row is done.
- Shared prefixes (`shared_prefix_groups`): prompts that start with the same long run of tokens (the
  in-context examples of a few-shot prompt) have it encoded once; each row then prefills only its own
  tokens against a copy of that cache.
- Prompt-lookup speculation (`NgramDrafter`): each row proposes the tokens that followed the latest
  earlier occurrence of its last n tokens (a repetition loop, common in over-forgotten models,
  proposes its own continuation); one forward pass checks all proposals and keeps the tokens greedy
  decoding would have produced.

Every shortcut returns the tokens of plain greedy decoding: a token is only emitted when it is the
argmax of the model's logits in its true context. The logits come from differently shaped passes
(a full sequence instead of one token at a time, other batch neighbours), which changes float
rounding only; `greedy_prefix` also refuses teacher-forced argmaxes whose lead over the runner-up
is within rounding (`draft_min_margin`). `sort_by_length=False` gives `model.generate` on fixed
batches in input order: the unoptimised baseline of `benchmarks/eval_tofu.py`.

`compat="openunlearning"` decodes as OpenUnlearning's evaluator does, and takes none of the
shortcuts: its mask hides the pad/EOS-valued tokens inside each prompt (`formatting.token_id_mask`)
and its positions skip them, which neither a draft from a teacher-forced pass (scored under other
positions) nor a prefix cache built without that mask reproduces. It runs `model.generate` on fixed
batches in input order (`_static_greedy`), left padded, with OpenUnlearning's mask, from which
`generate` derives the positions `cumsum(mask) - 1` (`formatting.openunlearning_batch`).

Over 500 lines for a reason: the three ways of making greedy decoding cheap share one decoding loop and its
exactness argument; split apart, each would need the others' invariants restated.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from baldro.data.formatting import (
    check_compat,
    openunlearning_batch,
    openunlearning_decode,
    pad_batch,
)
from baldro.errors import BaldroError
from baldro.eval.engine import (
    eval_mode,
    length_batches,
    model_device,
    model_dtype,
    progress_bar,
    supports_logits_to_keep,
)
from baldro.eval.kernels import available_memory_bytes
from baldro.eval.kv_cache import (
    KeysValues,
    append_rows,
    cache_from_layers,
    cache_kwarg,
    cache_layers,
    gather_positions,
    growing_cache,
    is_batchable_cache,
    move_rows,
    output_cache,
)

LOOKAHEAD = 8  # most tokens a row proposes per decoding step (prompt lookup)
# On a CPU, a forward pass of a model this large costs in proportion to the tokens it reads, so
# checking proposals costs about what decoding them would (SmolLM2-135M: 28.0 s with proposals,
# 26.4 s without); smaller models and GPUs spend most of a pass on fixed costs, which proposals share.
CPU_SPECULATION_MAX_PARAMS = 20_000_000
PROBE_EVERY = 8  # decoding steps between tries of rows whose last proposal was rejected
# Continuous decoding runs this many times `batch_size` rows at once: a decoding pass reads every weight
# for one token per row, so a larger batch costs less per token (SmolLM2-135M on one CPU thread, from
# `benchmarks/decode_step.py`: 5.8 ms a token at 32 rows, 4.3 at 64, 3.7 at 96), and it needs little
# memory besides the KV cache.
DECODE_BATCH_FACTOR = 3
# Prompts that share at least this many leading tokens (few-shot examples) have them encoded once.
SHARED_PREFIX_MIN = 64
# `DraftKV` keeps teacher-forced keys/values for decoding in at most this share of the free memory.
DRAFT_KV_MEMORY_SHARE = 0.1


# ------------------------------------------------------------------------------------- config
def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token over the last dim: `torch.max(dim).indices`, the first maximum as `argmax`
    gives it (`model.generate`'s choice), at a fifth of `argmax`'s cost over a vocabulary on a CPU."""
    return logits.max(-1).indices


def eos_ids(model, tokenizer) -> list[int]:
    """The EOS ids greedy generation stops at: the model's generation config's, then the tokenizer's."""
    ids: list[int] = []
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        for i in [src] if isinstance(src, int) else list(src):
            if i not in ids:
                ids.append(int(i))
    return ids


def greedy_config(model, tokenizer, max_new_tokens: int):
    """A pure greedy GenerationConfig: pad and EOS set (the model's and the tokenizer's EOS ids),
    nothing inherited from the checkpoint's sampling defaults."""
    from transformers import GenerationConfig

    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    if pad is None:
        raise BaldroError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        pad_token_id=pad,
        eos_token_id=eos or None,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )


@contextlib.contextmanager
def _generation_config(model, cfg) -> Iterator[None]:
    """Make `cfg` the model's generation config for the call: `generate` fills every unset field
    from `model.generation_config` (a checkpoint's temperature, top_p, max_length, ...), which would
    warn about sampling flags in greedy mode; with `cfg` in its place the defaults are neutral.
    Wrappers (PEFT) generate through their base model, so its config is swapped too."""
    targets = [model]
    base = getattr(model, "get_base_model", None)
    if callable(base):
        targets.append(base())
    saved = [(t, getattr(t, "generation_config", None)) for t in targets]
    try:
        for t in targets:
            t.generation_config = cfg
        yield
    finally:
        for t, old in reversed(saved):
            if old is not None:
                t.generation_config = old
            else:
                with contextlib.suppress(AttributeError):
                    delattr(t, "generation_config")


# ------------------------------------------------------------------------------------- drafts
# Teacher-forced and incremental (KV-cache) logits of the same text differ by float rounding. A draft
# token is only taken as the greedy choice when its logit leads the runner-up by more than this.
_DRAFT_MARGIN = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 0.25, torch.bfloat16: 0.5}


def draft_min_margin(dtype: torch.dtype) -> float:
    """The top-1/top-2 logit margin under which a teacher-forced argmax is not trusted to be the
    token greedy decoding picks (logits of `dtype`)."""
    return _DRAFT_MARGIN.get(dtype, 0.5)


@dataclass
class GreedyPrefix:
    """The first tokens of a greedy generation, known without decoding. `finished`: they are the
    whole generation (they end with EOS, or fill the token budget)."""

    tokens: list[int]
    finished: bool


def decode_rows(batch_size: int, decode_batch_size: int | None = None) -> int:
    """Rows continuous decoding runs at once: `decode_batch_size`, else DECODE_BATCH_FACTOR x `batch_size`."""
    return decode_batch_size or DECODE_BATCH_FACTOR * batch_size


def greedy_prefix(
    draft: Sequence[int],
    argmax: torch.Tensor,
    margin: torch.Tensor,
    eos_ids: Iterable[int],
    max_new_tokens: int,
    min_margin: float,
) -> GreedyPrefix:
    """The prefix of the greedy generation that a teacher-forced pass over prompt + `draft` already
    determines (speculative decoding with the draft, e.g. the reference answer, as the guess).

    `argmax[j]` / `margin[j]` are the teacher-forced argmax and its top-1/top-2 margin at the position
    that predicts `draft[j]` (after prompt + draft[:j]). Greedy decoding emits argmax[0]; while the
    emitted token equals the draft token, the next prediction is argmax[j + 1] as well. It stops at
    the first mismatch (that token is still known), at EOS (finished), at the budget (finished), or
    where the margin is too small to rule out that rounding changes the choice (that token is left
    to the decoder)."""
    eos = set(eos_ids)
    out: list[int] = []
    n = min(len(draft), len(argmax), max_new_tokens)
    for j in range(n):
        if not float(margin[j]) > min_margin:
            return GreedyPrefix(out, False)
        tok = int(argmax[j])
        out.append(tok)
        if tok in eos:
            return GreedyPrefix(out, True)
        if tok != draft[j]:
            break
    return GreedyPrefix(out, len(out) >= max_new_tokens)


class DraftKV:
    """Keys/values of reference texts (prompt + answer) kept from their teacher-forced pass for decoding.

    The decoder resumes a drafted generation after its `greedy_prefix`, so it needs the keys/values
    of the prompt and of every drafted token but the last (which it feeds): the teacher-forced pass
    over prompt + answer computed all of them. The scorer offers each expected reference (`expect`)
    after scoring it (`engine.KeepKV`); a reference whose generation still needs decoding keeps those
    positions, while they fit in `budget_bytes`; `generate` then takes them (`take`), and the row joins
    the decoding batch without a prefill. Keys/values of the same tokens from another pass shape
    differ by float rounding only, as the drafts' logits do (module docstring)."""

    def __init__(self, eos_ids: Iterable[int], max_new_tokens: int, min_margin: float, budget_bytes: int):
        self.eos, self.max_new_tokens, self.min_margin = list(eos_ids), max_new_tokens, min_margin
        self.budget, self.used = budget_bytes, 0
        self.references: set[tuple[int, ...]] = set()
        self.kept: dict[tuple[int, ...], tuple[list[KeysValues], int]] = {}
        self.taken = 0

    @classmethod
    def for_model(cls, model, tokenizer, max_new_tokens: int) -> DraftKV:
        """For greedy generations of up to `max_new_tokens` by `model`, in DRAFT_KV_MEMORY_SHARE of the
        free memory of its device (1 GiB where that is unknown)."""
        device = model_device(model)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory_bytes()
        budget = int(DRAFT_KV_MEMORY_SHARE * free) if free is not None else 1 << 30
        return cls(eos_ids(model, tokenizer), max_new_tokens, draft_min_margin(model_dtype(model)), budget)

    def expect(self, sequences: Iterable[Sequence[int]]) -> None:
        """The reference texts (prompt + answer tokens) whose keys/values may be kept."""
        self.references.update(tuple(t) for t in sequences)

    def expects(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self.references

    def offer(self, tokens, prompt_len: int, score, row_kv, bytes_per_position: int) -> None:
        if score is None or score.argmax is None:
            return
        pre = greedy_prefix(
            tokens[prompt_len:], score.argmax, score.argmax_margin, self.eos, self.max_new_tokens, self.min_margin
        )
        n = prompt_len + len(pre.tokens) - 1  # the decoder feeds the last known token itself
        size = n * bytes_per_position
        key = tuple(tokens[:n])
        if pre.finished or n < 1 or self.used + size > self.budget or key in self.kept:
            return
        self.kept[key] = (row_kv(n), size)
        self.used += size

    def take(self, tokens: Sequence[int]) -> list[KeysValues] | None:
        """The kept keys/values of exactly `tokens` ([1, kv_heads, len(tokens), head_dim] per layer), once."""
        got = self.kept.pop(tuple(tokens), None)
        if got is None:
            return None
        self.used -= got[1]
        self.taken += 1
        return got[0]

    def clear(self) -> None:
        self.kept.clear()
        self.used = 0


class NgramDrafter:
    """Prompt-lookup proposals for one growing token sequence.

    `draft(k)` finds the latest EARLIER occurrence of the sequence's last n tokens (n from `max_n`
    down to `min_n`) and proposes the k tokens that followed it, continued periodically past the
    end of the sequence (a loop "a b a b" proposes "a b a b ..."). An index of n-gram -> position
    after its latest occurrence keeps each call O(max_n).

    `propose(room)` adapts how many tokens to propose to how many were accepted (`accepted`): it
    doubles after a fully accepted proposal (up to `lookahead`) and falls to the accepted count
    otherwise; at zero, a token is only tried when the caller probes (every few steps, for all
    rows at once, so that probes widen few passes). A row that does not repeat itself thus soon
    costs nothing, and one caught in a loop proposes `lookahead` tokens a step."""

    def __init__(
        self,
        tokens: Iterable[int] = (),
        min_n: int = 2,
        max_n: int = 3,
        lookahead: int = LOOKAHEAD,
    ):
        if not 1 <= min_n <= max_n:
            raise BaldroError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.lookahead = lookahead
        self.length = min(2, lookahead)  # tokens the next proposal may have
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        n_tok = len(self.tokens)
        for n in range(self.min_n, min(self.max_n, n_tok) + 1):  # n-grams ending at the current last token
            self._after[tuple(self.tokens[n_tok - n :])] = n_tok  # become "earlier" once a token follows
        self.tokens.append(int(token))

    def draft(self, k: int) -> list[int]:
        n_tok = len(self.tokens)
        for n in range(min(self.max_n, n_tok), self.min_n - 1, -1):
            start = self._after.get(tuple(self.tokens[n_tok - n :]))
            if start is not None:
                period = n_tok - start
                out: list[int] = []
                for j in range(k):
                    out.append(self.tokens[start + j] if start + j < n_tok else out[j - period])
                return out
        return []

    def propose(self, room: int, probe: bool = False) -> list[int]:
        """Up to `room` proposed tokens; with `probe`, at least one is tried even after rejections."""
        k = max(self.length, 1) if probe and self.lookahead > 0 else self.length
        return self.draft(min(k, room)) if k > 0 and room > 0 else []

    def accepted(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.length = min(2 * proposed, self.lookahead) if accepted == proposed else accepted


# ------------------------------------------------------------------------------------- decoding
def _cut_at_eos(row: Sequence[int], eos: set) -> list[int]:
    return list(row[: next((j for j, t in enumerate(row) if t in eos), len(row))])


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of `stop_strings` (cut at each in turn, as
    OpenUnlearning cuts its generations at its stopwords)."""
    for s in stop_strings:
        if s and s in text:
            text = text.split(s)[0]
    return text


def _static_greedy(
    model,
    cfg,
    inputs: Sequence[Sequence[int]],
    budgets: Sequence[int],
    batch_size: int,
    sort_by_length: bool,
    bar,
    compat: str = "none",
) -> list[list[int]]:
    """`model.generate` on fixed batches: a batch runs until its last row stops. With
    `compat="openunlearning"` the attention mask is `input_ids != pad_token_id` (positions, which
    `generate` derives from the mask, then skip the masked tokens too)."""
    eos = set(cfg.eos_token_id or [])
    device = model_device(model)
    new_tokens: list[list[int] | None] = [None] * len(inputs)
    for idx in length_batches([len(p) for p in inputs], batch_size, sort_by_length):
        if compat == "openunlearning":
            ids, attn, _ = openunlearning_batch([inputs[i] for i in idx], cfg.pad_token_id, side="left")
        else:
            ids, attn = pad_batch([inputs[i] for i in idx], cfg.pad_token_id, side="left")
        cfg.max_new_tokens = max(budgets[i] for i in idx)
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=cfg)
        for i, row in zip(idx, out[:, ids.shape[1] :].cpu().tolist()):
            new_tokens[i] = _cut_at_eos(row[: budgets[i]], eos)
        bar.update(len(idx))
    return new_tokens  # type: ignore[return-value]


class _Batch:
    """The rows being decoded: one KV cache whose columns are key/value positions; a row's real
    positions are marked in `attn` and need not be contiguous (rejected proposals leave holes).

    The cache's buffers have room for `max_rows` rows and spare positions (`kv_cache.growing_cache`):
    new rows join after the others, a finished row's place is taken by the last row, and decoding
    appends in place, so only added and moved rows are copied. Columns that no row needs any more are
    cut when the cache grows `COMPACT_SLACK` times wider than its longest row."""

    COMPACT_SLACK = 1.25

    def __init__(self, device: torch.device, max_rows: int):
        self.device = device
        self.max_rows = max_rows
        self.reset()

    def reset(self) -> None:
        device = self.device
        self.rows: list[int] = []  # input index of every batch row
        self.cache = None
        self.attn = torch.zeros((0, 0), dtype=torch.long, device=device)  # [B, W] 1 on real positions
        self.pos = torch.zeros(0, dtype=torch.long, device=device)  # position id of each row's next input
        self.last: list[int] = []  # each row's newest token: emitted, not yet in the cache

    def add(self, rows: list[int], layers: Sequence[KeysValues], attn: torch.Tensor, last_tokens: list[int]) -> None:
        """Add rows whose keys/values (LEFT padded, real positions marked in `attn`) are `layers` and
        whose next input is `last_tokens`."""
        width = max(self.attn.shape[1], attn.shape[1])
        if self.cache is None:
            self.cache = growing_cache(layers, self.max_rows)
        else:
            append_rows(self.cache, layers, width)
        self.attn = torch.cat([_left_pad(self.attn, width, 1), _left_pad(attn, width, 1)])
        self.pos = torch.cat([self.pos, attn.sum(1)])
        self.rows += rows
        self.last += last_tokens

    def keep(self, keep: list[int]) -> None:
        """Keep the rows at these batch positions: the kept rows beyond the new row count move into
        the places of dropped ones (the order of rows changes)."""
        if not keep:  # the next rows start afresh rather than padded to this batch's width
            self.reset()
            return
        n = len(keep)
        kept = set(keep)
        holes = [b for b in range(n) if b not in kept]
        movers = [b for b in keep if b >= n]
        move_rows(self.cache, movers, holes, n)
        order = list(range(n))
        for h, m in zip(holes, movers):
            order[h] = m
        sel = torch.tensor(order, dtype=torch.long, device=self.device)
        self.attn, self.pos = self.attn[sel], self.pos[sel]
        self.rows = [self.rows[b] for b in order]
        self.last = [self.last[b] for b in order]
        self.compact()

    def compact(self) -> None:
        """When the cache is over COMPACT_SLACK times wider than the longest row: move every row's real
        positions to the right end (order kept), left padding the rest, and cut the width to the
        longest row."""
        real = self.attn.bool()
        width = int(real.sum(1).max())
        if real.shape[1] <= self.COMPACT_SLACK * width:
            return
        idx = torch.argsort(real.to(torch.int8), dim=1, stable=True)[:, real.shape[1] - width :]
        self.attn = self.attn.gather(1, idx)
        gather_positions(self.cache, idx)


def _stack_left(rows: Sequence[list[KeysValues]]) -> tuple[list[KeysValues], torch.Tensor]:
    """One batch of single-row keys/values of different lengths, LEFT padded with zeros, and its
    attention mask over the positions."""
    lengths = [r[0][0].shape[2] for r in rows]
    width = max(lengths)
    layers = []
    for layer in range(len(rows[0])):
        k0, v0 = rows[0][layer]
        k = k0.new_zeros((len(rows), k0.shape[1], width, k0.shape[3]))
        v = v0.new_zeros((len(rows), v0.shape[1], width, v0.shape[3]))
        for b, (r, n) in enumerate(zip(rows, lengths)):
            k[b, :, width - n :] = r[layer][0][0]
            v[b, :, width - n :] = r[layer][1][0]
        layers.append((k, v))
    attn = torch.zeros((len(rows), width), dtype=torch.long, device=k0.device)
    for b, n in enumerate(lengths):
        attn[b, width - n :] = 1
    return layers, attn


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if x.shape[dim] >= width:
        return x
    shape = list(x.shape)
    shape[dim] = width - x.shape[dim]
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def shared_prefix_groups(
    inputs: Sequence[Sequence[int]], min_len: int = SHARED_PREFIX_MIN
) -> tuple[list[int], list[int]]:
    """(group of each input, -1 for none; prefix length of each group). Inputs sorted by their tokens
    form a group where neighbours share at least `min_len` leading tokens; the group's prefix is what
    all of them share, cut so that every input keeps at least one token of its own."""
    order = sorted(range(len(inputs)), key=lambda i: list(inputs[i]))
    group = [-1] * len(inputs)
    lengths: list[int] = []

    def common(a, b) -> int:
        n = min(len(a), len(b))
        return next((j for j in range(n) if a[j] != b[j]), n)

    run = [order[0]] if order else []
    shared = None
    for prev, cur in zip(order, order[1:] + [None]):
        lcp = common(inputs[prev], inputs[cur]) if cur is not None else 0
        if lcp >= min_len:
            run.append(cur)
            shared = lcp if shared is None else min(shared, lcp)
            continue
        if len(run) > 1 and shared is not None:
            plen = min([shared] + [len(inputs[i]) - 1 for i in run])
            if plen >= min_len:
                for i in run:
                    group[i] = len(lengths)
                lengths.append(plen)
        run, shared = ([cur] if cur is not None else []), None
    return group, lengths


def _prefill(
    model,
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    keep_ok: bool,
    cache_arg: str,
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
):
    """Run the rows (LEFT padded) with `use_cache`; with `prefix` (the cached keys/values of tokens
    that come before every row), only the rows' own tokens run, against a copy of it. Returns (cache,
    attention mask over the cache's positions, first greedy tokens), or None when the cache cannot
    be batched."""
    device = model_device(model)
    ids, a = pad_batch(rows, pad_token_id, side="left")
    a = a.to(device)
    pos = (a.cumsum(1) - 1).clamp(min=0)
    kwargs = {"input_ids": ids.to(device), "use_cache": True}
    if prefix is not None:
        n, p = len(rows), prefix[0][0].shape[2]
        kwargs[cache_arg] = cache_from_layers([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix])
        a = torch.cat([torch.ones((n, p), dtype=a.dtype, device=device), a], dim=1)
        pos = pos + p
    kwargs.update(attention_mask=a, position_ids=pos)
    if keep_ok:
        kwargs["logits_to_keep"] = 1
    o = model(**kwargs)
    fresh = output_cache(o)
    if not is_batchable_cache(fresh):
        return None
    return fresh, a, greedy_tokens(o.logits[:, -1]).tolist()


def _encode_prefix(model, tokens: Sequence[int], keep_ok: bool) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    device = model_device(model)
    kwargs = {"input_ids": torch.tensor([list(tokens)], device=device), "use_cache": True}
    if keep_ok:
        kwargs["logits_to_keep"] = 1
    return cache_layers(output_cache(model(**kwargs)))


def _continuous_greedy(
    model,
    cfg,
    inputs: Sequence[Sequence[int]],
    budgets: Sequence[int],
    batch_size: int,
    bar,
    lookahead: int = LOOKAHEAD,
    stop: Callable[[int, list[int]], bool] | None = None,
    cached: list[list[KeysValues] | None] | None = None,
) -> list[list[int]] | None:
    """Greedy decoding with continuous batching and prompt-lookup speculation (module docstring).

    Rows sit LEFT padded in one KV cache with their own position ids and attention masks. Each step
    feeds every row its newest token and up to `lookahead` proposed tokens; a proposed token is kept
    while it equals the argmax before it, and each row emits the argmaxes up to its first rejected
    proposal (at least one token per step). Rows that share a long prefix (`shared_prefix_groups`)
    prefill only their own tokens. `stop(i, tokens)`: row i may stop early (its text already
    holds a stop string). `cached[i]`: the keys/values of all of input i but its last token (`DraftKV`):
    the row joins without a prefill. Returns None, before decoding anything, when the model's cache is
    not a full-attention DynamicCache (the caller then uses `model.generate`)."""
    device = model_device(model)
    eos = set(cfg.eos_token_id or [])
    keep_ok = supports_logits_to_keep(model)
    cache_arg = cache_kwarg(model)
    refill_at = max(1, batch_size // 4)  # each refill costs a prefill and a copy of the cache
    queue = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # pop() takes the longest prompt
    out: list[list[int]] = [[] for _ in inputs]
    drafters: dict[int, NgramDrafter] = {}
    batch = _Batch(device, batch_size)
    cached = cached if cached is not None else [None] * len(inputs)  # entries are dropped as rows join
    to_fill = [i for i in range(len(inputs)) if cached[i] is None]
    group = [-1] * len(inputs)
    fill_group, prefix_len = shared_prefix_groups([inputs[i] for i in to_fill])
    for i, g in zip(to_fill, fill_group):
        group[i] = g
    waiting = [group.count(g) for g in range(len(prefix_len))]  # rows of each group not started yet
    prefixes: dict[int, list] = {}  # group -> cached keys/values of its prefix, while rows wait
    steps = 0
    while queue or batch.rows:
        free = batch_size - len(batch.rows)
        if queue and (not batch.rows or free >= refill_at):
            new = [queue.pop() for _ in range(min(free, len(queue)))]
            ready = [i for i in new if cached[i] is not None]
            if ready:  # their keys/values are known: they join as they are, and emit at the next step
                layers, a = _stack_left([cached[i] for i in ready])
                for i in ready:
                    cached[i] = None
                    drafters[i] = NgramDrafter(inputs[i], lookahead=lookahead)
                batch.add(ready, layers, a, [inputs[i][-1] for i in ready])
            by_group: dict[int, list[int]] = {}
            for i in new:
                if i not in ready:
                    by_group.setdefault(group[i], []).append(i)
            emitted = {}
            for g, rows in by_group.items():
                if g >= 0 and g not in prefixes:
                    prefixes[g] = _encode_prefix(model, inputs[rows[0]][: prefix_len[g]], keep_ok)
                prefix = prefixes.get(g)
                cut = prefix_len[g] if prefix is not None else 0
                filled = _prefill(model, [inputs[i][cut:] for i in rows], cfg.pad_token_id, keep_ok, cache_arg, prefix)
                if filled is None:
                    if batch.cache is None and not any(out):
                        return None
                    raise RuntimeError("the model returned a different cache type during decoding")
                fresh, a, first = filled
                for i in rows:
                    drafters[i] = NgramDrafter(inputs[i], lookahead=lookahead)
                start = len(batch.rows)
                batch.add(rows, cache_layers(fresh), a, first)
                emitted.update({start + j: [t] for j, t in enumerate(first)})
                if g >= 0:
                    waiting[g] -= len(rows)
                    if waiting[g] == 0:
                        prefixes.pop(g, None)
        else:
            steps += 1
            emitted = _speculative_step(
                model,
                batch,
                drafters,
                out,
                budgets,
                cache_arg,
                cfg.pad_token_id,
                probe=steps % PROBE_EVERY == 0,
            )
        done = []
        for b, toks in emitted.items():
            i = batch.rows[b]
            for t in toks:
                if t in eos:
                    done.append(b)
                    break
                out[i].append(t)
                drafters[i].append(t)
                if len(out[i]) >= budgets[i] or (stop is not None and stop(i, out[i])):
                    done.append(b)
                    break
        if done:
            gone = set(done)
            for b in done:
                drafters.pop(batch.rows[b], None)
            batch.keep([b for b in range(len(batch.rows)) if b not in gone])
            bar.update(len(done))
    return out


def _speculative_step(
    model,
    batch: _Batch,
    drafters: dict[int, NgramDrafter],
    out: list[list[int]],
    budgets: Sequence[int],
    cache_arg: str,
    pad_token_id: int,
    probe: bool,
) -> dict[int, list[int]]:
    """One forward pass over every row's newest token and its proposals; returns the tokens each
    row emits (batch position -> tokens) and leaves the cache holding exactly the accepted inputs."""
    device = batch.device
    proposals = []
    for _b, i in enumerate(batch.rows):
        proposals.append(drafters[i].propose(budgets[i] - len(out[i]) - 1, probe))  # emits <= 1 + len(proposal)
    width = 1 + max(len(p) for p in proposals)
    ids = torch.full((len(proposals), width), pad_token_id, dtype=torch.long)
    step_attn = torch.zeros((len(proposals), width), dtype=torch.long)
    for b, p in enumerate(proposals):
        ids[b, : 1 + len(p)] = torch.tensor([batch.last[b], *p])
        step_attn[b, : 1 + len(p)] = 1
    step_attn = step_attn.to(device)
    attn = torch.cat([batch.attn, step_attn], dim=1)
    pos = batch.pos[:, None] + torch.arange(width, device=device)[None, :]
    o = model(
        input_ids=ids.to(device), attention_mask=attn, position_ids=pos, use_cache=True, **{cache_arg: batch.cache}
    )
    batch.cache = output_cache(o)
    greedy = greedy_tokens(o.logits).tolist()  # [B, width]: the argmax after each input
    emitted: dict[int, list[int]] = {}
    accepted = torch.zeros(len(proposals), dtype=torch.long)
    for b, p in enumerate(proposals):
        j = 0  # inputs 0..j hold the true sequence
        while j < len(p) and p[j] == greedy[b][j]:
            j += 1
        emitted[b] = greedy[b][: j + 1]
        accepted[b] = j + 1
        drafters[batch.rows[b]].accepted(len(p), j)
        batch.last[b] = greedy[b][j]
    keep = torch.arange(width)[None, :] < accepted[:, None]  # rejected proposals leave masked holes
    batch.attn = torch.cat([batch.attn, keep.to(device=device, dtype=torch.long)], dim=1)
    batch.pos = batch.pos + accepted.to(device)
    batch.compact()
    return emitted


def default_lookahead(model) -> int:
    """LOOKAHEAD, or 0 (no speculation) for a model of over CPU_SPECULATION_MAX_PARAMS on a CPU."""
    if model_device(model).type == "cpu":
        n = sum(p.numel() for p in model.parameters())
        if n > CPU_SPECULATION_MAX_PARAMS:
            return 0
    return LOOKAHEAD


def generate(
    model,
    tokenizer,
    prompts_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generating",
    sort_by_length: bool = True,
    progress: bool | None = None,
    prefixes: Sequence[GreedyPrefix | None] | None = None,
    lookahead: int | None = None,
    stop_strings: Sequence[str] = (),
    compat: str = "none",
    decode_batch_size: int | None = None,
    draft_kv: DraftKV | None = None,
) -> list[str]:
    """Greedy continuations of token-id prompts (new tokens only, special tokens skipped, stripped).

    Batched with LEFT padding, attention masks, per-row position ids and the KV cache; generation
    stops at EOS (the model's and the tokenizer's EOS ids). With `sort_by_length`, decoding is
    continuous and speculative (`_continuous_greedy`; `lookahead` proposed tokens at most, 0 for no
    speculation, None for `default_lookahead`); without
    it, or for a model whose cache cannot be batched that way, `model.generate` runs fixed batches
    (in input order without `sort_by_length`). `prefixes[i]` (from `greedy_prefix`) are tokens
    known to start the generation of prompt i: decoding resumes after them, and a finished prefix
    needs no decoding at all. `stop_strings`: each text is cut at the first of them
    (`cut_at_stop_strings`, before stripping); continuous decoding stops a row once its text holds
    one, which leaves the cut text unchanged. Returns the texts in input order. `batch_size`: rows per
    fixed batch; continuous decoding runs `decode_batch_size` rows at once (default DECODE_BATCH_FACTOR x
    `batch_size`). `draft_kv`: keys/values of prompt + prefix that a teacher-forced pass kept (`DraftKV`);
    continuous decoding takes them instead of running those tokens again.

    `compat="openunlearning"`: OpenUnlearning's decoding (module docstring): fixed batches in input
    order through `model.generate`, its mask and positions, no `prefixes` and no speculation, texts
    decoded by `formatting.openunlearning_decode` and cut at the EOS token's text.
    """
    if check_compat(compat) != "none":
        return _generate_openunlearning(
            model, tokenizer, prompts_ids, max_new_tokens, batch_size, desc, progress, stop_strings
        )
    if any(len(p) == 0 for p in prompts_ids):
        raise BaldroError("cannot generate from an empty prompt: every prompt needs at least one token")
    if prefixes is not None and len(prefixes) != len(prompts_ids):
        raise BaldroError(f"{len(prefixes)} prefixes for {len(prompts_ids)} prompts")
    if lookahead is None:
        lookahead = default_lookahead(model)
    if lookahead < 0:
        raise BaldroError(f"lookahead must be >= 0, got {lookahead}")
    cfg = greedy_config(model, tokenizer, max_new_tokens)
    eos = set(cfg.eos_token_id or [])
    known: list[list[int]] = []
    todo: list[int] = []
    for i in range(len(prompts_ids)):
        pre = prefixes[i] if prefixes is not None else None
        toks = list(pre.tokens[:max_new_tokens]) if pre is not None else []
        if pre is not None and not pre.finished and len(toks) < max_new_tokens and eos.intersection(toks):
            raise BaldroError(f"prefix {i} contains EOS but is not marked finished")
        known.append(toks)
        if not (pre is not None and pre.finished) and len(toks) < max_new_tokens:
            todo.append(i)
    with (
        eval_mode(model),
        _generation_config(model, cfg),
        torch.inference_mode(),
        progress_bar(len(prompts_ids), desc, progress) as bar,
    ):
        bar.update(len(prompts_ids) - len(todo))
        inputs = [list(prompts_ids[i]) + known[i] for i in todo]
        budgets = [max_new_tokens - len(known[i]) for i in todo]
        stop = None
        if stop_strings:

            def stop(j: int, toks: list[int]) -> bool:
                text = tokenizer.decode(known[todo[j]] + toks, skip_special_tokens=True)
                return any(s and s in text for s in stop_strings)

        new = None
        if sort_by_length and todo:
            cached = [draft_kv.take(p[:-1]) for p in inputs] if draft_kv is not None else None
            rows = decode_rows(batch_size, decode_batch_size)
            new = _continuous_greedy(model, cfg, inputs, budgets, rows, bar, lookahead, stop, cached)
            del cached
        if new is None:
            new = _static_greedy(model, cfg, inputs, budgets, batch_size, sort_by_length, bar)
    for i, toks in zip(todo, new):
        known[i] = known[i] + toks
    texts = [tokenizer.decode(_cut_at_eos(toks, eos), skip_special_tokens=True) for toks in known]
    return [cut_at_stop_strings(t, stop_strings).strip() for t in texts]


def _generate_openunlearning(
    model,
    tokenizer,
    prompts_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    desc: str,
    progress: bool | None,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """`generate(compat="openunlearning")`: OpenUnlearning's `eval_text_similarity` decoding."""
    if any(len(p) == 0 for p in prompts_ids):
        raise BaldroError("cannot generate from an empty prompt: every prompt needs at least one token")
    cfg = greedy_config(model, tokenizer, max_new_tokens)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        cfg.pad_token_id = tokenizer.eos_token_id  # OpenUnlearning's pad token (the id its mask compares with)
    eos = set(cfg.eos_token_id or [])
    with (
        eval_mode(model),
        _generation_config(model, cfg),
        torch.inference_mode(),
        progress_bar(len(prompts_ids), desc, progress) as bar,
    ):
        new = _static_greedy(
            model,
            cfg,
            [list(p) for p in prompts_ids],
            [max_new_tokens] * len(prompts_ids),
            batch_size,
            False,
            bar,
            compat="openunlearning",
        )
    stops = [tokenizer.decode([tokenizer.eos_token_id])] if tokenizer.eos_token_id is not None else []
    texts = [openunlearning_decode(tokenizer, _cut_at_eos(t, eos)) for t in new]
    return [cut_at_stop_strings(t, [*stops, *stop_strings]).strip() for t in texts]

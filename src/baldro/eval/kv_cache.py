"""The one place that knows how a `transformers` KV cache holds its keys and values.

The shared-prompt scorer (`engine.score_continuations`) and the continuous decoder
(`generation._continuous_greedy`) move cached keys/values between batches: they read the per-layer
tensors of a DynamicCache and build a cache from tensors. transformers has no public API for
either, so each reliance on its internals is one function here (`cache_layers`,
`cache_from_layers`, `growing_cache` and `GrowingLayer`); `tests/test_eval_structure.py` checks them
against the installed version.

A DynamicLayer appends by concatenation, which copies the whole cache at every decoding step (a
third of SmolLM2's decoding time on a CPU, measured with py-spy), and selecting batch rows copies it
again (another 15 % once the first copy was gone). `growing_cache` builds layers (`GrowingLayer`) that
append positions in place and add, move and drop rows by copying only those rows (`append_rows`,
`move_rows`). Everything else goes through the model's outputs.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

KeysValues = tuple[torch.Tensor, torch.Tensor]  # [batch, kv_heads, positions, head_dim] each


def cache_kwarg(model) -> str:
    """The forward argument that takes a cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The cache a forward pass with `use_cache=True` returned (`cache` or `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_layers(cache) -> list[KeysValues] | None:
    """Per-layer (keys, values) of a DynamicCache of full-attention layers, without a copy; None for
    any other cache (a sliding-window layer drops the keys of long prompts; static, quantised and
    offloaded caches keep them elsewhere).

    Private transformers internals (>= 4.56): `DynamicCache.layers`, `DynamicLayer` and its
    `keys` / `values` attributes."""
    layers = getattr(cache, "layers", None)
    if (
        not isinstance(cache, DynamicCache)
        or not layers
        or any(type(la) not in (DynamicLayer, GrowingLayer) for la in layers)
    ):
        return None
    return [(la.keys, la.values) for la in layers]


def is_batchable_cache(cache) -> bool:
    """Whether `cache_layers` can read `cache` (rows can be selected, every prompt position is kept)."""
    return cache_layers(cache) is not None


def cache_from_layers(layers: Sequence[KeysValues]):
    """A DynamicCache of full-attention layers holding these per-layer (keys, values).

    Relies on the `ddp_cache_data` argument of `DynamicCache.__init__` (transformers >= 4.56), which
    fills one `DynamicLayer` per (keys, values) pair."""
    return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])


# --------------------------------------------------------------------------- growing caches
def growing_cache(layers: Sequence[KeysValues], max_rows: int | None = None):
    """A DynamicCache of `GrowingLayer`s holding these per-layer (keys, values), with buffers for up to
    `max_rows` batch rows (default: the rows given) and spare positions.

    Relies on `Cache.layers` being the list `Cache.update` indexes (transformers >= 4.56)."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer.holding(k, v, max_rows) for k, v in layers]
    return cache


def append_rows(cache, layers: Sequence[KeysValues], width: int) -> None:
    """Add batch rows after the cache's rows, in place: row i of `layers` right-aligned in the last
    positions of `width` (>= its own and the cache's positions; zeros before it and, when `width`
    grows the cache, before the old rows)."""
    for la, (k, v) in zip(cache.layers, layers):
        la.append_rows(k, v, width)


def move_rows(cache, src: Sequence[int], dst: Sequence[int], rows: int) -> None:
    """Copy batch rows `src` onto rows `dst`, then keep the first `rows` rows: dropping rows by moving
    the last ones into their places copies only the moved rows."""
    for la in cache.layers:
        la.move_rows(src, dst, rows)


def gather_positions(cache, positions: torch.Tensor) -> None:
    """Keep, for each batch row b, the cached positions `positions[b]` (in that order): [rows, width]."""
    for la in cache.layers:
        la.gather_positions(positions)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `keys` / `values` are views `[:rows, :, :positions]` of larger buffers, so
    that a decoding step writes only its new positions, and rows are added, moved and dropped without
    copying the cache (`append_rows`, `move_rows`). Anything that replaces `keys` from outside
    (transformers' row selection, cropping) is noticed at the next `update`, which then copies the
    cache into new buffers once."""

    MIN_ROOM = 64  # spare positions at least, whenever buffers are allocated

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, max_rows: int | None = None) -> "GrowingLayer":
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._allocate(max(max_rows or 0, keys.shape[0]), keys.shape[-2], keys, values)
        return layer

    def _allocate(
        self,
        max_rows: int,
        positions: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        shift: int = 0,
        capacity: int | None = None,
    ) -> None:
        """New buffers for `max_rows` rows and `positions` (plus room); `keys` / `values` are copied in
        at position offset `shift`, zeros before them."""
        rows, n = keys.shape[0], keys.shape[-2]
        capacity = max(capacity or 0, positions + max(self.MIN_ROOM, positions // 2))
        buffers = tuple(s.new_empty((max_rows, *s.shape[1:-2], capacity, s.shape[-1])) for s in (keys, values))
        for buf, src in zip(buffers, (keys, values)):
            buf[:rows, ..., :shift, :].zero_()
            buf[:rows, ..., shift : shift + n, :].copy_(src)
        self._kv_buffers = buffers
        self._view(rows, positions)

    def _view(self, rows: int, positions: int) -> None:
        kb, vb = self._kv_buffers
        self.keys, self.values = kb[:rows, ..., :positions, :], vb[:rows, ..., :positions, :]

    def _owns_views(self) -> bool:
        buffers = getattr(self, "_kv_buffers", None)
        return (
            buffers is not None
            and self.keys.data_ptr() == buffers[0].data_ptr()
            and self.keys.stride() == buffers[0].stride()
        )

    def _positions(self) -> int:
        return self.keys.shape[-2] if self.keys.numel() else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self._positions(), key_states.shape[-2]
        owned = n > 0 and self._owns_views()
        if not owned or n + m > self._kv_buffers[0].shape[-2]:
            max_rows = max(key_states.shape[0], self._kv_buffers[0].shape[0] if owned else 0)
            keys, values = (self.keys, self.values) if n else (key_states[..., :0, :], value_states[..., :0, :])
            self._allocate(max_rows, n, keys, values, capacity=2 * (n + m))
        kb, vb = self._kv_buffers
        rows = key_states.shape[0]
        kb[:rows, ..., n : n + m, :].copy_(key_states)
        vb[:rows, ..., n : n + m, :].copy_(value_states)
        self._view(rows, n + m)
        return self.keys, self.values

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        rows, n, k = self.keys.shape[0], self._positions(), keys.shape[0]
        if width < max(n, keys.shape[-2]):
            raise ValueError(f"width {width} is below the cached ({n}) or added ({keys.shape[-2]}) positions")
        if (
            not self._owns_views()
            or width > n
            or rows + k > self._kv_buffers[0].shape[0]
            or width > self._kv_buffers[0].shape[-2]
        ):
            max_rows = max(rows + k, self._kv_buffers[0].shape[0] if self._owns_views() else 0)
            self._allocate(max_rows, width, self.keys, self.values, shift=width - n)
        for buf, src in zip(self._kv_buffers, (keys, values)):
            buf[rows : rows + k, ..., : width - src.shape[-2], :].zero_()
            buf[rows : rows + k, ..., width - src.shape[-2] : width, :].copy_(src)
        self._view(rows + k, width)

    def move_rows(self, src: Sequence[int], dst: Sequence[int], rows: int) -> None:
        n = self._positions()
        if not self._owns_views():
            self._allocate(self.keys.shape[0], n, self.keys, self.values)
        if len(src):
            s = torch.tensor(list(src), device=self.keys.device)
            d = torch.tensor(list(dst), device=self.keys.device)
            for buf in self._kv_buffers:
                buf[d, ..., :n, :] = buf[s, ..., :n, :]
        self._view(rows, n)

    def gather_positions(self, positions: torch.Tensor) -> None:
        rows, width = positions.shape
        kept = []
        for t in (self.keys, self.values):
            idx = positions[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
            kept.append(t.gather(-2, idx))
        max_rows = self._kv_buffers[0].shape[0] if self._owns_views() else rows
        self._allocate(max_rows, width, *kept)

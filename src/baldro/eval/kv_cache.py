"""The one place that knows how a `transformers` KV cache holds its keys and values.

The shared-prompt scorer (`engine.score_continuations`) and the continuous decoder
(`generation._continuous_greedy`) move cached keys/values between batches: they read the per-layer
tensors of a DynamicCache and build a cache from tensors. transformers has no public API for
either, so each reliance on its internals is one function here (`cache_layers`,
`cache_from_layers`, `GrowingLayer`); `tests/test_eval_structure.py` checks them against the
installed version.

A DynamicLayer appends by concatenation, which copies the whole cache at every decoding step (a
third of SmolLM2's decoding time on a CPU, measured with py-spy); `cache_from_layers(..., grow=True)`
builds layers that append in place (`GrowingLayer`).
Everything else goes through the public cache API (`batch_select_indices`) or the model's outputs.
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
    if not isinstance(cache, DynamicCache) or not layers or any(type(la) not in (DynamicLayer, GrowingLayer)
                                                                  for la in layers):
        return None
    return [(la.keys, la.values) for la in layers]


def is_batchable_cache(cache) -> bool:
    """Whether `cache_layers` can read `cache` (rows can be selected, every prompt position is kept)."""
    return cache_layers(cache) is not None


def cache_from_layers(layers: Sequence[KeysValues], grow: bool = False):
    """A DynamicCache of full-attention layers holding these per-layer (keys, values); with `grow`,
    of `GrowingLayer`s, for a cache that decoding appends to step after step.

    Relies on the `ddp_cache_data` argument of `DynamicCache.__init__` (transformers >= 4.56), which
    fills one `DynamicLayer` per (keys, values) pair, and (`grow`) on `Cache.layers` being the list
    its `update` indexes."""
    if not grow:
        return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])
    cache = DynamicCache()
    cache.layers = [GrowingLayer.holding(k, v) for k, v in layers]
    return cache


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only these batch rows of `cache`, in place (the public `Cache.batch_select_indices`)."""
    cache.batch_select_indices(rows)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends in place: `keys` / `values` are views of buffers with room for
    more positions (capacity doubled when full), so a step writes only its new positions. Anything
    that replaces `keys` (row selection, cropping) is noticed at the next `update`, which then copies
    the cache into new buffers once."""

    MIN_CAPACITY = 64

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> "GrowingLayer":
        layer = cls()
        layer.update(keys, values)
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        m = key_states.shape[-2]
        buffers = getattr(self, "_kv_buffers", None)
        if buffers is None or n + m > buffers[0].shape[-2] or not _views_start_of(self.keys, buffers[0]) \
                or buffers[0].shape[:-2] != key_states.shape[:-2]:
            capacity = max(2 * (n + m), self.MIN_CAPACITY)
            buffers = tuple(s.new_empty((*s.shape[:-2], capacity, s.shape[-1])) for s in (key_states, value_states))
            if n:
                buffers[0][..., :n, :].copy_(self.keys)
                buffers[1][..., :n, :].copy_(self.values)
            self._kv_buffers = buffers
        buffers[0][..., n : n + m, :].copy_(key_states)
        buffers[1][..., n : n + m, :].copy_(value_states)
        self.keys, self.values = buffers[0][..., : n + m, :], buffers[1][..., : n + m, :]
        return self.keys, self.values


def _views_start_of(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    return view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()

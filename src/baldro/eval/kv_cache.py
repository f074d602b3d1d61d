"""The one place that knows how a `transformers` KV cache holds its keys and values.

The shared-prompt scorer (`engine.score_continuations`) and the continuous decoder
(`generation._continuous_greedy`) move cached keys/values between batches: they read the per-layer
tensors of a DynamicCache and build a cache from tensors. transformers has no public API for
either, so each reliance on its internals is one function here (`cache_layers`,
`cache_from_layers`); `tests/test_eval_structure.py` checks both against the installed version.
Everything else goes through the public cache API (`batch_select_indices`) or the model's outputs.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

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
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or any(type(la) is not DynamicLayer for la in layers):
        return None
    return [(la.keys, la.values) for la in layers]


def is_batchable_cache(cache) -> bool:
    """Whether `cache_layers` can read `cache` (rows can be selected, every prompt position is kept)."""
    return cache_layers(cache) is not None


def cache_from_layers(layers: Sequence[KeysValues]):
    """A DynamicCache of full-attention layers holding these per-layer (keys, values).

    Relies on the `ddp_cache_data` argument of `DynamicCache.__init__` (transformers >= 4.56), which
    fills one `DynamicLayer` per (keys, values) pair."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only these batch rows of `cache`, in place (the public `Cache.batch_select_indices`)."""
    cache.batch_select_indices(rows)

"""Faster CPU matrix products for evaluation: linear layers on weights prepacked for oneDNN.

`torch.nn.functional.linear` on a CPU calls MKL's sgemm on the weight as it is stored. oneDNN can
instead reorder a weight once into the blocked layout its kernels read, and multiply against that
copy on every call, faster on a CPU where MKL's product is slow for a shape (SmolLM2's LM head,
[49152, 576], at decoding's ~100 rows: `benchmarks/decode_kernels.py` measures a model's decoding
steps and teacher-forced passes both ways). Evaluation never changes the weights, so the
reordering is paid once per evaluation.

The products round differently from MKL's (another summation order): numbers move by float32
rounding, which `benchmarks/eval_tofu.py`'s tolerance check bounds. Only plain `torch.nn.Linear`
modules with ordinary float32 CPU weights are packed: subclasses (bitsandbytes' quantized layers),
tensor subclasses, other dtypes and modules whose `forward` is already replaced (accelerate's hooks)
keep their own path. The copies cost the linear weights' size again in memory: `auto` packs only
models at least AUTO_MIN_WIDTH wide, and only when the copies fit in a quarter of the available memory.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

MEMORY_SHARE = 0.25  # `auto` packs when the copies fit in this share of the available memory
# `auto` packs models at least this wide (hidden size): oneDNN's fixed cost per call outweighs its gain on
# narrow layers (`benchmarks/decode_kernels.py`: SmolLM2, hidden size 576, gains; Llamas of 256 and 64 do not)
AUTO_MIN_WIDTH = 512


def onednn_linear_available() -> bool:
    """This torch build has oneDNN and the two operators packing needs."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def packable_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The modules whose products packing replaces (module docstring)."""
    out = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if (
            type(m) is torch.nn.Linear
            and w is not None
            and type(w.data) is torch.Tensor
            and w.dtype == torch.float32
            and w.device.type == "cpu"
            and "forward" not in m.__dict__
            and not hasattr(m, "_hf_hook")
        ):
            out.append(m)
    return out


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def linears_to_pack(model: torch.nn.Module, prepack: bool | None) -> list[torch.nn.Linear]:
    """`prepack` False: none; True: every packable linear (if oneDNN is there); None (auto): all of them
    for a model at least AUTO_MIN_WIDTH wide (its config's hidden size, else its widest linear input),
    when their copies fit in MEMORY_SHARE of the available memory."""
    if prepack is False or not onednn_linear_available():
        return []
    linears = packable_linears(model)
    if prepack or not linears:
        return linears
    width = getattr(getattr(model, "config", None), "hidden_size", None) or max(m.in_features for m in linears)
    if width < AUTO_MIN_WIDTH:
        return []
    need = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    avail = available_memory_bytes()
    return linears if avail is None or need <= MEMORY_SHARE * avail else []


def should_prepack(model: torch.nn.Module, prepack: bool | None) -> bool:
    """Whether `prepacked_linears(model, prepack)` packs anything."""
    return bool(linears_to_pack(model, prepack))


def linear_kernels(packed: bool) -> str:
    """The name eval_info.json gives to what `prepacked_linears` yielded: "onednn_prepacked" or "torch"."""
    return "onednn_prepacked" if packed else "torch"


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    return forward


@contextlib.contextmanager
def prepacked_linears(model: torch.nn.Module, prepack: bool | None = None, rows_hint: int = 64) -> Iterator[bool]:
    """While inside, the linears `linears_to_pack(model, prepack)` picks multiply through oneDNN on
    weights reordered once on entry; yields whether any do. `prepack`: True, False or None (auto).
    `rows_hint`: the typical rows of a product, which oneDNN's layout choice may use. The weights must not change inside (evaluation); on exit every module is as before."""
    linears = linears_to_pack(model, prepack)
    if not linears:
        yield False
        return
    patched: list[torch.nn.Linear] = []
    try:
        with torch.no_grad():
            for m in linears:
                w = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows_hint)
                b = m.bias.detach() if m.bias is not None else None
                m.forward = _packed_forward(w, b)
                patched.append(m)
        logger.debug("%d linear layers run on prepacked oneDNN weights", len(patched))
        yield True
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)

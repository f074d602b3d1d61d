"""One forward pass that computes only what an objective declared: answer-token log-probs, logits at the
answer positions, a module's hidden states (stopping the pass at that module when nothing after it is needed).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from baldro.train.sequence import (
    AnswerHidden,
    AnswerLogits,
    TokenLogProbs,
    answer_hidden,
    answer_logits,
    token_log_probs,
)


# --------------------------------------------------------------------------- forward passes
@dataclass
class ForwardOut:
    """What one forward pass computed (None: not asked for)."""

    token_lp: TokenLogProbs | None = None
    logits: AnswerLogits | None = None
    hidden: AnswerHidden | None = None


class _StopForward(Exception):
    """Raised by the hidden-state hook when nothing after the module is needed."""


def forward_parts(
    model,
    batch: dict[str, torch.Tensor],
    token_logp: bool = True,
    logits: bool = False,
    hidden_module: torch.nn.Module | None = None,
    may_stop: bool = True,
) -> ForwardOut:
    """A forward pass over a right-padded batch computing only what is asked: answer-token log-probs,
    full-vocabulary logits at the answer positions (the vocabulary-sized tensor of the whole sequence is
    not kept), the output of `hidden_module` at the answer tokens. When only that output is asked for,
    the pass stops at the module (the layers after it and the LM head never run), unless `may_stop` is
    false: a DDP or FSDP wrapper must finish its forward to synchronise the gradients, so its output
    joins the module's with weight zero (the LM head computing one position only where the model allows)."""
    captured: list[torch.Tensor] = []
    stop = may_stop and hidden_module is not None and not (token_logp or logits)

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _StopForward

    handle = hidden_module.register_forward_hook(hook) if hidden_module is not None else None
    hidden_only = hidden_module is not None and not (token_logp or logits)
    extra = {"logits_to_keep": 1} if hidden_only and _accepts_logits_to_keep(model) else {}
    out = None
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
    except _StopForward:
        pass
    finally:
        if handle is not None:
            handle.remove()
    labels = batch["labels"]
    result = ForwardOut()
    if out is not None:
        if token_logp:
            result.token_lp = token_log_probs(out.logits, labels)
        if logits:
            result.logits = answer_logits(out.logits, labels)
    if hidden_module is not None:
        hidden = captured[0]
        if hidden_only and out is not None:  # the wrapper's output joins the loss, with zero weight
            hidden = hidden + 0 * out.logits.sum()
        result.hidden = answer_hidden(hidden, labels)
    return result


def _accepts_logits_to_keep(model) -> bool:
    inner = getattr(model, "module", model)  # a DDP wrapper's model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False

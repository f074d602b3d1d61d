"""Forget objectives (per-sample losses) and retain losses (SPEC section 2).

A forget objective is a pure function of `ForgetInputs` (per-token log-probs from one forward pass,
plus the frozen reference model's log-probs where needed) that returns a vector of B per-sample
losses, lower = more forgotten. It never averages: a weighting (`baldro.weighting`) reduces the
vector, so every weighting wraps every objective. A new objective is one decorated function.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from baldro.errors import BaldroError
from baldro.sequence import TokenLogProbs


@dataclass
class ForgetInputs:
    """What a forget objective may look at, for a batch of B forget samples."""

    forget: TokenLogProbs  # pi_theta on the forget answers
    forget_ref_logp: torch.Tensor | None = None  # logp_ref_i, computed under no_grad
    refusal: TokenLogProbs | None = None  # pi_theta on a refusal answer to the same question
    refusal_ref_logp: torch.Tensor | None = None


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., torch.Tensor]
    needs_reference: bool
    needs_refusal: bool
    defaults: dict = field(default_factory=dict)

    def check_args(self, hparams: dict) -> None:
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.defaults), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise BaldroError(
                f"objective {self.name!r} has no hyperparameter(s) {unknown}{hint}: it takes {sorted(self.defaults)}"
            )

    def __call__(self, inputs: ForgetInputs, **hparams) -> torch.Tensor:
        self.check_args(hparams)
        if self.needs_reference and inputs.forget_ref_logp is None:
            raise BaldroError(f"objective {self.name!r} needs the reference model's log-probs")
        if self.needs_refusal and inputs.refusal is None:
            raise BaldroError(f"objective {self.name!r} needs refusal answers (data.refusal_file)")
        return self.fn(inputs, **{**self.defaults, **hparams})


FORGET_OBJECTIVES: dict[str, Objective] = {}


def forget_objective(name: str, needs_reference: bool = False, needs_refusal: bool = False):
    """Register `fn(inputs, **hparams) -> Tensor[B]`; keyword defaults become the hyperparameters."""

    def register(fn):
        defaults = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty
        }
        FORGET_OBJECTIVES[name] = Objective(name, fn, needs_reference, needs_refusal, defaults)
        return fn

    return register


def get_objective(name: str) -> Objective:
    if name not in FORGET_OBJECTIVES:
        raise BaldroError(f"unknown forget objective {name!r}: use one of {sorted(FORGET_OBJECTIVES)}")
    return FORGET_OBJECTIVES[name]


def _check_beta(beta: float, name: str = "beta") -> None:
    if not beta > 0:
        raise BaldroError(f"{name} must be > 0, got {beta}")


@forget_objective("ga")
def gradient_ascent(x: ForgetInputs) -> torch.Tensor:
    """l_i = -nll_i: minimising it raises the forget NLL without bound."""
    return -x.forget.nll


@forget_objective("npo", needs_reference=True)
def npo(x: ForgetInputs, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation: -(2/beta) logsigmoid(-beta (logp - logp_ref))."""
    _check_beta(beta)
    return -(2.0 / beta) * F.logsigmoid(-beta * (x.forget.logp - x.forget_ref_logp))


@forget_objective("simnpo")
def simnpo(x: ForgetInputs, beta: float = 4.5, delta: float = 0.0) -> torch.Tensor:
    """Reference-free NPO on the length-normalised NLL: -(2/beta) logsigmoid(beta (nll - delta))."""
    _check_beta(beta)
    return -(2.0 / beta) * F.logsigmoid(beta * (x.forget.nll - delta))


def _weighted_ascent(x: ForgetInputs, token_weight: torch.Tensor) -> torch.Tensor:
    """mean_t of -(w_t, detached) * ce_t: gradient ascent with per-token weights."""
    return x.forget.token_mean(token_weight.detach() * x.forget.token_logp)


@forget_objective("wga")
def weighted_gradient_ascent(x: ForgetInputs, beta: float = 1.0) -> torch.Tensor:
    """WGA: tokens weighted by p_t^beta, so already-forgotten tokens stop pushing."""
    p = x.forget.token_logp.exp()
    return _weighted_ascent(x, p.pow(beta))


@forget_objective("satimp")
def satimp(x: ForgetInputs, beta1: float = 5.0, beta2: float = 1.0) -> torch.Tensor:
    """SatImp: tokens weighted by p_t^beta1 (1 - p_t)^beta2 (saturation and importance)."""
    p = x.forget.token_logp.exp()
    return _weighted_ascent(x, p.pow(beta1) * (1.0 - p).pow(beta2))


@forget_objective("idk", needs_refusal=True)
def idk(x: ForgetInputs) -> torch.Tensor:
    """NLL of a refusal answer given the forget question."""
    return x.refusal.nll


@forget_objective("dpo", needs_reference=True, needs_refusal=True)
def dpo(x: ForgetInputs, beta: float = 0.1) -> torch.Tensor:
    """DPO with the refusal as the preferred and the forget answer as the rejected response."""
    _check_beta(beta)
    chosen = x.refusal.logp - x.refusal_ref_logp
    rejected = x.forget.logp - x.forget_ref_logp
    return -(2.0 / beta) * F.logsigmoid(beta * (chosen - rejected))


# ----------------------------------------------------------------------------- retain losses
def retain_nll(retain: TokenLogProbs, **_) -> torch.Tensor:
    """Token-mean NLL over all answer tokens of the retain batch (same scale for every method)."""
    return -(retain.token_logp * retain.mask).sum() / retain.mask.sum().clamp(min=1)


def retain_kl(retain: TokenLogProbs, logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref || pi_theta), token mean over the retain answer tokens."""
    mask = labels[:, 1:] != -100
    logq = F.log_softmax(logits[:, :-1][mask].float(), dim=-1)
    logp_ref = F.log_softmax(ref_logits[:, :-1][mask].float(), dim=-1)
    kl = (logp_ref.exp() * (logp_ref - logq)).sum(-1)
    return kl.mean() if kl.numel() else logits.sum() * 0.0


@dataclass(frozen=True)
class RetainLoss:
    name: str
    fn: Callable[..., torch.Tensor]
    needs_reference: bool
    needs_logits: bool


RETAIN_LOSSES = {
    "nll": RetainLoss("nll", retain_nll, needs_reference=False, needs_logits=False),
    "kl": RetainLoss("kl", retain_kl, needs_reference=True, needs_logits=True),
}


def get_retain_loss(name: str) -> RetainLoss:
    if name not in RETAIN_LOSSES:
        raise BaldroError(f"unknown retain loss {name!r}: use one of {sorted(RETAIN_LOSSES)}")
    return RETAIN_LOSSES[name]

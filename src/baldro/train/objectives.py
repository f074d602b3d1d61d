"""Forget objectives (per-sample losses) and retain losses (SPEC section 2).

A forget objective is a pure function of `ForgetInputs` that returns a vector of B per-sample losses,
lower = more forgotten. It never averages: a weighting (`baldro.train.weighting`) reduces the vector, so every
weighting wraps every objective. A new objective is one decorated function that declares what it reads
beyond the answer tokens' log-probs (`Needs`: the reference's log-probs, a preferred answer, full-vocabulary
logits of the model or of the reference, the hidden states of one module, RMU's steering vector); the
trainer computes only what is declared, so the NPO path never holds a vocabulary-sized tensor it does not use.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F

from baldro.errors import BaldroError
from baldro.train.sequence import AnswerHidden, AnswerLogits, TokenLogProbs


@dataclass(frozen=True)
class Needs:
    """What an objective (or a retain loss) reads from the forward passes; all off by default."""

    reference: bool = False  # logp_ref of the scored answers (per sample; cached across epochs)
    refusal: bool = False  # a refusal answer to each forget question (data.refusal_file)
    alternate: bool = False  # an alternate answer to each forget question, generated before unlearning
    logits: bool = False  # the model's full-vocabulary logits at the answer positions
    reference_logits: bool = False  # the same from the reference model (no grad)
    hidden: bool = False  # the output of the module matched by objective.module_regex at the answer tokens
    reference_hidden: bool = False  # the same from the reference model (no grad)
    steering: bool = False  # RMU's fixed random unit vector (objective state, saved with the run)
    token_logp: bool = True  # answer-token log-probs (false: the forward may stop at the hidden module)

    @property
    def any_reference(self) -> bool:
        return self.reference or self.reference_logits or self.reference_hidden

    @property
    def preferred(self) -> str | None:
        """The batch part that holds the preferred answer of a preference objective, if any."""
        return "refusal" if self.refusal else "alternate" if self.alternate else None


@dataclass
class ForgetInputs:
    """What a forget objective may look at, for a batch of B forget samples (None: not declared)."""

    forget: TokenLogProbs | None  # pi_theta on the forget answers
    forget_ref_logp: torch.Tensor | None = None  # logp_ref_i, computed under no_grad
    refusal: TokenLogProbs | None = None  # pi_theta on a refusal answer to the same question
    refusal_ref_logp: torch.Tensor | None = None
    alternate: TokenLogProbs | None = None  # pi_theta on an alternate answer (AltPO)
    alternate_ref_logp: torch.Tensor | None = None
    logits: AnswerLogits | None = None  # the model's logits at the forget answer positions
    ref_logits: torch.Tensor | None = None  # [N, V]: the reference's, aligned with `logits`
    hidden: AnswerHidden | None = None  # the module's output at the forget answer tokens
    steering: torch.Tensor | None = None  # [d]: RMU's unit vector u


def _declared(fn) -> dict:
    return {
        p.name: p.default for p in inspect.signature(fn).parameters.values() if p.default is not inspect.Parameter.empty
    }


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., torch.Tensor]
    needs: Needs = Needs()
    defaults: dict = field(default_factory=dict)

    @property
    def needs_reference(self) -> bool:
        return self.needs.any_reference

    @property
    def needs_refusal(self) -> bool:
        return self.needs.refusal

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
        given = {
            "reference": inputs.forget_ref_logp,
            "refusal": inputs.refusal,
            "alternate": inputs.alternate,
            "logits": inputs.logits,
            "reference_logits": inputs.ref_logits,
            "hidden": inputs.hidden,
            "steering": inputs.steering,
            "token_logp": inputs.forget,
        }
        for need, value in given.items():
            if getattr(self.needs, need) and value is None:
                raise BaldroError(f"objective {self.name!r} needs {NEED_TEXT[need]}")
        return self.fn(inputs, **{**self.defaults, **hparams})


FORGET_OBJECTIVES: dict[str, Objective] = {}
NEED_NAMES = tuple(f.name for f in fields(Needs))
NEED_TEXT = {
    "reference": "the reference model's log-probs",
    "refusal": "refusal answers (data.refusal_file)",
    "alternate": "alternate answers (objective.alternates)",
    "logits": "the model's logits",
    "reference_logits": "the reference model's logits",
    "hidden": "hidden states (objective.module_regex)",
    "steering": "a steering vector",
    "token_logp": "the answer tokens' log-probs",
}


def forget_objective(name: str, needs_reference: bool = False, needs_refusal: bool = False, **needs: bool):
    """Register `fn(inputs, **hparams) -> Tensor[B]`; keyword defaults become the hyperparameters.
    `needs_reference` / `needs_refusal` and any `Needs` field (`logits=True`, `hidden=True`, ...) say
    what the trainer must compute for it."""
    unknown = sorted(set(needs) - set(NEED_NAMES))
    if unknown:
        raise TypeError(f"forget_objective({name!r}): unknown needs {unknown}; use {list(NEED_NAMES)}")

    def register(fn):
        declared = Needs(reference=needs_reference, refusal=needs_refusal, **needs)
        FORGET_OBJECTIVES[name] = Objective(name, fn, declared, _declared(fn))
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


def _preference(chosen: TokenLogProbs, chosen_ref_logp: torch.Tensor, x: ForgetInputs, beta: float) -> torch.Tensor:
    """-(2/beta) logsigmoid(beta ((logp_w - logp_ref_w) - (logp_l - logp_ref_l))), l = the forget answer."""
    _check_beta(beta)
    margin = (chosen.logp - chosen_ref_logp) - (x.forget.logp - x.forget_ref_logp)
    return -(2.0 / beta) * F.logsigmoid(beta * margin)


@forget_objective("dpo", needs_reference=True, needs_refusal=True)
def dpo(x: ForgetInputs, beta: float = 0.1) -> torch.Tensor:
    """DPO with the refusal as the preferred and the forget answer as the rejected response."""
    return _preference(x.refusal, x.refusal_ref_logp, x, beta)


@forget_objective("altpo", needs_reference=True, alternate=True)
def altpo(x: ForgetInputs, beta: float = 0.1) -> torch.Tensor:
    """AltPO: DPO with an alternate answer the model generated before unlearning as the preferred one."""
    return _preference(x.alternate, x.alternate_ref_logp, x, beta)


@forget_objective("rmu", hidden=True, steering=True, token_logp=False)
def rmu(x: ForgetInputs, steering_coeff: float = 2.0) -> torch.Tensor:
    """RMU: (1/n_i) sum_t (1/d) |h_t - c u|^2 at the module's output on the forget answer tokens."""
    if not steering_coeff > 0:
        raise BaldroError(f"rmu steering_coeff must be > 0, got {steering_coeff}")
    h = x.hidden.values
    target = (steering_coeff * x.steering).to(h.dtype)
    return x.hidden.sample_mean((h.float() - target.float()).pow(2).mean(-1))


def _soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """CE(softmax(target), softmax(logits)) per row: -sum_v p_v log q_v (the target carries no gradient)."""
    p = torch.softmax(target_logits.float(), -1)
    return -(p * torch.log_softmax(logits.float(), -1)).sum(-1)


@forget_objective("undial", logits=True, reference_logits=True, token_logp=False)
def undial(x: ForgetInputs, beta: float = 10.0) -> torch.Tensor:
    """UNDIAL: distil towards the reference's logits with the label token's logit lowered by beta."""
    if not beta >= 0:
        raise BaldroError(f"undial beta must be >= 0, got {beta}")
    lowered = x.ref_logits.float().scatter_add(
        -1, x.logits.labels[:, None], torch.full_like(x.logits.labels[:, None], -beta, dtype=torch.float32)
    )
    return x.logits.sample_mean(_soft_cross_entropy(lowered.detach(), x.logits.values))


@forget_objective("ceu", logits=True, token_logp=False)
def ceu(x: ForgetInputs, ignore_first_n_answer_tokens: int = 1) -> torch.Tensor:
    """CE-U: cross-entropy against the model's own detached distribution with the label token removed,
    over the answer tokens after the first n."""
    n = ignore_first_n_answer_tokens
    if not (float(n).is_integer() and n >= 0):
        raise BaldroError(f"ceu ignore_first_n_answer_tokens must be an integer >= 0, got {n}")
    lg = x.logits
    target = lg.values.detach().float().scatter(-1, lg.labels[:, None], float("-inf"))
    return lg.sample_mean(_soft_cross_entropy(target, lg.values), keep=lg.position >= int(n))


@forget_objective("pdu", logits=True, token_logp=False)
def pdu(x: ForgetInputs) -> torch.Tensor:
    """PDU's forget loss: (max_v z_t,v - mean_v z_t,v)^2, the token mean (flattens the next-token logits).
    Its primal-dual retain constraint is `objective.primal_dual` (any objective may use it)."""
    z = x.logits.values.float()
    return x.logits.sample_mean((z.max(-1).values - z.mean(-1)).pow(2))


# ----------------------------------------------------------------------------- retain losses
@dataclass
class RetainInputs:
    """What a retain loss may look at, for the step's retain batch (None: not declared)."""

    retain: TokenLogProbs | None = None
    logits: AnswerLogits | None = None
    ref_logits: torch.Tensor | None = None
    hidden: AnswerHidden | None = None
    ref_hidden: torch.Tensor | None = None  # [N, d], aligned with `hidden`


def retain_nll(x: RetainInputs) -> torch.Tensor:
    """Token-mean NLL over all answer tokens of the retain batch (same scale for every method)."""
    retain = x.retain
    return -(retain.token_logp * retain.mask).sum() / retain.mask.sum().clamp(min=1)


def retain_kl(x: RetainInputs) -> torch.Tensor:
    """KL(pi_ref || pi_theta), token mean over the retain answer tokens."""
    logq = F.log_softmax(x.logits.values.float(), dim=-1)
    logp_ref = F.log_softmax(x.ref_logits.float(), dim=-1)
    kl = (logp_ref.exp() * (logp_ref - logq)).sum(-1)
    return kl.mean() if kl.numel() else x.logits.values.sum() * 0.0


def retain_embed_diff(x: RetainInputs) -> torch.Tensor:
    """EMBED_DIFF: (1/n_j) sum_t (1/d) |h_t - h_ref,t|^2 per retain sample, then the batch mean."""
    h = x.hidden
    return h.sample_mean((h.values.float() - x.ref_hidden.float()).pow(2).mean(-1)).mean()


@dataclass(frozen=True)
class RetainLoss:
    name: str
    fn: Callable[[RetainInputs], torch.Tensor]
    needs: Needs

    @property
    def needs_reference(self) -> bool:
        return self.needs.any_reference


RETAIN_LOSSES = {
    "nll": RetainLoss("nll", retain_nll, Needs()),
    "kl": RetainLoss("kl", retain_kl, Needs(logits=True, reference_logits=True, token_logp=False)),
    "embed_diff": RetainLoss(
        "embed_diff", retain_embed_diff, Needs(hidden=True, reference_hidden=True, token_logp=False)
    ),
}


def get_retain_loss(name: str) -> RetainLoss:
    if name not in RETAIN_LOSSES:
        raise BaldroError(f"unknown retain loss {name!r}: use one of {sorted(RETAIN_LOSSES)}")
    return RETAIN_LOSSES[name]


# ----------------------------------------------------------------------------- the hidden-state module
def default_module_regex(num_hidden_layers: int) -> str:
    """OpenUnlearning's RMU layer 7 of a 32-layer Llama, at the same relative depth for other depths."""
    layer = min(num_hidden_layers - 1, max(0, round(7 * num_hidden_layers / 32)))
    return rf"model\.layers\.{layer}"


def find_module(model, regex: str) -> tuple[str, torch.nn.Module]:
    """The one module whose name fully matches `regex` (a PEFT model is searched in its base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise BaldroError(f"objective.module_regex {regex!r} is not a regular expression ({e})") from None
    names = [name for name, _ in base.named_modules()]
    matched = [n for n in names if pattern.fullmatch(n)]
    if len(matched) != 1:
        layers = [n for n in names if re.fullmatch(r"(.*\.)?layers\.\d+", n)]
        example = f" (decoder layers are named like {layers[0]!r})" if layers else ""
        what = "no module" if not matched else f"{len(matched)} modules ({', '.join(matched[:4])}...)"
        raise BaldroError(f"objective.module_regex {regex!r} matches {what}: it must match exactly one{example}")
    return matched[0], base.get_submodule(matched[0])


def set_trainable(model, regexes: list[str] | None) -> int:
    """Train only the parameters whose names fully match one of `regexes` (None: all); returns how many
    tensors train. Matching nothing is an error."""
    params = list(model.named_parameters())
    if regexes is None:
        return len(params)
    patterns = []
    for r in regexes:
        try:
            patterns.append(re.compile(r))
        except re.error as e:
            raise BaldroError(f"objective.trainable_params_regex {r!r} is not a regular expression ({e})") from None
    n = 0
    for name, param in params:
        param.requires_grad_(any(p.fullmatch(name) for p in patterns))
        n += int(param.requires_grad)
    if n == 0:
        raise BaldroError(
            f"objective.trainable_params_regex {regexes} matches no parameter (names look like "
            f"{params[0][0]!r}): fix the patterns or set it to null (train all)"
        )
    return n


def steering_vector(dim: int, seed: int) -> torch.Tensor:
    """RMU's u: drawn once from U[0, 1)^d (as OpenUnlearning) with a generator seeded by the run's seed,
    then normalised to unit length."""
    g = torch.Generator().manual_seed(int(seed) + 0x5EED)
    u = torch.rand(dim, generator=g, dtype=torch.float32)
    return u / u.norm()


# ----------------------------------------------------------------------------- PDU's dual variable
class PrimalDual:
    """PDU's retain constraint R <= eps: the loss term lambda (R - eps) with lambda >= 0, lambda starting
    at alpha and moved by dual ascent, lambda <- max(0, lambda + step_size (R - eps)), after each optimizer
    step (its mean R) or each epoch (mean R over one pass), once `warmup_epochs` epochs are done."""

    def __init__(
        self,
        alpha: float,
        retain_loss_eps: float,
        step_size: float = 1.0,
        update_upon: str = "step",
        warmup_epochs: float = 0,
    ):
        self.lam, self.eps, self.step_size = float(alpha), float(retain_loss_eps), float(step_size)
        self.update_upon, self.warmup_epochs = update_upon, float(warmup_epochs)
        self.can_update = self.warmup_epochs == 0

    def term(self, retain: torch.Tensor) -> torch.Tensor:
        return self.lam * (retain - self.eps)

    def ascend(self, retain_mean: float) -> None:
        if not math.isfinite(retain_mean):
            raise BaldroError(f"PDU: non-finite retain loss {retain_mean} for the dual update")
        self.lam = max(0.0, self.lam + self.step_size * (retain_mean - self.eps))

    def end_epoch(self, epoch: float) -> bool:
        """After an epoch: enable updates once the warm-up is over; True when an epoch update is due."""
        if epoch >= self.warmup_epochs - 1e-9:
            self.can_update = True
        return self.can_update and self.update_upon == "epoch"

    def state_dict(self) -> dict:
        return {"lambda": self.lam, "can_update": self.can_update}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.can_update = float(state["lambda"]), bool(state["can_update"])

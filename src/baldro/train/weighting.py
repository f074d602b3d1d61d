"""Weightings F over per-sample forget losses: ERM and the BalDRO inner steps (SPEC section 3).

Each weighting reduces a vector of B losses to a scalar whose gradient with respect to l_i is the
weight of sample i under the worst-case distribution: `mean` gives 1/B, `group` (BalDRO-G) 1/k on the
k hardest samples, `dv` (BalDRO-DV) softmax(l/sigma), `dv_softmin` (the authors' released code)
softmax(-l/sigma), `dv_global` a Gibbs tilt over running losses of the whole forget set.

Which batch B is: by default the micro-batch of one process (with gradient accumulation, each
accumulation micro-batch separately; with several processes, each process's micro-batch separately:
the step's gradient is the mean over these micro-batches). `global_batch=true` (any weighting,
`GlobalBatchWeighting`) makes B the micro-batches of all processes at one micro-step together; see
`baldro.distributed` for the scale that keeps DDP's averaging exact.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from baldro.errors import BaldroError


@dataclass
class Weighted:
    value: torch.Tensor  # scalar, differentiable
    weights: torch.Tensor  # [B], detached: d value / d l_i
    selected: torch.Tensor | None = None  # group: indices of the samples kept
    batch_weights: torch.Tensor | None = None  # global batch: the weights over every process's samples


# ------------------------------------------------------------------ pure functions
def mean(losses: torch.Tensor) -> Weighted:
    return Weighted(losses.mean(), torch.full_like(losses.detach(), 1.0 / losses.numel()))


def top_rows(hardness: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Indices of the k = max(1, floor(ratio B)) samples of largest hardness."""
    _check_ratio(ratio)
    k = max(1, math.floor(ratio * hardness.numel() + 1e-9))
    return torch.topk(hardness.detach(), k).indices


def group_at(losses: torch.Tensor, selected: torch.Tensor) -> Weighted:
    """The mean loss over the `selected` rows; weight 1/k on them, 0 elsewhere."""
    weights = torch.zeros_like(losses.detach())
    weights[selected] = 1.0 / selected.numel()
    return Weighted(losses[selected].mean(), weights, selected)


def group(losses: torch.Tensor, ratio: float = 0.5, hardness: torch.Tensor | None = None) -> Weighted:
    """BalDRO-G: mean loss over the k = max(1, floor(ratio B)) samples of largest hardness."""
    return group_at(losses, top_rows(losses.detach() if hardness is None else hardness, ratio))


def dv(losses: torch.Tensor, sigma: float = 2.0) -> Weighted:
    """BalDRO-DV: sigma (logsumexp(l/sigma) - log B); weights softmax(l/sigma) favour high loss."""
    _check_sigma(sigma)
    z = losses / sigma
    value = sigma * (torch.logsumexp(z, 0) - math.log(losses.numel()))
    return Weighted(value, torch.softmax(z.detach(), 0))


def dv_softmin(losses: torch.Tensor, sigma: float = 2.0) -> Weighted:
    """The authors' released code: -sigma (logsumexp(-l/sigma) - log B); favours LOW loss."""
    _check_sigma(sigma)
    z = -losses / sigma
    value = -sigma * (torch.logsumexp(z, 0) - math.log(losses.numel()))
    return Weighted(value, torch.softmax(z.detach(), 0))


WEIGHT_STATS = ("weight_max", "weight_entropy", "weight_nonzero")


def weight_stat_tensor(weights: torch.Tensor) -> torch.Tensor:
    """`WEIGHT_STATS` as one tensor on the weights' device (no copy to the CPU)."""
    w = weights.detach().float().clamp(min=0)
    w = w / w.sum().clamp(min=1e-30)
    nz = w > 0
    entropy = -torch.where(nz, w * w.clamp(min=1e-30).log(), torch.zeros_like(w)).sum()
    return torch.stack([w.max(), entropy, nz.sum().float()])


def weight_stats(weights: torch.Tensor) -> dict[str, float]:
    """What the DRO did in one step: largest normalised weight, entropy (nats), non-zero count."""
    values = weight_stat_tensor(weights).tolist()
    return {"weight_max": values[0], "weight_entropy": values[1], "weight_nonzero": int(values[2])}


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise BaldroError(f"weighting ratio must be in (0, 1], got {ratio}")


def _check_sigma(sigma: float) -> None:
    if not sigma > 0:
        raise BaldroError(f"weighting sigma must be > 0, got {sigma}")


# ------------------------------------------------------------------ configured weightings
# gather(ids, *values) -> the same tensors concatenated over every process (identity on one process).
Gather = Callable[..., Sequence[torch.Tensor]]


class Weighting:
    """A configured weighting: `weighting(losses, ids=..., nll=..., gather=...) -> Weighted`.

    The trainer calls every weighting the same way; what a weighting needs beyond the losses it
    takes from the keyword arguments (`ids`: forget-sample ids, `nll`: per-sample mean NLL, `gather`:
    the batch of every process), and it may shape the rest of the step through the hooks below. A
    new weighting is one subclass registered in `WEIGHTINGS`; the trainer does not change.
    """

    name = "base"
    stateful = False  # True: has state_dict() / load_state_dict(), saved with every checkpoint
    # "nograd" or "grad": the trainer first scores the whole batch (without or with autograd), asks
    # `select` which rows to train, and runs forward and backward on those rows alone; the weighting
    # is then called with `rows=` and the batch's losses (gradients only through those rows).
    preselect: str | None = None

    def __call__(
        self,
        losses: torch.Tensor,
        *,
        ids: torch.Tensor | None = None,
        nll: torch.Tensor | None = None,
        gather: Gather | None = None,
    ) -> Weighted:
        raise NotImplementedError

    def select(self, losses: torch.Tensor, *, nll: torch.Tensor | None = None) -> torch.Tensor:
        """With `preselect`: the rows to train, from the batch's detached losses and mean NLLs."""
        raise NotImplementedError

    def retain_rows(self, weighted: Weighted, n_retain: int, device: torch.device) -> torch.Tensor | None:
        """Rows of the step's retain batch to use (None: all of them)."""
        return None


class MeanWeighting(Weighting):
    name = "mean"

    def __call__(self, losses, *, ids=None, nll=None, gather=None):
        return mean(losses)


class GroupWeighting(Weighting):
    """BalDRO-G. `hardness`: "loss" (the objective's loss) or "nll" (-nll_i, the released code).

    `selection` says how the step finds the k rows. "nograd" (default): score the batch in a no-grad
    forward pass, then forward and backward the k selected rows alone (about 5/6 of the one-pass
    FLOPs at ratio 0.5, and no activations held for the dropped rows). "onepass": forward the whole
    batch with autograd and keep k rows of it (the backward pass still runs through the dropped
    rows). "twopass": the authors' released code, a selection forward with autograd, then a second
    forward on the selected rows (the baseline of `benchmarks/train_step.py`). All three select the
    same rows and give the same gradients up to float rounding.
    """

    name = "group"
    SELECTIONS = {"nograd": "nograd", "onepass": None, "twopass": "grad"}

    def __init__(
        self, ratio: float = 0.5, hardness: str = "loss", shrink_retain: bool = False, selection: str = "nograd"
    ):
        _check_ratio(ratio)
        if hardness not in ("loss", "nll"):
            raise BaldroError(f"group hardness must be 'loss' or 'nll', got {hardness!r}")
        if selection not in self.SELECTIONS:
            raise BaldroError(f"group selection must be one of {sorted(self.SELECTIONS)}, got {selection!r}")
        self.ratio, self.hardness, self.shrink_retain = ratio, hardness, shrink_retain
        self.selection, self.preselect = selection, self.SELECTIONS[selection]

    def _hardness(self, losses, nll):
        if self.hardness == "nll":
            if nll is None:
                raise BaldroError("group hardness 'nll' needs the per-sample NLL")
            return -nll.detach()
        return losses.detach()

    def select(self, losses, *, nll=None):
        return top_rows(self._hardness(losses, nll), self.ratio)

    def __call__(self, losses, *, ids=None, nll=None, gather=None, rows=None):
        return group_at(losses, self.select(losses, nll=nll) if rows is None else rows)

    def retain_rows(self, weighted, n_retain, device):
        """With `shrink_retain` (the released code), k random retain samples, k = the number kept."""
        if not self.shrink_retain:
            return None
        return torch.randperm(n_retain, device=device)[: len(weighted.selected)]


class DVWeighting(Weighting):
    name = "dv"

    def __init__(self, sigma: float = 2.0):
        _check_sigma(sigma)
        self.sigma = sigma

    def __call__(self, losses, *, ids=None, nll=None, gather=None):
        return dv(losses, self.sigma)


class DVSoftminWeighting(DVWeighting):
    name = "dv_softmin"

    def __call__(self, losses, *, ids=None, nll=None, gather=None):
        return dv_softmin(losses, self.sigma)


class GlobalDVWeighting(Weighting):
    """Dataset-level DV: a Gibbs tilt over running estimates L_j of every forget sample's loss.

    `observe(ids, losses)` updates L_j (an exponential moving average with `momentum`; 0 = latest
    value) for the samples of a step, across all processes. Samples not yet seen count at the mean of
    the seen ones. Batch weights are w_i = n softmax_j(L_j / sigma)[i] / B, which average to 1/B over
    uniformly drawn batches, so `value = sum_i w_i l_i` matches `mean` in scale.
    """

    name = "dv_global"
    stateful = True

    def __init__(self, n_samples: int, sigma: float = 2.0, momentum: float = 0.0):
        _check_sigma(sigma)
        if n_samples < 1:
            raise BaldroError("dv_global needs the number of forget samples (n_samples >= 1)")
        if not 0 <= momentum < 1:
            raise BaldroError(f"dv_global momentum must be in [0, 1), got {momentum}")
        self.sigma, self.momentum = sigma, momentum
        self.running = torch.full((n_samples,), float("nan"))

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        ids = ids.detach().long().cpu()
        new = losses.detach().float().cpu()
        old = self.running[ids]
        self.running[ids] = torch.where(old.isnan(), new, self.momentum * old + (1 - self.momentum) * new)

    def global_weights(self) -> torch.Tensor:
        seen = ~self.running.isnan()
        fill = self.running[seen].mean() if seen.any() else torch.tensor(0.0)
        return torch.softmax(torch.where(seen, self.running, fill) / self.sigma, 0)

    def __call__(self, losses, *, ids=None, nll=None, gather=None):
        """Observe the losses of every process's batch, then tilt this process's batch."""
        if ids is None:
            raise BaldroError("dv_global needs sample ids")
        all_ids, all_losses = gather(ids, losses.detach()) if gather is not None else (ids, losses.detach())
        self.observe(all_ids, all_losses)
        return self.tilt(losses, ids)

    def tilt(self, losses: torch.Tensor, ids: torch.Tensor) -> Weighted:
        """Weight a batch by the current global state (without updating it)."""
        n, b = self.running.numel(), losses.numel()
        w = (n * self.global_weights()[ids.long().cpu()] / b).to(losses.device, losses.dtype)
        return Weighted((w * losses).sum(), w)

    def state_dict(self) -> dict:
        return {"running": self.running.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.running = state["running"].clone()


class GlobalBatchWeighting(Weighting):
    """`weighting.args.global_batch=true`: the wrapped weighting sees the samples of every process.

    Each process gathers the detached losses (and NLLs, for group's `hardness: nll`) of all processes
    (`gather`, from the trainer), computes the wrapped weighting on the concatenation -- weights w
    normalised over the global batch, and F(l_all) -- and keeps the weights of its own rows. Its value
    is `F(l_all) + s * (sum_{i local} w_i l_i - stopgrad(same))`: every process logs the global F,
    and since DDP averages the processes' gradients, s = P (the number of processes) gives
    `sum_i w_i dl_i` over the global batch, the gradient of F on the concatenated batch. The trainer
    passes `gather.scale` (P, or M/M' in a step whose last micro-batches are padded: baldro.distributed).
    On one process (or without `gather`) it is the wrapped weighting itself.

    A stateful weighting (dv_global) is updated from the gathered batch, the same update on every
    process; `retain_rows` (group's shrink_retain) sees this process's selected rows.
    """

    preselect = None  # a selection pass would select per process: the wrapped weighting runs in one pass

    def __init__(self, inner: Weighting):
        self.inner = inner
        self.name = inner.name
        self.stateful = inner.stateful
        self.global_batch = True

    def __getattr__(self, name):  # anything else (state_dict, sigma, ratio, ...) is the wrapped weighting's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, losses, *, ids=None, nll=None, gather=None):
        processes = int(getattr(gather, "num_processes", 1)) if gather is not None else 1
        if processes == 1:
            return self.inner(losses, ids=ids, nll=nll, gather=gather)
        if ids is None:
            raise BaldroError(f"weighting {self.name!r} with global_batch needs sample ids")
        me = int(gather.process_index)
        scale = getattr(gather, "scale", None)
        scale = float(processes if scale is None else scale)
        local_nll = nll.detach() if nll is not None else torch.zeros_like(losses.detach())
        owner = torch.full_like(ids, me)
        all_ids, all_losses, all_nll, all_owner = gather(ids, losses.detach(), local_nll, owner)
        whole = self.inner(all_losses, ids=all_ids, nll=all_nll if nll is not None else None, gather=None)
        real = ids >= 0  # pad rows (several processes) are not in the gathered batch
        w = torch.zeros_like(losses.detach())
        w[real] = whole.weights[all_owner == me].to(w.dtype)
        local = (w * losses).sum()
        value = whole.value.detach().to(losses.dtype) + scale * (local - local.detach())
        selected = torch.nonzero(w > 0).flatten() if whole.selected is not None else None
        return Weighted(value, w, selected, batch_weights=whole.weights)

    def retain_rows(self, weighted, n_retain, device):
        return self.inner.retain_rows(weighted, n_retain, device)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


WEIGHTINGS = {
    "mean": MeanWeighting,
    "group": GroupWeighting,
    "dv": DVWeighting,
    "dv_softmin": DVSoftminWeighting,
    "dv_global": GlobalDVWeighting,
}


def make_weighting(name: str, n_samples: int | None = None, **args) -> Weighting:
    """Build a weighting by name; `n_samples` (the forget-set size) is used by `dv_global`.
    `global_batch=True` (any weighting) wraps it in `GlobalBatchWeighting`."""
    if name not in WEIGHTINGS:
        raise BaldroError(f"unknown weighting {name!r}: use one of {sorted(WEIGHTINGS)}")
    global_batch = args.pop("global_batch", False)
    if not isinstance(global_batch, bool):
        raise BaldroError(f"weighting.args.global_batch={global_batch!r} must be true or false")
    if global_batch:
        return GlobalBatchWeighting(make_weighting(name, n_samples=n_samples, **args))
    cls = WEIGHTINGS[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "n_samples")]
    params.append("global_batch")
    for key in args:
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"it takes {params or 'no arguments'}"
            raise BaldroError(f"bad arguments for weighting {name!r}: it has no argument {key!r}, {hint}")
    if "n_samples" in inspect.signature(cls.__init__).parameters:
        args = {"n_samples": n_samples or 0, **args}
    try:
        return cls(**args)
    except TypeError as e:
        raise BaldroError(f"bad arguments for weighting {name!r}: {e}") from None

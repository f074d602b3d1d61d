"""Weighting values and their autograd gradient weights equal SPEC section 3's table."""

import math

import pytest
import torch

from baldro.errors import BaldroError
from baldro.train.weighting import (
    GlobalDVWeighting,
    dv,
    dv_softmin,
    group,
    make_weighting,
    mean,
    weight_stats,
)


def grad_of(fn, losses):
    x = losses.clone().requires_grad_(True)
    out = fn(x)
    out.value.backward()
    return out, x.grad


@pytest.fixture
def losses():
    torch.manual_seed(0)
    return torch.randn(8, dtype=torch.float64) * 3


def test_mean(losses):
    out, g = grad_of(mean, losses)
    assert out.value.item() == pytest.approx(losses.mean().item())
    assert torch.allclose(g, torch.full_like(g, 1 / 8))
    assert torch.allclose(out.weights, g)


@pytest.mark.parametrize("ratio,k", [(0.5, 4), (0.3, 2), (0.01, 1), (1.0, 8)])
def test_group(losses, ratio, k):
    out, g = grad_of(lambda x: group(x, ratio), losses)
    top = losses.topk(k).indices
    assert out.value.item() == pytest.approx(losses[top].mean().item())
    want = torch.zeros_like(losses)
    want[top] = 1 / k
    assert torch.allclose(g, want)
    assert torch.allclose(out.weights, g)
    assert sorted(out.selected.tolist()) == sorted(top.tolist())


def test_group_with_nll_hardness(losses):
    nll = torch.arange(8, dtype=torch.float64)  # lowest nll = most remembered = hardest
    out = make_weighting("group", ratio=0.25, hardness="nll")(losses, nll=nll)
    assert sorted(out.selected.tolist()) == [0, 1]


def test_group_p1_equals_mean(losses):
    assert group(losses, 1.0).value.item() == pytest.approx(mean(losses).value.item())


def test_dv_value_and_gradient(losses):
    sigma = 2.0
    out, g = grad_of(lambda x: dv(x, sigma), losses)
    want = sigma * math.log(sum(math.exp(x / sigma) for x in losses.tolist()) / 8)
    assert out.value.item() == pytest.approx(want)
    assert torch.allclose(g, torch.softmax(losses / sigma, 0))
    assert torch.allclose(out.weights, g)
    assert g.argmax() == losses.argmax()  # paper direction: the highest loss (least forgotten) gets most weight


def test_dv_softmin_value_and_gradient(losses):
    sigma = 2.0
    out, g = grad_of(lambda x: dv_softmin(x, sigma), losses)
    want = -sigma * math.log(sum(math.exp(-x / sigma) for x in losses.tolist()) / 8)
    assert out.value.item() == pytest.approx(want)
    assert torch.allclose(g, torch.softmax(-losses / sigma, 0))
    assert g.argmax() == losses.argmin()


def test_dv_limits(losses):
    assert dv(losses, 1e6).value.item() == pytest.approx(losses.mean().item(), abs=1e-4)
    assert dv(losses, 1e-4).value.item() == pytest.approx(losses.max().item(), abs=1e-2)
    assert dv_softmin(losses, 1e6).value.item() == pytest.approx(losses.mean().item(), abs=1e-4)
    assert dv_softmin(losses, 1e-4).value.item() == pytest.approx(losses.min().item(), abs=1e-2)


@pytest.mark.parametrize("fn", [dv, dv_softmin])
def test_dv_is_finite_for_extreme_inputs(fn):
    x = torch.tensor([1e4, -1e4, 0.0, 5e3], requires_grad=True)
    out = fn(x, 1e-3)
    out.value.backward()
    assert torch.isfinite(out.value) and torch.isfinite(x.grad).all()
    assert x.grad.sum().item() == pytest.approx(1.0)


def test_global_dv():
    w = GlobalDVWeighting(n_samples=4, sigma=1.0)
    x = torch.tensor([1.0, 3.0], requires_grad=True)
    out = w(x, ids=torch.tensor([0, 2]))
    # unseen samples 1 and 3 count at the mean of the seen ones (2.0)
    running = torch.tensor([1.0, 2.0, 3.0, 2.0])
    gw = torch.softmax(running, 0)
    want = 4 * gw[[0, 2]] / 2
    assert torch.allclose(out.weights, want)
    out.value.backward()
    assert torch.allclose(x.grad, want)
    # a later batch sees the updated state of samples 0 and 2
    out2 = w(torch.tensor([0.0, 0.0]), ids=torch.tensor([1, 3]))
    gw = torch.softmax(torch.tensor([1.0, 0.0, 3.0, 0.0]), 0)
    assert torch.allclose(out2.weights, 4 * gw[[1, 3]] / 2)
    state = w.state_dict()
    w2 = GlobalDVWeighting(n_samples=4, sigma=1.0)
    w2.load_state_dict(state)
    assert torch.equal(w2.running, w.running)


def test_global_dv_uniform_losses_equal_mean():
    w = make_weighting("dv_global", n_samples=6, sigma=0.5)
    w.observe(torch.arange(6), torch.ones(6))
    out = w(torch.ones(3) * 1.0, ids=torch.tensor([0, 1, 2]))
    assert torch.allclose(out.weights, torch.full((3,), 1 / 3))


def test_weight_stats():
    s = weight_stats(torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert s == {"weight_max": 0.5, "weight_entropy": pytest.approx(math.log(2)), "weight_nonzero": 2}


@pytest.mark.parametrize(
    "name,args,msg",
    [
        ("nope", {}, "unknown weighting 'nope'"),
        ("group", {"ratio": 0.0}, r"ratio must be in \(0, 1\]"),
        ("group", {"ratio": 1.5}, r"ratio must be in \(0, 1\]"),
        ("dv", {"sigma": 0.0}, "sigma must be > 0"),
        ("dv_softmin", {"sigma": -1.0}, "sigma must be > 0"),
        ("group", {"hardness": "x"}, "hardness must be"),
        ("dv", {"temperature": 1.0}, "bad arguments for weighting 'dv'"),
    ],
)
def test_bad_weighting_args(name, args, msg):
    with pytest.raises(BaldroError, match=msg):
        make_weighting(name, n_samples=4, **args)

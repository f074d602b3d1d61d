"""Each forget objective against a hand computation on small tensors (SPEC section 2)."""

import math

import pytest
import torch

from baldro.errors import BaldroError
from baldro.objectives import FORGET_OBJECTIVES, ForgetInputs, get_objective, get_retain_loss
from baldro.sequence import TokenLogProbs, token_log_probs

# Two samples: the first has 2 answer tokens, the second 3.
P = torch.tensor([[0.5, 0.25, 1.0], [0.8, 0.1, 0.5]])
MASK = torch.tensor([[True, True, False], [True, True, True]])
TLP = TokenLogProbs(P.log().masked_fill(~MASK, 0.0), MASK)
LOGP = torch.tensor([math.log(0.5 * 0.25), math.log(0.8 * 0.1 * 0.5)])
NLL = -LOGP / torch.tensor([2.0, 3.0])
REF = torch.tensor([-1.0, -2.0])


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_sequence_quantities():
    assert torch.allclose(TLP.logp, LOGP)
    assert torch.allclose(TLP.nll, NLL)
    assert TLP.n_tokens.tolist() == [2, 3]


def test_token_log_probs_shift_and_mask():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, 5, -100], [-100, -100, 1, 2]])
    out = token_log_probs(logits, labels)
    lsm = logits.log_softmax(-1)
    assert out.mask.tolist() == [[True, True, False], [False, True, True]]
    assert torch.allclose(out.token_logp[0, 0], lsm[0, 0, 3])
    assert torch.allclose(out.token_logp[1, 2], lsm[1, 2, 2])
    assert out.token_logp[0, 2] == 0


def test_ga():
    assert torch.allclose(get_objective("ga")(ForgetInputs(TLP)), -NLL)


def test_npo():
    beta = 0.1
    got = get_objective("npo")(ForgetInputs(TLP, forget_ref_logp=REF), beta=beta)
    want = [-(2 / beta) * logsig(-beta * (LOGP[i].item() - REF[i].item())) for i in range(2)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def test_simnpo():
    got = get_objective("simnpo")(ForgetInputs(TLP), beta=4.5, delta=0.5)
    want = [-(2 / 4.5) * logsig(4.5 * (NLL[i].item() - 0.5)) for i in range(2)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def test_wga_and_satimp():
    # sample 0: tokens p = 0.5, 0.25 -> mean_t of -(p^beta) * (-log p)
    wga = get_objective("wga")(ForgetInputs(TLP), beta=2.0)
    want0 = (-(0.5**2) * -math.log(0.5) + -(0.25**2) * -math.log(0.25)) / 2
    assert wga[0].item() == pytest.approx(want0, rel=1e-5)
    sat = get_objective("satimp")(ForgetInputs(TLP), beta1=5.0, beta2=1.0)
    w = [p**5 * (1 - p) for p in (0.8, 0.1, 0.5)]
    want1 = sum(-wi * -math.log(p) for wi, p in zip(w, (0.8, 0.1, 0.5))) / 3
    assert sat[1].item() == pytest.approx(want1, rel=1e-5)


def test_token_weights_are_detached():
    logp = P.log().clone().requires_grad_(True)
    x = ForgetInputs(TokenLogProbs(logp.masked_fill(~MASK, 0.0), MASK))
    get_objective("wga")(x, beta=1.0).sum().backward()
    # d/dlogp of (p.detach() * logp)/n = p/n on scored tokens
    assert torch.allclose(logp.grad, torch.where(MASK, P / TLP.n_tokens[:, None], torch.zeros_like(P)))


def test_idk_and_dpo():
    refusal = TokenLogProbs(torch.tensor([[-0.1, -0.2, 0.0], [-0.3, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
    x = ForgetInputs(TLP, forget_ref_logp=REF, refusal=refusal, refusal_ref_logp=torch.tensor([-0.5, -0.5]))
    assert torch.allclose(get_objective("idk")(x), torch.tensor([0.15, 0.3]))
    got = get_objective("dpo")(x, beta=0.1)
    chosen = torch.tensor([-0.3 + 0.5, -0.3 + 0.5])
    rejected = LOGP - REF
    want = [-(2 / 0.1) * logsig(0.1 * (chosen[i] - rejected[i]).item()) for i in range(2)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def test_every_objective_returns_per_sample_vector():
    refusal = TokenLogProbs(TLP.token_logp * 0.5, MASK)
    x = ForgetInputs(TLP, forget_ref_logp=REF, refusal=refusal, refusal_ref_logp=REF)
    for name, obj in FORGET_OBJECTIVES.items():
        out = obj(x)
        assert out.shape == (2,), name
        assert torch.isfinite(out).all(), name


def test_lower_loss_means_more_forgotten():
    """Lowering the answer log-probs lowers every likelihood-based objective's loss."""
    lower = TokenLogProbs(TLP.token_logp - 1.0 * MASK, MASK)
    for name in ("ga", "npo", "simnpo"):
        obj = get_objective(name)
        a = obj(ForgetInputs(TLP, forget_ref_logp=REF))
        b = obj(ForgetInputs(lower, forget_ref_logp=REF))
        assert (b < a).all(), name


def test_unknown_names_and_hparams():
    with pytest.raises(BaldroError, match="unknown forget objective 'nope'"):
        get_objective("nope")
    with pytest.raises(BaldroError, match="no hyperparameter"):
        get_objective("npo")(ForgetInputs(TLP, forget_ref_logp=REF), gamma=1)
    with pytest.raises(BaldroError, match="needs the reference"):
        get_objective("npo")(ForgetInputs(TLP))
    with pytest.raises(BaldroError, match="unknown retain loss"):
        get_retain_loss("l2")


def test_retain_losses():
    nll = get_retain_loss("nll").fn(TLP)
    assert nll.item() == pytest.approx(-(LOGP.sum() / 5).item(), rel=1e-6)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, -100]])
    kl = get_retain_loss("kl").fn(TLP, logits=logits, ref_logits=logits, labels=labels)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    ref = torch.randn(2, 4, 6)
    kl = get_retain_loss("kl").fn(TLP, logits=logits, ref_logits=ref, labels=labels)
    pos = [(0, 0), (0, 1), (0, 2), (1, 1)]
    want = sum(
        (ref[b, t].softmax(-1) * (ref[b, t].log_softmax(-1) - logits[b, t].log_softmax(-1))).sum() for b, t in pos
    ) / len(pos)
    assert kl.item() == pytest.approx(want.item(), rel=1e-5)

"""Each forget objective against a hand computation on small tensors (SPEC section 2)."""

import math

import pytest
import torch

from baldro.errors import BaldroError
from baldro.train.objectives import (
    FORGET_OBJECTIVES,
    ForgetInputs,
    PrimalDual,
    RetainInputs,
    get_objective,
    get_retain_loss,
    steering_vector,
)
from baldro.train.sequence import (
    TokenLogProbs,
    answer_hidden,
    answer_logits,
    token_log_probs,
)

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
    refusal = TokenLogProbs(
        torch.tensor([[-0.1, -0.2, 0.0], [-0.3, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    )
    x = ForgetInputs(TLP, forget_ref_logp=REF, refusal=refusal, refusal_ref_logp=torch.tensor([-0.5, -0.5]))
    assert torch.allclose(get_objective("idk")(x), torch.tensor([0.15, 0.3]))
    got = get_objective("dpo")(x, beta=0.1)
    chosen = torch.tensor([-0.3 + 0.5, -0.3 + 0.5])
    rejected = LOGP - REF
    want = [-(2 / 0.1) * logsig(0.1 * (chosen[i] - rejected[i]).item()) for i in range(2)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def full_inputs() -> ForgetInputs:
    """Inputs carrying everything any objective may declare (B = 2 samples)."""
    torch.manual_seed(0)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, 3, 4, 5]])
    logits, ref_logits, hidden = torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randn(2, 4, 3)
    refusal = TokenLogProbs(TLP.token_logp * 0.5, MASK)
    return ForgetInputs(
        TLP,
        forget_ref_logp=REF,
        refusal=refusal,
        refusal_ref_logp=REF,
        alternate=refusal,
        alternate_ref_logp=REF,
        logits=answer_logits(logits, labels),
        ref_logits=answer_logits(ref_logits, labels).values,
        hidden=answer_hidden(hidden, labels),
        steering=steering_vector(3, 0),
    )


def test_every_objective_returns_per_sample_vector():
    x = full_inputs()
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
    with pytest.raises(BaldroError, match="needs hidden states"):
        get_objective("rmu")(ForgetInputs(None))
    with pytest.raises(BaldroError, match="unknown retain loss"):
        get_retain_loss("l2")


def test_retain_losses():
    nll = get_retain_loss("nll").fn(RetainInputs(TLP))
    assert nll.item() == pytest.approx(-(LOGP.sum() / 5).item(), rel=1e-6)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, -100]])
    same = answer_logits(logits, labels)
    kl = get_retain_loss("kl").fn(RetainInputs(logits=same, ref_logits=same.values))
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    ref = torch.randn(2, 4, 6)
    kl = get_retain_loss("kl").fn(RetainInputs(logits=same, ref_logits=answer_logits(ref, labels).values))
    pos = [(0, 0), (0, 1), (0, 2), (1, 1)]
    want = sum(
        (ref[b, t].softmax(-1) * (ref[b, t].log_softmax(-1) - logits[b, t].log_softmax(-1))).sum() for b, t in pos
    ) / len(pos)
    assert kl.item() == pytest.approx(want.item(), rel=1e-5)


# ----------------------------------------------------------------------------- OpenUnlearning's other methods
# Each is checked against a full-tensor computation written as OpenUnlearning writes it (d3d7cf9), on
# batches where the reductions agree: every sample has the same number of answer tokens.
LABELS = torch.tensor([[-100, -100, 3, 1, 4], [-100, -100, 2, 0, 5]])  # two answers of 3 tokens


def test_answer_rows_positions_and_sample_mean():
    logits = torch.randn(2, 5, 7)
    lg = answer_logits(logits, torch.tensor([[-100, 3, 1, -100, -100], [-100, -100, 2, 0, 5]]))
    assert lg.rows.tolist() == [0, 0, 1, 1, 1] and lg.position.tolist() == [0, 1, 0, 1, 2]
    assert torch.equal(lg.values[0], logits[0, 0]) and lg.labels.tolist() == [3, 1, 2, 0, 5]
    assert lg.sample_mean(torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0])).tolist() == [2.0, 4.0]
    assert lg.sample_mean(torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0]), keep=lg.position >= 1).tolist() == [3.0, 5.0]
    h = answer_hidden(torch.randn(2, 5, 4), torch.tensor([[-100, 3, 1, -100, -100], [-100, -100, 2, 0, 5]]))
    assert h.rows.tolist() == [0, 0, 1, 1, 1] and h.values.shape == (5, 4)


def test_rmu_matches_openunlearning_activation_loss():
    torch.manual_seed(1)
    h = torch.randn(2, 5, 8, requires_grad=True)
    u = steering_vector(8, 3)
    assert u.norm().item() == pytest.approx(1.0) and (u >= 0).all()
    got = get_objective("rmu")(ForgetInputs(None, hidden=answer_hidden(h, LABELS), steering=u), steering_coeff=2.0)
    # OpenUnlearning: mse(h, c u, none).mean(dim=2) masked, summed over tokens, / n tokens, then the batch mean
    mask = LABELS != -100
    sq = torch.nn.functional.mse_loss(h, (2.0 * u).expand_as(h), reduction="none")
    per = (sq * mask[..., None]).mean(2).sum(1) / mask.sum(-1)
    assert torch.allclose(got, per, rtol=1e-6)
    g1 = torch.autograd.grad(got.mean(), h, retain_graph=True)[0]
    g2 = torch.autograd.grad(per.mean(), h)[0]
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-8)


def test_embed_diff_retain_loss():
    h, ref = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = LABELS != -100
    want = ((h - ref).pow(2) * mask[..., None]).mean(2).sum(1) / mask.sum(-1)
    x = RetainInputs(hidden=answer_hidden(h, LABELS), ref_hidden=answer_hidden(ref, LABELS).values)
    assert get_retain_loss("embed_diff").fn(x).item() == pytest.approx(want.mean().item(), rel=1e-6)


def _undial_openunlearning(logits, teacher, labels, beta):
    """OpenUnlearning's compute_undial_loss on given logits (its loss.mean() over every position)."""
    shift_labels, shift_logits, shift_teacher = labels[..., 1:], logits[..., :-1, :], teacher[..., :-1, :]
    mask = torch.zeros_like(shift_teacher)
    mask[
        torch.arange(2).view(-1, 1, 1), torch.arange(shift_labels.shape[1]).view(1, -1, 1), shift_labels.unsqueeze(-1)
    ] = 1.0
    soft = torch.softmax(shift_teacher - mask * beta, -1)
    per = torch.nn.CrossEntropyLoss(reduction="none")(shift_logits.reshape(-1, 6), soft.reshape(-1, 6))
    return per.view(2, -1)


def test_undial_matches_openunlearning_on_answer_positions():
    torch.manual_seed(2)
    logits, teacher = torch.randn(2, 5, 6, requires_grad=True), torch.randn(2, 5, 6)
    labels = torch.tensor([[1, 3, 1, 4, 2], [5, 2, 0, 5, 1]])  # every position an answer token (MUSE-like)
    got = get_objective("undial")(
        ForgetInputs(None, logits=answer_logits(logits, labels), ref_logits=answer_logits(teacher, labels).values),
        beta=10.0,
    )
    ou = _undial_openunlearning(logits, teacher, labels, 10.0)
    assert torch.allclose(got, ou.mean(1), rtol=1e-6)
    g1 = torch.autograd.grad(got.mean(), logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(ou.mean(), logits)[0]
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-8)
    # with a prompt, OpenUnlearning also distils the prompt positions; we score answer tokens only
    got = get_objective("undial")(
        ForgetInputs(None, logits=answer_logits(logits, LABELS), ref_logits=answer_logits(teacher, LABELS).values),
        beta=10.0,
    )
    ou = _undial_openunlearning(logits, teacher, LABELS.clamp(min=0), 10.0)  # the same targets on the answers
    assert torch.allclose(got, ou[:, 1:].mean(1), rtol=1e-6)


def test_ceu_matches_openunlearning_and_skips_first_tokens():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 6, requires_grad=True)

    def ou(n):  # compute_batch_ceu + cross_entropy_unlearning_loss, a batch token mean
        valid = LABELS != -100
        lab = LABELS.masked_fill((valid.cumsum(-1) <= n) & valid, -100)[:, 1:]
        lg = logits[:, :-1]
        keep = lab != -100
        vl, vlab = lg[keep], lab[keep]
        target = vl.detach().clone().scatter(-1, vlab[:, None], float("-inf")).softmax(-1)
        return torch.nn.functional.cross_entropy(vl, target)

    for n in (0, 1, 2):
        got = get_objective("ceu")(
            ForgetInputs(None, logits=answer_logits(logits, LABELS)), ignore_first_n_answer_tokens=n
        )
        want = ou(n)
        assert got.mean().item() == pytest.approx(want.item(), rel=1e-6)
        g1 = torch.autograd.grad(got.mean(), logits)[0]
        g2 = torch.autograd.grad(ou(n), logits)[0]
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-8)


def test_pdu_forget_loss():
    torch.manual_seed(4)
    logits = torch.randn(2, 5, 6)
    got = get_objective("pdu")(ForgetInputs(None, logits=answer_logits(logits, LABELS)))
    z = logits[:, 1:4]  # the positions that predict answer tokens 2..4
    want = ((z.max(-1).values - z.mean(-1)) ** 2).mean(1)
    assert torch.allclose(got, want, rtol=1e-6)


def test_primal_dual_ascent_and_warmup():
    dual = PrimalDual(alpha=1.0, retain_loss_eps=0.5, step_size=2.0, update_upon="step", warmup_epochs=1)
    assert not dual.can_update
    assert dual.term(torch.tensor(0.7)).item() == pytest.approx(0.2)
    assert not dual.end_epoch(0.5) and not dual.can_update
    assert not dual.end_epoch(1.0) and dual.can_update  # step updates from now on
    dual.ascend(0.7)
    assert dual.lam == pytest.approx(1.4)
    dual.ascend(-1.0)
    assert dual.lam == 0.0  # never negative
    state = dual.state_dict()
    other = PrimalDual(1.0, 0.5)
    other.load_state_dict(state)
    assert other.lam == 0.0 and other.can_update
    assert PrimalDual(1.0, 0.5, update_upon="epoch").end_epoch(1.0)
    with pytest.raises(BaldroError, match="non-finite"):
        dual.ascend(float("nan"))

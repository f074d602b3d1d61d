"""Hand-computed cases for every metric in baldro.eval.metrics."""

import math
import zlib

import numpy as np
import pytest
import torch

from baldro.eval import metrics as M

LN2 = math.log(2.0)


def test_probability_is_exp_of_minus_avg_loss():
    np.testing.assert_allclose(M.probability([0.0, LN2, 2 * LN2]), [1.0, 0.5, 0.25], rtol=1e-15)
    np.testing.assert_allclose(M.probability(torch.tensor([LN2])), [0.5], rtol=1e-7)


def test_normalised_probability():
    # p_c = 0.5, wrong = 0.25 + 0.25 -> 0.5 / 1.0; p_c = 0.25, wrong = 0.5 + 0.25 -> 0.25
    got = M.normalised_probability([LN2, 2 * LN2], [[2 * LN2, 2 * LN2], [LN2, 2 * LN2]])
    np.testing.assert_allclose(got, [0.5, 0.25], rtol=1e-9)
    np.testing.assert_allclose(M.normalised_probability_from_probs([0.2], [[0.1, 0.1, 0.2]]), [1 / 3], rtol=1e-9)


def test_truth_ratio_uses_geometric_mean_of_perturbed():
    # paraphrased avg loss 1; perturbed avg losses 1 and 3 -> mean 2 in log space -> TR = e^-2 / e^-1.
    tr = M.truth_ratio([1.0], [[1.0, 3.0]])
    assert tr[0] == pytest.approx(math.exp(-1.0), rel=1e-9)
    arithmetic = (math.exp(-1) + math.exp(-3)) / 2 / math.exp(-1)
    assert abs(tr[0] - arithmetic) > 0.1
    # several paraphrases are averaged the same way
    assert M.truth_ratio([[0.5, 1.5]], [[2.0]])[0] == pytest.approx(math.exp(-1.0), rel=1e-9)


def test_truth_ratio_aggregates():
    tr = np.array([0.5, 2.0, 1.0])
    assert M.truth_ratio_closer_to_1(tr) == pytest.approx((0.5 + 0.5 + 1.0) / 3, rel=1e-9)
    assert M.truth_ratio_true_better(tr) == pytest.approx((0.5 + 0.0 + 0.0) / 3, rel=1e-12)


def test_rouge_recall_and_f1_on_known_strings():
    ref = "The cat sat on the mat."
    (s,) = M.rouge(["the cat is on the mat"], [ref])
    # LCS = "the cat on the mat" (5 of 6 reference tokens, 5 of 6 generated)
    assert s["rougeL_recall"] == pytest.approx(5 / 6)
    assert s["rougeL_f1"] == pytest.approx(5 / 6)
    assert s["rouge1_recall"] == pytest.approx(5 / 6)
    # stemming: cats -> cat, running/runs -> run; LCS = "cat run": recall 2/4, precision 2/3
    (s,) = M.rouge(["a cat runs"], ["The cats were running"])
    assert s["rougeL_recall"] == pytest.approx(0.5)
    assert s["rougeL_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # recall is relative to the reference: a long generation containing it scores 1
    (s,) = M.rouge(["well, Paris, France, of course"], ["Paris"])
    assert s["rougeL_recall"] == 1.0 and s["rougeL_f1"] < 1.0
    with pytest.raises(ValueError):
        M.rouge(["a"], [])


def test_rouge_scorer_is_built_once():
    M.rouge(["a"], ["a"])
    before = M._rouge_scorer.cache_info().misses
    M.rouge(["b"], ["b"])
    assert M._rouge_scorer.cache_info().misses == before


def test_forget_quality_ks_pvalue():
    assert M.forget_quality([0.1, 0.5, 0.9], [0.1, 0.5, 0.9]) == pytest.approx(1.0)
    # fully separated samples of 3 and 3: exact p = 2 / C(6, 3) = 0.1
    assert M.forget_quality([1.0, 2.0, 3.0], [10.0, 11.0, 12.0]) == pytest.approx(0.1)


def test_harmonic_mean_and_model_utility():
    assert M.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert M.model_utility([0.5] * 9) == pytest.approx(0.5)
    assert M.model_utility([0.5] * 8 + [0.0]) == 0.0


def test_without_last_position():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(M.without_last_position(mask), expected)


def test_exact_memorization():
    target = torch.tensor([[7, 2, 3, 4], [7, 5, 6, 8]])
    pred = torch.tensor([[0, 2, 3, 9], [1, 5, 6, 8]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    em = M.exact_memorization(pred, target, mask)
    assert em.tolist() == pytest.approx([2 / 3, 1.0])  # position 0 is not scored
    empty = M.exact_memorization(pred[:1], target[:1], torch.zeros(1, 4, dtype=torch.bool))
    assert math.isnan(empty.item())


def test_extraction_strength():
    target = torch.tensor([[9, 1, 2, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool)  # answer = 1 2 3 4, n = 4

    def es(pred):
        return M.extraction_strength(torch.tensor([pred]), target, mask).item()

    assert es([0, 1, 2, 3, 4]) == 1.0  # whole answer reproduced: k = 0
    assert es([0, 1, 0, 3, 4]) == pytest.approx(0.5)  # mismatch at answer token 2: k = 2
    assert es([0, 0, 2, 3, 4]) == pytest.approx(0.75)  # mismatch at token 1: k = 1
    assert es([0, 1, 2, 3, 0]) == pytest.approx(0.25)  # last token wrong: OpenUnlearning's floor 1/n
    assert es([0, 0, 0, 0, 0]) == pytest.approx(0.25)
    one = torch.tensor([[0, 1, 0]], dtype=torch.bool)
    assert M.extraction_strength(torch.tensor([[0, 5, 0]]), torch.tensor([[0, 6, 0]]), one).item() == 1.0
    assert M.extraction_strength(target, target, torch.zeros(1, 5, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="contiguous"):
        M.extraction_strength(target, target, torch.tensor([[0, 1, 0, 1, 1]], dtype=torch.bool))


def test_min_k_on_known_vector():
    logp = torch.tensor([[-1.0, -5.0, -2.0, -4.0, -3.0], [-1.0, -5.0, -2.0, -4.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    # row 0: n = 5, int(5 * 0.4) = 2 lowest: -5, -4 -> 4.5; row 1: n = 4, int(1.6) = 1 -> 5
    np.testing.assert_allclose(M.min_k(logp, mask, k=0.4), [4.5, 5.0])
    # at least one token; an empty row scores 0
    np.testing.assert_allclose(M.min_k(logp, mask, k=0.01), [5.0, 5.0])
    assert M.min_k(logp[:1], torch.zeros(1, 5, dtype=torch.bool)).tolist() == [0.0]


def test_min_k_plus_plus_from_tiny_logits():
    # vocabulary distribution p = (1/2, 1/4, 1/4): log p = (-ln2, -2ln2, -2ln2)
    # mu = -(1/2)ln2 - (1/2)2ln2 = -1.5 ln2; E[(log p)^2] = 2.5 ln2^2 -> var = 0.25 ln2^2, sigma = 0.5 ln2
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]]))
    mu, sigma = M.vocab_logprob_moments(logits)
    torch.testing.assert_close(mu, torch.full((1, 2), -1.5 * LN2))
    torch.testing.assert_close(sigma, torch.full((1, 2), 0.5 * LN2))
    # tokens 0 then 1: z = (-ln2 + 1.5ln2) / 0.5ln2 = +1, (-2ln2 + 1.5ln2) / 0.5ln2 = -1
    token_logp = torch.tensor([[-LN2, -2 * LN2]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    np.testing.assert_allclose(M.min_k_plus_plus(token_logp, mu, sigma, mask, k=0.4), [1.0], rtol=1e-6)
    np.testing.assert_allclose(M.min_k_plus_plus(token_logp, mu, sigma, mask, k=1.0), [0.0], atol=1e-6)


def test_min_k_plus_plus_clamps_sigma():
    # a uniform distribution has zero variance; sigma is clamped to 1e-3 (variance 1e-6)
    mu, sigma = M.vocab_logprob_moments(torch.zeros(1, 1, 4))
    assert sigma.item() == pytest.approx(0.0, abs=1e-6)
    score = M.min_k_plus_plus(mu - 0.002, mu, sigma, torch.ones(1, 1, dtype=torch.bool))
    np.testing.assert_allclose(score, [2.0], rtol=1e-3)


def test_mia_loss_and_zlib():
    np.testing.assert_array_equal(M.mia_loss([0.5, 2.0]), [0.5, 2.0])
    assert len(zlib.compress(b"a")) == 9  # 2 header + 3 deflate + 4 checksum bytes
    np.testing.assert_allclose(M.mia_zlib([1.8], ["a"]), [0.2])
    # repetitive text compresses well: same loss, larger score
    a, b = M.mia_zlib([1.0, 1.0], ["ab" * 50, "the quick brown fox jumps over the lazy dog" * 2])
    assert a > b
    with pytest.raises(ValueError):
        M.mia_zlib([1.0], [])


def test_mia_auc_convention():
    # forget (members) has the lower loss: perfectly separable -> 1
    assert M.mia_auc([0.1, 0.2], [0.8, 0.9]) == 1.0
    assert M.mia_auc([0.8, 0.9], [0.1, 0.2]) == 0.0
    assert M.mia_auc([0.5, 0.5, 0.5], [0.5, 0.5]) == 0.5
    # pairs (holdout > forget): 2>1, 4>1, 4>3 of 4
    assert M.mia_auc([1.0, 3.0], [2.0, 4.0]) == 0.75


def test_mia_auc_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    f = np.round(rng.normal(0.0, 1.0, 57), 1)  # rounding makes ties
    h = np.round(rng.normal(0.4, 1.0, 43), 1)
    expected = sklearn_metrics.roc_auc_score([0] * 57 + [1] * 43, np.concatenate([f, h]))
    assert M.mia_auc(f, h) == pytest.approx(expected, abs=1e-12)


def test_privleak():
    assert M.privleak(1.0, 0.5) == pytest.approx(-100.0, abs=1e-6)
    assert M.privleak(0.5, 0.5) == pytest.approx(0.0, abs=1e-12)
    # 1 - AUC = 0.75 against 0.5: 50% more "non-member-like" than the reference
    assert M.privleak(0.25, 0.5) == pytest.approx(50.0, rel=1e-9)

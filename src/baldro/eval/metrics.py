"""Every evaluation metric once, as pure functions over per-sample model outputs (SPEC section 5).

Definitions, sign conventions and numerical guards follow OpenUnlearning, so that numbers computed
here are comparable with its published logs (the reference-log tests check this to 1e-9). Nothing
here runs a model: the evaluator produces average losses, token log-probs, argmax ids and
generations, and these functions turn them into per-sample scores and aggregates.

Token-level metrics (EM, ES, Min-K%, Min-K%++) take [B, T] tensors aligned to label positions and a
mask of the positions to score. OpenUnlearning scores every answer position except the last one
(it drops the final EOS prediction); `without_last_position` builds that mask.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Iterable, Sequence

import numpy as np
import scipy.stats
import torch


def finite_float(value) -> float | None:
    """`value` as a finite float; None for None, a boolean, a non-number, NaN or an infinity."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# OpenUnlearning adds 1e-10 to denominators (truth ratio, normalised probability, privleak). It is
# not negligible: for a correct-answer probability of ~1e-8 (world facts under a small model) it
# changes the truth ratio in the second decimal, so it is kept to reproduce published numbers.
EPS = 1e-10

# Min-K%++ divides by the vocabulary std; OpenUnlearning clamps the variance at 1e-6.
MIN_KPP_MIN_SIGMA = 1e-3


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _per_sample_mean(x) -> np.ndarray:
    """(N,) stays as is; (N, K, ...) is averaged over everything but the first axis."""
    x = _as_float64(x)
    return x if x.ndim <= 1 else x.mean(axis=tuple(range(1, x.ndim)))


# --- probabilities and truth ratio ---------------------------------------------------------------


def probability(avg_loss) -> np.ndarray:
    """Length-normalised answer probability exp(-mean token NLL), per sample."""
    return np.exp(-_as_float64(avg_loss))


def normalised_probability_from_probs(correct_prob, wrong_prob) -> np.ndarray:
    """p_c / (p_c + sum_k p_k) from already length-normalised probabilities, (N,) and (N, K)."""
    correct = _as_float64(correct_prob)
    wrong = _as_float64(wrong_prob).reshape(len(correct), -1).sum(axis=1)
    return correct / (correct + wrong + EPS)


def normalised_probability(correct_avg_loss, wrong_avg_loss) -> np.ndarray:
    """`Prob_normalised` (real authors, world facts): correct (N,), wrong (N, K) average losses."""
    return normalised_probability_from_probs(probability(correct_avg_loss), probability(wrong_avg_loss))


def truth_ratio(paraphrased_avg_loss, perturbed_avg_loss) -> np.ndarray:
    """Per-sample TR = P(perturbed) / P(paraphrased), (N,) and (N, K) average losses.

    The K perturbed answers are averaged in log space (geometric mean of their probabilities);
    a (N, K) paraphrased input is averaged the same way.
    """
    paraphrased = probability(_per_sample_mean(paraphrased_avg_loss))
    perturbed = probability(_per_sample_mean(perturbed_avg_loss))
    return perturbed / (paraphrased + EPS)


def truth_ratio_closer_to_1(tr) -> float:
    """Forget-set aggregate: mean(min(TR, 1/TR)); 1 = paraphrase and perturbations equally likely."""
    tr = _as_float64(tr)
    return float(np.mean(np.minimum(tr, 1.0 / (tr + EPS))))


def truth_ratio_true_better(tr) -> float:
    """Retain / real-authors / world-facts aggregate: mean(max(0, 1 - TR)); higher = truth preferred."""
    tr = _as_float64(tr)
    return float(np.mean(np.maximum(0.0, 1.0 - tr)))


# --- generation ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    import logging

    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # its "Using default tokenizer." on every scorer
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge(generations: list[str], references: list[str]) -> list[dict]:
    """Per-sample ROUGE of each generation against its reference (rouge-score, stemming on)."""
    if len(generations) != len(references):
        raise ValueError(f"rouge: {len(generations)} generations but {len(references)} references")
    scorer = _rouge_scorer()
    out = []
    for gen, ref in zip(generations, references):
        s = scorer.score(ref, gen)  # (target, prediction): recall is relative to the reference
        out.append(
            {
                "rouge1_recall": s["rouge1"].recall,
                "rougeL_f1": s["rougeL"].fmeasure,
                "rougeL_recall": s["rougeL"].recall,
            }
        )
    return out


# --- TOFU headline metrics ---------------------------------------------------------------------


def forget_quality(unlearned_tr, retain_tr) -> float:
    """p-value of the two-sample KS test between per-sample forget truth ratios of the two models."""
    # (Older OpenUnlearning tests 1/TR instead of TR: a monotone map, so the p-value is the same.)
    return float(scipy.stats.ks_2samp(_as_float64(unlearned_tr), _as_float64(retain_tr)).pvalue)


def ks_statistic(unlearned_tr, retain_tr) -> float:
    """The KS statistic D behind forget quality: the largest gap between the two empirical CDFs."""
    return float(scipy.stats.ks_2samp(_as_float64(unlearned_tr), _as_float64(retain_tr)).statistic)


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean; 0 if any value is 0."""
    return float(scipy.stats.hmean(_as_float64(list(values))))


def model_utility(values: Iterable[float]) -> float:
    """Harmonic mean of the 9 utility aggregates: {retain, real authors, world facts} x
    {probability (normalised for the latter two), ROUGE-L recall, truth ratio (true_better)}."""
    return harmonic_mean(values)


# --- memorisation (teacher-forced argmax) -------------------------------------------------------


def without_last_position(mask: torch.Tensor) -> torch.Tensor:
    """`mask` without its last True position per row, i.e. OpenUnlearning's scored positions for
    EM, ES, Min-K% and Min-K%++ (it ignores the prediction of the final EOS)."""
    mask = mask.bool()
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1, keepdim=True).values
    return mask & (positions != last)


def exact_memorization(pred_ids, target_ids, mask) -> torch.Tensor:
    """Fraction of scored positions where the teacher-forced argmax equals the label, per sample
    (NaN for a sample without scored positions)."""
    mask = mask.bool()
    hits = ((pred_ids == target_ids) & mask).sum(-1).double()
    n = mask.sum(-1).double()
    return torch.where(n > 0, hits / n.clamp(min=1), torch.full_like(n, float("nan")))


def extraction_strength(pred_ids, target_ids, mask) -> torch.Tensor:
    """ES = 1 - k/n per sample, k the smallest prefix length after which the argmax reproduces the
    rest of the answer (the scored positions, which must be contiguous).

    As in OpenUnlearning (whose search loop stops at k = n-1), an answer whose last token is not
    reproduced gets ES = 1/n rather than 0 (so 1 for a one-token answer); published ES values of
    poorly-memorised samples carry this floor. A sample without scored positions gets 0.
    """
    mask = mask.bool()
    out = torch.zeros(mask.shape[0], dtype=torch.float64)
    for i in range(mask.shape[0]):
        idx = mask[i].nonzero(as_tuple=True)[0]
        n = idx.numel()
        if n == 0:
            continue
        if n != int(idx[-1] - idx[0]) + 1:
            raise ValueError(f"extraction_strength: the scored positions of sample {i} are not contiguous")
        wrong = (pred_ids[i, idx] != target_ids[i, idx]).nonzero(as_tuple=True)[0]
        # The suffix from k matches iff every mismatch lies before k.
        k = 0 if wrong.numel() == 0 else min(int(wrong[-1]) + 1, n - 1)
        out[i] = 1.0 - k / n
    return out


# --- membership inference -----------------------------------------------------------------------
# Scores are "higher = looks less like a member" (a loss); see `mia_auc` for the AUC convention.


def mia_loss(avg_loss) -> np.ndarray:
    """LOSS attack: the mean token NLL of the sample."""
    return _as_float64(avg_loss)


def mia_zlib(avg_loss, texts: Sequence[str]) -> np.ndarray:
    """ZLib attack: mean token NLL / zlib-compressed byte length of the sample's text."""
    loss = _as_float64(avg_loss)
    if len(texts) != len(loss):
        raise ValueError(f"mia_zlib: {len(loss)} losses but {len(texts)} texts")
    sizes = np.array([max(len(zlib.compress(t.encode("utf-8"))), 1) for t in texts], dtype=np.float64)
    return loss / sizes


def _bottom_k_mean_negated(values: np.ndarray, k: float) -> float:
    if values.size == 0:
        return 0.0
    num_k = max(1, int(len(values) * k))
    return -float(np.mean(np.sort(values)[:num_k]))


def min_k(token_logp, mask, k: float = 0.4) -> np.ndarray:
    """Min-K% attack: minus the mean of the lowest k-fraction of token log-probs (at least one
    token; 0 for a sample without scored positions)."""
    lp = _as_float64(token_logp)
    m = _as_float64(mask).astype(bool)
    return np.array([_bottom_k_mean_negated(lp[i][m[i]], k) for i in range(lp.shape[0])])


def logprob_moments(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of log p_v under p over the last axis of the log-probs `logp` (any leading shape,
    e.g. a [rows, V] chunk), for Min-K%++: mu = sum_v p_v log p_v, sigma^2 = sum_v p_v (log p_v)^2
    - mu^2, the variance clamped at 0 against rounding. Computed in the dtype of `logp`."""
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()
    return mu, var.clamp(min=0).sqrt()


def vocab_logprob_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprob_moments` of p = softmax(logits) over the last axis, in float32. Align them like the
    token log-probs (the distribution that predicts each label)."""
    return logprob_moments(torch.log_softmax(logits.float(), dim=-1))


def min_k_plus_plus(token_logp, mu, sigma, mask, k: float = 0.4) -> np.ndarray:
    """Min-K%++ attack: Min-K% on the token log-probs standardised by the vocabulary mean `mu` and
    std `sigma` at each position (sigma clamped at 1e-3, i.e. variance at 1e-6, as OpenUnlearning)."""
    lp, mu_, sd = _as_float64(token_logp), _as_float64(mu), _as_float64(sigma)
    z = (lp - mu_) / np.maximum(sd, MIN_KPP_MIN_SIGMA)
    m = _as_float64(mask).astype(bool)
    return np.array([_bottom_k_mean_negated(z[i][m[i]], k) for i in range(z.shape[0])])


def mia_auc(forget_scores, holdout_scores) -> float:
    """ROC AUC of the attack with forget = members labelled 0 and holdout labelled 1 on
    loss-like scores: 1 = forget data much more likely than holdout (not forgotten), 0.5 = chance."""
    f, h = _as_float64(forget_scores).ravel(), _as_float64(holdout_scores).ravel()
    if f.size == 0 or h.size == 0:
        raise ValueError("mia_auc: needs at least one forget and one holdout score")
    # Mann-Whitney: AUC = P(holdout score > forget score) + P(tie) / 2.
    ranks = scipy.stats.rankdata(np.concatenate([f, h]))
    u = ranks[f.size :].sum() - h.size * (h.size + 1) / 2.0
    return float(u / (f.size * h.size))


def privleak(auc, reference_auc) -> float:
    """PrivLeak in percent: relative difference of (1 - AUC) to the reference (retrained / retain)
    model's (1 - AUC). Target model about -100, retrained model 0."""
    # MUSE reports AUC as 1 - x; OpenUnlearning converts back before taking the relative difference.
    score, ref = 1.0 - float(auc), 1.0 - float(reference_auc)
    return (score - ref) / (ref + EPS) * 100.0

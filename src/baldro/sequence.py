"""Per-sample quantities from one teacher-forced forward pass (SPEC section 1).

`TokenLogProbs` holds the log-probability of every label token and a mask of the scored (answer)
positions; sequence log-probs, token counts and mean NLLs derive from it. Everything downstream
(objectives, metrics) consumes these tensors and never runs the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baldro.data.formatting import IGNORE_INDEX


@dataclass
class TokenLogProbs:
    """`token_logp[b, t]` = log pi(y_t | x, y_<t) on scored positions (0 elsewhere); `mask` marks them."""

    token_logp: torch.Tensor  # [B, T], float
    mask: torch.Tensor  # [B, T], bool

    @property
    def n_tokens(self) -> torch.Tensor:
        """n_i: number of scored tokens per sample, at least 1 to keep divisions finite."""
        return self.mask.sum(-1).clamp(min=1)

    @property
    def logp(self) -> torch.Tensor:
        """logp_i: summed log-probability of the answer tokens."""
        return (self.token_logp * self.mask).sum(-1)

    @property
    def nll(self) -> torch.Tensor:
        """nll_i = -logp_i / n_i: mean token negative log-likelihood."""
        return -self.logp / self.n_tokens

    def token_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample mean of a [B, T] tensor over the scored positions."""
        return (values * self.mask).sum(-1) / self.n_tokens


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits at position t with the label at t+1."""
    return logits[:, :-1, :], labels[:, 1:]


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> TokenLogProbs:
    """Log-probabilities of the label tokens; positions labelled -100 are masked out."""
    logits, labels = shift_for_next_token(logits, labels)
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)
    # cross_entropy is the fused log-softmax + gather: far less memory than log_softmax on [B, T, V].
    ce = F.cross_entropy(logits.float().transpose(1, 2), safe_labels, reduction="none")
    return TokenLogProbs(token_logp=(-ce).masked_fill(~mask, 0.0), mask=mask)

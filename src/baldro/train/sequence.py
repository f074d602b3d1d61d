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


@dataclass
class AnswerRows:
    """Values at the N answer positions of a batch of B samples, flattened: `rows[k]` is the sample of
    position k and `position[k]` its index within that sample's answer (0 = the first answer token)."""

    values: torch.Tensor  # [N, ...]
    rows: torch.Tensor  # [N], long
    position: torch.Tensor  # [N], long
    n_rows: int

    def sample_mean(self, per_position: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B]: the mean of a [N] quantity over each sample's (kept) positions; 0 for a sample with none."""
        weight = torch.ones_like(per_position) if keep is None else keep.to(per_position.dtype)
        total = per_position.new_zeros(self.n_rows).index_add(0, self.rows, per_position * weight)
        count = per_position.new_zeros(self.n_rows).index_add(0, self.rows, weight)
        return total / count.clamp(min=1)

    @classmethod
    def gather(cls, per_token: torch.Tensor, mask: torch.Tensor) -> "AnswerRows":
        """Take the positions of `mask` [B, T] from a [B, T, ...] tensor."""
        rows = torch.nonzero(mask, as_tuple=True)[0]
        position = (mask.long().cumsum(-1) - 1)[mask]
        return cls(per_token[mask], rows, position, mask.shape[0])


@dataclass
class AnswerLogits(AnswerRows):
    """Full-vocabulary logits [N, V] at the positions that predict an answer token, and those tokens."""

    labels: torch.Tensor = None  # [N]


@dataclass
class AnswerHidden(AnswerRows):
    """A module's output [N, d] at the answer tokens' own positions (label != -100)."""


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> AnswerLogits:
    """The logits that predict each answer token (shifted as in `token_log_probs`)."""
    logits, labels = shift_for_next_token(logits, labels)
    mask = labels != IGNORE_INDEX
    rows = AnswerRows.gather(logits, mask)
    return AnswerLogits(rows.values, rows.rows, rows.position, rows.n_rows, labels=labels[mask])


def answer_hidden(hidden: torch.Tensor, labels: torch.Tensor) -> AnswerHidden:
    rows = AnswerRows.gather(hidden, labels != IGNORE_INDEX)
    return AnswerHidden(rows.values, rows.rows, rows.position, rows.n_rows)

"""Batches without hidden state: the per-epoch sample order, the datasets and collators of fine-tuning and
unlearning, and row selection in a batch.

Every random choice (the sample order, the retain sample paired with a forget sample, AltPO's alternate) is
drawn from (seed, epoch, sample) alone (`derived_rng`), so a resumed run, any number of data-loader workers or
processes draw exactly what an uninterrupted run draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from baldro.data.formatting import IGNORE_INDEX, EncodedQA, collate_encoded
from baldro.distributed import (
    PAD_ID,
)
from baldro.errors import BaldroError

# Independent streams of derived random numbers (the first entry of every key).
STREAM_ORDER, STREAM_RETAIN, STREAM_STEP, STREAM_ALTERNATE, STREAM_RELEARN = (
    0,
    1,
    2,
    3,
    4,
)  # relearn: baldro.recipes.attack's pick


def derived_rng(stream: int, seed: int, *key: int) -> np.random.Generator:
    """A generator that depends on its key alone (no hidden state): the same key gives the same draws
    in an uninterrupted run, a resumed run, a data-loader worker or another process."""
    return np.random.default_rng([int(stream), int(seed), *(int(k) for k in key)])


class EpochSampler(Sampler):
    """A permutation of the dataset per epoch, drawn from (seed, epoch) alone.

    The Trainer calls `set_epoch` before each epoch (also when it resumes in the middle of one). For a
    dataset with `epoch_aware = True` the indices carry the epoch, `epoch * len(dataset) + i`, so that
    the dataset's own draws know it too, in every worker process, without shared state.
    """

    def __init__(self, dataset, seed: int, pad_to: int = 1):
        self.n, self.seed, self.epoch = len(dataset), int(seed), 0
        self.tag = bool(getattr(dataset, "epoch_aware", False))
        # Several processes: pad the epoch with PAD_ID to a multiple of processes x batch size, so that
        # every process gets as many batches and none re-uses samples (baldro.distributed).
        self.pad_to = max(1, int(pad_to))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n // self.pad_to) * self.pad_to

    def __iter__(self):
        order = derived_rng(STREAM_ORDER, self.seed, self.epoch).permutation(self.n)
        offset = self.epoch * self.n if self.tag else 0
        return iter([offset + int(i) for i in order] + [PAD_ID] * (len(self) - self.n))


# --------------------------------------------------------------------------- data
class EncodedDataset(Dataset):
    """A list of `EncodedQA` (fine-tuning): item i is `{"id": i, "qa": items[i]}`."""

    def __init__(self, items: Sequence[EncodedQA]):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if int(i) < 0:  # a pad row (several processes): scored nowhere
            return {"id": PAD_ID, "qa": self.items[0]}
        return {"id": int(i), "qa": self.items[i]}


@dataclass
class QACollator:
    """Pads `EncodedQA` items (or `EncodedDataset` items, whose ids become `sample_ids`)."""

    pad_token_id: int

    def __call__(self, batch: Sequence) -> dict[str, torch.Tensor]:
        if batch and isinstance(batch[0], dict):
            out = collate_encoded([b["qa"] for b in batch], self.pad_token_id)
            out["sample_ids"] = torch.tensor([b["id"] for b in batch], dtype=torch.long)
            pad = out["sample_ids"] < 0
            if pad.any():  # pad rows (several processes) have no label: the token-mean loss never sees them
                out["labels"][pad] = IGNORE_INDEX
            return out
        return collate_encoded(batch, self.pad_token_id)


class UnlearnDataset(Dataset):
    """One item per forget sample, paired with a random retain sample, an optional refusal and an optional
    alternate answer (AltPO: one of sample i's K alternates, drawn from (seed, epoch, i) alone like the
    retain pairing; `alt_ids` = i * K + k names it for the reference cache).

    An epoch is one pass over the forget set (SPEC section 4). The retain sample of forget sample i in
    epoch e is drawn from (seed, e, i) alone; index `e * len(self) + i` (from `EpochSampler`) asks
    for it, a plain index i means epoch 0. `retain=None`: no retain samples (a run without a retain
    loss, alpha = 0).
    """

    epoch_aware = True

    def __init__(
        self,
        forget: Sequence[EncodedQA],
        retain: Sequence[EncodedQA] | None,
        refusal: Sequence[EncodedQA] | None = None,
        seed: int = 0,
        alternates: Sequence[Sequence[EncodedQA]] | None = None,
    ):
        if not forget:
            raise BaldroError("the forget set is empty: check data.forget_split")
        if retain is not None and not retain:
            raise BaldroError("the retain set is empty: check data.retain_split")
        self.forget, self.retain, self.refusal = list(forget), (list(retain) if retain is not None else None), refusal
        self.seed = int(seed)
        self.alternates = [list(a) for a in alternates] if alternates is not None else None
        if self.alternates is not None and (
            len(self.alternates) != len(self.forget)
            or len({len(a) for a in self.alternates}) != 1
            or not self.alternates[0]
        ):
            raise BaldroError("alternates: every forget sample needs the same number (>= 1) of alternate answers")
        self.n_alternates = len(self.alternates[0]) if self.alternates is not None else 0

    def __len__(self):
        return len(self.forget)

    def alternate_index(self, epoch: int, i: int) -> int:
        return int(derived_rng(STREAM_ALTERNATE, self.seed, epoch, i).integers(self.n_alternates))

    def retain_index(self, epoch: int, i: int) -> int:
        return int(derived_rng(STREAM_RETAIN, self.seed, epoch, i).integers(len(self.retain)))

    def __getitem__(self, index):
        if int(index) < 0:  # a pad row (several processes): forwarded, never counted
            return self._pad_item()
        epoch, i = divmod(int(index), len(self.forget))
        item = {"id": i, "forget": self.forget[i]}
        if self.retain is not None:
            item["retain"] = self.retain[self.retain_index(epoch, i)]
        if self.refusal is not None:
            item["refusal"] = self.refusal[i]
        if self.alternates is not None:
            k = self.alternate_index(epoch, i)
            item["alternate"], item["alt_id"] = self.alternates[i][k], i * self.n_alternates + k
        return item

    def _pad_item(self):
        item = {"id": PAD_ID, "forget": self.forget[0]}
        if self.retain is not None:
            item["retain"] = self.retain[0]
        if self.refusal is not None:
            item["refusal"] = self.refusal[0]
        if self.alternates is not None:
            item["alternate"], item["alt_id"] = self.alternates[0][0], PAD_ID
        return item


@dataclass
class UnlearnCollator:
    pad_token_id: int

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        out = {"forget_ids": torch.tensor([b["id"] for b in batch], dtype=torch.long)}
        if "alt_id" in batch[0]:
            out["alt_ids"] = torch.tensor([b["alt_id"] for b in batch], dtype=torch.long)
        for part in ("forget", "retain", "refusal", "alternate"):
            if part in batch[0]:
                for key, value in collate_encoded([b[part] for b in batch], self.pad_token_id).items():
                    out[f"{part}_{key}"] = value
        return out


def batch_part(inputs: dict[str, torch.Tensor], part: str, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`forget_input_ids` etc. -> `input_ids` etc., optionally keeping only some rows."""
    out = {k[len(part) + 1 :]: v for k, v in inputs.items() if k.startswith(part + "_") and k != "forget_ids"}
    if rows is not None:
        out = {k: v[rows] for k, v in out.items()}
    return out


def select_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Some rows of a right-padded batch, without the columns that are padding in all of them."""
    width = int(batch["attention_mask"][rows].sum(-1).max())
    return {k: v[rows, :width] for k, v in batch.items()}


def drop_rows(inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep the rows `keep` of every batch tensor; each part's padding columns are trimmed to its
    longest kept row (`select_rows`), so that the kept rows are collated as if they were the whole batch."""
    n = len(keep)
    out = {
        k: (v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
        for k, v in inputs.items()
    }
    for part in ("forget", "retain", "refusal", "alternate"):
        sub = batch_part(inputs, part)
        if sub.get("attention_mask") is not None and sub["attention_mask"].dim() == 2:
            out.update({f"{part}_{k}": v for k, v in select_rows(sub, keep).items()})
    return out

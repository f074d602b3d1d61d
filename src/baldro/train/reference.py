"""A cache of the frozen reference model's per-sample log-probabilities.

The reference model never changes during unlearning, so logp_ref of a forget (or refusal) answer is
the same in every epoch: it is computed in the first batch that holds the sample and read back in
later epochs, which skips the reference forward pass (NPO, SimNPO with a reference, DPO-style
objectives). The cached value is the one the first batch computed, bit for bit; a fresh forward in
another batch can differ from it in the last float bits only (another padding width).

Each process keeps the samples it has seen. A checkpoint holds one file per process; a resumed run,
with any number of processes, merges them.
"""

from __future__ import annotations

from pathlib import Path

import torch

CACHE_FILE = "reference_logp-{rank}.pt"  # in each checkpoint, one per process


class ReferenceCache:
    """logp_ref per sample id, for each batch part ("forget", "refusal"); kept on the CPU."""

    def __init__(self, n_samples: int, parts: tuple[str, ...] = ("forget", "refusal"), sizes: dict | None = None):
        """`sizes`: entries per part where a part is not indexed by the forget sample (AltPO's alternates:
        sample i's alternate k is entry i * K + k); parts of size 0 are left out."""
        self.n_samples = int(n_samples)
        sizes = {p: self.n_samples for p in parts} if sizes is None else {p: int(n) for p, n in sizes.items() if n}
        self.values = {p: torch.zeros(n, dtype=torch.float32) for p, n in sizes.items()}
        self.known = {p: torch.zeros(n, dtype=torch.bool) for p, n in sizes.items()}

    def lookup(self, part: str, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor | None:
        """The cached logp_ref of `ids`, or None when any of them has not been seen yet (or is a pad
        row, id -1, of a run of several processes)."""
        ids = ids.detach().long().cpu()
        if bool((ids < 0).any()) or not bool(self.known[part][ids].all()):
            return None
        return self.values[part][ids].to(device if device is not None else "cpu")

    def store(self, part: str, ids: torch.Tensor, logp: torch.Tensor) -> None:
        ids = ids.detach().long().cpu()
        real = ids >= 0  # pad rows (id -1) are no sample
        self.values[part][ids[real]] = logp.detach().float().cpu()[real]
        self.known[part][ids[real]] = True

    def n_known(self, part: str = "forget") -> int:
        return int(self.known[part].sum())

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "n_samples": self.n_samples,
            "values": {p: v.clone() for p, v in self.values.items()},
            "known": {p: k.clone() for p, k in self.known.items()},
        }

    def merge(self, state: dict) -> None:
        """Add the samples another cache (another process's file) knows."""
        if int(state["n_samples"]) != self.n_samples:
            return  # another forget set: nothing in it applies
        for part, known in state["known"].items():
            if part in self.known and len(known) == len(self.known[part]):
                self.values[part][known] = state["values"][part][known]
                self.known[part] |= known

    def save(self, folder: str | Path, rank: int) -> None:
        torch.save(self.state_dict(), Path(folder) / CACHE_FILE.format(rank=rank))

    def load(self, folder: str | Path) -> int:
        """Merge every process's file of a checkpoint; returns how many files were read."""
        files = sorted(Path(folder).glob(CACHE_FILE.format(rank="*")))
        for f in files:
            self.merge(torch.load(f))
        return len(files)

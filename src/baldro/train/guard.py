"""`RunGuard`, what both trainers share: stateless sampling (`EpochSampler`), staged checkpoints and
non-finite checks.

A checkpoint is written into `checkpoints/.staging/` and renamed to `checkpoint-N` when it is complete (its
marker file written last); a non-finite loss or gradient stops the run (`NonFiniteError`) before the optimizer
step, naming the step and the samples.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from baldro.errors import BaldroError
from baldro.io import append_jsonl, apply_umask_tree, write_json_atomic
from baldro.train.batching import EpochSampler


# --------------------------------------------------------------------------- callbacks
class JsonlLogCallback(TrainerCallback):
    """Appends every training log (one row per logging step) to a JSON-lines file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            append_jsonl(self.path, {"step": state.global_step, **logs})


# --------------------------------------------------------------------------- checkpoints
CHECKPOINT_MARKER = "baldro_checkpoint.json"  # written last: the checkpoint is complete
STAGING = ".staging"  # checkpoints are written here, then renamed into place


def checkpoint_step(folder: str | Path) -> int | None:
    name = Path(folder).name
    head, _, tail = name.rpartition("-")
    return int(tail) if head == "checkpoint" and tail.isdigit() else None


def is_complete_checkpoint(folder: str | Path) -> bool:
    """Complete: renamed into place with its marker; a checkpoint of an older version counts when
    it has the files transformers writes (weights, optimizer, trainer_state.json)."""
    folder = Path(folder)
    if (folder / CHECKPOINT_MARKER).is_file():
        return True
    weights = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
    return (
        (folder / "trainer_state.json").is_file()
        and any((folder / w).exists() for w in weights)
        and (folder / "optimizer.pt").is_file()
    )


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete `checkpoint-N` folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and is_complete_checkpoint(p)]
    return sorted(found, key=checkpoint_step)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(folder: Path, staging: Path) -> None:
    """Remove a folder by renaming it into the staging area first (a kill never leaves half of it)."""
    trash = staging / f".trash-{folder.name}-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- the guard both trainers share
class NonFiniteError(BaldroError):
    """A NaN or inf loss or gradient: the run stops before the optimizer step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class _GuardCallback(TrainerCallback):
    def __init__(self, trainer: "RunGuard"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        # The Trainer also passes the epoch down through the data loader, but not through every wrapper
        # (a multi-process loader that skips the batches of a resumed epoch): set it here as well.
        if self.trainer._sampler is not None:
            self.trainer._sampler.set_epoch(int(state.epoch + 1e-6))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_gradients()


class RunGuard:
    """Mixed into a `transformers.Trainer`: stateless sampling, staged checkpoints, non-finite checks.

    `checkpoint_info` (a JSON-able dict, e.g. the recipe) is written into each checkpoint's marker file.
    """

    checkpoint_info: dict = {}
    ids_key = "sample_ids"  # the batch's sample ids (named in a non-finite error)

    def _guard_init(self) -> None:
        self._step_ids: list[int] = []
        self._step_ids_at = -1
        self._staging_root: Path | None = None
        self._sampler: EpochSampler | None = None
        self.checkpoint_info = {}
        self.add_callback(_GuardCallback(self))

    def describe(self) -> str:
        """What is being trained, for error messages."""
        return "fine-tuning (NLL)"

    # ------------------------------------------------------------ sampling
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        world = self.args.world_size
        self._sampler = EpochSampler(
            dataset, self.args.seed, pad_to=world * self.args.per_device_train_batch_size if world > 1 else 1
        )
        return self._sampler

    # ------------------------------------------------------------ non-finite loss and gradients
    def _note_ids(self, inputs) -> None:
        if self.state.global_step != self._step_ids_at:
            self._step_ids, self._step_ids_at = [], self.state.global_step
        ids = inputs.get(self.ids_key) if isinstance(inputs, dict) else None
        if ids is not None:
            self._step_ids += [int(i) for i in ids.tolist()]

    def _non_finite(self, what: str, detail: str = "") -> NonFiniteError:
        step = self.state.global_step + 1
        ids = self._step_ids if len(self._step_ids) <= 64 else self._step_ids[:64] + ["..."]
        return NonFiniteError(
            f"non-finite {what} at step {step} ({self.describe()}; sample ids "
            f"{', '.join(map(str, ids)) or '?'}{'; ' + detail if detail else ''})",
            step,
        )

    def _loss_detail(self) -> str:
        """The parts of a non-finite loss, for its error message."""
        return ""

    def training_step(self, model, inputs, *args, **kwargs):
        self._note_ids(inputs)
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not torch.isfinite(loss.detach()).all():  # the step's one sync besides the gradient check
            raise self._non_finite("loss", self._loss_detail())
        return loss

    def _check_gradients(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for norm in torch._foreach_norm(grads) if grads else ():
            by_device.setdefault(norm.device, []).append(norm.float())
        if any(
            not bool(torch.isfinite(torch.stack(norms)).all()) for norms in by_device.values()
        ):  # one sync per device
            raise self._non_finite("gradient")

    # ------------------------------------------------------------ checkpoints: staged, then renamed
    def _get_output_dir(self, trial):
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_extra_state(self, folder: Path) -> None:
        """Anything beyond what transformers saves (main process, before the checkpoint is renamed)."""

    def _save_process_state(self, folder: Path) -> None:
        """Every process's own state beyond what transformers saves (before the checkpoint is renamed)."""

    def _save_checkpoint(self, model, trial):
        root = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = root / STAGING
        tmp, final = staging / name, root / name
        main = self.is_world_process_zero()
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self._save_process_state(tmp)
        if main:
            self._save_extra_state(tmp)
            apply_umask_tree(tmp)
            write_json_atomic(
                tmp / CHECKPOINT_MARKER,
                {"step": self.state.global_step, "epoch": self.state.epoch, **self.checkpoint_info},
            )
        self.accelerator.wait_for_everyone()
        if main:
            if final.exists():
                _discard(final, staging)
            os.replace(tmp, final)
            _fsync_dir(root)
            limit = self.args.save_total_limit
            if limit:
                for old in complete_checkpoints(root)[:-limit]:
                    _discard(old, staging)
        self.accelerator.wait_for_everyone()

"""Trainers on `transformers.Trainer`: supervised fine-tuning and unlearning (SPEC sections 2-4).

`UnlearnTrainer.compute_loss` is the only place where objectives, weightings and retain losses meet:
one forward pass per batch part gives per-token log-probs, the objective turns them into B per-sample
losses, the weighting reduces them, and the loss is `gamma * F(l) + alpha * R`. Everything the DRO did
is logged per step (weight statistics, per-sample losses with sample ids).

Both trainers (`FinetuneTrainer`, `UnlearnTrainer`) share `RunGuard`: every random choice (the sample
order, the retain sample paired with a forget sample, the retain rows a weighting keeps) is drawn from
(seed, epoch, step, process, sample) alone, so a resumed run, and any number of data-loader workers
or processes, draw exactly what an uninterrupted run draws; a checkpoint is written into
`checkpoints/.staging/` and renamed to `checkpoint-N` when it is complete; a non-finite loss or
gradient stops the run (`NonFiniteError`) before the optimizer step, naming the step and the samples.

Several processes (see `baldro.distributed` for the semantics): the epoch's permutation is padded with
pad rows (id -1) to a multiple of processes x batch size; each optimizer step is planned once
(`UnlearnTrainer.get_batch_samples`: which micro-batches hold real samples) so that its gradient is
the mean over the step's real micro-batches (or, with a global-batch weighting, its micro-steps), and
per-step statistics are averaged over every process before they are logged.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from transformers import Trainer, TrainerCallback

from baldro.data.formatting import IGNORE_INDEX, EncodedQA, collate_encoded
from baldro.distributed import PAD_ID, all_gather_objects, fsdp_version, prepare_reference
from baldro.errors import BaldroError
from baldro.io import append_jsonl, apply_umask_tree, write_json_atomic

log = logging.getLogger(__name__)

# Independent streams of derived random numbers (the first entry of every key).
STREAM_ORDER, STREAM_RETAIN, STREAM_STEP, STREAM_ALTERNATE, STREAM_RELEARN = 0, 1, 2, 3, 4  # relearn: baldro.attack's pick


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
from baldro.objectives import (
    ForgetInputs,
    Needs,
    Objective,
    PrimalDual,
    RetainInputs,
    RetainLoss,
    default_module_regex,
    find_module,
    steering_vector,
)
from baldro.reference import ReferenceCache
from baldro.sequence import AnswerHidden, AnswerLogits, TokenLogProbs, answer_hidden, answer_logits, token_log_probs
from baldro.weighting import WEIGHT_STATS, Weighting, weight_stat_tensor

STAT_NAMES = ("forget_loss", "forget_loss_mean", "retain_loss", *WEIGHT_STATS)  # train_log.jsonl's statistics


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
        if self.alternates is not None and (len(self.alternates) != len(self.forget) or
                                            len({len(a) for a in self.alternates}) != 1 or not self.alternates[0]):
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


# --------------------------------------------------------------------------- callbacks
class JsonlLogCallback(TrainerCallback):
    """Appends every training log (one row per logging step) to a JSON-lines file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            append_jsonl(self.path, {"step": state.global_step, **logs})


WEIGHTING_STATE_FILE = "weighting_state.pt"  # a stateful weighting's state (dv_global), in every checkpoint
OBJECTIVE_STATE_FILE = "objective_state.pt"  # RMU's steering vector, PDU's dual variable, in every checkpoint


def restore_weighting_state(weighting: Weighting, checkpoint: str | Path) -> None:
    """Continue a stateful weighting from a checkpoint (`UnlearnTrainer` saves it with each one)."""
    path = Path(checkpoint) / WEIGHTING_STATE_FILE
    if weighting.stateful and path.exists():
        weighting.load_state_dict(torch.load(path))


# --------------------------------------------------------------------------- forward passes
@dataclass
class ForwardOut:
    """What one forward pass computed (None: not asked for)."""

    token_lp: TokenLogProbs | None = None
    logits: AnswerLogits | None = None
    hidden: AnswerHidden | None = None


class _StopForward(Exception):
    """Raised by the hidden-state hook when nothing after the module is needed."""


def forward_parts(model, batch: dict[str, torch.Tensor], token_logp: bool = True, logits: bool = False,
                  hidden_module: torch.nn.Module | None = None, may_stop: bool = True) -> ForwardOut:
    """A forward pass over a right-padded batch computing only what is asked: answer-token log-probs,
    full-vocabulary logits at the answer positions (the vocabulary-sized tensor of the whole sequence is
    not kept), the output of `hidden_module` at the answer tokens. When only that output is asked for,
    the pass stops at the module (the layers after it and the LM head never run), unless `may_stop` is
    false: a DDP or FSDP wrapper must finish its forward to synchronise the gradients, so its output
    joins the module's with weight zero (the LM head computing one position only where the model allows)."""
    captured: list[torch.Tensor] = []
    stop = may_stop and hidden_module is not None and not (token_logp or logits)

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _StopForward

    handle = hidden_module.register_forward_hook(hook) if hidden_module is not None else None
    hidden_only = hidden_module is not None and not (token_logp or logits)
    extra = {"logits_to_keep": 1} if hidden_only and _accepts_logits_to_keep(model) else {}
    out = None
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
    except _StopForward:
        pass
    finally:
        if handle is not None:
            handle.remove()
    labels = batch["labels"]
    result = ForwardOut()
    if out is not None:
        if token_logp:
            result.token_lp = token_log_probs(out.logits, labels)
        if logits:
            result.logits = answer_logits(out.logits, labels)
    if hidden_module is not None:
        hidden = captured[0]
        if hidden_only and out is not None:  # the wrapper's output joins the loss, with zero weight
            hidden = hidden + 0 * out.logits.sum()
        result.hidden = answer_hidden(hidden, labels)
    return result


def _accepts_logits_to_keep(model) -> bool:
    inner = getattr(model, "module", model)  # a DDP wrapper's model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


class _DualCallback(TrainerCallback):
    """PDU: the dual update after each optimizer step or epoch (before that step's log and checkpoint)."""

    def __init__(self, trainer: "UnlearnTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.dual_step_end()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.dual_epoch_end(state.epoch)


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
    return ((folder / "trainer_state.json").is_file() and any((folder / w).exists() for w in weights)
            and (folder / "optimizer.pt").is_file())


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
        self._sampler = EpochSampler(dataset, self.args.seed,
                                     pad_to=world * self.args.per_device_train_batch_size if world > 1 else 1)
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
        return NonFiniteError(f"non-finite {what} at step {step} ({self.describe()}; sample ids "
                              f"{', '.join(map(str, ids)) or '?'}{'; ' + detail if detail else ''})", step)

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
        if any(not bool(torch.isfinite(torch.stack(norms)).all()) for norms in by_device.values()):  # one sync per device
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
            write_json_atomic(tmp / CHECKPOINT_MARKER, {"step": self.state.global_step, "epoch": self.state.epoch,
                                                        **self.checkpoint_info})
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


# --------------------------------------------------------------------------- fine-tuning
class FinetuneTrainer(RunGuard, Trainer):
    """Supervised fine-tuning (the model's own answer-only NLL) with `RunGuard`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._guard_init()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "sample_ids"}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


# --------------------------------------------------------------------------- unlearning
class UnlearnTrainer(RunGuard, Trainer):
    """`loss = gamma * F(l_1..l_B) + alpha * R` with F a weighting of per-sample forget losses.

    The objective and the retain loss declare what they read (`baldro.objectives.Needs`); each forward
    pass computes only that: answer-token log-probs, full-vocabulary logits at the answer positions, the
    output of the module matched by `module_regex` (a forward that needs nothing after that module stops
    there), and the same from the frozen reference. `ref_cache` (default on): the reference's logp_ref of
    each forget and preferred answer is computed once and reused in later epochs (`baldro.reference`).
    `primal_dual` (PDU) replaces alpha by a dual variable. The weighting's state, the reference cache, RMU's
    steering vector and the dual variable are saved with every checkpoint.
    """

    ids_key = "forget_ids"

    def __init__(
        self,
        *args,
        objective: Objective,
        objective_args: dict | None = None,
        weighting: Weighting,
        retain_loss: RetainLoss,
        gamma: float = 1.0,
        alpha: float = 1.0,
        ref_model=None,
        ref_cache: bool = True,
        forget_log_path: str | Path | None = None,
        module_regex: str | None = None,
        primal_dual: PrimalDual | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-micro-batch mean; let Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.objective, self.objective_args = objective, dict(objective_args or {})
        self.weighting, self.retain_loss = weighting, retain_loss
        self.gamma, self.alpha = gamma, alpha
        self.forget_log_path = Path(forget_log_path) if forget_log_path else None
        self.needs_reference = objective.needs_reference or retain_loss.needs_reference
        self.ref_model = ref_model
        if self.needs_reference and ref_model is None and not self._is_peft():
            raise BaldroError(f"objective {objective.name!r} / retain loss {retain_loss.name!r} need a reference "
                              "model: none was given and the model has no LoRA adapter to switch off")
        if ref_model is not None:
            # this process's device, or sharded like the trained model (FSDP, ZeRO-3): baldro.distributed
            self.ref_model = prepare_reference(ref_model, self.accelerator, self.args.device)
        elif self.needs_reference and fsdp_version(self.accelerator) == 1:
            raise BaldroError("LoRA under FSDP1: the adapter-free reference would run outside FSDP's wrapper; use "
                              "fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
        self.module_name = None
        if objective.needs.hidden or retain_loss.needs.hidden:
            unwrapped = self.accelerator.unwrap_model(self.model)
            regex = module_regex or default_module_regex(unwrapped.config.num_hidden_layers)
            self.module_name = find_module(unwrapped, regex)[0]
            if self.ref_model is not None:
                find_module(self.accelerator.unwrap_model(self.ref_model), regex)
        self.steering = None
        if objective.needs.steering:
            self.steering = steering_vector(self.accelerator.unwrap_model(self.model).config.hidden_size, self.args.seed)
        self.primal_dual = primal_dual
        self._dual_retain: list[torch.Tensor] = []
        if primal_dual is not None:
            self.add_callback(_DualCallback(self))
        n_forget = len(getattr(self.train_dataset, "forget", ()))
        sizes = {"forget": n_forget, "refusal": n_forget,
                 "alternate": n_forget * getattr(self.train_dataset, "n_alternates", 0)}
        self.ref_cache = (ReferenceCache(n_forget, sizes=sizes)
                          if ref_cache and objective.needs.reference and n_forget else None)
        self._accum: list[torch.Tensor] = []  # per micro-batch: STAT_NAMES, on the device until a logging step
        self._last_parts: tuple[torch.Tensor, torch.Tensor] | None = None
        self._gather_samples = SampleGather(self)  # the weighting's `gather`, knowing the processes
        self._units: tuple | None = None  # the current optimizer step's plan (several processes)
        self._micro = 0
        self._guard_init()

    def describe(self) -> str:
        return f"objective {self.objective.name} under weighting {self.weighting.name}"

    def objective_state(self) -> dict:
        """The objective's own training state: RMU's steering vector, PDU's dual variable."""
        state = {}
        if self.steering is not None:
            state["steering"] = self.steering.clone()
        if self.primal_dual is not None:
            state["primal_dual"] = self.primal_dual.state_dict()
        return state

    def _save_extra_state(self, folder: Path) -> None:
        if self.weighting.stateful:
            torch.save(self.weighting.state_dict(), folder / WEIGHTING_STATE_FILE)
        state = self.objective_state()
        if state:
            torch.save(state, folder / OBJECTIVE_STATE_FILE)

    def _save_process_state(self, folder: Path) -> None:
        if self.ref_cache is not None:
            self.ref_cache.save(folder, self.args.process_index)

    def restore_extra_state(self, checkpoint: str | Path) -> None:
        """Continue from a checkpoint: the weighting's and the objective's state, the reference log-prob cache."""
        restore_weighting_state(self.weighting, checkpoint)
        path = Path(checkpoint) / OBJECTIVE_STATE_FILE
        if path.exists():
            state = torch.load(path)
            if "steering" in state and self.steering is not None:
                self.steering = state["steering"]
            if "primal_dual" in state and self.primal_dual is not None:
                self.primal_dual.load_state_dict(state["primal_dual"])
        if self.ref_cache is not None and self.ref_cache.load(checkpoint):
            log.info("resume: %d cached reference log-prob(s) from %s", self.ref_cache.n_known(), checkpoint)

    def _step_seed(self, ids: torch.Tensor) -> int:
        """A seed from (seed, step, process, the batch's sample ids): a weighting's random choices."""
        # pad rows (id -1, several processes) get keys no sample has; sample ids keep theirs
        key = (self.state.global_step, self.args.process_index, *(i if i >= 0 else 2**40 - i for i in ids.tolist()))
        return int(derived_rng(STREAM_STEP, self.args.seed, *key).integers(2**62))

    # ------------------------------------------------------------ several processes: units of a step
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer fetches a step's micro-batches together: plan the step's units there."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._plan_units(batch_samples)
        return batch_samples, num_items

    def _plan_units(self, batch_samples) -> None:
        """Which of the step's micro-batches hold real samples, on every process (one gather per step):
        M real micro-batches, M' micro-steps with a real row (baldro.distributed)."""
        self._micro = 0
        processes = self.accelerator.num_processes
        if processes == 1:
            self._units = None
            return
        real = torch.tensor([bool((b["forget_ids"] >= 0).any()) for b in batch_samples], dtype=torch.long,
                            device=self.args.device)
        every = self.accelerator.gather(real).view(processes, -1)
        m, m_steps = int(every.sum()), int(every.any(0).sum())
        self._units = (processes, m, m_steps, [bool(r) for r in real.tolist()])
        self._gather_samples.scale = m / m_steps if m_steps else float(processes)

    def training_step(self, model, inputs, *args, **kwargs):
        if self._units is not None:
            processes, m, _, real = self._units
            index = min(self._micro, len(real) - 1)
            self._micro += 1
            if real[index]:
                keep = inputs["forget_ids"] >= 0
                if not bool(keep.all()):
                    inputs = drop_rows(inputs, keep)
                # Trainer divides the loss by this: the loss counts P / M, and the average over processes
                # makes the step's gradient the mean over its M real micro-batches.
                self.current_gradient_accumulation_steps = m / processes
            else:  # only pad rows: forward and backward (every process must), counted zero times
                self.current_gradient_accumulation_steps = float("inf")
        return super().training_step(model, inputs, *args, **kwargs)

    def save_weighting_state(self, path: str | Path) -> None:
        """A stateful weighting's final state (dv_global), checked to be one state on every process,
        written by the main process."""
        if not self.weighting.stateful:
            return
        states = all_gather_objects(self.weighting.state_dict())
        for rank, other in enumerate(states[1:], 1):
            if not _same_state(states[0], other):
                raise BaldroError(f"weighting {self.weighting.name!r}: process {rank} holds another state than "
                                  "process 0 (each process must observe the losses of all processes)")
        if self.is_world_process_zero():
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(self.weighting.state_dict(), tmp)
            os.replace(tmp, path)

    # ------------------------------------------------------------ reference model
    def _is_peft(self) -> bool:
        return hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter")

    @contextlib.contextmanager
    def _reference(self, model):
        """The frozen reference: a separate copy, or the LoRA model with its adapter switched off."""
        with torch.no_grad():
            if self.ref_model is not None:
                yield self.ref_model
            else:
                unwrapped = self.accelerator.unwrap_model(model)
                with unwrapped.disable_adapter():
                    yield unwrapped

    def _reference_logp(self, model, part: str, batch: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """logp_ref of a batch part: from the cache, or one reference forward pass (then cached)."""
        if self.ref_cache is not None:
            cached = self.ref_cache.lookup(part, ids, device=ids.device)
            if cached is not None:
                return cached
        with self._reference(model) as ref:
            logp = self._forward(ref, batch).token_lp.logp
        if self.ref_cache is not None:
            self.ref_cache.store(part, ids, logp)
        return logp

    def _module(self, model) -> torch.nn.Module | None:
        if self.module_name is None:
            return None
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        return base.get_submodule(self.module_name)

    def _forward(self, model, batch: dict[str, torch.Tensor], needs: Needs = Needs(), reference: bool = False):
        """One forward pass computing what `needs` asks of the model (`reference=True`: of the reference)."""
        logits = needs.reference_logits if reference else needs.logits
        hidden = needs.reference_hidden if reference else needs.hidden
        token_logp = needs.token_logp and not reference or (reference and needs.reference)
        return forward_parts(model, batch, token_logp=token_logp, logits=logits,
                             hidden_module=self._module(model) if hidden else None,
                             may_stop=self.accelerator.unwrap_model(model) is model)

    # ------------------------------------------------------------ the loss
    def _forget_losses(self, model, parts: dict, ref_logp: dict, rows: torch.Tensor | None = None):
        """Per-sample forget losses and mean NLLs (None when the objective reads no log-probs) of the
        batch (or of its `rows`)."""
        if rows is not None:
            parts = {k: select_rows(v, rows) for k, v in parts.items()}
            ref_logp = {k: v[rows] for k, v in ref_logp.items()}
        needs = self.objective.needs
        out = self._forward(model, parts["forget"], needs)
        x = ForgetInputs(out.token_lp, forget_ref_logp=ref_logp.get("forget"), logits=out.logits, hidden=out.hidden,
                         steering=None if self.steering is None else self.steering.to(model.device))
        if needs.reference_logits:
            with self._reference(model) as ref:
                x.ref_logits = self._forward(ref, parts["forget"], needs, reference=True).logits.values
        preferred = needs.preferred
        if preferred is not None:
            setattr(x, preferred, self._forward(model, parts[preferred]).token_lp)
            setattr(x, f"{preferred}_ref_logp", ref_logp.get(preferred))
        nll = out.token_lp.nll if out.token_lp is not None else None
        return self.objective(x, **self.objective_args), nll

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["forget_ids"]
        parts = {"forget": batch_part(inputs, "forget")}
        preferred = self.objective.needs.preferred
        if preferred is not None:
            parts[preferred] = batch_part(inputs, preferred)
            if not parts[preferred]:
                raise BaldroError(f"objective {self.objective.name!r} needs {preferred} answers: none in the batch")
        ref_logp = {}
        if self.objective.needs.reference:
            part_ids = {"alternate": inputs.get("alt_ids")}
            ref_logp = {part: self._reference_logp(model, part, batch, part_ids.get(part, ids))
                        for part, batch in parts.items()}

        if self.weighting.preselect is None:  # one forward pass with autograd over the batch
            losses, nll = self._forget_losses(model, parts, ref_logp)
            extra = {}
        else:  # score the batch, then train the rows the weighting selects
            with torch.set_grad_enabled(self.weighting.preselect == "grad"):
                scores, nll = self._forget_losses(model, parts, ref_logp)
                scores, nll = scores.detach(), (nll.detach() if nll is not None else None)  # graph freed here
            rows = self.weighting.select(scores, nll=nll)
            chosen, _ = self._forget_losses(model, parts, ref_logp, rows)
            losses = scores.detach().index_put((rows,), chosen)  # gradients through the chosen rows only
            extra = {"rows": rows}
        weighted = self.weighting(losses, ids=ids, nll=nll.detach() if nll is not None else None,
                                  gather=self._gather_samples, **extra)
        if "retain_input_ids" in inputs:
            retain_value = self._retain_value(model, inputs, weighted, ids)
        else:  # no retain set (alpha = 0)
            retain_value = torch.zeros((), device=weighted.value.device)

        if self.primal_dual is not None:
            loss = self.gamma * weighted.value + self.primal_dual.term(retain_value)
            if self.accelerator.num_processes == 1 or bool((ids >= 0).any()):  # pad rows are no retain sample
                self._dual_retain.append(retain_value.detach())
        else:
            loss = self.gamma * weighted.value + self.alpha * retain_value
        self._record(weighted, losses, retain_value, ids)
        return (loss, {"losses": losses}) if return_outputs else loss

    def _retain_value(self, model, inputs, weighted=None, ids=None) -> torch.Tensor:
        # A weighting may draw random rows (group's shrink_retain): from a generator seeded by the step.
        retain_rows = None
        if weighted is not None:
            devices = [ids.device.index or 0] if ids.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self._step_seed(ids))
                retain_rows = self.weighting.retain_rows(weighted, len(inputs["retain_input_ids"]), ids.device)
        retain = batch_part(inputs, "retain", retain_rows)
        needs = self.retain_loss.needs
        out = self._forward(model, retain, needs)
        x = RetainInputs(out.token_lp, logits=out.logits, hidden=out.hidden)
        if needs.reference_logits or needs.reference_hidden:
            with self._reference(model) as ref:
                ref_out = self._forward(ref, retain, needs, reference=True)
            x.ref_logits = ref_out.logits.values if ref_out.logits is not None else None
            x.ref_hidden = ref_out.hidden.values if ref_out.hidden is not None else None
        return self.retain_loss.fn(x)

    # ------------------------------------------------------------ PDU's dual variable
    def dual_step_end(self) -> None:
        """After an optimizer step: dual ascent on the step's mean retain loss (every process's)."""
        values, self._dual_retain = self._dual_retain, []
        if not self.primal_dual.can_update or self.primal_dual.update_upon != "step":  # the same on every process
            return
        total = torch.stack(values).float().sum() if values else torch.zeros((), device=self.args.device)
        both = torch.stack([total.to(self.args.device), torch.tensor(float(len(values)), device=self.args.device)])
        if self.accelerator.num_processes > 1:  # every process gathers, also one whose micro-batches were padding
            both = self.accelerator.gather(both[None]).sum(0)
        if float(both[1]) > 0:
            self.primal_dual.ascend(float(both[0]) / float(both[1]))

    @torch.no_grad()
    def dual_epoch_end(self, epoch: float) -> None:
        """After an epoch: enable updates after the warm-up; an epoch update averages the retain loss
        over one pass of the training data's retain batches (eval mode, no grad)."""
        if not self.primal_dual.end_epoch(epoch):
            return
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        was_training = model.training
        model.eval()
        total, count = torch.zeros((), device=self.args.device), 0
        sampler = self._sampler  # the training loop's sampler stays the one the guard advances
        try:
            loader = self.get_train_dataloader()
        finally:
            self._sampler = sampler
        for inputs in loader:
            if "retain_input_ids" not in inputs:
                break
            inputs = self._prepare_inputs(inputs)
            keep = inputs["forget_ids"] >= 0
            if not bool(keep.any()):
                continue
            total += self._retain_value(model, drop_rows(inputs, keep) if not bool(keep.all()) else inputs).float()
            count += 1
        if self.accelerator.num_processes > 1:
            both = self.accelerator.gather(torch.stack([total, torch.tensor(float(count), device=total.device)])[None])
            total, count = both[:, 0].sum(), int(both[:, 1].sum())
        model.train(was_training)
        if count:
            self.primal_dual.ascend(float(total) / count)

    # ------------------------------------------------------------ logging
    def _gather(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self.accelerator.num_processes == 1:
            return list(tensors)
        return [self.accelerator.gather(self.accelerator.pad_across_processes(t, pad_index=-1)) for t in tensors]

    def _gather_samples(self, ids: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
        """`ids` and per-sample `values` of every process, without the padding of uneven batches."""
        all_ids, *all_values = self._gather(ids, *values)
        keep = all_ids >= 0
        return [all_ids[keep], *(v[keep] for v in all_values)]

    def _record(self, weighted, losses, retain_value, ids) -> None:
        """Keep the step's statistics on the device (read at logging steps) and log per-sample losses."""
        self._last_parts = (weighted.value.detach(), retain_value.detach())
        # a micro-batch of pad rows (several processes only) is not a sample
        if self.accelerator.num_processes == 1 or bool((ids >= 0).any()):
            self._accum.append(torch.cat([
                torch.stack([weighted.value.detach(), losses.detach().mean(), retain_value.detach()]).float(),
                weight_stat_tensor(_batch_weights(weighted)),
            ]))
        if self.forget_log_path is not None:
            all_ids, all_losses, all_weights = self._gather_samples(ids, losses.detach().float(), weighted.weights.float())
            row = {"step": self.state.global_step + 1, "ids": all_ids.tolist(), "losses": all_losses.tolist(),
                   "weights": all_weights.tolist()}
            if not all(math.isfinite(v) for v in row["losses"] + [float(v) for v in self._last_parts]):
                raise self._non_finite("loss", self._loss_detail())  # before a NaN reaches the log
            if self.is_world_process_zero():
                append_jsonl(self.forget_log_path, row)

    def _loss_detail(self) -> str:
        if self._last_parts is None:
            return ""
        forget, retain = (float(v) for v in self._last_parts)
        return f"forget loss {forget:.4g}, retain loss {retain:.4g}"

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        several = self.accelerator.num_processes > 1
        if "loss" in logs and (self._accum or several):  # every process logs together: average over all
            n = len(self._accum)
            totals = torch.stack(self._accum).sum(0).tolist() if n else []  # one copy to the CPU per logging step
            sums = {k: (t, n) for k, t in zip(STAT_NAMES, totals)}
            if several:
                merged: dict[str, list[float]] = {}
                for part in all_gather_objects(sums):
                    for k, (total, count) in part.items():
                        merged.setdefault(k, [0.0, 0])
                        merged[k][0] += total
                        merged[k][1] += count
                sums = {k: tuple(v) for k, v in merged.items()}
            logs = {**logs, **{k: total / count for k, (total, count) in sums.items() if count}}
            if "weight_nonzero" in logs:
                logs["weight_nonzero"] = round(logs["weight_nonzero"], 3)
            self._accum = []
        if "loss" in logs and self.primal_dual is not None:
            logs = {**logs, "dual_lambda": self.primal_dual.lam}
        super().log(logs, start_time)


def _batch_weights(weighted) -> torch.Tensor:
    """The weights over the weighting's whole batch (a global-batch weighting's `batch_weights`)."""
    whole = getattr(weighted, "batch_weights", None)
    return weighted.weights if whole is None else whole


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            nx, ny = x.isnan() if x.is_floating_point() else None, y.isnan() if y.is_floating_point() else None
            if x.shape != y.shape or (nx is not None and not torch.equal(nx, ny)):
                return False
            if not torch.equal(x[~nx] if nx is not None else x, y[~ny] if ny is not None else y):
                return False
        elif x != y:
            return False
    return True


def drop_rows(inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep the rows `keep` of every batch tensor; each part's padding columns are trimmed to its
    longest kept row (`select_rows`), so that the kept rows are collated as if they were the whole batch."""
    n = len(keep)
    out = {k: (v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
           for k, v in inputs.items()}
    for part in ("forget", "retain", "refusal", "alternate"):
        sub = batch_part(inputs, part)
        if sub.get("attention_mask") is not None and sub["attention_mask"].dim() == 2:
            out.update({f"{part}_{k}": v for k, v in select_rows(sub, keep).items()})
    return out


class SampleGather:
    """The `gather` a weighting gets: `gather(ids, *values)` -> ids and per-sample values of every
    process, without pad rows, in process order. `num_processes` and `process_index` say where this
    process's rows are; `scale` is what a global-batch weighting multiplies its local gradient by
    (M / M' of the current step, baldro.distributed; the number of processes when nothing is padded)."""

    def __init__(self, trainer: "UnlearnTrainer"):
        self.trainer = trainer
        self.scale: float | None = None

    @property
    def num_processes(self) -> int:
        return self.trainer.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.trainer.accelerator.process_index

    def __call__(self, ids: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
        return UnlearnTrainer._gather_samples(self.trainer, ids, *values)

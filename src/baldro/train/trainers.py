"""Trainers on `transformers.Trainer`: supervised fine-tuning and unlearning (SPEC sections 2-4).

`UnlearnTrainer.compute_loss` is the only place where objectives, weightings and retain losses meet:
one forward pass per batch part gives per-token log-probs, the objective turns them into B per-sample
losses, the weighting reduces them, and the loss is `gamma * F(l) + alpha * R`. Everything the DRO did
is logged per step (weight statistics, per-sample losses with sample ids).

Both trainers (`FinetuneTrainer`, `UnlearnTrainer`) share `RunGuard` (`guard.py`: stateless sampling, staged
checkpoints, non-finite checks); their batches come from `batching.py`, their forward passes from `forward.py`.

Several processes (see `baldro.distributed` for the semantics): the epoch's permutation is padded with
pad rows (id -1) to a multiple of processes x batch size; each optimizer step is planned once
(`UnlearnTrainer.get_batch_samples`: which micro-batches hold real samples) so that its gradient is
the mean over the step's real micro-batches (or, with a global-batch weighting, its micro-steps), and
per-step statistics are averaged over every process before they are logged.

Over 500 lines for a reason: `UnlearnTrainer` is one class (the step plan, the loss, the statistics and the
state it checkpoints); its pieces without trainer state live in `batching.py`, `forward.py` and `guard.py`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from baldro.distributed import (
    all_gather_objects,
    fsdp_version,
    prepare_reference,
)
from baldro.errors import BaldroError
from baldro.io import append_jsonl
from baldro.train.batching import (
    STREAM_STEP,
    batch_part,
    derived_rng,
    drop_rows,
    select_rows,
)
from baldro.train.forward import forward_parts
from baldro.train.guard import RunGuard
from baldro.train.objectives import (
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
from baldro.train.reference import ReferenceCache
from baldro.train.weighting import WEIGHT_STATS, Weighting, weight_stat_tensor

log = logging.getLogger(__name__)

STAT_NAMES = ("forget_loss", "forget_loss_mean", "retain_loss", *WEIGHT_STATS)  # train_log.jsonl's statistics


WEIGHTING_STATE_FILE = "weighting_state.pt"  # a stateful weighting's state (dv_global), in every checkpoint
OBJECTIVE_STATE_FILE = "objective_state.pt"  # RMU's steering vector, PDU's dual variable, in every checkpoint


def restore_weighting_state(weighting: Weighting, checkpoint: str | Path) -> None:
    """Continue a stateful weighting from a checkpoint (`UnlearnTrainer` saves it with each one)."""
    path = Path(checkpoint) / WEIGHTING_STATE_FILE
    if weighting.stateful and path.exists():
        weighting.load_state_dict(torch.load(path))


class _DualCallback(TrainerCallback):
    """PDU: the dual update after each optimizer step or epoch (before that step's log and checkpoint)."""

    def __init__(self, trainer: "UnlearnTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.dual_step_end()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.dual_epoch_end(state.epoch)


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

    The objective and the retain loss declare what they read (`baldro.train.objectives.Needs`); each forward
    pass computes only that: answer-token log-probs, full-vocabulary logits at the answer positions, the
    output of the module matched by `module_regex` (a forward that needs nothing after that module stops
    there), and the same from the frozen reference. `ref_cache` (default on): the reference's logp_ref of
    each forget and preferred answer is computed once and reused in later epochs (`baldro.train.reference`).
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
            raise BaldroError(
                f"objective {objective.name!r} / retain loss {retain_loss.name!r} need a reference "
                "model: none was given and the model has no LoRA adapter to switch off"
            )
        if ref_model is not None:
            # this process's device, or sharded like the trained model (FSDP, ZeRO-3): baldro.distributed
            self.ref_model = prepare_reference(ref_model, self.accelerator, self.args.device)
        elif self.needs_reference and fsdp_version(self.accelerator) == 1:
            raise BaldroError(
                "LoRA under FSDP1: the adapter-free reference would run outside FSDP's wrapper; use "
                "fsdp_version: 2 (configs/accelerate/fsdp.yaml)"
            )
        self.module_name = None
        if objective.needs.hidden or retain_loss.needs.hidden:
            unwrapped = self.accelerator.unwrap_model(self.model)
            regex = module_regex or default_module_regex(unwrapped.config.num_hidden_layers)
            self.module_name = find_module(unwrapped, regex)[0]
            if self.ref_model is not None:
                find_module(self.accelerator.unwrap_model(self.ref_model), regex)
        self.steering = None
        if objective.needs.steering:
            self.steering = steering_vector(
                self.accelerator.unwrap_model(self.model).config.hidden_size, self.args.seed
            )
        self.primal_dual = primal_dual
        self._dual_retain: list[torch.Tensor] = []
        if primal_dual is not None:
            self.add_callback(_DualCallback(self))
        n_forget = len(getattr(self.train_dataset, "forget", ()))
        sizes = {
            "forget": n_forget,
            "refusal": n_forget,
            "alternate": n_forget * getattr(self.train_dataset, "n_alternates", 0),
        }
        self.ref_cache = (
            ReferenceCache(n_forget, sizes=sizes) if ref_cache and objective.needs.reference and n_forget else None
        )
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
        real = torch.tensor(
            [bool((b["forget_ids"] >= 0).any()) for b in batch_samples], dtype=torch.long, device=self.args.device
        )
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
                raise BaldroError(
                    f"weighting {self.weighting.name!r}: process {rank} holds another state than "
                    "process 0 (each process must observe the losses of all processes)"
                )
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
        return forward_parts(
            model,
            batch,
            token_logp=token_logp,
            logits=logits,
            hidden_module=self._module(model) if hidden else None,
            may_stop=self.accelerator.unwrap_model(model) is model,
        )

    # ------------------------------------------------------------ the loss
    def _forget_losses(self, model, parts: dict, ref_logp: dict, rows: torch.Tensor | None = None):
        """Per-sample forget losses and mean NLLs (None when the objective reads no log-probs) of the
        batch (or of its `rows`)."""
        if rows is not None:
            parts = {k: select_rows(v, rows) for k, v in parts.items()}
            ref_logp = {k: v[rows] for k, v in ref_logp.items()}
        needs = self.objective.needs
        out = self._forward(model, parts["forget"], needs)
        x = ForgetInputs(
            out.token_lp,
            forget_ref_logp=ref_logp.get("forget"),
            logits=out.logits,
            hidden=out.hidden,
            steering=None if self.steering is None else self.steering.to(model.device),
        )
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
            ref_logp = {
                part: self._reference_logp(model, part, batch, part_ids.get(part, ids)) for part, batch in parts.items()
            }

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
        weighted = self.weighting(
            losses, ids=ids, nll=nll.detach() if nll is not None else None, gather=self._gather_samples, **extra
        )
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
            self._accum.append(
                torch.cat(
                    [
                        torch.stack([weighted.value.detach(), losses.detach().mean(), retain_value.detach()]).float(),
                        weight_stat_tensor(_batch_weights(weighted)),
                    ]
                )
            )
        if self.forget_log_path is not None:
            all_ids, all_losses, all_weights = self._gather_samples(
                ids, losses.detach().float(), weighted.weights.float()
            )
            row = {
                "step": self.state.global_step + 1,
                "ids": all_ids.tolist(),
                "losses": all_losses.tolist(),
                "weights": all_weights.tolist(),
            }
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

"""Trainers on `transformers.Trainer`: supervised fine-tuning and unlearning (SPEC sections 2-4).

`UnlearnTrainer.compute_loss` is the only place where objectives, weightings and retain losses meet:
one forward pass per batch part gives per-token log-probs, the objective turns them into B per-sample
losses, the weighting reduces them, and the loss is `gamma * F(l) + alpha * R`. Everything the DRO did
is logged per step (weight statistics, per-sample losses with sample ids).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from baldro.data.formatting import EncodedQA, collate_encoded
from baldro.errors import BaldroError
from baldro.io import append_jsonl
from baldro.objectives import ForgetInputs, Objective, RetainLoss
from baldro.sequence import token_log_probs
from baldro.weighting import Weighting, weight_stats


# --------------------------------------------------------------------------- data
class EncodedDataset(Dataset):
    """A list of `EncodedQA` (fine-tuning and scoring)."""

    def __init__(self, items: Sequence[EncodedQA]):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@dataclass
class QACollator:
    pad_token_id: int

    def __call__(self, batch: Sequence[EncodedQA]) -> dict[str, torch.Tensor]:
        return collate_encoded(batch, self.pad_token_id)


class UnlearnDataset(Dataset):
    """One item per forget sample, paired with a random retain sample (seeded) and optional refusal.

    An epoch is one pass over the forget set (SPEC section 4). `retain=None`: no retain samples (a
    run without a retain loss, alpha = 0).
    """

    def __init__(
        self,
        forget: Sequence[EncodedQA],
        retain: Sequence[EncodedQA] | None,
        refusal: Sequence[EncodedQA] | None = None,
        seed: int = 0,
    ):
        if not forget:
            raise BaldroError("the forget set is empty: check data.forget_split")
        if retain is not None and not retain:
            raise BaldroError("the retain set is empty: check data.retain_split")
        self.forget, self.retain, self.refusal = list(forget), (list(retain) if retain is not None else None), refusal
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.forget)

    def __getitem__(self, i):
        item = {"id": i, "forget": self.forget[i]}
        if self.retain is not None:
            item["retain"] = self.retain[int(self.rng.integers(len(self.retain)))]
        if self.refusal is not None:
            item["refusal"] = self.refusal[i]
        return item


@dataclass
class UnlearnCollator:
    pad_token_id: int

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        out = {"forget_ids": torch.tensor([b["id"] for b in batch], dtype=torch.long)}
        for part in ("forget", "retain", "refusal"):
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


# --------------------------------------------------------------------------- callbacks
class JsonlLogCallback(TrainerCallback):
    """Appends every training log (one row per logging step) to a JSON-lines file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            append_jsonl(self.path, {"step": state.global_step, **logs})


class WeightingStateCallback(TrainerCallback):
    """Saves a stateful weighting (dv_global) with each checkpoint so that resumed runs continue it."""

    FILE = "weighting_state.pt"

    def __init__(self, weighting: Weighting):
        self.weighting = weighting

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.weighting.state_dict(), folder / self.FILE)

    @classmethod
    def restore(cls, weighting: Weighting, checkpoint: str | Path) -> None:
        path = Path(checkpoint) / cls.FILE
        if path.exists():
            weighting.load_state_dict(torch.load(path))


# --------------------------------------------------------------------------- unlearning
class UnlearnTrainer(Trainer):
    """`loss = gamma * F(l_1..l_B) + alpha * R` with F a weighting of per-sample forget losses."""

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
        forget_log_path: str | Path | None = None,
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
            raise BaldroError(f"objective {objective.name!r} / retain loss {retain_loss.name!r} need a reference model")
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            self.ref_model = ref_model.to(self.args.device)
        self._accum: dict[str, list[float]] = {}

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

    @staticmethod
    def _forward(model, batch: dict[str, torch.Tensor]):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits, token_log_probs(out.logits, batch["labels"])

    # ------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = batch_part(inputs, "forget")
        _, forget_lp = self._forward(model, forget)
        x = ForgetInputs(forget_lp)
        refusal = batch_part(inputs, "refusal") if self.objective.needs_refusal else None
        if refusal is not None:
            if not refusal:
                raise BaldroError(f"objective {self.objective.name!r} needs refusal answers: none in the batch")
            _, x.refusal = self._forward(model, refusal)
        if self.objective.needs_reference:
            with self._reference(model) as ref:
                x.forget_ref_logp = self._forward(ref, forget)[1].logp
                if refusal is not None:
                    x.refusal_ref_logp = self._forward(ref, refusal)[1].logp

        losses = self.objective(x, **self.objective_args)
        ids = inputs["forget_ids"]
        weighted = self.weighting(losses, ids=ids, nll=forget_lp.nll.detach(), gather=self._gather_samples)
        if "retain_input_ids" in inputs:
            retain_value = self._retain_value(model, inputs, weighted, ids.device)
        else:  # no retain set (alpha = 0)
            retain_value = torch.zeros((), device=weighted.value.device)

        loss = self.gamma * weighted.value + self.alpha * retain_value
        self._record(loss, weighted, losses, retain_value, ids)
        return (loss, {"losses": losses}) if return_outputs else loss

    def _retain_value(self, model, inputs, weighted, device) -> torch.Tensor:
        retain_rows = self.weighting.retain_rows(weighted, len(inputs["retain_input_ids"]), device)
        retain = batch_part(inputs, "retain", retain_rows)
        retain_logits, retain_lp = self._forward(model, retain)
        ref_logits = None
        if self.retain_loss.needs_reference:
            with self._reference(model) as ref:
                ref_logits = self._forward(ref, retain)[0]
        return self.retain_loss.fn(retain_lp, logits=retain_logits, ref_logits=ref_logits, labels=retain["labels"])

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

    def _record(self, loss, weighted, losses, retain_value, ids) -> None:
        if not torch.isfinite(loss.detach()):
            raise BaldroError(
                f"non-finite loss at step {self.state.global_step + 1} (forget {weighted.value.item():.4g}, "
                f"retain {retain_value.item():.4g}): lower train.learning_rate or use model.dtype=float32"
            )
        stats = {
            "forget_loss": weighted.value.item(),
            "forget_loss_mean": losses.detach().mean().item(),
            "retain_loss": retain_value.item(),
            **weight_stats(weighted.weights),
        }
        for k, v in stats.items():
            self._accum.setdefault(k, []).append(float(v))
        if self.forget_log_path is not None:
            all_ids, all_losses, all_weights = self._gather_samples(ids, losses.detach().float(), weighted.weights.float())
            if self.is_world_process_zero():
                append_jsonl(self.forget_log_path, {
                    "step": self.state.global_step + 1,
                    "ids": all_ids.tolist(),
                    "losses": all_losses.tolist(),
                    "weights": all_weights.tolist(),
                })

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._accum:
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._accum.items()}}
            logs["weight_nonzero"] = round(logs["weight_nonzero"], 3)
            self._accum = {}
        super().log(logs, start_time)

"""Evaluation during unlearning (`train.eval_strategy`): the benchmark's evaluator on the model as it is in
memory, at step 0 (the starting model) and at every evaluation point; the best evaluation under a utility
floor; early stopping; the best model at the end.

Files (in the run folder):

- `evals/step-N/`: the evaluator's files (TOFU_EVAL.json and TOFU_SUMMARY.json, or MUSE_*) and
  `eval_timings.json` (seconds per stage: only here, so that the trajectory is the same in a resumed run);
- `eval_trajectory.jsonl`: one line per evaluation, `{"step", "epoch", <headline metrics>}` in step order;
- `best/step-N/trainable.safetensors` (`train.load_best_model_at_end`): the trainable weights of the best
  evaluation so far, written when a new best appears (and, while checkpoints are saved, also the best up to
  the last checkpoint, which a resumed run may need: at most two copies).

The best evaluation (`best_evaluation`, a pure function of the trajectory): among evaluations whose utility
(TOFU `model_utility`, MUSE `retain_knowmem_ROUGE`) is at least `utility_floor` x the first evaluation's, the
one with the best `metric_for_best_model` (the earliest of equal ones). Early stopping (`stop_reason`): at the
first evaluation below the floor, or after `patience` evaluations that are not the best.

Several processes: the main process evaluates (every process holds the whole model under DDP and ZeRO-1/2)
while the others wait in one collective that then hands them the main process's decision (stop, best step,
or an error to raise), so every process stops, fails and loads the best weights together. Sharded weights
(FSDP, ZeRO-3) are refused before training (`baldro.recipes`): one process cannot run the model alone.

Over 500 lines for a reason: when to evaluate, the best-step rule, early stopping and an exact resume of the
trajectory are one callback's state and belong together.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from transformers import TrainerCallback

from baldro.distributed import all_gather_objects, barrier
from baldro.errors import BaldroError
from baldro.eval.metrics import finite_float
from baldro.io import append_jsonl, read_jsonl, truncate_jsonl

log = logging.getLogger(__name__)

TRAJECTORY_FILE = "eval_trajectory.jsonl"
EVALS_DIR = "evals"
BEST_DIR = "best"
BEST_WEIGHTS = "trainable.safetensors"

UTILITY_KEY = {"tofu": "model_utility", "muse": "retain_knowmem_ROUGE"}
# The summary keys each trajectory line holds (besides step and epoch, and the best-model metric).
TRAJECTORY_KEYS = {
    "tofu": (
        "forget_quality",
        "model_utility",
        "forget_truth_ratio",
        "forget_Q_A_Prob",
        "forget_Q_A_ROUGE",
        "exact_memorization",
        "extraction_strength",
        "privleak",
    ),
    "muse": (
        "forget_verbmem_ROUGE",
        "forget_knowmem_ROUGE",
        "retain_knowmem_ROUGE",
        "privleak",
        "exact_memorization",
        "extraction_strength",
    ),
}
# Memorisation measures: lower = more forgotten.
_LOWER_IS_BETTER = ("exact_memorization", "extraction_strength")


def lower_is_better(metric: str) -> bool:
    """The default of `train.greater_is_better` (negated): lower is better for what measures remembering the
    forget set (its probabilities and ROUGE, exact memorisation, extraction strength), higher otherwise
    (forget quality, model utility, retain scores, truth ratios)."""
    return metric in _LOWER_IS_BETTER or (metric.startswith("forget_") and metric.endswith(("_Prob", "_ROUGE")))


_finite = finite_float


@dataclass(frozen=True)
class BestRule:
    """How the best evaluation is chosen: `metric` (a summary key), its direction, and the utility floor."""

    metric: str
    greater_is_better: bool = True
    utility_key: str = "model_utility"
    utility_floor: float | None = None  # a fraction of the first evaluation's utility

    def floor_value(self, rows: Sequence[dict]) -> float | None:
        """The absolute utility floor (None without a floor or without a first evaluation's utility)."""
        if self.utility_floor is None or not rows:
            return None
        base = _finite(rows[0].get(self.utility_key))
        return None if base is None else self.utility_floor * base

    def eligible(self, row: dict, floor: float | None) -> bool:
        if _finite(row.get(self.metric)) is None:
            return False
        if self.utility_floor is None:
            return True
        utility = _finite(row.get(self.utility_key))
        return floor is not None and utility is not None and utility >= floor


def best_evaluation(rows: Sequence[dict], rule: BestRule) -> dict | None:
    """The best row of a trajectory (in step order) under `rule`: the best metric among rows whose utility
    is at least the floor (the earliest of equal ones); None when no row qualifies."""
    floor = rule.floor_value(rows)
    best = None
    for row in rows:
        if not rule.eligible(row, floor):
            continue
        value = _finite(row[rule.metric])
        if best is None or (value > best[1] if rule.greater_is_better else value < best[1]):
            best = (row, value)
    return None if best is None else best[0]


def stop_reason(rows: Sequence[dict], rule: BestRule, patience: int | None) -> str | None:
    """Why training should stop after the last row of `rows` (None: go on). With early stopping on
    (`patience` set): the last evaluation's utility is below the floor, or the last `patience`
    evaluations came after the best one (or there is no best one yet)."""
    if patience is None or not rows:
        return None
    last = rows[-1]
    floor = rule.floor_value(rows)
    if rule.utility_floor is not None:
        utility = _finite(last.get(rule.utility_key))
        if floor is not None and utility is not None and utility < floor:
            return (
                f"{rule.utility_key}={utility:.4g} fell below the utility floor {floor:.4g} "
                f"({rule.utility_floor:g} x the first evaluation's)"
            )
    best = best_evaluation(rows, rule)
    since = len(rows) if best is None else len(rows) - 1 - rows.index(best)  # evaluations after the best
    if since >= patience:
        return (
            f"no better {rule.metric} in {since} evaluation(s) (train.early_stopping_patience={patience}; "
            f"best at step {best['step']})"
            if best is not None
            else f"no evaluation has {rule.metric} yet after {since} evaluation(s)"
        )
    return None


def eval_interval(eval_steps: float, max_steps: int) -> int:
    """`train.eval_steps` in optimizer steps: a count, or a fraction of the run (rounded up, as transformers)."""
    steps = math.ceil(max_steps * eval_steps) if eval_steps < 1 else int(eval_steps)
    if steps < 1 or steps > max_steps:
        raise BaldroError(
            f"train.eval_steps={eval_steps:g} is beyond the run ({max_steps} optimizer steps): use a "
            "count <= the run's steps or a fraction of the run below 1"
        )
    return steps


def trajectory_row(
    step: int, epoch: float | None, summary: dict, benchmark: str, extra_keys: Sequence[str] = ()
) -> dict:
    """One line of eval_trajectory.jsonl: no timings, so that a resumed run writes the same bytes."""
    row: dict[str, Any] = {"step": int(step), "epoch": round(float(epoch or 0.0), 6)}
    for key in (*TRAJECTORY_KEYS.get(benchmark, ()), *extra_keys):
        if key not in row:
            row[key] = _finite(summary.get(key))
    return row


# ----------------------------------------------------------------------------- the best weights on disk
def _trainable(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model, folder: Path) -> Path:
    """The trainable weights (all that training changes) into `folder/trainable.safetensors`, atomically."""
    import os

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / BEST_WEIGHTS, folder / f".{BEST_WEIGHTS}.tmp"
    save_file({name: p.detach().cpu().contiguous() for name, p in _trainable(model).items()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_trainable(model, folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    state = load_file(str(folder / BEST_WEIGHTS))
    params = _trainable(model)
    missing = sorted(set(params) - set(state))
    if missing:
        raise BaldroError(
            f"{folder / BEST_WEIGHTS} lacks {len(missing)} trainable weight(s) of this model (e.g. "
            f"{missing[0]}): it was written by another run"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))


def _step_dirs(root: Path) -> dict[int, Path]:
    out = {}
    for p in root.glob("step-*") if root.is_dir() else ():
        tail = p.name[len("step-") :]
        if tail.isdigit():
            out[int(tail)] = p
    return out


def truncate_outputs(run_dir: Path, step: int) -> int:
    """Resume from a checkpoint of `step`: drop the trajectory lines, evaluation folders and best weights of
    later steps (the resumed run writes them again); returns how many lines were dropped."""
    dropped = truncate_jsonl(run_dir / TRAJECTORY_FILE, lambda r: r.get("step", 0) <= step)
    for root in (run_dir / EVALS_DIR, run_dir / BEST_DIR):
        for s, folder in _step_dirs(root).items():
            if s > step:
                shutil.rmtree(folder, ignore_errors=True)
    return dropped


# ----------------------------------------------------------------------------- the callback
# (model, out folder, quiet) -> (summary, benchmark); quiet after the first evaluation of a process
EvaluateFn = Callable[[Any, Path, bool], tuple[dict, str]]


class EvalDuringTraining(TrainerCallback):
    """Evaluates at step 0 and at every `strategy` point (steps: every `eval_steps` and the last step;
    epoch: every epoch's end), appends to the trajectory, logs the headline numbers (the run's logger and
    `trainer.log`, hence `report_to`), tracks the best evaluation, stops early and loads the best weights
    at the end. `evaluate_fn(model, out, quiet)` runs the benchmark's evaluator into `out` on the main process
    (`quiet` after the first evaluation: its notes would repeat).
    Set `trainer` (for `trainer.log`) once the Trainer exists."""

    def __init__(
        self,
        evaluate_fn: EvaluateFn,
        run_dir: str | Path,
        strategy: str,
        eval_steps: float | None,
        benchmark: str,
        rule: BestRule | None = None,
        patience: int | None = None,
        load_best: bool = False,
    ):
        if strategy not in ("steps", "epoch"):
            raise BaldroError(f"EvalDuringTraining: strategy must be steps or epoch, got {strategy!r}")
        if load_best and rule is None:
            raise BaldroError("EvalDuringTraining: load_best needs a rule (train.metric_for_best_model)")
        self.evaluate_fn, self.run_dir = evaluate_fn, Path(run_dir)
        self.strategy, self.eval_steps, self.benchmark = strategy, eval_steps, benchmark
        self.rule, self.patience, self.load_best = rule, patience, load_best
        self.trainer = None
        self.interval: int | None = None
        self.rows: list[dict] = []  # the main process's trajectory
        self.best_step: int | None = None  # every process (the main process's decision)
        self.stopped: dict | None = None
        self.best_loaded = False
        self.last_checkpoint_step = 0
        self.saves_checkpoints = True
        self.seconds = 0.0
        self._failure: BaseException | None = None
        self._warned: set[int] = set()
        self._evaluated = 0  # by this process

    @property
    def path(self) -> Path:
        return self.run_dir / TRAJECTORY_FILE

    # -- the decision every process shares
    def _decide(self) -> dict:
        """(main process) best step and stop reason from the trajectory."""
        if self.rule is None:
            return {"best": None, "stop": None}
        best = best_evaluation(self.rows, self.rule)
        return {
            "best": None if best is None else best["step"],
            "stop": stop_reason(self.rows, self.rule, self.patience),
        }

    def _share(self, state, decision: dict | None) -> dict:
        """The main process's `decision` on every process (one collective, which the others wait in)."""
        decision = all_gather_objects(decision)[0]
        if decision.get("error"):
            if state.is_world_process_zero and self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            raise BaldroError(decision["error"])
        return decision

    def _check_metric(self, summary: dict) -> None:
        """After the first evaluation: the best-model metric and the utility are keys the evaluator produces."""
        if self.rule is None:
            return
        numeric = sorted(k for k, v in summary.items() if _finite(v) is not None)
        if self.rule.metric not in summary:
            raise BaldroError(
                f"train.metric_for_best_model={self.rule.metric} is not a metric of this evaluation: "
                f"use one of {', '.join(numeric)}"
            )
        if self.rule.utility_floor is not None and _finite(summary.get(self.rule.utility_key)) is None:
            raise BaldroError(
                f"eval.utility_floor needs {self.rule.utility_key}, which the first evaluation did not "
                "produce (n/a): unset eval.utility_floor"
            )

    def _evaluate(self, state, model) -> None:
        """(main process) one evaluation into evals/step-N and one trajectory line."""
        step = state.global_step
        start = time.time()
        summary, benchmark = self.evaluate_fn(model, self.run_dir / EVALS_DIR / f"step-{step}", self._evaluated > 0)
        self._evaluated += 1
        seconds = time.time() - start
        self.seconds += seconds
        if not self.rows:
            self._check_metric(summary)
        extra = (self.rule.metric,) if self.rule is not None else ()
        row = trajectory_row(step, state.epoch, summary, benchmark, extra)
        append_jsonl(self.path, row)
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("step", "epoch") and v is not None}
        log.info(
            "eval at step %d (epoch %.2f, %.1f s): %s",
            step,
            row["epoch"],
            seconds,
            " ".join(f"{k}={v:.4g}" for k, v in shown.items()) or "no metric",
        )
        if self.trainer is not None and shown:
            # trainer.log clears control.should_log (the Trainer's own log of this step would be lost)
            control = self.trainer.control
            should_log = control.should_log
            self.trainer.log({f"eval_{k}": v for k, v in shown.items()})
            self.trainer.control.should_log = control.should_log = should_log

    def _point(self, state, control, model, evaluate: bool = True) -> None:
        """An evaluation point on every process: the main process evaluates (unless this step is in the
        trajectory already) and decides; every process follows the decision."""
        decision = None
        if state.is_world_process_zero:
            try:
                if evaluate and not any(r["step"] == state.global_step for r in self.rows):
                    self._evaluate(state, model)
                decision = self._decide()
                if self.load_best and decision["best"] is not None:
                    self._keep_best(model, decision["best"])
            except BaseException as e:  # the others wait in the collective: tell them, then raise
                self._failure = e
                first = (str(e).splitlines() or [type(e).__name__])[0]
                decision = {
                    "error": first
                    if isinstance(e, BaldroError)
                    else f"the evaluation at step {state.global_step} failed on the main process "
                    f"({type(e).__name__}: {first})"
                }
        decision = self._share(state, decision)
        self.best_step = decision["best"]
        if decision["stop"] and not self.stopped:
            self.stopped = {"step": state.global_step, "reason": decision["stop"]}
            if state.is_world_process_zero:
                log.info("early stopping at step %d: %s", state.global_step, decision["stop"])
        if decision["stop"]:
            control.should_training_stop = True

    # -- the best weights
    def _keep_best(self, model, best: int) -> None:
        """(main process) write the best weights when they are new, and keep only what may still be needed."""
        root = self.run_dir / BEST_DIR
        if not (root / f"step-{best}" / BEST_WEIGHTS).is_file():
            if best != self.rows[-1]["step"]:
                if best not in self._warned:
                    self._warned.add(best)
                    log.warning(
                        "the weights of the best evaluation so far (step %d) are not on disk (the run "
                        "resumed from an older checkpoint?)",
                        best,
                    )
            else:
                start = time.time()
                save_trainable(model, root / f"step-{best}")
                log.info(
                    "best so far: step %d; its trainable weights written to %s in %.1f s",
                    best,
                    root / f"step-{best}",
                    time.time() - start,
                )
        self._prune()

    def _prune(self) -> None:
        keep = set()
        if self.rule is not None:
            for rows in (
                self.rows,
                [r for r in self.rows if r["step"] <= self.last_checkpoint_step] if self.saves_checkpoints else [],
            ):
                best = best_evaluation(rows, self.rule)
                if best is not None:
                    keep.add(best["step"])
        for step, folder in _step_dirs(self.run_dir / BEST_DIR).items():
            if step not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    # -- TrainerCallback hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.saves_checkpoints = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
        self.last_checkpoint_step = state.global_step
        if self.strategy == "steps":
            self.interval = eval_interval(self.eval_steps, state.max_steps)
        if state.is_world_process_zero:
            self.rows = (
                [r for r in read_jsonl(self.path) if r.get("step", 0) <= state.global_step]
                if self.path.exists()
                else []
            )
            if self.rule is not None and self.rows and self.rule.metric not in self.rows[0]:
                log.warning(
                    "%s does not record %s (the run started with another train.metric_for_best_model): "
                    "its %d evaluation(s) so far are not candidates for the best",
                    self.path,
                    self.rule.metric,
                    len(self.rows),
                )
        step = state.global_step
        epoch_end = abs((state.epoch or 0) - round(state.epoch or 0)) < 1e-6
        due = step == 0 or (self.strategy == "steps" and self._due(state)) or (self.strategy == "epoch" and epoch_end)
        self._point(state, control, model, evaluate=due)

    def _due(self, state) -> bool:
        """A `steps` evaluation point: every `interval` steps and the last step."""
        return state.global_step % self.interval == 0 or state.global_step >= state.max_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.strategy == "steps" and self._due(state):
            self._point(state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.strategy == "epoch":
            self._point(state, control, model)

    def on_save(self, args, state, control, **kwargs):
        self.last_checkpoint_step = state.global_step
        if state.is_world_process_zero and self.load_best:
            self._prune()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.load_best:
            barrier()  # the main process wrote the best weights before it shared its last decision
            main = state.is_world_process_zero
            if self.best_step is None and main:
                log.warning(
                    "train.load_best_model_at_end: no evaluation qualifies as the best (%s): the final "
                    "model is the last step's",
                    self._why_no_best(),
                )
            elif self.best_step is not None and self.best_step != state.global_step:
                folder = self.run_dir / BEST_DIR / f"step-{self.best_step}"
                if (folder / BEST_WEIGHTS).is_file():
                    load_trainable(model, folder)
                    self.best_loaded = True
                    if main:
                        log.info(
                            "train.load_best_model_at_end: the final model is step %d's (best %s)",
                            self.best_step,
                            self.rule.metric,
                        )
                elif main:
                    log.warning(
                        "train.load_best_model_at_end: the weights of the best step %d are not on disk (the "
                        "run resumed from an older checkpoint?): the final model is the last step's",
                        self.best_step,
                    )
            elif self.best_step is not None:
                self.best_loaded = True  # the last step is the best: the model in memory is its model

    def _why_no_best(self) -> str:
        if self.rule is None:
            return "no metric"
        if self.rule.utility_floor is not None:
            return f"none has {self.rule.metric} with {self.rule.utility_key} above the floor"
        return f"none has a finite {self.rule.metric}"

    def info(self) -> dict:
        """What run_info.json records (main process)."""
        out: dict[str, Any] = {
            "eval_strategy": self.strategy,
            "evaluations": len(self.rows),
            "trajectory_eval_time_s": self.seconds,
        }
        if self.strategy == "steps":
            out["eval_steps"] = self.interval
        if self.rule is not None:
            best = best_evaluation(self.rows, self.rule)
            out.update(
                {
                    "metric_for_best_model": self.rule.metric,
                    "greater_is_better": self.rule.greater_is_better,
                    "utility_floor": self.rule.utility_floor,
                    "best_step": None if best is None else best["step"],
                    "best_epoch": None if best is None else best["epoch"],
                    "best_metric": None if best is None else best[self.rule.metric],
                }
            )
            if self.load_best:
                out["best_model_loaded"] = self.best_loaded
        if self.stopped:
            out["stopped_early"] = self.stopped
        return out

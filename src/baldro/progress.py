"""One progress policy for every command: bars on a terminal; elsewhere (batch jobs, `nohup`, CI) plain
log lines with counts, rates and elapsed seconds, at most one every `EVERY_S` seconds per stage.

Libraries' own bars (transformers' loading and saving, the hub's downloads, datasets' map) follow the
same policy through `follow_terminal_policy`; the Trainer's bar and its per-step dicts are replaced by
`TrainProgress`, which writes each logging step's metrics as one readable line (or JSON)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("baldro")

EVERY_S = 30.0
LOG_FORMATS = ("text", "json")


def on_terminal() -> bool:
    """Whether progress goes to a person (bars) or to a file (log lines): stderr decides, as for tqdm."""
    return sys.stderr.isatty()


def follow_terminal_policy() -> None:
    """Off a terminal, switch off the progress bars of transformers, huggingface_hub and datasets."""
    if on_terminal():
        return
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


class LogProgress:
    """Progress for logs: a line with the count, rate and seconds at most every `every_s` seconds, and
    one at the end. The part of tqdm's interface the evaluator uses."""

    def __init__(self, total: int, desc: str, unit: str = "sequences", every_s: float = EVERY_S):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s: %d/%d %s, %.0f s", self.desc, self.n, self.total, self.unit, now - self.start)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.total:
            log.info(
                "%s: %d/%d %s in %.1f s", self.desc, self.n, self.total, self.unit, time.perf_counter() - self.start
            )


def progress_bar(total: int, desc: str, progress: bool | None, unit: str = "seq"):
    """A tqdm bar on a terminal, log lines elsewhere (progress=None); forced on or off with True/False."""
    if progress is None and not on_terminal():
        return LogProgress(total, desc)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        disable=not progress and progress is not None,
        dynamic_ncols=True,
    )


def rate(count: int, seconds: float, unit: str) -> str:
    """`3.2 steps/s`, or `41.0 s/step` when slower than one per second."""
    if count and seconds / count > 1:
        return f"{seconds / count:.1f} s/{unit}"
    return f"{count / max(seconds, 1e-9):.2f} {unit}s/s"


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def metrics_line(logs: dict, step: int, max_steps: int, fmt: str = "text") -> str:
    """One logging step's metrics: `step 3/8 (epoch 0.75): loss 20.1, grad_norm 85.1, ...` or one JSON object."""
    logs = {k: v for k, v in logs.items() if k != "total_flos"}
    if fmt == "json":
        return json.dumps({"step": step, "max_steps": max_steps, **logs}, allow_nan=True)
    epoch = logs.pop("epoch", None)
    head = f"step {step}/{max_steps}" + (f" (epoch {epoch:.4g})" if isinstance(epoch, (int, float)) else "")
    return head + ": " + ", ".join(f"{k} {_number(v)}" for k, v in logs.items())


def train_progress_callback(show_metrics: bool = True, fmt: str = "text", every_s: float = EVERY_S):
    """The Trainer's progress under this policy (a `TrainerCallback`; replaces its ProgressCallback and
    PrinterCallback): a bar on a terminal; off one, a line with the step count, rate and elapsed seconds at
    most every `every_s` seconds. Each logging step's metrics are one line (`fmt`: text or json) unless
    `show_metrics` is false."""
    from transformers import TrainerCallback

    class TrainProgress(TrainerCallback):
        def __init__(self):
            self.bar, self.start, self.last, self.first, self.step = None, 0.0, 0.0, 0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.start = self.last = time.perf_counter()
            self.first = self.step = state.global_step
            if on_terminal() and not args.disable_tqdm:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)
            elif state.global_step:
                log.info("train: resuming at step %d/%d", state.global_step, state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if self.bar is not None:
                self.bar.update(state.global_step - self.step)
            else:
                now = time.perf_counter()
                if now - self.last >= every_s:
                    self.last = now
                    log.info(
                        "train: step %d/%d, %s, %.0f s",
                        state.global_step,
                        state.max_steps,
                        rate(state.global_step - self.first, now - self.start, "step"),
                        now - self.start,
                    )
            self.step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not show_metrics or not logs:
                return
            line = metrics_line(dict(logs), state.global_step, state.max_steps, fmt)
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                log.info("%s", line)

        def on_train_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            log.info(
                "train: %d/%d steps in %.1f s", state.global_step, state.max_steps, time.perf_counter() - self.start
            )

    return TrainProgress()

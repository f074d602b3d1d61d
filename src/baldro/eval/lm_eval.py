"""Any lm-evaluation-harness task on the model in memory (WMDP, MMLU, ARC, HellaSwag, GSM8K, the
user's own task YAML files), through the harness's Python API: `lm_eval.simple_evaluate` with
`HFLM(pretrained=model, tokenizer=tokenizer, batch_size=...)`. No task logic is reimplemented here:
prompts, few-shot sampling, requests, filters and metrics are the harness's, so the numbers are those
of `lm_eval --model hf --model_args pretrained=M --tasks T` on the same model (tests/test_lm_eval.py).

Options carry the harness's names: `tasks` (names, groups, tags or globs, resolved as its command line
resolves them), `num_fewshot`, `limit`, `include_path` (a folder of the user's task YAML files, indexed
after the harness's own, so a local task may shadow a registered one), `batch_size` and
`apply_chat_template` (few-shot examples as a multi-turn chat when set, as its command line does). Its
seeds are its command line's defaults (random 0, numpy, torch and few-shot 1234); the caller's random
states are put back afterwards, so a training run that evaluates every N steps draws as it would without.

Output (OpenUnlearning's `LMEvalEvaluator` layout):

| file | content |
| --- | --- |
| `LMEVAL_EVAL.json` | {requested task: {harness task: [its per-sample records]}} (`doc`, `arguments`, `resps`, `filtered_resps`, the metrics) |
| `LMEVAL_SUMMARY.json` | {"TASK/METRIC": value}: a group's aggregate metrics for a group (`mmlu/acc`), a task's own metrics otherwise (`wmdp_cyber/acc`, `wmdp_cyber/acc_stderr`); a tag gives each of its tasks' |
| `LMEVAL_RESULTS.json` | the harness's results object without the samples (every subtask, n-shot, n-samples, versions, configs) |

A metric computed under one filter keeps OpenUnlearning's key (`gsm8k/exact_match` is not ambiguous);
where the harness reports one metric under several filters (GSM8K's `strict-match` and
`flexible-extract`), the key keeps the filter (`gsm8k/exact_match,strict-match`) instead of keeping
only the last one as OpenUnlearning does. Values the harness could not compute ("N/A") are left out.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from baldro.errors import BaldroError
from baldro.io import write_json_atomic

log = logging.getLogger(__name__)

INSTALL = "pip install 'baldro[lm-eval]'"
EVAL_FILE, SUMMARY_FILE, RESULTS_FILE = "LMEVAL_EVAL.json", "LMEVAL_SUMMARY.json", "LMEVAL_RESULTS.json"
DEFAULT_BATCH_SIZE = 16  # OpenUnlearning's simple_evaluate batch size (the harness's command line: 1)
TIMING_PREFIX = "lm_eval"  # timing groups: "lm_eval setup", "lm_eval loglikelihood", "lm_eval generate_until", ...


# ----------------------------------------------------------------------------------- the harness
def require_lm_eval():
    """The `lm_eval` package, or a one-line error naming the install command."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401  (the part this module calls)
    except ImportError as e:
        raise BaldroError(
            f"lm-evaluation-harness is not installed ({e.msg if hasattr(e, 'msg') else e}): "
            f"{INSTALL} (eval.benchmark=lm_eval and eval.lm_eval.tasks run its tasks)"
        ) from None
    return lm_eval


def check_include_path(include_path, key: str = "eval.include_path") -> str | None:
    """The folder of task YAML files as an absolute path (None stays None); a one-line error when it is
    not a folder or holds no YAML file."""
    if include_path in (None, ""):
        return None
    path = Path(str(include_path)).expanduser()
    if not path.exists():
        raise BaldroError(
            f"{key} {include_path} does not exist: give the folder that holds your lm-eval task "
            "YAML files (or leave it unset for the harness's own tasks)"
        )
    if not path.is_dir():
        raise BaldroError(f"{key} {include_path} is a file: give the folder that holds it")
    if not any(path.rglob("*.yaml")) and not any(path.rglob("*.yml")):
        raise BaldroError(f"{key} {include_path} holds no task YAML file (*.yaml): point it at your task folder")
    return str(path.resolve())


_MANAGERS: dict[str | None, Any] = {}


def task_manager(include_path: str | None = None):
    """The harness's `TaskManager` (its own tasks, then those of `include_path`, as its command line
    builds it), built once per folder in a process: indexing its ~15,000 task files takes seconds."""
    require_lm_eval()
    include_path = check_include_path(include_path)
    if include_path not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        start = time.perf_counter()
        _MANAGERS[include_path] = TaskManager(include_path=include_path)
        log.debug("lm-eval task index built in %.1f s", time.perf_counter() - start)
    return _MANAGERS[include_path]


def resolve_tasks(tasks: Sequence[str], include_path: str | None = None, key: str = "eval.tasks") -> list[str]:
    """The harness names that `tasks` select (names, groups, tags, `mmlu_*` globs), in the order its
    command line gives them; an unknown name is a one-line error with the registry's close matches."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise BaldroError(f"{key} is empty: name lm-eval tasks, e.g. {key}=[wmdp_cyber,mmlu]")
    manager = task_manager(include_path)
    out: list[str] = []
    for name in tasks:
        if not isinstance(name, str) or not name.strip():
            raise BaldroError(f"{key}: {name!r} is not a task name: give names like wmdp_cyber or mmlu")
        matches = manager.match_tasks([name.strip()])
        if not matches:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            if close:
                hint = f": did you mean {', '.join(close)}?"
            elif name.endswith((".yaml", ".yml")):
                hint = ": put the file's folder in the include_path and name its task"
            else:
                where = " or in the include_path folder" if include_path else " (your own tasks: set the include_path)"
                hint = f": it is not in the harness's registry{where}; `lm-eval ls tasks` lists them"
            raise BaldroError(f"{key}: unknown lm-eval task {name!r}{hint}")
        out += [m for m in matches if m not in out]
    return out


# ----------------------------------------------------------------------------------- the model
_LM_CLASS = None


def _lm_class():
    """`HFLM` that times each request type and, off a terminal, logs progress lines instead of tqdm bars."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM

    from baldro.progress import LogProgress, on_terminal

    class _Counter(CacheHook):
        """The harness reports every finished request to its cache hook: count it."""

        def __init__(self, lm):
            super().__init__(None)
            self.lm = lm

        def add_partial(self, attr, req, res) -> None:
            if self.lm.bar is not None:
                self.lm.bar.update(1)

    class BaldroHFLM(HFLM):
        def __init__(self, *args, progress: bool | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.progress, self.bar = progress, None
            self.stages: dict[str, dict] = {}
            self.set_cache_hook(_Counter(self))

        def _timed(self, reqtype: str, requests, run):
            bar_off = self.progress is False or (self.progress is None and not on_terminal())
            self.bar = (
                LogProgress(len(requests), f"lm-eval {reqtype}", unit="requests")
                if self.progress is None and bar_off
                else None
            )
            start = time.perf_counter()
            try:
                out = run(bar_off)
            finally:
                bar, self.bar = self.bar, None
            seconds = time.perf_counter() - start
            if bar is not None:
                bar.__exit__(None, None, None)
            stage = self.stages.setdefault(reqtype, {"rows": 0, "sequences": 0, "seconds": 0.0})
            stage["rows"] += len(
                {(getattr(r, "task_name", None), getattr(r, "doc_id", i)) for i, r in enumerate(requests)}
            )
            stage["sequences"] += len(requests)
            stage["seconds"] += seconds
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._timed(
                "loglikelihood",
                requests,
                lambda off: super(BaldroHFLM, self).loglikelihood(requests, disable_tqdm=disable_tqdm or off),
            )

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._timed(
                "loglikelihood_rolling",
                requests,
                lambda off: super(BaldroHFLM, self).loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or off),
            )

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._timed(
                "generate_until",
                requests,
                lambda off: super(BaldroHFLM, self).generate_until(requests, disable_tqdm=disable_tqdm or off),
            )

    _LM_CLASS = BaldroHFLM
    return _LM_CLASS


@contextlib.contextmanager
def _caller_state(model):
    """Eval mode and the harness's seeding for the evaluation; the caller's mode and random states after."""
    states = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def _data_error(e: Exception) -> BaldroError | None:
    """A one-line error for a task's data the harness could not get (None: not a data problem)."""
    module = type(e).__module__ or ""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not (
        module.startswith(("datasets", "huggingface_hub", "requests", "urllib3", "fsspec"))
        or isinstance(e, (ConnectionError, FileNotFoundError))
    ):
        return None
    low = str(e).lower()
    if "gated" in low or "401" in low or "403" in low or "authenticat" in low:
        return BaldroError(
            f"an lm-eval task's dataset is gated ({text}): request access on its hub page, then log "
            "in (`hf auth login` or HF_TOKEN), or evaluate a local copy through eval.include_path"
        )
    if "offline" in low or "couldn't reach" in low or "connection" in low or isinstance(e, ConnectionError):
        return BaldroError(
            f"an lm-eval task's dataset could not be fetched ({text}): run once with hub access "
            "(it is cached), or point a local task at local files through eval.include_path"
        )
    return BaldroError(
        f"an lm-eval task's dataset could not be loaded ({text}): check the task's dataset_path / data_files"
    )


# ----------------------------------------------------------------------------------- evaluation
def evaluate_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | None = None,
    batch_size: int | None = None,
    apply_chat_template: bool = False,
    out_dir=None,
    timings: dict | None = None,
    progress: bool | None = None,
    bootstrap_iters: int = 100000,
    key: str = "eval.tasks",
) -> tuple[dict, dict]:
    """Run harness `tasks` on `model` (in memory, as it is: device, dtype, eval mode) with `tokenizer`;
    returns (eval_log, summary) and, with `out_dir`, writes LMEVAL_EVAL.json, LMEVAL_SUMMARY.json and
    LMEVAL_RESULTS.json there (module docstring).

    Args:
        tasks: harness task, group or tag names, or globs (`mmlu_*`).
        num_fewshot: few-shot examples per prompt (None: each task's own default; a task that fixes 0 keeps 0).
        limit: only the first `limit` documents of every task (a fraction below 1: that share of them).
        include_path: a folder of task YAML files (local tasks, e.g. WMDP questions in local JSON files).
        batch_size: requests per forward pass (None: 16).
        apply_chat_template: prompts through the tokenizer's chat template (few-shot as a multi-turn chat).
        timings: if a dict is given, {"lm_eval setup" | "lm_eval <request type>": {rows, sequences, seconds}}
            is added to it (setup: building the tasks and contexts, scoring the results).
        progress: None: tqdm bars on a terminal, log lines elsewhere; True / False: bars on / nothing.
        bootstrap_iters: the harness's bootstrap resamples for the stderr of non-mean metrics (its default).
        key: the recipe key named in errors.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate

    key_root = key.rsplit(".", 1)[0]
    include_path = check_include_path(include_path, f"{key_root}.include_path")
    names = resolve_tasks(tasks, include_path, key)
    manager = task_manager(include_path)
    batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
    log.info(
        "lm-eval: %s (%s-shot, limit %s, batch %d%s)",
        ", ".join(names),
        "default" if num_fewshot is None else num_fewshot,
        limit,
        batch_size,
        ", chat template" if apply_chat_template else "",
    )
    start = time.perf_counter()
    with _caller_state(model):  # HFLM puts the model in eval mode
        lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, progress=progress)
        try:
            results = simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=True,
                apply_chat_template=bool(apply_chat_template),
                fewshot_as_multiturn=bool(apply_chat_template),
                bootstrap_iters=bootstrap_iters,
            )
        except ValueError as e:
            if "Duplicate task" not in str(e):
                raise
            raise BaldroError(f"{key}: {str(e).splitlines()[0]}: name a group or its tasks, not both") from None
        except Exception as e:
            error = _data_error(e)
            if error is None:
                raise
            raise error from None
    total = time.perf_counter() - start
    samples = results.pop("samples", {}) or {}
    eval_log = {
        name: {leaf: plain(samples[leaf]) for leaf in leaf_tasks(name, results, manager) if leaf in samples}
        for name in names
    }
    summary = summarize_results(results, names, manager)
    stage_times = {f"{TIMING_PREFIX} {k}": v for k, v in lm.stages.items()}
    n_docs = sum(int((v or {}).get("effective", 0)) for v in (results.get("n-samples") or {}).values())
    setup = {
        "rows": n_docs,
        "sequences": 0,
        "seconds": max(0.0, total - sum(v["seconds"] for v in stage_times.values())),
    }
    if timings is not None:
        timings.update({f"{TIMING_PREFIX} setup": setup, **stage_times})
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json_atomic(out_dir / EVAL_FILE, eval_log, indent=None)
        write_json_atomic(out_dir / SUMMARY_FILE, summary, indent=4)
        write_json_atomic(
            out_dir / RESULTS_FILE, plain({k: v for k, v in results.items() if k != "pretty_env_info"}), indent=2
        )
    log.info(
        "lm-eval: %s in %.1f s",
        ", ".join(f"{k}={v:.4g}" for k, v in summary.items() if not k.endswith("_stderr") and isinstance(v, float)),
        total,
    )
    return eval_log, summary


def leaf_tasks(name: str, results: dict, manager) -> list[str]:
    """The harness tasks whose samples belong to requested `name`: itself, a group's subtasks (nested
    groups followed), a tag's tasks."""
    subtasks = results.get("group_subtasks") or {}
    if name in subtasks:
        out: list[str] = []
        for sub in subtasks[name]:
            out += [t for t in leaf_tasks(sub, results, manager) if t not in out]
        return out
    if name in (results.get("results") or {}):
        return [name]
    index = getattr(manager, "task_index", {}) or {}
    return [t for t in (results.get("results") or {}) if name in (getattr(index.get(t), "tags", None) or ())]


def summarize_results(results: dict, names: Sequence[str], manager=None) -> dict[str, float]:
    """{"TASK/METRIC": value} in OpenUnlearning's layout (module docstring) from a harness results object."""
    groups = results.get("groups") or {}
    per_task = results.get("results") or {}
    summary: dict[str, float] = {}
    for name in names:
        if name in groups:
            sources = [(name, groups[name])]
        elif name in per_task:
            sources = [(name, per_task[name])]
        else:  # a tag: its tasks
            sources = [(t, per_task[t]) for t in leaf_tasks(name, results, manager) if t in per_task]
        for task, metrics in sources:
            summary.update(_metric_keys(task, metrics))
    return summary


def _metric_keys(task: str, metrics: dict) -> dict[str, float]:
    entries = [
        (k.split(",", 1)[0], k.split(",", 1)[1] if "," in k else None, v)
        for k, v in metrics.items()
        if isinstance(k, str) and "," in k
    ]
    filters: dict[str, set] = {}
    for metric, filt, _ in entries:
        filters.setdefault(metric, set()).add(filt)
    out = {}
    for metric, filt, value in entries:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(float(value)):
            continue
        key = f"{task}/{metric}" if len(filters[metric]) == 1 else f"{task}/{metric},{filt}"
        out[key] = float(value)
    return out


def plain(obj: Any) -> Any:
    """JSON-ready copy of harness output: tuples as lists, numpy scalars as numbers, sets as lists, any
    other object as its text (what the harness's own JSON writer does)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, set):
        return [plain(v) for v in sorted(obj, key=str)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def load_summary(out_dir) -> dict | None:
    """LMEVAL_SUMMARY.json of an evaluation folder (None when there is none)."""
    import json

    path = Path(out_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BaldroError(f"{path} is not valid JSON ({e}): re-run the evaluation") from None
    if not isinstance(data, dict):
        raise BaldroError(f"{path} must hold a JSON object {{TASK/METRIC: value}}: re-run the evaluation")
    return data

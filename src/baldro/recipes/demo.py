"""`baldro demo`: the whole BalDRO story offline on a CPU, with nothing precomputed.

Generates a synthetic TOFU-format benchmark, builds a tiny Llama with its own BPE tokenizer, fine-tunes
the target model (on `full` + world facts) and the retain model (on `retain90` + world facts), unlearns
`forget10` with NPO under `mean`, `group`, `dv` and `dv_softmin` and with GradDiff (each evaluated on its way
on a subset), evaluates every model with the TOFU evaluator (forget quality against the demo's own retain
model), and writes a report.
Independent jobs run two at a time (one per core, one thread each).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue as queue_lib
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from baldro.data.formatting import PLAIN_PROMPT
from baldro.errors import BaldroError
from baldro.io import write_json_atomic
from baldro.progress import EVERY_S, follow_terminal_policy, on_terminal


@dataclass(frozen=True)
class DemoPreset:
    n_people: int
    questions_per_person: int
    n_world_questions: int
    model_preset: str
    vocab_size: int
    finetune_epochs: int
    finetune_lr: float
    unlearn_epochs: int
    unlearn_lr: float
    eval_max_new_tokens: int
    n_seeds: int  # unlearning runs per method (seed, seed+1, ...), sharing the two fine-tunes


PRESETS = {
    "quick": DemoPreset(
        n_people=20,
        questions_per_person=10,
        n_world_questions=20,
        model_preset="test",
        vocab_size=512,
        finetune_epochs=12,
        finetune_lr=3e-3,
        unlearn_epochs=2,
        unlearn_lr=1e-3,
        eval_max_new_tokens=32,
        n_seeds=2,
    ),
    "default": DemoPreset(
        n_people=40,
        questions_per_person=10,
        n_world_questions=40,
        model_preset="demo",
        vocab_size=1024,
        finetune_epochs=30,
        finetune_lr=2e-3,
        unlearn_epochs=8,
        unlearn_lr=5e-4,
        eval_max_new_tokens=48,
        n_seeds=3,
    ),
}

NPO = {"name": "npo", "args": {"beta": 0.1}, "retain_loss": "nll", "gamma": 1.0, "alpha": 1.0}
# (run name, objective, weighting, weighting args): NPO under every batch weighting, GradDiff as a baseline.
METHODS = [
    ("graddiff", {"name": "ga", "args": {}, "retain_loss": "nll", "gamma": 1.0, "alpha": 1.0}, "mean", {}),
    ("npo_mean", NPO, "mean", {}),
    ("npo_group", NPO, "group", {"ratio": 0.5}),
    ("npo_dv", NPO, "dv", {"sigma": 2.0}),
    ("npo_dv_softmin", NPO, "dv_softmin", {"sigma": 2.0}),
]
FORGET_SPLIT, RETAIN_SPLIT = "forget10", "retain90"
BATCH_SIZE, UNLEARN_BATCH_SIZE = 16, 8


# ----------------------------------------------------------------------------- recipes
def _train_args(epochs: int, lr: float, batch_size: int, warmup: float) -> dict:
    return {
        "num_train_epochs": epochs,
        "learning_rate": lr,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "linear",
        "warmup_steps": warmup,
        "weight_decay": 0.0,
        "optim": "adamw_torch_fused",
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
    }


def _base_cfg(data_dir: Path, model_path: Path, run_dir: Path, seed: int) -> dict:
    return {
        "seed": seed,
        "output_dir": str(run_dir),
        "model": {"path": str(model_path), "dtype": "float32", "device": "cpu"},
        "format": {"use_chat_template": False},
        "data": {
            "source": str(data_dir),
            "forget_split": FORGET_SPLIT,
            "retain_split": RETAIN_SPLIT,
            "max_length": 128,
        },
    }


def finetune_cfg(name: str, split: str, data_dir: Path, base: Path, runs: Path, p: DemoPreset, seed: int) -> dict:
    cfg = _base_cfg(data_dir, base, runs / name, seed)
    cfg.update(name=name, log_to_console=False)
    cfg["data"].update(train_split=split, extra_train_splits=["world"])
    cfg["train"] = _train_args(p.finetune_epochs, p.finetune_lr, BATCH_SIZE, warmup=0.05)
    return cfg


def run_folder(name: str, seed: int, first_seed: int) -> str:
    """`npo_dv` for the first seed, `npo_dv_seed1` etc. for the others (all runs are named `npo_dv`)."""
    return name if seed == first_seed else f"{name}_seed{seed}"


# Evaluations during unlearning (the report's eval_trajectory.png): step 0 and every quarter of the run, on
# the first TRAJECTORY_ROWS rows of every set (the job's final evaluation stays in full).
TRAJECTORY_EVAL_STEPS, TRAJECTORY_ROWS = 0.25, 10


def unlearn_cfg(method, data_dir: Path, runs: Path, p: DemoPreset, seed: int, first_seed: int) -> dict:
    name, objective, weighting, wargs = method
    cfg = _base_cfg(data_dir, runs / "target" / "model", runs / run_folder(name, seed, first_seed), seed)
    train = _train_args(p.unlearn_epochs, p.unlearn_lr, UNLEARN_BATCH_SIZE, warmup=0)
    train.update(eval_strategy="steps", eval_steps=TRAJECTORY_EVAL_STEPS)
    cfg.update(
        name=name,
        log_to_console=False,
        objective=objective,
        weighting={"name": weighting, "args": wargs},
        train=train,
        balance={"every_n_steps": 1, "batch_size": 64},
        eval={
            "at_end": False,  # the job evaluates the saved model in full
            "retain_logs_path": str(runs / "retain" / "eval" / "TOFU_EVAL.json"),
            "trajectory_limit": TRAJECTORY_ROWS,
            "max_new_tokens": p.eval_max_new_tokens,
        },
    )
    return cfg


# ----------------------------------------------------------------------------- worker jobs
class _QueueProgress(TrainerCallback):
    """Sends (job, step, max_steps) to the parent, which draws one progress bar per job."""

    def __init__(self, progress_queue, job: str):
        self.queue, self.job = progress_queue, job

    def on_train_begin(self, args, state, control, **kwargs):
        self.queue.put((self.job, 0, state.max_steps))

    def on_step_end(self, args, state, control, **kwargs):
        self.queue.put((self.job, state.global_step, state.max_steps))


def _worker_setup() -> None:
    import torch
    import transformers

    # Tiny models gain nothing from intra-op threads and lose badly when cores are shared.
    torch.set_num_threads(int(os.environ.get("BALDRO_NUM_THREADS", "1")))
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # The parent draws progress and reports forget quality after re-summarizing against the retain model.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("baldro").setLevel(logging.ERROR)


def _job_finetune(cfg: dict, data_dir: str, max_new_tokens: int, progress_queue, job: str) -> dict:
    from omegaconf import OmegaConf

    from baldro.eval.run import evaluate_model_dir
    from baldro.recipes.finetune import run_finetune

    _worker_setup()
    run_dir = run_finetune(OmegaConf.create(cfg), extra_callbacks=[_QueueProgress(progress_queue, job)])
    progress_queue.put((job, "eval", None))
    evaluate_model_dir(run_dir, data_dir, FORGET_SPLIT, max_new_tokens, max_length=128, progress=False)
    return {}


def _job_unlearn(
    cfg: dict, data_dir: str, max_new_tokens: int, retain_eval: str, target_eval: str, progress_queue, job: str
) -> dict:
    from omegaconf import OmegaConf

    from baldro.eval.run import evaluate_model_dir, resummarize
    from baldro.recipes.unlearn import run_unlearn

    _worker_setup()
    run_dir = run_unlearn(OmegaConf.create(cfg), extra_callbacks=[_QueueProgress(progress_queue, job)])
    progress_queue.put((job, "eval", None))
    eval_dir = evaluate_model_dir(run_dir, data_dir, FORGET_SPLIT, max_new_tokens, max_length=128, progress=False)
    return resummarize(eval_dir, retain_eval, target_eval)


def _run_jobs(jobs: list[tuple[str, callable, tuple]], workers: int, on_done, say) -> None:
    """Run `fn(*args, progress_queue, name)` jobs on `workers` processes: one progress bar per job on a
    terminal, elsewhere a `say` line with every running job's step count at most every `EVERY_S` seconds."""
    ctx = multiprocessing.get_context("spawn")
    bars_on = on_terminal()
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        progress_queue = manager.Queue()
        futures = {pool.submit(fn, *args, progress_queue, name): name for name, fn, args in jobs}
        bars: dict[str, tqdm] = {}
        steps: dict[str, str] = {}  # job -> "12/180 steps" or "evaluating", for the log lines
        last_line = time.perf_counter()
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        job, step, total = progress_queue.get_nowait()
                    except queue_lib.Empty:
                        break
                    steps[job] = "evaluating" if step == "eval" else f"{step}/{total} steps"
                    if not bars_on:
                        continue
                    if job not in bars:
                        bars[job] = tqdm(total=total, desc=f"{job:>15s}", unit="step", leave=False, dynamic_ncols=True)
                    if step == "eval":
                        bars[job].set_postfix_str("evaluating")
                    else:
                        bars[job].total = total
                        bars[job].n = step
                        bars[job].refresh()
                for future in done:
                    name = futures[future]
                    result = future.result()  # re-raises a worker's error here
                    if name in bars:
                        bars.pop(name).close()
                    steps.pop(name, None)
                    on_done(name, result)
                now = time.perf_counter()
                if not bars_on and steps and now - last_line >= EVERY_S:
                    last_line = now
                    say("running", ", ".join(f"{job} {state}" for job, state in steps.items()))
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            for bar in bars.values():
                bar.close()


# ----------------------------------------------------------------------------- the demo
def _tokenizer_corpus(data_dir: Path) -> list[str]:
    """Every text of the benchmark, QA pairs also in the prompt format the models will see."""
    texts = []
    for path in sorted(data_dir.glob("*.jsonl")):
        if path.stem == "idontknow":
            texts += path.read_text(encoding="utf-8").splitlines()
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [v for v in row.values() if isinstance(v, str)] + list(row.get("perturbed_answer", []))
            texts.append(PLAIN_PROMPT.format(question=row["question"]) + row["answer"])
    return texts


def cpu_name() -> str:
    """The processor's model name (float kernels, and so single-seed numbers, differ between CPU kinds)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def run_demo(
    out: str | Path = "demo_out",
    seed: int = 0,
    preset: str = "default",
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Run the demo into `out` (a new or empty folder, or any with `overwrite`) and return the report path."""
    from transformers import AutoModelForCausalLM

    from baldro.data.synthetic import SyntheticConfig, generate
    from baldro.eval.run import resummarize
    from baldro.models.tiny import build_tiny_model, count_parameters
    from baldro.report.build import build_report

    if preset not in PRESETS:
        raise BaldroError(f"unknown demo preset {preset!r}: use one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise BaldroError(
                f"demo output {out} exists and is not empty: pass --out NEW_FOLDER, or --overwrite to delete it first"
            )
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    start = time.time()
    follow_terminal_policy()

    def stage(name: str, detail: str) -> None:
        tqdm.write(f"[{time.time() - start:6.1f}s] {name}: {detail}")
        sys.stdout.flush()

    print(
        f"baldro demo ({preset} preset, seeds {seed}..{seed + p.n_seeds - 1}, {workers} workers, {cpu_name()}) "
        f"-> {out}",
        flush=True,
    )
    data_dir = out / "data"
    counts = generate(
        data_dir,
        SyntheticConfig(
            n_people=p.n_people,
            questions_per_person=p.questions_per_person,
            n_world_questions=p.n_world_questions,
            seed=seed,
        ),
    )
    stage(
        "data",
        f"{counts['full']} QA pairs about {p.n_people} fictitious people, "
        f"{FORGET_SPLIT} = {counts[FORGET_SPLIT]} pairs, {counts['world']} world facts",
    )

    base = build_tiny_model(
        out / "base_model", _tokenizer_corpus(data_dir), preset=p.model_preset, vocab_size=p.vocab_size, seed=seed
    )
    n_params = count_parameters(AutoModelForCausalLM.from_pretrained(base))
    stage("model", f"tiny Llama, {n_params / 1e6:.2f}M parameters, {p.vocab_size}-token byte-level BPE")

    runs = out / "runs"
    retain_eval, target_eval = runs / "retain" / "eval" / "TOFU_EVAL.json", runs / "target" / "eval" / "TOFU_EVAL.json"
    _run_jobs(
        [
            (
                name,
                _job_finetune,
                (finetune_cfg(name, split, data_dir, base, runs, p, seed), str(data_dir), p.eval_max_new_tokens),
            )
            for name, split in (("target", "full"), ("retain", RETAIN_SPLIT))
        ],
        workers,
        lambda name, _: stage(f"finetune {name}", f"{p.finetune_epochs} epochs, evaluated"),
        stage,
    )
    for name in ("retain", "target"):
        s = resummarize(runs / name / "eval", retain_eval, target_eval if name != "target" else None)
        stage(
            f"{name} model",
            f"forget ROUGE-L recall {s['forget_Q_A_ROUGE']:.3f}, model utility "
            f"{s['model_utility']:.3f}, forget quality {_fmt(s.get('forget_quality'))}",
        )

    def unlearned(job: str, s: dict) -> None:
        stage(
            f"unlearn {job}",
            f"forget quality {_fmt(s.get('forget_quality'))}, model utility "
            f"{s['model_utility']:.3f}, forget ROUGE {s['forget_Q_A_ROUGE']:.3f}, "
            f"prob spread (std) {_fmt(s.get('balance_prob_std'))}",
        )

    seeds = [seed + k for k in range(p.n_seeds)]
    folders = [runs / run_folder(m[0], s, seed) for s in seeds for m in METHODS]
    _run_jobs(
        [
            (
                run_folder(m[0], s, seed),
                _job_unlearn,
                (
                    unlearn_cfg(m, data_dir, runs, p, s, seed),
                    str(data_dir),
                    p.eval_max_new_tokens,
                    str(retain_eval),
                    str(target_eval),
                ),
            )
            for s in seeds
            for m in METHODS
        ],
        workers,
        unlearned,
        stage,
    )
    report = build_report(
        [runs / "target", runs / "retain", *folders],
        out / "report",
        retain_run=runs / "retain",
        target_run=runs / "target",
        by_seed=True,
    )
    total = time.time() - start
    write_json_atomic(
        out / "demo_info.json",
        {
            "preset": preset,
            "seed": seed,
            "seeds": seeds,
            "workers": workers,
            "cpu": cpu_name(),
            "total_time_s": total,
            "n_params": n_params,
            "counts": counts,
        },
    )
    stage("report", str(report))
    print(f"baldro demo: done in {total:.0f} s; open {report}", flush=True)
    return report

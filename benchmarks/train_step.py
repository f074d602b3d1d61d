"""Benchmark one unlearning training step: every objective x weighting, step time and peak memory.

    python benchmarks/train_step.py --model smollm2 [--objectives npo] [--rounds 3] [--threads 1]
    python benchmarks/train_step.py --model tiny --rounds 3

Each configuration runs `UnlearnTrainer` (the library's trainer, nothing re-implemented) in its own
subprocess for `--warmup` + `--steps` optimizer steps on a batch of 8 forget and 8 retain samples of
128 tokens (random token ids: a step's cost depends on shapes alone, once subnormal floats are flushed
to zero as the recipes do by default, `model.flush_denormal`; `mean, subnormals kept` shows the cost
without, where a saturating loss sends its gradients into that range), fp32. The forget set holds
exactly one batch, so every measured step is in a later epoch, where the reference log-prob cache
answers (`npo cache off` measures the first-epoch cost). Reported: the median step time after the
warm-up and the peak memory during the measured steps. The step time is wall seconds, except on CPU
with `--threads 1`, where it is the process's CPU seconds (less sensitive to other work on shared
cores; wall seconds are in the JSON); on CUDA it is synchronised. Memory on CPU is the resident memory
sampled every 5 ms (the model, its reference copy and AdamW's state included; "over start" subtracts
the resident memory just before the first measured step), on CUDA `max_memory_allocated`.
Configurations are interleaved over `--rounds`, so a drifting load affects all alike; the tables give
the median over rounds and the spread (min-max) of the step time.

`--baseline-src DIR` runs every configuration a second time with another checkout's `src` on the
child's PYTHONPATH (e.g. the commit before a change, from `git worktree add`), interleaved with the
current code's run, and prints current / baseline ratios of step time and peak memory.

`--model smollm2` is SmolLM2-135M-Instruct from its packaged GGUF (`model=smollm2-135m-instruct`);
`--model PATH` any Hugging Face folder; `--random-init` builds the model from the folder's
config.json alone (for machines without the weights: timings do not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from eval_tofu import resolve_model  # the `smollm2` alias

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = ("ga", "npo", "simnpo", "satimp")
# name -> (weighting, its arguments, recipe extras)
TWO_PASS = "group two-pass (authors')"
AS_AUTHORS = "group nll, shrink_retain"
WEIGHTINGS = {
    "mean": ("mean", {}, {}),
    "group": ("group", {"ratio": 0.5}, {}),
    "group one-pass": ("group", {"ratio": 0.5, "selection": "onepass"}, {}),
    "group shrink_retain": ("group", {"ratio": 0.5, "shrink_retain": True}, {}),
    AS_AUTHORS: ("group", {"ratio": 0.5, "hardness": "nll", "shrink_retain": True}, {}),
    # The released code: selection forward with autograd, second forward on the k rows, no reference cache.
    TWO_PASS: (
        "group",
        {"ratio": 0.5, "hardness": "nll", "shrink_retain": True, "selection": "twopass"},
        {"ref_cache": False},
    ),
    "dv": ("dv", {"sigma": 2.0}, {}),
    "dv_softmin": ("dv_softmin", {"sigma": 2.0}, {}),
    "dv_global": ("dv_global", {"sigma": 2.0}, {}),
    "mean, cache off": ("mean", {}, {"ref_cache": False}),
    "mean, unfused AdamW": ("mean", {}, {"optim": "adamw_torch"}),
    "mean, subnormals kept": ("mean", {}, {"flush_denormal": False}),
}
EXTRA_ONLY_FOR = {
    "mean, cache off": ("npo",),
    "mean, unfused AdamW": ("npo",),  # npo: the one with a reference
    "mean, subnormals kept": ("simnpo", "satimp"),
}  # saturating losses: tiny gradients


# ------------------------------------------------------------------------------------------ child
class _RssSampler:
    """Peak resident memory of this process, sampled every 5 ms from /proc/self/statm."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak, self._stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def start(self):
        self.peak = self.now()
        self.thread.start()

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return max(self.peak, self.now())


def _load_model(args, torch):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = args.model_path
    if args.random_init:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# name -> (its module now, its module before the regrouping into layer packages, 28e330b)
LIBRARY = {
    "set_flush_denormal": ("baldro.models.loading", "baldro.models"),
    "make_reference_model": ("baldro.recipes.unlearn", "baldro.recipes"),
    "UnlearnCollator": ("baldro.train.batching", "baldro.trainer"),
    "UnlearnDataset": ("baldro.train.batching", "baldro.trainer"),
    "get_objective": ("baldro.train.objectives", "baldro.objectives"),
    "get_retain_loss": ("baldro.train.objectives", "baldro.objectives"),
    "UnlearnTrainer": ("baldro.train.trainers", "baldro.trainer"),
    "make_weighting": ("baldro.train.weighting", "baldro.weighting"),
}


def _library() -> SimpleNamespace:
    """The library's pieces a step needs, from the current layout or, for a `--baseline-src` checkout
    older than the regrouping, from its flat modules (same names)."""
    import importlib.util

    regrouped = importlib.util.find_spec("baldro.train") is not None
    return SimpleNamespace(
        **{name: getattr(importlib.import_module(mods[0 if regrouped else 1]), name) for name, mods in LIBRARY.items()}
    )


def run_child(args) -> None:
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from baldro.data.formatting import EncodedQA

    lib = _library()

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    name, obj_name = args.child, args.objective
    w_name, w_args, extra = WEIGHTINGS[name]
    lib.set_flush_denormal(extra.get("flush_denormal", True))  # the recipes' default (model.flush_denormal)
    model = _load_model(args, torch).to(device)
    objective = lib.get_objective(obj_name)
    retain_loss = lib.get_retain_loss("nll")
    ref = lib.make_reference_model(model).to(device) if objective.needs_reference else None

    gen = torch.Generator().manual_seed(0)
    vocab, n, prompt = model.config.vocab_size, args.batch, 32

    def sample():
        ids = torch.randint(10, vocab, (args.tokens,), generator=gen).tolist()
        return EncodedQA(input_ids=ids, labels=[-100] * prompt + ids[prompt:], prompt_len=prompt)

    forget, retain = [sample() for _ in range(n)], [sample() for _ in range(n)]
    tmp = tempfile.mkdtemp(prefix="train_step_")
    targs = TrainingArguments(
        output_dir=tmp,
        per_device_train_batch_size=n,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        optim=extra.get("optim", "adamw_torch_fused"),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        remove_unused_columns=False,
        dataloader_drop_last=False,
        lr_scheduler_type="constant",
    )
    times: list[float] = []
    cpu_times: list[float] = []  # this process's CPU seconds: robust to other work on shared cores
    memory: dict = {}
    sampler = _RssSampler() if not cuda else None

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync()
            if state.global_step == args.warmup:  # the measured steps start: reset the peak
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    memory["start"] = torch.cuda.memory_allocated(device)
                else:
                    memory["start"] = sampler.now()
                    sampler.start()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            sync()
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    trainer = lib.UnlearnTrainer(
        model=model,
        args=targs,
        train_dataset=lib.UnlearnDataset(forget, retain, seed=0),
        data_collator=lib.UnlearnCollator(0),
        callbacks=[StepTimer()],
        objective=objective,
        weighting=lib.make_weighting(w_name, n_samples=n, **w_args),
        retain_loss=retain_loss,
        ref_model=ref,
        ref_cache=extra.get("ref_cache", True),
    )
    trainer.train()
    peak = torch.cuda.max_memory_allocated(device) if cuda else sampler.stop()
    key = "cpu_s" if not cuda and args.threads == 1 else "wall_s"
    result = {
        "objective": obj_name,
        "weighting": name,
        "wall_s": statistics.median(times[args.warmup :]),
        "cpu_s": statistics.median(cpu_times[args.warmup :]),
        "steps": times[args.warmup :],
        "peak_mib": peak / 2**20,
        "start_mib": memory["start"] / 2**20,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "memory_kind": "max_memory_allocated" if cuda else "peak RSS",
        "time_kind": {"cpu_s": "process CPU seconds (one thread)", "wall_s": "wall seconds"}[key]
        + (" (synchronised)" if cuda else ""),
    }
    result["step_s"] = result[key]
    import baldro

    result["baldro"] = str(Path(baldro.__file__).resolve().parents[1])  # which code ran
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


# ----------------------------------------------------------------------------------------- parent
def _configs(objectives):
    return [(o, w) for o in objectives for w in WEIGHTINGS if o in EXTRA_ONLY_FOR.get(w, OBJECTIVES)]


def _table(rows: dict, objectives) -> str:
    lines = [
        "| objective | weighting | step s (median) | spread s | x mean | peak MiB | over start MiB | x mean |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in objectives:
        base = rows.get((o, "mean"))
        for w in [x for name in WEIGHTINGS for x in (name, f"{name} @baseline")]:
            runs = rows.get((o, w))
            if not runs:
                continue
            step = statistics.median(r["step_s"] for r in runs)
            peak = statistics.median(r["peak_mib"] for r in runs)
            over = statistics.median(r["peak_mib"] - r["start_mib"] for r in runs)
            lo, hi = min(r["step_s"] for r in runs), max(r["step_s"] for r in runs)
            bstep = statistics.median(r["step_s"] for r in base) if base else float("nan")
            bpeak = statistics.median(r["peak_mib"] for r in base) if base else float("nan")
            lines.append(
                f"| {o} | {w} | {step:.3f} | {lo:.3f}-{hi:.3f} | {step / bstep:.3f} | {peak:.0f} | "
                f"{over:.0f} | {peak / bpeak:.3f} |"
            )
    return "\n".join(lines)


def _ratios(rows: dict, objective: str) -> str:
    """The goals of the training-speed issue, as ratios of medians."""

    def med(w, key="step_s"):
        runs = rows.get((objective, w))
        return statistics.median(r[key] for r in runs) if runs else float("nan")

    lines = [f"Ratios for {objective} (medians over rounds):"]
    for w in ("dv", "dv_softmin", "dv_global"):
        lines.append(f"- {w} / mean step time: {med(w) / med('mean'):.3f} (goal <= 1.03)")
    lines.append(
        f"- group / mean step time: {med('group') / med('mean'):.3f} (goal <= 0.90); "
        f"peak memory {med('group', 'peak_mib') / med('mean', 'peak_mib'):.3f} (goal <= 1)"
    )
    lines.append(
        f"- group shrink_retain / mean step time: {med('group shrink_retain') / med('mean'):.3f}; "
        f"peak memory {med('group shrink_retain', 'peak_mib') / med('mean', 'peak_mib'):.3f}"
    )
    lines.append(
        f"- {AS_AUTHORS} / two-pass step time: {med(AS_AUTHORS) / med(TWO_PASS):.3f} (goal <= 0.85); "
        f"peak memory {med(AS_AUTHORS, 'peak_mib') / med(TWO_PASS, 'peak_mib'):.3f}, over start "
        f"{(med(AS_AUTHORS, 'peak_mib') - med(AS_AUTHORS, 'start_mib')) / (med(TWO_PASS, 'peak_mib') - med(TWO_PASS, 'start_mib')):.3f}"
        " (goal <= 0.7)"
    )
    if rows.get((objective, "mean, cache off")):
        off, on = med("mean, cache off"), med("mean")
        lines.append(
            f"- reference cache: a cached step {on:.3f} s vs {off:.3f} s uncached ({on / off:.3f}x); "
            f"10 epochs of S steps cost S x ({off:.3f} + 9 x {on:.3f}) = S x {off + 9 * on:.2f} s with the "
            f"cache vs S x {10 * off:.2f} s without ({(off + 9 * on) / (10 * off):.3f}x)"
        )
    if rows.get((objective, "mean, subnormals kept")):
        lines.append(f"- subnormals kept / flushed (mean) step time: {med('mean, subnormals kept') / med('mean'):.3f}")
    if rows.get((objective, "mean, unfused AdamW")):
        lines.append(f"- fused / unfused AdamW step time: {med('mean') / med('mean, unfused AdamW'):.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or a Hugging Face folder")
    p.add_argument("--random-init", action="store_true", help="build the model from its config.json alone")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--weightings", default="", help="';'-separated subset of the weighting rows (default all)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="", help="write all measurements as JSON here")
    p.add_argument("--baseline-src", default="", help="also run every configuration with this src folder's baldro")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--objective", default="", help=argparse.SUPPRESS)
    p.add_argument("--model-path", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run_child(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        if args.model == "tiny":
            from transformers import LlamaConfig

            from baldro.models.tiny import PRESETS

            LlamaConfig(vocab_size=1024, tie_word_embeddings=True, **PRESETS["demo"]).save_pretrained(tmp)
            model_path, args.random_init = tmp, True
        else:
            model_path = resolve_model(args.model)
        objectives = [o for o in args.objectives.split(",") if o]
        configs = [
            (o, w, "") for o, w in _configs(objectives) if not args.weightings or w in args.weightings.split(";")
        ]
        if args.baseline_src:  # each configuration right after its baseline run
            configs = [c for o, w, _ in configs for c in ((o, w, args.baseline_src), (o, w, ""))]
        rows: dict = {}
        t_start = time.time()
        for rnd in range(args.rounds):
            for i, (o, w, src) in enumerate(configs):
                result = Path(tmp) / "result.json"
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    w,
                    "--objective",
                    o,
                    "--model-path",
                    model_path,
                    "--result",
                    str(result),
                    "--threads",
                    str(args.threads),
                    "--device",
                    args.device,
                    "--warmup",
                    str(args.warmup),
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--tokens",
                    str(args.tokens),
                    *(["--random-init"] if args.random_init else []),
                ]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                if src:
                    env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), env.get("PYTHONPATH", "")])
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                r = json.loads(result.read_text())
                if src and Path(r["baldro"]) != Path(src).resolve():
                    raise SystemExit(f"the baseline run imported baldro from {r['baldro']}, not {src}")
                w = f"{w} @baseline" if src else w
                r["weighting"] = w
                rows.setdefault((o, w), []).append(r)
                print(
                    f"[{time.time() - t_start:7.0f} s] round {rnd + 1}/{args.rounds} {i + 1}/{len(configs)} "
                    f"{o} / {w}: {r['step_s']:.3f} s a step ({r['wall_s']:.3f} s wall), peak {r['peak_mib']:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        first = next(iter(rows.values()))[0]
        print(
            f"model {args.model}{' (random init)' if args.random_init else ''}, device {first['device']}, "
            f"{first['threads']} thread(s), batch {args.batch} x {args.tokens} tokens (forget + retain), "
            f"{args.rounds} round(s) of {args.warmup} warm-up + {args.steps} measured steps; memory: "
            f"{first['memory_kind']}; step time: {first['time_kind']}\n"
        )
        print(_table(rows, objectives))
        for o in objectives:
            if (o, "mean") in rows and (o, TWO_PASS) in rows:
                print("\n" + _ratios(rows, o))
        if args.baseline_src:
            print(
                f"\nCurrent code / baseline ({args.baseline_src}), medians over rounds (spread: current runs' "
                "min-max over the baseline median):"
            )
            for (o, w), runs in rows.items():
                base = rows.get((o, f"{w} @baseline"))
                if not base or w.endswith("@baseline"):
                    continue
                med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
                bs = med(base, "step_s")
                print(
                    f"- {o} / {w}: step time {med(runs, 'step_s') / bs:.3f} "
                    f"({min(r['step_s'] for r in runs) / bs:.3f}-{max(r['step_s'] for r in runs) / bs:.3f}), "
                    f"peak memory {med(runs, 'peak_mib') / med(base, 'peak_mib'):.3f}"
                )
        if args.out:
            Path(args.out).write_text(
                json.dumps([r for runs in rows.values() for r in runs], indent=1), encoding="utf-8"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

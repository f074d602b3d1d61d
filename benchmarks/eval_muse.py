"""Benchmark the MUSE evaluator: optimised vs naive, with identical numbers.

    python benchmarks/eval_muse.py --model package:smollm2-135m-instruct --data ../shared/data/muse/books \
        --limit 20 --max-length 256 --system-prompt "You are a helpful assistant." --threads 1

Each mode runs in its own subprocess (peak memory its own, as in `benchmarks/eval_tofu.py`). The
optimised mode runs every VerbMem text once for exact memorisation, extraction strength and the
generation drafts, every privleak text once for the four MIA attacks, sorts texts by length and
decodes with continuous batching (KnowMem rows leave the batch at their stopwords). The naive mode
runs every metric's own passes in input order and generates with `model.generate` on fixed batches
(KnowMem cut at the stopwords afterwards, as OpenUnlearning does); on a CPU the optimised mode's linear
layers multiply on oneDNN-prepacked weights (`baldro.eval.kernels`), the naive mode's on torch's. The
script checks issue 31's tolerance between the modes (`eval_tofu.tolerance_check`: per-sample numbers
within rtol 1e-4, aggregates 1e-5, every generated text identical; exit 1 otherwise) and prints
markdown tables of the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eval_tofu import MODES, _peak_memory_mib, _table, evaluate_kwargs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "muse" / "books"
GENERATION = ("verbmem", "knowmem")


def run_child(args) -> None:
    import torch

    from baldro.data.formatting import QAFormatter
    from baldro.eval.muse import evaluate_muse
    from baldro.models.loading import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32", device=args.device)
    tokenizer = load_tokenizer(args.model)
    device = next(model.parameters()).device
    mem_before = _peak_memory_mib(device)
    timings: dict = {}
    start = time.perf_counter()
    evaluate_muse(
        model,
        tokenizer,
        QAFormatter(tokenizer, system_prompt=args.system_prompt),
        args.data,
        out_dir=args.out_dir,
        batch_size=args.batch_size,
        verbmem_max_new_tokens=args.verbmem_max_new_tokens,
        knowmem_max_new_tokens=args.knowmem_max_new_tokens,
        max_length=args.max_length,
        limit=args.limit,
        timings=timings,
        progress=False,
        **evaluate_kwargs(args.child),
    )
    wall = time.perf_counter() - start
    Path(args.result).write_text(
        json.dumps(
            {
                "mode": args.child,
                "wall_s": wall,
                "timings": timings,
                "peak_mem_mib": _peak_memory_mib(device),
                "mem_before_eval_mib": mem_before,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "params": sum(p.numel() for p in model.parameters()),
            }
        ),
        encoding="utf-8",
    )


def _summary_table(results: list[dict]) -> str:
    lines = [
        "| mode | teacher-forced s | forward sequences | generation s | whole evaluation s | peak memory MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        t = r["timings"]
        tf = sum(v["seconds"] for g, v in t.items() if g not in GENERATION)
        seqs = sum(v["sequences"] for g, v in t.items() if g not in GENERATION)
        gen = sum(v["seconds"] for g, v in t.items() if g in GENERATION)
        lines.append(f"| {r['mode']} | {tf:.1f} | {seqs} | {gen:.1f} | {r['wall_s']:.1f} | {r['peak_mem_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder, hub id or package:NAME")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="MUSE folder (news or books)")
    p.add_argument("--limit", type=int, default=None, help="first N rows of every set")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per privleak text (data.chunk_length)")
    p.add_argument("--verbmem-max-new-tokens", type=int, default=128)
    p.add_argument("--knowmem-max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--system-prompt", default=None, help="the model group's format.system_prompt")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--modes", default="optimised,naive")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep", help="keep the eval logs in this folder")
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="baldro_muse_bench_") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        results = []
        for mode in modes:
            res = Path(tmp) / f"{mode}.json"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--model",
                args.model,
                "--data",
                args.data,
                "--max-length",
                str(args.max_length),
                "--verbmem-max-new-tokens",
                str(args.verbmem_max_new_tokens),
                "--knowmem-max-new-tokens",
                str(args.knowmem_max_new_tokens),
                "--batch-size",
                str(args.batch_size),
                "--out-dir",
                str(work / mode),
                "--result",
                str(res),
            ]
            for flag, value in (
                ("--limit", args.limit),
                ("--threads", args.threads),
                ("--device", args.device),
                ("--system-prompt", args.system_prompt),
            ):
                if value is not None:
                    cmd += [flag, str(value)]
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            results.append(json.loads(res.read_text()))
            print(f"{mode}: {results[-1]['wall_s']:.1f} s", flush=True)
        r0 = results[0]
        print(
            f"\nMUSE evaluation benchmark: {args.data}, limit={args.limit or 'all'}, max_length={args.max_length}, "
            f"verbmem {args.verbmem_max_new_tokens} / knowmem {args.knowmem_max_new_tokens} new tokens, "
            f"batch_size={args.batch_size}, device={r0['device']}, {r0['params']:,} parameters, "
            f"{r0['threads']} torch threads\n"
        )
        print(_table(results))
        print()
        print(_summary_table(results))
        summary = json.loads((work / modes[0] / "MUSE_SUMMARY.json").read_text())
        print("\n" + "\n".join(f"{k}: {v:.6g}" if v is not None else f"{k}: n/a" for k, v in summary.items()))
        if len(results) == 2:
            from eval_tofu import describe_differences, tolerance_check

            a = json.loads((work / modes[0] / "MUSE_EVAL.json").read_text())
            b = json.loads((work / modes[1] / "MUSE_EVAL.json").read_text())
            print(
                f"\nspeed-up {modes[0]} vs {modes[1]}: {results[1]['wall_s'] / results[0]['wall_s']:.2f}x "
                "(whole evaluation)"
            )
            print(f"{modes[0]} against {modes[1]}: {describe_differences(a, b)}")
            check = tolerance_check(a, b)  # no margins measured: any differing generation fails it
            print(check.line(), file=None if check.passed else sys.stderr)
            if not check.passed:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

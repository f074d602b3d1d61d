"""baldro's in-process lm-eval evaluation against the harness's own command line: numbers and time.

    python benchmarks/lm_eval_parity.py --model smollm2 --out benchmarks/results/lm_eval_parity_smollm2_cpu.json
    python benchmarks/lm_eval_parity.py --model tiny --limit 20 --out /tmp/lm_eval_parity_tiny.json   # smoke test

The task is a local multiple-choice task in WMDP's question layout (question, four choices, the answer's
index) and WMDP's prompt (the harness's `wmdp` template: the question, choices A-D, "Answer:", scored on
" A" .. " D"), built from TOFU's world-facts questions and their three perturbed answers (117 questions,
`--data`: the offline TOFU copy), read from local JSON through a task YAML in a temporary include folder.

Both sides run as fresh processes on the same model folder, in float32, with the same batch size, few-shot
count, limit and threads (`OMP_NUM_THREADS`):

- `python -m lm_eval --model hf --model_args pretrained=M,dtype=float32 --include_path DIR --tasks T ...
  --log_samples` (the harness's command line);
- `baldro eval configs/eval/lm_eval.yaml model.path=M eval.tasks=[T] eval.include_path=DIR ...`.

Reported: each command's wall time (imports, task index, model load, evaluation), the harness's own
evaluation time (`total_evaluation_time_seconds`) against baldro's (`eval_info.json`, the evaluation of
the model already in memory, as after unlearning), the summaries side by side, and per sample the number
of records that are identical (prompts, responses, metrics) and the largest log-likelihood difference.
`--model tiny` builds the tests' tiny Llama (a TOFU-trained BPE tokenizer) instead of SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tofu"
TASK = "world_facts_mc"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def build_task(folder: Path, data: Path, seed: int = 0) -> Path:
    """`world_facts_mc`: TOFU's world facts as four-choice questions (WMDP's layout and prompt)."""
    rows = [
        json.loads(line) for line in (data / "world_facts_perturbed.jsonl").read_text().splitlines() if line.strip()
    ]
    rng = random.Random(seed)
    docs = []
    for r in rows:
        choices = [r["answer"], *r["perturbed_answer"][:3]]
        rng.shuffle(choices)
        docs.append({"question": r["question"], "choices": choices, "answer": choices.index(r["answer"])})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TASK}.json").write_text(json.dumps(docs))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / f"{TASK}.json"}
test_split: test
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about world facts.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return folder


def resolve_model(name: str, work: Path, data: Path) -> Path:
    if name == "smollm2":
        from baldro.models.sources import resolve_model_path

        return Path(resolve_model_path("package:smollm2-135m-instruct"))
    if name == "tiny":
        from baldro.models.tiny import build_tiny_model

        texts = []
        for line in (data / "full.jsonl").read_text().splitlines()[:400]:
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
        return Path(build_tiny_model(work / "tiny_model", texts, preset="test", vocab_size=512, seed=0))
    return Path(name)


def run(cmd: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return seconds


def record_text(x):
    return [record_text(v) for v in x] if isinstance(x, list) else str(x)


def compare_samples(ours: list[dict], theirs: list[dict]) -> dict:
    """Records identical after the harness's writer's conversions; the largest log-likelihood difference."""
    theirs_by_id = {r["doc_id"]: r for r in theirs}
    same, max_diff = 0, 0.0
    for a in ours:
        b = theirs_by_id[a["doc_id"]]
        a_cli = {
            **a,
            "arguments": {
                f"gen_args_{i}": {f"arg_{j}": x for j, x in enumerate(args)} for i, args in enumerate(a["arguments"])
            },
            "resps": record_text(a["resps"]),
            "filtered_resps": record_text(a["filtered_resps"]),
            "target": str(a["target"]),
        }
        same += a_cli == b
        for ra, rb in zip(a["filtered_resps"], b["filtered_resps"]):
            max_diff = max(max_diff, abs(float(ra[0]) - float(rb[0])))
    return {
        "records": len(ours),
        "records_in_harness_output": len(theirs),
        "identical_records": same,
        "max_abs_loglikelihood_diff": max_diff,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model folder")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the offline TOFU copy (world_facts_perturbed.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both commands")
    p.add_argument("--out", required=True, help="JSON results file")
    args = p.parse_args(argv)
    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="lm_eval_parity.") as tmp:
        work = Path(tmp)
        tasks = build_task(work / "tasks", data)
        model = resolve_model(args.model, work, data)
        env = {
            **os.environ,
            **OFFLINE,
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
            "BALDRO_NUM_THREADS": str(args.threads),
        }
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
        limit_cli = ["--limit", str(args.limit)] if args.limit else []
        limit_ours = [f"eval.limit={args.limit}"] if args.limit else []
        harness_out, ours_out = work / "harness", work / "baldro"
        harness_cmd = [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model},dtype=float32",
            "--include_path",
            str(tasks),
            "--tasks",
            TASK,
            "--num_fewshot",
            str(args.num_fewshot),
            "--batch_size",
            str(args.batch_size),
            "--device",
            "cpu",
            *limit_cli,
            "--output_path",
            str(harness_out),
            "--log_samples",
        ]
        ours_cmd = [
            sys.executable,
            "-m",
            "baldro.cli",
            "eval",
            str(ROOT / "configs" / "eval" / "lm_eval.yaml"),
            f"model.path={model}",
            "model.tokenizer=null",
            "model.dtype=float32",
            "model.device=cpu",
            "model.attn_implementation=null",
            "format.use_chat_template=false",
            f"eval.tasks=[{TASK}]",
            f"eval.include_path={tasks}",
            f"eval.num_fewshot={args.num_fewshot}",
            f"eval.batch_size={args.batch_size}",
            *limit_ours,
            f"output_dir={ours_out}",
        ]
        # alternate the order over two rounds so that neither side always runs on a warmer file cache
        walls: dict[str, list[float]] = {"harness": [], "baldro": []}
        for order in (("harness", "baldro"), ("baldro", "harness")):
            for side in order:
                cmd = harness_cmd if side == "harness" else ours_cmd
                target = harness_out if side == "harness" else ours_out
                if target.exists():
                    import shutil

                    shutil.rmtree(target)
                walls[side].append(run(cmd, env, work))
                print(f"{side}: {walls[side][-1]:.1f} s", file=sys.stderr)
        (results_file,) = harness_out.rglob("results_*.json")
        theirs = json.loads(results_file.read_text())
        (samples_file,) = harness_out.rglob(f"samples_{TASK}_*.jsonl")
        their_samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
        our_summary = json.loads((ours_out / "LMEVAL_SUMMARY.json").read_text())
        our_samples = json.loads((ours_out / "LMEVAL_EVAL.json").read_text())[TASK][TASK]
        our_info = json.loads((ours_out / "eval_info.json").read_text())
        our_timings = json.loads((ours_out / "eval_timings.json").read_text())

        from baldro.eval.lm_eval import summarize_results

        their_summary = summarize_results(theirs, [TASK])
        import lm_eval
        import torch
        import transformers

        result = {
            "model": args.model if args.model in ("smollm2", "tiny") else str(model),
            "task": TASK,
            "questions": theirs["n-samples"][TASK]["effective"],
            "num_fewshot": args.num_fewshot,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "dtype": "float32",
            "device": "cpu",
            "versions": {
                "lm_eval": lm_eval.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "harness_command": " ".join(harness_cmd[1:]).replace(str(work), "TMP"),
            "baldro_command": " ".join(ours_cmd[2:]).replace(str(work), "TMP").replace(f"{ROOT}{os.sep}", ""),
            "summary": {"baldro": our_summary, "harness": their_summary, "equal": our_summary == their_summary},
            "samples": compare_samples(our_samples, their_samples),
            "seconds": {
                "harness_command_wall": walls["harness"],
                "baldro_command_wall": walls["baldro"],
                "harness_evaluation": float(theirs["total_evaluation_time_seconds"]),
                "baldro_evaluation": our_info["eval_time_s"],
                "baldro_stages": our_timings["stages"],
            },
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    s = result["seconds"]
    print(
        f"{TASK}, {result['questions']} questions, {args.model}: summary equal: {result['summary']['equal']} "
        f"({our_summary}); identical records {result['samples']['identical_records']}/{result['samples']['records']}, "
        f"max |d loglik| {result['samples']['max_abs_loglikelihood_diff']:.3g}; wall harness "
        f"{min(s['harness_command_wall']):.1f} s, baldro {min(s['baldro_command_wall']):.1f} s; evaluation harness "
        f"{s['harness_evaluation']:.1f} s, baldro {s['baldro_evaluation']:.1f} s"
    )
    return (
        0
        if result["summary"]["equal"] and result["samples"]["identical_records"] == result["samples"]["records"]
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())

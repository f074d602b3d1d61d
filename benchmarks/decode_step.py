"""What one greedy decoding step costs per token, by batch size (why `eval.generation_batch_size`
defaults to 3 x `eval.batch_size`), and what the teacher-forced statistics cost per scored token.

    python benchmarks/decode_step.py [--model smollm2|PATH|random:PRESET] [--batches 16,32,64,96,128] [--threads 1]

Decoding: each batch is prefilled with `--context` random tokens (every other row left padded by 20),
in a cache that decoding appends to in place (`kv_cache.growing_cache`, as the evaluator decodes); the
median of `--steps` one-token steps (after 2 warm-up steps) is reported, with its time per row.

Where a step's time goes (`torch.profiler` over the same steps, shares of self CPU time scaled to the
median step): matrix products (the weights), attention (reads every row's cached keys and values) and
the rest (norms, rotary, activations, cache writes); the attention's read rate is the KV bytes of a step
over its attention time, next to the machine's read bandwidth (`read_gbps`: summing a 1 GiB tensor).

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
from eval_tofu import _recorder, resolve_model  # noqa: E402

RANDOM_VOCAB = 1024  # the vocabulary of a `random:PRESET` model (about the tiny models' tokenizers')


def load_model(spec: str):
    """The float32 model to time: `smollm2` (the packaged GGUF), a model folder, or `random:PRESET`, a
    Llama of a `baldro.models.tiny` preset's shape ("test", "demo") with random weights (seed 0)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if spec.startswith("random:"):
        from baldro.models.tiny import PRESETS

        preset = spec.split(":", 1)[1]
        if preset not in PRESETS:
            raise SystemExit(f"unknown preset {preset!r} in --model {spec}: use one of {sorted(PRESETS)}")
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=RANDOM_VOCAB, max_position_embeddings=512, tie_word_embeddings=True, **PRESETS[preset]
        )
        return LlamaForCausalLM(cfg).float().eval()
    return AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=torch.float32).eval()


WARMUP_STEPS = 2  # untimed, before the `steps` timed ones
PROFILED_STEPS = 3  # after the warm-up and the timed ones


def kv_positions_read(context: int, steps: int) -> float:
    """Cached positions one profiled step's attention reads per row, averaged over the profiled steps:
    step i (counting from 0 after the prefill) attends to the `context` prefilled positions, the i
    decoded before it and its own."""
    first = WARMUP_STEPS + steps
    return context + first + (PROFILED_STEPS - 1) / 2 + 1


def decoder(model, batch: int, context: int, seed: int | None = None):
    """A function `step(i)` running decoding step i of `batch` rows (a random token each) after a prefill
    of `context` random tokens (every other row left padded by 20), in a cache that decoding appends to in
    place (`kv_cache.growing_cache`, as the evaluator decodes). `seed`: of the tokens (default `batch`)."""
    from baldro.eval.kv_cache import (
        cache_kwarg,
        cache_layers,
        growing_cache,
        output_cache,
    )

    g = torch.Generator().manual_seed(batch if seed is None else seed)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(device)
    attn = torch.ones(batch, context, dtype=torch.long, device=device)
    attn[::2, :20] = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=(attn.cumsum(1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
    cache = growing_cache(cache_layers(output_cache(out)), batch)
    pos = attn.sum(1)

    def step(i: int) -> None:
        nonlocal attn, cache
        with torch.inference_mode():
            attn = torch.cat([attn, torch.ones(batch, 1, dtype=torch.long, device=device)], 1)
            nxt = torch.randint(0, vocab, (batch, 1), generator=g).to(device)
            o = model(
                input_ids=nxt,
                attention_mask=attn,
                position_ids=(pos + i)[:, None],
                use_cache=True,
                **{cache_kwarg(model): cache},
            )
            cache = output_cache(o)
            o.logits.max(-1)
            sync()

    return step


def decode_ms(model, batch: int, context: int, steps: int, split: bool = True) -> tuple[float, dict]:
    """The median step in ms, and (`split`) the step's ms split into matmul / attention / other, from
    three more steps under the profiler (a CPU's split; on a GPU the kernels run asynchronously)."""
    from torch.profiler import profile

    step = decoder(model, batch, context)
    times = []
    with torch.inference_mode():
        for i in range(WARMUP_STEPS + steps):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times[WARMUP_STEPS:]) * 1e3
        if not split:
            return median, {}
        with profile() as prof:
            for i in range(WARMUP_STEPS + steps, WARMUP_STEPS + steps + PROFILED_STEPS):
                step(i)
    parts = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        kind = (
            "matmul"
            if ev.key in ("aten::mm", "aten::addmm", "aten::bmm")
            else "attention"
            if "scaled_dot_product" in ev.key or "flash_attention" in ev.key
            else "other"
        )
        parts[kind] += ev.self_cpu_time_total
    total = sum(parts.values()) or 1.0
    return median, {k: median * v / total for k, v in parts.items()}


def kv_bytes_per_position(model) -> int:
    """Bytes of cached keys and values per position per row (fp32)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 4


def read_gbps(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth: the median rate of summing a `gib` GiB fp32 tensor."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def float64_stats(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """The statistics as computed before: a float64 log-softmax of every vocabulary entry."""
    lg = logits.double()
    lsm = torch.log_softmax(lg, dim=-1)
    top = lg.topk(2, dim=-1).values
    return {
        "token_logp": lsm.gather(1, targets[:, None]).squeeze(1),
        "argmax": lg.argmax(-1),
        "argmax_margin": top[:, 0] - top[:, 1],
    }


def stats_ms(vocab: int, rows: int) -> dict:
    from baldro.eval.engine import _vocab_chunk_stats

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g) * 4
    targets = torch.randint(0, vocab, (rows,), generator=g)
    out = {}
    for name, fn in [
        ("float64 log-softmax", lambda: float64_stats(logits, targets)),
        ("engine (float32 exp-sum)", lambda: _vocab_chunk_stats(logits, targets, frozenset({"argmax"}))),
    ]:
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
    p.add_argument("--model", default="smollm2", help="smollm2 (the packaged GGUF), a model folder or random:PRESET")
    p.add_argument("--batches", default="16,32,64,96,128")
    p.add_argument("--context", type=int, default=150, help="cached positions before the measured steps")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--rows", type=int, default=256, help="scored positions for the statistics timing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the figures to this JSON file")
    args = p.parse_args(argv)

    from baldro.models.loading import set_flush_denormal

    report: list[str] = []
    say = _recorder(report)  # stdout and, with --out, a .md beside the JSON
    torch.set_num_threads(args.threads)
    set_flush_denormal(True)
    model = load_model(args.model)
    record = {"threads": args.threads, "context": args.context, "decode": [], "stats_ms_per_token": None}
    gbps = read_gbps()
    kv_pos = kv_bytes_per_position(model)
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    record.update(read_gbps=gbps, kv_bytes_per_position=kv_pos, weight_mb=weight_mb)
    say(
        f"decoding step, {args.context} cached positions, {args.threads} thread(s), median of {args.steps} steps; "
        f"memory read bandwidth {gbps:.1f} GB/s (sum of 1 GiB); weights {weight_mb:.0f} MB; "
        f"KV cache {kv_pos / 1e3:.1f} kB per position and row; a profiled step's attention reads "
        f"{kv_positions_read(args.context, args.steps):g} positions per row\n"
    )
    say("| rows | step ms | ms per row | matmul ms | attention ms | other ms | KV MB read | attention GB/s |")
    say("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b in [int(x) for x in args.batches.split(",")]:
        ms, parts = decode_ms(model, b, args.context, args.steps)
        kv_mb = b * kv_positions_read(args.context, args.steps) * kv_pos / 1e6
        att_gbps = kv_mb / parts["attention"] if parts["attention"] else float("nan")
        record["decode"].append(
            {
                "rows": b,
                "step_ms": ms,
                "ms_per_row": ms / b,
                **{f"{k}_ms": v for k, v in parts.items()},
                "kv_mb": kv_mb,
                "attention_gbps": att_gbps,
            }
        )
        say(
            f"| {b} | {ms:.1f} | {ms / b:.2f} | {parts['matmul']:.1f} | {parts['attention']:.1f} | {parts['other']:.1f} "
            f"| {kv_mb:.0f} | {att_gbps:.1f} |",
            flush=True,
        )
    stats = stats_ms(model.config.vocab_size, args.rows)
    record["stats_ms_per_token"] = stats
    say(f"\nteacher-forced statistics per scored token, vocabulary {model.config.vocab_size}:\n")
    say("| computation | ms per token |\n| --- | ---: |")
    for k, v in stats.items():
        say(f"| {k} | {v:.3g} |")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1), encoding="utf-8")
        Path(args.out).with_suffix(".md").write_text("\n".join(report).strip() + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

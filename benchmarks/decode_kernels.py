"""Which matrix-product kernels make an evaluation's forward passes fastest on this machine.

    python benchmarks/decode_kernels.py [--model smollm2|PATH|random:PRESET] [--rows 96] [--rounds 14] [--threads 1] [--compile]

Two passes, each timed for every variant in turn, round after round (so that a noisy machine slows
them alike), and compared as the median of the per-round ratios against torch's own products:
- a decoding step: `--rows` rows, one new token each, against `--context` cached positions
  (`decode_step.decoder`: every other row left padded by 20, the evaluator's growing cache);
- a teacher-forced pass: `--tf-rows` sequences of `--tf-length` tokens, no cache.

Variants: `torch` (the model as loaded: MKL's products), `prepacked` (`baldro.eval.kernels`:
linear layers on weights reordered once for oneDNN, what the evaluator uses on a CPU) and, with
`--compile`, `compiled` (`torch.compile` of the forward with inductor's weight freezing, on a
static cache of the same rows; its compile time is reported). Each variant's largest logit
difference from `torch` on the teacher-forced pass says how far its rounding moves the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_step import decoder, load_model  # noqa: E402
from eval_tofu import _recorder  # noqa: E402


def _compiled_decoder(model, rows: int, context: int, steps: int, seed: int = 0):
    """`decode_step.decoder`'s steps on a static cache through `torch.compile` (inductor, frozen weights); returns
    (step function, seconds the first step took: the compilation)."""
    import torch._inductor.config as inductor_config
    from transformers import StaticCache

    inductor_config.freezing = True
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (rows, context), generator=g)
    length = context + steps + 8
    mask = torch.zeros(rows, length, dtype=torch.long)
    mask[:, :context] = 1
    mask[::2, :20] = 0
    pos = mask.sum(1)
    cache = StaticCache(config=model.config, max_cache_len=length)
    forward = torch.compile(model.forward, dynamic=False)
    state = {"i": 0}
    with torch.inference_mode():
        model(
            input_ids=ids,
            attention_mask=mask[:, :context],
            position_ids=(mask[:, :context].cumsum(1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.arange(context),
            logits_to_keep=1,
        )

    def step() -> None:
        i = state["i"]
        if i >= steps + 8:
            raise RuntimeError("the static cache is full: raise its length")
        with torch.inference_mode():
            mask[:, context + i] = 1
            o = forward(
                input_ids=torch.full((rows, 1), 1000 + i),
                attention_mask=mask,
                position_ids=(pos + i)[:, None],
                past_key_values=cache,
                use_cache=True,
                cache_position=torch.tensor([context + i]),
            )
            state["i"] += 1
            o.logits.max(-1)

    t0 = time.perf_counter()
    step()
    return step, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (the packaged GGUF), a model folder or random:PRESET")
    p.add_argument("--rows", type=int, default=96, help="rows of a decoding step")
    p.add_argument("--context", type=int, default=150, help="cached positions before the measured steps")
    p.add_argument("--tf-rows", type=int, default=16)
    p.add_argument("--tf-length", type=int, default=100)
    p.add_argument("--rounds", type=int, default=14, help="timed rounds (after 2 untimed ones)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compilation)")
    p.add_argument("--out", help="write the figures to this JSON file (and the table to the same name .md)")
    args = p.parse_args(argv)

    from baldro.eval.kernels import prepacked_linears
    from baldro.models.loading import set_flush_denormal

    report: list[str] = []
    say = _recorder(report)
    torch.set_num_threads(args.threads)
    set_flush_denormal(True)
    models = {"torch": load_model(args.model), "prepacked": load_model(args.model)}
    packing = prepacked_linears(models["prepacked"], True, rows_hint=args.rows)
    if not packing.__enter__():
        raise SystemExit("this torch build cannot prepack linear weights (no oneDNN)")
    tf_ids = torch.randint(
        0, models["torch"].config.vocab_size, (args.tf_rows, args.tf_length), generator=torch.Generator().manual_seed(1)
    )

    def teacher_forced(model):
        def run():
            with torch.inference_mode():
                return model(input_ids=tf_ids, use_cache=False).logits

        return run

    steps = args.rounds + 2

    def stepping(model):  # decode_step.decoder's steps, numbered
        step, count = decoder(model, args.rows, args.context, seed=0), itertools.count()
        return lambda: step(next(count))

    decode = {k: stepping(m) for k, m in models.items()}
    tf = {k: teacher_forced(m) for k, m in models.items()}
    record: dict = {"rows": args.rows, "context": args.context, "threads": args.threads, "rounds": args.rounds}
    if args.compile:
        step, seconds = _compiled_decoder(load_model(args.model), args.rows, args.context, steps)
        decode["compiled"] = step
        record["compile_s"] = seconds
    reference = tf["torch"]()
    record["max_logit_difference"] = {k: float((f() - reference).abs().max()) for k, f in tf.items()}
    times: dict = {"decode": {k: [] for k in decode}, "teacher_forced": {k: [] for k in tf}}
    for _ in range(steps):
        for kind, fns in (("decode", decode), ("teacher_forced", tf)):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[kind][k].append(time.perf_counter() - t0)
    say(
        f"{args.model}: decoding step of {args.rows} rows at {args.context} cached positions, teacher-forced pass of "
        f"{args.tf_rows} x {args.tf_length} tokens; {args.threads} thread(s), {args.rounds} rounds (after 2 untimed); "
        "speed-up: median of the per-round ratios torch / variant (range in brackets)\n"
    )
    say("| pass | variant | ms per row or token (median) | speed-up over torch | max logit difference |")
    say("| --- | --- | ---: | ---: | ---: |")
    summary: dict = {}
    for kind, per in times.items():
        unit = args.rows if kind == "decode" else args.tf_rows * args.tf_length
        base = per["torch"][2:]
        for k, ts in per.items():
            ratios = [a / b for a, b in zip(base, ts[2:])]
            ms = statistics.median(ts[2:]) * 1e3 / unit
            summary[f"{kind}/{k}"] = {
                "ms": ms,
                "speedup": statistics.median(ratios),
                "range": [min(ratios), max(ratios)],
            }
            diff = record["max_logit_difference"].get(k)
            say(
                f"| {kind} | {k} | {ms:.3f} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
                + (f"{diff:.1e} |" if diff is not None else "(static cache) |")
            )
    if "compile_s" in record:
        say(f"\ncompiled: the first step (compilation) took {record['compile_s']:.1f} s")
    record["summary"] = summary
    packing.__exit__(None, None, None)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1), encoding="utf-8")
        Path(args.out).with_suffix(".md").write_text("\n".join(report) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

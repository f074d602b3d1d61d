"""The evaluator's structure: the generic suite, the one vocabulary-moment formula, the isolated
reliance on transformers cache internals, and no import of recipes/config from the eval modules."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from baldro.eval import engine, kv_cache, metrics, suite, tofu

SRC = Path(__file__).resolve().parents[1] / "src" / "baldro"
TRANSFORMERS = f"transformers {transformers.__version__}"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval()


def test_cache_internals_hold_for_the_installed_transformers():
    """kv_cache.cache_layers / cache_from_layers read and build DynamicCache internals that
    transformers does not promise to keep: a change there must fail here, not skew evaluations."""
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :5], use_cache=True)
        layers = kv_cache.cache_layers(kv_cache.output_cache(out))
        assert layers is not None, (
            f"{TRANSFORMERS}: a Llama forward pass with use_cache=True no longer gives a DynamicCache of "
            "DynamicLayer with .layers/.keys/.values: update baldro.eval.kv_cache.cache_layers"
        )
        cfg = model.config
        shape = (2, cfg.num_key_value_heads, 5, cfg.hidden_size // cfg.num_attention_heads)
        assert len(layers) == cfg.num_hidden_layers and all(k.shape == v.shape == shape for k, v in layers), (
            f"{TRANSFORMERS}: cached keys/values are no longer [batch, kv_heads, positions, head_dim] per layer "
            f"(got {[tuple(k.shape) for k, _ in layers]}): update baldro.eval.kv_cache"
        )

        cache = kv_cache.cache_from_layers(layers)
        rebuilt = kv_cache.cache_layers(cache)
        assert rebuilt is not None and all(torch.equal(a, b) for (a, _), (b, _) in zip(layers, rebuilt)), (
            f"{TRANSFORMERS}: DynamicCache(ddp_cache_data=...) no longer holds the given keys/values: "
            "update baldro.eval.kv_cache.cache_from_layers"
        )
        step = model(input_ids=ids[:, 5:], use_cache=True, **{kv_cache.cache_kwarg(model): cache}).logits
        torch.testing.assert_close(
            step[:, -1],
            full[:, -1],
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m: (
                f"{TRANSFORMERS}: a forward pass on a cache from kv_cache.cache_from_layers no longer continues "
                f"the cached sequence: {m}"
            ),
        )

        cache = kv_cache.cache_from_layers(layers)
        cache.batch_select_indices(torch.tensor([1]))
        step = model(input_ids=ids[1:, 5:], use_cache=True, **{kv_cache.cache_kwarg(model): cache}).logits
        torch.testing.assert_close(
            step[:, -1],
            full[1:, -1],
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m: f"{TRANSFORMERS}: Cache.batch_select_indices no longer keeps the selected rows: {m}",
        )


def test_a_growing_cache_decodes_as_a_dynamic_one_and_appends_in_place():
    """GrowingLayer (kv_cache.growing_cache) relies on Cache.update indexing Cache.layers: the
    logits must be bitwise those of a plain DynamicCache, steps must write into the same buffer, and
    a row selection must be noticed."""
    model = _tiny_llama()
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    arg = kv_cache.cache_kwarg(model)
    with torch.no_grad():
        layers = kv_cache.cache_layers(kv_cache.output_cache(model(input_ids=ids[:, :4], use_cache=True)))
        plain, growing = kv_cache.cache_from_layers(layers), kv_cache.growing_cache(layers)
        assert kv_cache.is_batchable_cache(growing)
        start = growing.layers[0].keys.data_ptr()
        for t in range(4, 10):
            a = model(input_ids=ids[:, t : t + 1], use_cache=True, **{arg: plain}).logits
            b = model(input_ids=ids[:, t : t + 1], use_cache=True, **{arg: growing}).logits
            assert torch.equal(a, b), f"{TRANSFORMERS}: a GrowingLayer cache decodes differently"
        assert growing.layers[0].keys.data_ptr() == start, "decoding steps reallocated the cache"
        assert growing.layers[0].keys.shape[-2] == 10
        for cache in (plain, growing):
            cache.batch_select_indices(torch.tensor([2, 0]))  # transformers' own selection, from outside
        a = model(input_ids=ids[[2, 0], 10:], use_cache=True, **{arg: plain}).logits
        b = model(input_ids=ids[[2, 0], 10:], use_cache=True, **{arg: growing}).logits
        assert torch.equal(a, b), f"{TRANSFORMERS}: a GrowingLayer cache lost its rows after a selection"


def test_a_decoding_batch_stays_exact_as_rows_join_leave_and_the_cache_is_compacted():
    """generation._Batch on GrowingLayer buffers (kv_cache.append_rows / move_rows /
    gather_positions): after every change, each row's next-token logits are those of a plain forward
    pass over its own tokens; dropping a row moves the last row into its place without reallocating.
    Rows also join on keys/values known beforehand (`generation._stack_left`, as `DraftKV` hands them)."""
    from baldro.eval import generation

    model = _tiny_llama()
    arg = kv_cache.cache_kwarg(model)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (3, 6, 2, 14, 5, 9)]
    seqs: dict[int, list[int]] = {}
    batch = generation._Batch(torch.device("cpu"), max_rows=3)

    def join(idx):
        fresh, attn, first = generation._prefill(model, [prompts[i] for i in idx], 0, False, arg)
        batch.add(idx, kv_cache.cache_layers(fresh), attn, first)
        seqs.update({i: list(prompts[i]) for i in idx})

    def join_on_known_keys_values(idx):  # all but the last token cached; the last is the next input
        rows = []
        for i in idx:
            out = model(input_ids=torch.tensor([prompts[i][:-1]]), use_cache=True)
            rows.append([(k.clone(), v.clone()) for k, v in kv_cache.cache_layers(kv_cache.output_cache(out))])
        layers, attn = generation._stack_left(rows)
        batch.add(idx, layers, attn, [prompts[i][-1] for i in idx])
        seqs.update({i: list(prompts[i][:-1]) for i in idx})

    def step():
        attn = torch.cat([batch.attn, torch.ones(len(batch.rows), 1, dtype=torch.long)], 1)
        out = model(
            input_ids=torch.tensor([[t] for t in batch.last]),
            attention_mask=attn,
            position_ids=batch.pos[:, None],
            use_cache=True,
            **{arg: batch.cache},
        )
        batch.attn, batch.pos = attn, batch.pos + 1
        for b, i in enumerate(batch.rows):
            seqs[i].append(batch.last[b])
            ref = model(input_ids=torch.tensor([seqs[i]])).logits[0, -1]
            torch.testing.assert_close(out.logits[b, -1], ref, rtol=1e-5, atol=1e-5)
        batch.last = out.logits[:, -1].argmax(-1).tolist()

    with torch.no_grad():
        join([0, 1])
        step(), step()
        join([2])  # narrower than the batch: right-aligned, zeros before it
        step()
        buffer = batch.cache.layers[0]._kv_buffers[0].data_ptr()
        batch.keep([1, 2])  # row 0 leaves: row 2 moves into its place
        assert batch.rows == [2, 1]
        assert batch.cache.layers[0]._kv_buffers[0].data_ptr() == buffer, "dropping a row copied the cache"
        step()
        join([3])  # wider than the batch: the old rows shift right
        step(), step()
        batch.keep([0])  # only the short row is left: the cache is cut to its width
        assert batch.rows == [2] and batch.attn.shape[1] == len(seqs[2]) and bool(batch.attn.all())
        step(), step()
        join_on_known_keys_values([4, 5])  # of two lengths, one wider than the batch
        step(), step()


def test_caches_that_drop_positions_are_not_batchable():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=3,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 64, (2, 6)), use_cache=True)
    assert kv_cache.cache_layers(kv_cache.output_cache(out)) is None, (
        f"{TRANSFORMERS}: a sliding-window cache was taken for a full-attention one by kv_cache.cache_layers"
    )
    assert kv_cache.cache_layers(None) is None and not kv_cache.is_batchable_cache(object())


def test_cache_internals_are_read_in_kv_cache_only():
    internals = (
        "cache_utils",
        "DynamicCache(",
        "DynamicLayer",
        "ddp_cache_data",
        "key_cache",
        "value_cache",
        "_seen_tokens",
        ".crop(",
        "reorder_cache",
        "batch_select_indices",
        "la.keys",
    )
    offenders = [
        f"{path.relative_to(SRC)}: {word}"
        for path in SRC.rglob("*.py")
        if path.name != "kv_cache.py"
        for word in internals
        if word in path.read_text(encoding="utf-8")
    ]
    assert not offenders, f"transformers cache internals outside baldro/eval/kv_cache.py: {offenders}"


def test_vocab_moments_have_one_definition():
    """The engine's float64 chunk statistics are metrics.logprob_moments, bit for bit."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=g, dtype=torch.float64) * 4
    targets = torch.randint(0, 50, (7,), generator=g)
    stats = engine._vocab_chunk_stats(logits, targets, frozenset({"vocab_stats"}))
    mu, sd = metrics.logprob_moments(torch.log_softmax(logits, dim=-1))
    assert torch.equal(stats["vocab_mean"], mu) and torch.equal(stats["vocab_std"], sd)
    mu32, sd32 = metrics.vocab_logprob_moments(logits.float()[None])
    ref_mu, ref_sd = metrics.logprob_moments(torch.log_softmax(logits.float()[None], dim=-1))
    assert mu32.dtype == torch.float32 and torch.equal(mu32, ref_mu) and torch.equal(sd32, ref_sd)


def test_token_logprobs_match_a_float64_log_softmax_over_a_real_sized_vocabulary():
    """The engine takes log p(target) as logit - logsumexp with the exp-sum in float32 (a float64
    log-softmax of every vocabulary entry costs three times as much): within 5e-7 of the float64
    value at a 49k vocabulary, also for half-precision logits; argmax is the first maximum."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 49152, generator=g) * 4
    logits[:, 7] += 30  # a confident row, as a memorised answer gives
    targets = torch.randint(0, 49152, (64,), generator=g)
    for lg in (logits, logits.bfloat16()):
        stats = engine._vocab_chunk_stats(lg, targets, frozenset({"argmax"}))
        ref = torch.log_softmax(lg.double(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        assert stats["token_logp"].dtype == torch.float64
        assert (stats["token_logp"] - ref).abs().max() < 5e-7, lg.dtype
        assert torch.equal(stats["argmax"], lg.double().argmax(-1))
        top = lg.double().topk(2, dim=-1).values
        assert torch.equal(stats["argmax_margin"], top[:, 0] - top[:, 1])
    tie = engine._vocab_chunk_stats(torch.tensor([[1.0, 3.0, 3.0]]), torch.tensor([0]), frozenset({"argmax"}))
    assert int(tie["argmax"][0]) == 1 and float(tie["argmax_margin"][0]) == 0.0


def test_the_fast_argmaxes_pick_the_first_of_tied_maxima_as_argmax_does():
    """The scoring pass's argmax (from a top-2 pass) and decoding's greedy token (`torch.max`) stand in
    for `torch.argmax`, which greedy decoding and exact memorisation use: ties go to the first index."""
    from baldro.eval import generation

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(48, 49152, generator=g)
    for r in range(48):  # two or three equal maxima at random places, the first one anywhere
        cols = torch.randperm(49152, generator=g)[: 2 + r % 2]
        logits[r, cols] = 9.0
    want = logits.argmax(-1)
    stats = engine._vocab_chunk_stats(logits, torch.zeros(48, dtype=torch.long), frozenset({"argmax"}))
    assert torch.equal(stats["argmax"], want) and bool((stats["argmax_margin"] == 0).all())
    assert torch.equal(generation.greedy_tokens(logits), want)
    assert torch.equal(generation.greedy_tokens(logits[:, None, :]), want[:, None])  # [B, width, V]


def _baldro_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("baldro")}


@pytest.mark.parametrize("module", ["suite", "engine", "generation", "metrics", "kv_cache"])
def test_generic_eval_modules_know_no_benchmark(module):
    imported = _baldro_imports(SRC / "eval" / f"{module}.py")
    specific = {n for n in imported if n.startswith(("baldro.eval.tofu", "baldro.data.tofu", "baldro.eval.summarize"))}
    assert not specific, f"baldro.eval.{module} imports benchmark-specific modules: {sorted(specific)}"


def test_eval_modules_import_neither_recipes_nor_config():
    code = (
        "import sys, importlib, pkgutil, baldro.eval\n"
        "for m in pkgutil.iter_modules(baldro.eval.__path__): importlib.import_module('baldro.eval.' + m.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('baldro.recipes')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing baldro.eval loads {out.stdout.strip()}"


def test_tofu_keeps_its_public_names():
    for name in (
        "evaluate_tofu",
        "diff_eval_logs",
        "load_tofu_eval_data",
        "tofu_sets",
        "score_tofu",
        "generate_tofu",
        "assemble_tofu_eval_log",
        "load_retain_log",
        "restrict_log",
        "EVAL_FILE",
        "SUMMARY_FILE",
        "HEADLINE",
        "TofuSet",
        "TofuEvalData",
    ):
        assert hasattr(tofu, name), name
    assert tofu.diff_eval_logs is suite.diff_eval_logs
    assert list(inspect.signature(tofu.evaluate_tofu).parameters) == [
        "model",
        "tokenizer",
        "formatter",
        "data_source",
        "forget_split",
        "out_dir",
        "retain_logs_path",
        "batch_size",
        "max_new_tokens",
        "limit",
        "shared_forward",
        "sort_by_length",
        "timings",
        "progress",
        "generation_batch_size",
        "forget_only",
        "prepack_weights",
        "info",
    ]


def test_progress_is_logged_when_stderr_is_not_a_terminal(caplog, monkeypatch):
    import logging
    import sys

    from baldro import (
        progress as engine,  # the evaluator's progress policy lives in baldro.progress
    )

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    clock = iter([0.0, 10.0, 31.0, 40.0, 65.0, 70.0])
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="baldro"):
        with engine.progress_bar(30, "scoring (forget)", None) as bar:  # starts at t=0
            for _ in range(3):
                bar.update(10)  # t = 10, 31, 40: one line at 31 s (30 s since the start)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["scoring (forget): 20/30 sequences, 31 s", "scoring (forget): 30/30 sequences in 65.0 s"]
    assert not isinstance(engine.progress_bar(3, "x", False), engine.LogProgress)  # progress=False stays silent


def test_stage_timer_counts_the_tokens_every_forward_reads():
    model = _tiny_llama()
    timer = suite.StageTimer({"forget": 3}, model)
    ids = torch.ones((3, 5), dtype=torch.long)

    def two_passes():
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            model(input_ids=ids[:, :1], **{kv_cache.cache_kwarg(model): kv_cache.output_cache(out)})  # a decoding step

    timer.run("probability", ["forget/answer"], 3, two_passes)
    timer.run("rouge", ["forget/prompts"], 3, lambda: None)
    assert timer.result()["probability"] == {
        "rows": 3,
        "sequences": 3,
        "seconds": pytest.approx(timer.seconds["probability"]),
        "model_tokens": 15 + 3,
    }
    assert timer.result()["rouge"]["model_tokens"] == 0
    model(input_ids=ids)  # outside a stage: not counted, the hook is gone
    assert timer.tokens["probability"] == 18
    plain = suite.StageTimer({"forget": 3})  # no model: nothing counted, no key
    plain.run("probability", ["forget/answer"], 3, two_passes)
    assert "model_tokens" not in plain.result()["probability"]


def test_numeric_differences_counts_numbers_and_ranks_relative_differences():
    a = {"x": {"value_by_index": {"0": {"prob": 0.5}, "1": {"prob": [1.0, 2.0e-8]}}}, "gen": "same", "n": 3, "ok": True}
    b = {
        "x": {"value_by_index": {"0": {"prob": 0.5 + 1e-5}, "1": {"prob": [1.1, 5.0e-8]}}},
        "gen": "other",
        "n": 3,
        "ok": True,
        "extra": 1.0,
    }
    n, diffs = suite.numeric_differences(a, b)
    assert n == 4  # 0.5, 1.0, 2e-8 and n; the string, the bool and the key only in b are not numbers compared
    assert [p for p, _ in diffs] == ["/x/value_by_index/1/prob[0]", "/x/value_by_index/0/prob"]  # 3e-8 is within atol
    assert diffs[0][1] == pytest.approx(0.1 / 1.1) and diffs[1][1] == pytest.approx(1e-5 / (0.5 + 1e-5))
    assert suite.numeric_differences(a, a) == (4, [])
    assert suite.numeric_differences({"v": float("nan")}, {"v": float("nan")}) == (1, [])
    assert suite.numeric_differences({"v": float("nan")}, {"v": 1.0}) == (1, [("/v", float("inf"))])


def test_diff_eval_logs_names_every_kind_of_difference():
    a = {"p": {"0": 0.5, "1": 1.0}, "gen": ["a", "b"], "rows": [1, 2], "only_a": 1, "n": 3}
    b = {"p": {"0": 0.5 + 1e-7, "1": 1.001}, "gen": ["a", "c"], "rows": [1, 2, 3], "only_b": 2, "n": 3}
    assert suite.diff_eval_logs(a, b) == [
        "/only_b: only in the second log",
        "/p/1: 1.0 vs 1.001",  # 0.5 vs 0.5 + 1e-7 is within rtol 1e-5
        "/gen[1]: 'b' vs 'c'",
        "/rows: 2 vs 3 items",
        "/only_a: only in the first log",
    ]
    assert suite.diff_eval_logs(a, a) == []
    assert suite.diff_eval_logs({"v": 1.0}, {"v": 1.001}, rtol=1e-2) == []
    nan = float("nan")  # an undefined metric in both logs is no difference (as in numeric_differences)
    assert suite.diff_eval_logs({"v": nan}, {"v": nan}) == []
    assert suite.diff_eval_logs({"v": nan}, {"v": 1.0}) == ["/v: nan vs 1.0"]


def test_eval_tofu_compare_logs_counts_numbers_and_other_differences(tmp_path, capsys):
    """`benchmarks/eval_tofu.py --compare-logs`: one line per log pair, exit 1 when a log differs."""
    import json as json_

    bench = _eval_tofu_bench()
    logs = [
        {"p": [0.5, 1.0, float("nan")], "gen": ["a", "b"]},
        {"p": [0.5 + 1e-8, 1.1, float("nan")], "gen": ["a", "c"]},
        {"p": [0.5, 1.0, float("nan")], "gen": ["a", "b"]},
    ]
    files = []
    for i, log in enumerate(logs):
        files.append(str(tmp_path / f"{i}.json"))
        Path(files[-1]).write_text(json_.dumps(log))
    assert bench.compare_logs(files[:2], None) == 1
    line = capsys.readouterr().out.strip()
    assert line.endswith(
        "3 numbers, 1 differ beyond atol 1e-07, 1 beyond rtol 1e-05; largest 9.09e-02 at /p[1]; "
        "1 non-numeric difference(s) (generated texts, keys or list lengths)"
    ), line
    assert bench.compare_logs([files[0], files[2]], None) == 0
    assert capsys.readouterr().out.strip().endswith("3 numbers, 0 differ beyond atol 1e-07, 0 beyond rtol 1e-05")
    assert bench.compare_logs([files[0], str(tmp_path / "missing.json")], None) == 2


def _eval_tofu_bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_tofu.py"
    spec = importlib.util.spec_from_file_location("eval_tofu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(bench)
    return bench


def _tofu_log(prob=0.5, prob_agg=0.5, forget_gen="the author", retain_gen="she wrote", rouge=0.5, utility=0.3):
    return {
        "forget_Q_A_Prob": {"agg_value": prob_agg, "value_by_index": {"0": {"prob": prob}, "1": {"prob": 0.25}}},
        "forget_Q_A_ROUGE": {
            "agg_value": rouge,
            "value_by_index": {"0": {"rougeL_recall": rouge, "generation": forget_gen}},
        },
        "retain_Q_A_ROUGE": {
            "agg_value": rouge,
            "value_by_index": {"3": {"rougeL_recall": 0.5, "generation": retain_gen}},
        },
        "model_utility": {"agg_value": utility},
    }


def test_eval_tofu_tolerance_check_follows_issue_31():
    """Per-sample numbers within 1e-4, aggregates within 1e-5, generations identical except at a
    near-tie (margin < 1e-3), whose ROUGE numbers, their aggregate and model utility are excused."""
    bench = _eval_tofu_bench()
    base = _tofu_log()
    same = bench.tolerance_check(base, _tofu_log())
    assert same.passed and same.numbers == 8 and same.generations == 2 and not same.differing
    assert bench.tolerance_check(base, _tofu_log(prob=0.5 * (1 + 5e-5))).passed  # a row: limit 1e-4
    row = bench.tolerance_check(base, _tofu_log(prob=0.5 * (1 + 3e-4)))
    assert not row.passed and [(p, lim) for p, _, lim in row.beyond] == [
        ("/forget_Q_A_Prob/value_by_index/0/prob", 1e-4)
    ]
    agg = bench.tolerance_check(base, _tofu_log(prob_agg=0.5 * (1 + 5e-5)))  # an aggregate: limit 1e-5
    assert not agg.passed and agg.beyond[0][0] == "/forget_Q_A_Prob/agg_value"

    flipped = _tofu_log(retain_gen="she wrote books", rouge=0.5, utility=0.31)
    flipped["retain_Q_A_ROUGE"]["value_by_index"]["3"]["rougeL_recall"] = 0.7
    flipped["retain_Q_A_ROUGE"]["agg_value"] = 0.7
    seen = []

    def margin(value):
        def margin_of(key, idx, a, b):
            seen.append((key, idx, a, b))
            return value

        return margin_of

    tie = bench.tolerance_check(base, flipped, margin(4e-4))
    assert seen == [("retain_Q_A_ROUGE", "3", "she wrote", "she wrote books")]
    assert tie.passed and tie.near_ties == 1 and not tie.beyond
    assert sorted(p for p, _ in tie.excused) == [
        "/model_utility/agg_value",
        "/retain_Q_A_ROUGE/agg_value",
        "/retain_Q_A_ROUGE/value_by_index/3/rougeL_recall",
    ]
    assert "1 of 2 generations differ, 1 at a near-tie" in tie.line()
    clear = bench.tolerance_check(base, flipped, margin(0.2))
    assert not clear.passed and clear.near_ties == 0 and len(clear.beyond) == 3 and "FAILED" in clear.line()
    assert not bench.tolerance_check(base, flipped).passed  # margin unknown: not excused
    extra = {**_tofu_log(), "mia_loss": {"agg_value": 0.5}}
    assert bench.tolerance_check(base, extra).others == ["/mia_loss: only in the second log"]


def test_eval_tofu_divergence_margin_is_the_top_two_gap_where_generations_part(tiny_model_dir, tofu_dir):
    """The margin is read from the logits after the prompt and the two texts' common tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bench = _eval_tofu_bench()
    margin_of = bench.divergence_margins(str(tiny_model_dir), False, str(tofu_dir), "forget01", 2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    question = tofu.load_tofu_eval_data(str(tofu_dir), "forget01", 2).rows["retain"][1]["question"]
    common = tok("The author was ", add_special_tokens=False)["input_ids"]  # this tokenizer ends words with a space
    for text in ("The author was born", "The author was a writer"):
        assert tok(text, add_special_tokens=False)["input_ids"][: len(common)] == common
    ids = bench.build_formatter(tok, False).encode_prompt(question) + common
    with torch.inference_mode():
        top = model(input_ids=torch.tensor([ids])).logits[0, -1].double().topk(2).values
    got = margin_of("retain_Q_A_ROUGE", "1", "The author was born", "The author was a writer")
    assert got == pytest.approx(float(top[0] - top[1]), rel=1e-5, abs=1e-6) and got >= 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--modes", "optimised,fast"], "--modes 'optimised,fast': unknown mode(s) fast: pick from optimised, naive"),
        (["--modes", ","], "unknown mode(s) (none given)"),
        (["--generation-batch-size", "0"], "--generation-batch-size 0: must be 1 or more"),
        (["--batch-size", "-2"], "--batch-size -2: must be 1 or more"),
        (["--threads", "0"], "--threads 0: must be 1 or more"),
    ],
)
def test_eval_tofu_refuses_bad_options_in_one_line(tofu_dir, capsys, argv, message):
    """`benchmarks/eval_tofu.py`: a bad option gets one line naming it and exit 2, before any model loads."""
    bench = _eval_tofu_bench()
    assert bench.main(["--data", str(tofu_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err

"""TOFU evaluator and shared scoring engine, end to end on the real TOFU files with a tiny random Llama."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOFU = DATA / "tofu"
REFERENCE_LOGS = DATA / "reference_logs"
pytestmark = pytest.mark.skipif(not TOFU.is_dir(), reason=f"TOFU data not found at {TOFU}")

from baldro.data.formatting import EncodedQA, QAFormatter  # noqa: E402
from baldro.errors import BaldroError  # noqa: E402
from baldro.eval import engine, generation  # noqa: E402
from baldro.eval.kernels import onednn_linear_available  # noqa: E402
from baldro.eval.tofu import (  # noqa: E402
    EVAL_FILE,
    SUMMARY_FILE,
    diff_eval_logs,
    evaluate_tofu,
    load_retain_log,
    load_tofu_eval_data,
    restrict_log,
)

LIMIT = 5
MAX_NEW = 8
HEADLINE = ("forget_quality", "model_utility", "privleak")
SET_KEYS = {
    "forget": [
        "forget_Q_A_Prob",
        "forget_Q_A_PARA_Prob",
        "forget_Q_A_PERT_Prob",
        "forget_Q_A_ROUGE",
        "forget_truth_ratio",
    ],
    "retain": [
        "retain_Q_A_Prob",
        "retain_Q_A_PARA_Prob",
        "retain_Q_A_PERT_Prob",
        "retain_Q_A_ROUGE",
        "retain_Truth_Ratio",
    ],
    "ra": ["ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio"],
    "wf": ["wf_Q_A_Prob", "wf_Q_A_PERT_Prob", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio"],
}
FORGET_KEYS = ["exact_memorization", "extraction_strength"]
MIA_KEYS = ["mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"]


def _rows(name: str, n: int) -> list[dict]:
    lines = (TOFU / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def tiny():
    """A byte-level BPE tokenizer trained here and a randomly initialised ~150k-parameter Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from baldro.models.tiny import train_tokenizer

    texts = []
    for name in (
        "forget10_perturbed",
        "retain_perturbed",
        "real_authors_perturbed",
        "world_facts_perturbed",
        "holdout10",
    ):
        for r in _rows(name, 60):
            texts += [r["question"], r["answer"], *r.get("perturbed_answer", [])]
    tok = train_tokenizer(texts, vocab_size=1024)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    return model, tok, QAFormatter(tok)


@pytest.fixture(scope="module")
def first_run(tiny, tmp_path_factory):
    """Optimised evaluation (shared forward pass, length-sorted batches), no retain log."""
    model, tok, fmt = tiny
    out = tmp_path_factory.mktemp("tofu_eval_a")
    timings: dict = {}
    log, summary = evaluate_tofu(
        model,
        tok,
        fmt,
        TOFU,
        forget_split="forget10",
        out_dir=out,
        batch_size=4,
        max_new_tokens=MAX_NEW,
        limit=LIMIT,
        timings=timings,
    )
    return out, log, summary, timings


@pytest.fixture(scope="module")
def naive_run(tiny, first_run, tmp_path_factory):
    """Unoptimised evaluation (per-metric forward passes, input order), with the first run as reference."""
    model, tok, fmt = tiny
    out = tmp_path_factory.mktemp("tofu_eval_b")
    timings: dict = {}
    with warnings.catch_warnings():  # scipy's KS test on 5 vs 5 nearly equal values falls back to asymp
        warnings.simplefilter("ignore", RuntimeWarning)
        log, summary = evaluate_tofu(
            model,
            tok,
            fmt,
            TOFU,
            forget_split="forget10",
            out_dir=out,
            batch_size=4,
            max_new_tokens=MAX_NEW,
            limit=LIMIT,
            shared_forward=False,
            sort_by_length=False,
            retain_logs_path=first_run[0] / EVAL_FILE,
            timings=timings,
        )
    return out, log, summary, timings


# ------------------------------------------------------------------------------------------ end to end
def test_files_keys_and_per_sample_counts(first_run):
    out, log, summary, timings = first_run
    on_disk = json.loads((out / EVAL_FILE).read_text())
    assert on_disk == json.loads(json.dumps(log))
    assert json.loads((out / SUMMARY_FILE).read_text()) == json.loads(json.dumps(dict(summary)))

    expected = {k for ks in SET_KEYS.values() for k in ks} | set(FORGET_KEYS) | set(MIA_KEYS) | set(HEADLINE)
    assert set(on_disk) == expected
    for keys in SET_KEYS.values():
        for key in keys:
            assert len(on_disk[key]["value_by_index"]) == LIMIT, key
            assert isinstance(on_disk[key]["agg_value"], float), key
    for prefix, k in (("forget", 5), ("retain", 5), ("ra", 3), ("wf", 3)):
        entry = on_disk[f"{prefix}_Q_A_PERT_Prob"]["value_by_index"]["0"]
        assert len(entry["prob"]) == len(entry["avg_loss"]) == k
        rouge = on_disk[f"{prefix}_Q_A_ROUGE"]["value_by_index"]["0"]
        assert set(rouge) == {"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}
    first = _rows("forget10_perturbed", 1)[0]
    assert on_disk["forget_Q_A_ROUGE"]["value_by_index"]["0"]["ground_truth"] == first["answer"]
    assert first["question"] in on_disk["forget_Q_A_ROUGE"]["value_by_index"]["0"]["input"]
    assert set(on_disk["forget_Q_A_Prob"]["value_by_index"]["0"]) == {"prob", "avg_loss"}
    for key in FORGET_KEYS:
        assert len(on_disk[key]["value_by_index"]) == LIMIT
    for key in MIA_KEYS:
        entry = on_disk[key]
        assert set(entry) == {"forget", "holdout", "auc", "agg_value"}
        assert len(entry["forget"]["value_by_index"]) == len(entry["holdout"]["value_by_index"]) == LIMIT
        assert 0.0 <= entry["auc"] <= 1.0 and entry["agg_value"] == entry["auc"]

    # without the retain model's log there is no forget quality, never a number
    assert on_disk["forget_quality"] == {"agg_value": None}
    assert summary["forget_quality"] is None
    assert 0.0 <= summary["model_utility"] <= 1.0
    assert summary["forget_Q_A_Prob"] == pytest.approx(on_disk["forget_Q_A_Prob"]["agg_value"])
    assert timings["rouge"]["rows"] == 4 * LIMIT


def test_shared_forward_equals_per_metric_passes(first_run, naive_run):
    """Shared pass + length sorting give the numbers of per-metric passes in input order."""
    _, log_a, _, timings_a = first_run
    _, log_b, summary_b, timings_b = naive_run
    strip = lambda log: {k: v for k, v in log.items() if k not in HEADLINE}  # noqa: E731
    assert diff_eval_logs(strip(log_a), strip(log_b)) == []
    assert log_a["model_utility"]["agg_value"] == pytest.approx(log_b["model_utility"]["agg_value"], rel=1e-6)
    # fewer forward passes in the shared run
    seqs = lambda t: sum(v["sequences"] for k, v in t.items() if k != "rouge")  # noqa: E731
    assert seqs(timings_a) < seqs(timings_b)


def test_prepacked_weights_give_the_numbers_of_torch_products(tiny, first_run):
    """Prepacked oneDNN weights (`eval.kernels`; asked for: auto leaves a model this narrow on torch's
    products, as the first run was) give the same log up to float32 rounding, generations included."""
    model, tok, fmt = tiny
    info: dict = {}
    log, _ = evaluate_tofu(
        model,
        tok,
        fmt,
        TOFU,
        forget_split="forget10",
        batch_size=4,
        max_new_tokens=MAX_NEW,
        limit=LIMIT,
        prepack_weights=True,
        info=info,
    )
    assert info == {"linear_kernels": "onednn_prepacked" if onednn_linear_available() else "torch"}
    strip = lambda log: {k: v for k, v in log.items() if k not in HEADLINE}  # noqa: E731
    assert diff_eval_logs(strip(first_run[1]), strip(log)) == []


def test_forget_only_scores_the_forget_set_as_the_full_evaluation_does(tiny, first_run):
    """eval.forget_only: the forget set's and privleak's numbers as in the full evaluation (within float
    tolerance: batches hold other sets' texts), no utility set, model utility None with a reason."""
    model, tok, fmt = tiny
    timings: dict = {}
    with warnings.catch_warnings():  # scipy's KS test on 5 vs 5 values falls back to asymp
        warnings.simplefilter("ignore", RuntimeWarning)
        log, summary = evaluate_tofu(
            model,
            tok,
            fmt,
            TOFU,
            forget_split="forget10",
            batch_size=4,
            max_new_tokens=MAX_NEW,
            limit=LIMIT,
            retain_logs_path=first_run[0] / EVAL_FILE,
            timings=timings,
            forget_only=True,
        )
    full = first_run[1]
    assert not [k for k in log if k.startswith(("retain_", "ra_", "wf_"))]
    per_sample = [k for k in log if k not in ("forget_quality", "model_utility", "privleak")]
    assert "forget_Q_A_ROUGE" in per_sample and "mia_min_k" in per_sample
    assert diff_eval_logs({k: log[k] for k in per_sample}, {k: full[k] for k in per_sample}) == []
    assert summary["model_utility"] is None and "forget_only" in summary.notes["model_utility"]
    assert summary["forget_quality"] is not None and summary["privleak"] is not None
    assert timings["rouge"]["rows"] == LIMIT and first_run[3]["rouge"]["rows"] == 4 * LIMIT


def test_forget_quality_against_same_model_is_one(naive_run):
    _, log, summary, _ = naive_run
    assert isinstance(summary["forget_quality"], float)
    assert summary["forget_quality"] == pytest.approx(1.0)
    assert log["forget_quality"]["agg_value"] == summary["forget_quality"]
    assert summary["privleak"] == pytest.approx(0.0, abs=1e-3)  # same model: same MIA AUC as the reference


def test_avg_loss_matches_unbatched_forward(tiny, first_run):
    model, tok, fmt = tiny
    log = first_run[1]
    row = _rows("forget10_perturbed", 3)[2]
    for answer, key, get in (
        (row["answer"], "forget_Q_A_Prob", lambda e: e["avg_loss"]),
        (row["perturbed_answer"][1], "forget_Q_A_PERT_Prob", lambda e: e["avg_loss"][1]),
    ):
        enc = fmt.encode(row["question"], answer)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels]))
        assert get(log[key]["value_by_index"]["2"]) == pytest.approx(out.loss.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def encoded(tiny):
    _, _, fmt = tiny
    rows = _rows("retain_perturbed", 6)
    qs = [r["question"] for r in rows for _ in range(2)]
    ans = [a for r in rows for a in (r["answer"], r["perturbed_answer"][0])]
    return fmt.encode_many(qs, ans)


def _fields(s: engine.SequenceScore) -> list[torch.Tensor]:
    return [s.token_logp, s.vocab_mean, s.vocab_std]


def test_length_sorting_does_not_change_scores(tiny, encoded):
    model, tok, _ = tiny
    a = engine.score_sequences(model, encoded, 5, tok.pad_token_id, sort_by_length=True)
    b = engine.score_sequences(model, encoded, 5, tok.pad_token_id, sort_by_length=False)
    one = engine.score_sequences(model, encoded, 1, tok.pad_token_id)
    for x, y, z, e in zip(a, b, one, encoded):
        assert x.n_tokens == y.n_tokens == z.n_tokens == sum(t != -100 for t in e.labels[1:])
        for other in (y, z):
            assert x.avg_loss == pytest.approx(other.avg_loss, rel=1e-5)
            assert torch.equal(x.argmax, other.argmax) and torch.equal(x.targets, other.targets)
            for f, g in zip(_fields(x), _fields(other)):
                torch.testing.assert_close(f, g, rtol=1e-4, atol=1e-5)


def test_engine_outputs_match_a_direct_forward(tiny, encoded):
    """Token log-probs, argmax and vocab moments equal those of a plain full-vocab forward pass."""
    from baldro.eval.metrics import vocab_logprob_moments
    from baldro.train.sequence import token_log_probs

    model, tok, _ = tiny
    (s,) = engine.score_sequences(model, encoded[3:4], 1, tok.pad_token_id)
    e = encoded[3]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([e.input_ids])).logits
    tlp = token_log_probs(logits, torch.tensor([e.labels]))
    torch.testing.assert_close(s.token_logp, tlp.token_logp[tlp.mask].double(), rtol=1e-5, atol=1e-6)
    assert s.avg_loss == pytest.approx(tlp.nll.item(), rel=1e-6)
    scored = logits[0, :-1][tlp.mask[0]]
    assert torch.equal(s.argmax, scored.argmax(-1))
    mu, sd = vocab_logprob_moments(scored)
    torch.testing.assert_close(s.vocab_mean, mu.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.vocab_std, sd.double(), rtol=1e-3, atol=1e-5)


def test_shared_prompt_scores_equal_separate_scores(tiny):
    """Each prompt encoded once (KV cache shared by its answers) gives the scores of scoring every
    prompt + answer on its own: prompts of different lengths, different numbers of answers per
    prompt, one-token answers, several prompts in a batch and a prompt split over batches."""
    model, tok, fmt = tiny
    rows = _rows("forget10_perturbed", 2) + _rows("real_authors_perturbed", 2)
    prompts = [fmt.encode_prompt(r["question"]) for r in rows]
    assert len({len(p) for p in prompts}) > 1
    conts = []
    for i, r in enumerate(rows):
        answers = [r["answer"], *r["perturbed_answer"][: 2 + i]]
        cs = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
        conts.append(cs + [[cs[0][0]]])  # and a one-token continuation
    pad = tok.pad_token_id
    for batch_size in (3, 8, 64):
        shared = engine.score_continuations(model, prompts, conts, batch_size, pad)
        assert shared is not None and [len(s) for s in shared] == [len(c) for c in conts]
        for p, cs, scores in zip(prompts, conts, shared):
            sep = engine.score_sequences(model, [EncodedQA(p + c, [-100] * len(p) + c, len(p)) for c in cs], 1, pad)
            for x, y, c in zip(scores, sep, cs):
                assert x.n_tokens == y.n_tokens == len(c) and x.targets.tolist() == c
                assert x.avg_loss == pytest.approx(y.avg_loss, rel=1e-5)
                assert torch.equal(x.argmax, y.argmax)
                for f, g in zip(_fields(x), _fields(y)):
                    torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-6)
    # the EncodedQA entry point: grouped by prompt tokens, lone answers scored the ordinary way
    qs = [r["question"] for r in rows for _ in range(3)][:-2]
    ans = [a for r in rows for a in (r["answer"], *r["perturbed_answer"][:2])][:-2]
    enc = fmt.encode_many(qs, ans)
    a = engine.score_sequences_shared_prompts(model, enc, 4, pad)
    b = engine.score_sequences(model, enc, 4, pad)
    for x, y in zip(a, b):
        assert x.avg_loss == pytest.approx(y.avg_loss, rel=1e-5) and torch.equal(x.targets, y.targets)


def test_left_padded_batched_generation_equals_one_by_one(memorising):
    model, tok, fmt = memorising
    rows = _rows("real_authors_perturbed", 3) + _rows("forget10_perturbed", 3)
    prompts = [fmt.encode_prompt(r["question"]) for r in rows]
    assert len({len(p) for p in prompts}) > 2  # really padded
    batched = generation.generate(model, tok, prompts, 12, batch_size=6)
    unsorted = generation.generate(model, tok, prompts, 12, batch_size=4, sort_by_length=False)
    single = [generation.generate(model, tok, [p], 12, batch_size=1)[0] for p in prompts]
    assert batched == single == unsorted
    assert len(set(single)) > 3  # the prompts give different texts


def test_generation_stops_at_eos(tiny):
    """A model that always predicts EOS yields empty generations (EOS and padding are cut)."""
    model, tok, fmt = tiny

    with torch.no_grad():
        bias = torch.zeros(len(tok))
        bias[tok.eos_token_id] = 1e4
        head = model.lm_head
        handle = head.register_forward_hook(lambda m, i, o: o + bias)
        try:
            gens = generation.generate(model, tok, [fmt.encode_prompt("Who?"), fmt.encode_prompt("Why not?")], 5, 2)
        finally:
            handle.remove()
    assert gens == ["", ""]


# ------------------------------------------------------------- drafted and continuous generation
EOS = 7  # token ids in the hand cases below are arbitrary


@pytest.mark.parametrize(
    "draft, argmax, margin, budget, expect, finished",
    [
        ([1, 2, 3, EOS], [1, 2, 3, EOS], [5.0] * 4, 10, [1, 2, 3, EOS], True),  # memorised: no decoding
        ([1, 2, 3, EOS], [1, 9, 4, 4], [5.0] * 4, 10, [1, 9], False),  # 9 is greedy; what follows it is not known
        ([1, 2, 3, EOS], [1, 2, 3, EOS], [5.0, 5.0, 1e-4, 5.0], 10, [1, 2], False),  # a near tie is left to decoding
        ([1, 2, 3, EOS], [1, 2, 3, EOS], [5.0] * 4, 2, [1, 2], True),  # the budget ends the generation
        ([1, 2, 3, 4], [1, EOS, 3, 4], [5.0] * 4, 10, [1, EOS], True),  # an early EOS ends it too
        ([1, 2], [1, 2], [5.0] * 2, 10, [1, 2], False),  # draft used up without EOS: decoding goes on
        ([1, 2], [3, 2], [1e-4, 5.0], 10, [], False),
    ],
)
def test_greedy_prefix_hand_cases(draft, argmax, margin, budget, expect, finished):
    pre = generation.greedy_prefix(
        draft, torch.tensor(argmax), torch.tensor(margin, dtype=torch.float64), [EOS], budget, min_margin=1e-3
    )
    assert (pre.tokens, pre.finished) == (expect, finished)


@pytest.fixture(scope="module")
def memorising(tiny):
    """A copy of the tiny model trained until it reproduces the first forget and retain answers."""
    import copy

    from baldro.data.formatting import collate_encoded

    model, tok, fmt = tiny
    model = copy.deepcopy(model).train()
    rows = _rows("forget10_perturbed", LIMIT) + _rows("retain_perturbed", LIMIT)
    batch = collate_encoded(
        fmt.encode_many([r["question"] for r in rows], [r["answer"] for r in rows]), tok.pad_token_id
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(150):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok, fmt


def _generation_prompts(fmt, n: int) -> list[list[int]]:
    rows = _rows("forget10_perturbed", n) + _rows("world_facts_perturbed", n)
    return [fmt.encode_prompt(r["question"]) for r in rows]


def test_continuous_batching_equals_fixed_batches(memorising):
    """Rows that stop leave the batch and waiting prompts take their places: same texts as
    model.generate on fixed batches and as one prompt at a time."""
    model, tok, fmt = memorising
    prompts = _generation_prompts(fmt, 8)
    continuous = generation.generate(model, tok, prompts, 24, batch_size=3)
    fixed = generation.generate(model, tok, prompts, 24, batch_size=5, sort_by_length=False)
    single = [generation.generate(model, tok, [p], 24, batch_size=1, sort_by_length=False)[0] for p in prompts]
    lengths = [len(tok(g, add_special_tokens=False)["input_ids"]) for g in single]
    assert len(set(lengths)) >= 4, f"rows should stop at different lengths to exercise refills: {lengths}"
    assert continuous == fixed == single


@pytest.mark.parametrize(
    "tokens, k, expect",
    [
        ([5, 5, 5], 4, [5, 5, 5, 5]),  # a loop of period 1 continues
        ([1, 2, 3, 1, 2, 3, 1, 2], 5, [3, 1, 2, 3, 1]),  # period 3, from the latest occurrence of (1, 2)
        ([9, 1, 2, 4, 1, 2], 3, [4, 1, 2]),  # (1, 2) was followed by 4
        ([1, 2, 3, 4], 3, []),  # nothing repeats
        ([7, 1, 2, 8, 3, 1, 2], 2, [8, 3]),  # the longest n-gram wins: (1, 2) -> 8
        ([1, 2, 3, 1, 2], 0, []),
    ],
)
def test_ngram_drafter_hand_cases(tokens, k, expect):
    assert generation.NgramDrafter(tokens).draft(k) == expect


def test_ngram_drafter_prefers_the_longest_match():
    d = generation.NgramDrafter([4, 1, 2, 6, 3, 1, 2, 7, 4, 1, 2], min_n=1, max_n=3)
    assert d.draft(1) == [6]  # (4, 1, 2) was followed by 6; the later (1, 2) by 7
    d.append(5)
    assert d.draft(2) == []  # (1, 2, 5), (2, 5) and (5,) never occurred


def test_speculative_decoding_equals_plain_greedy(memorising):
    """Prompt-lookup proposals change how many tokens a forward pass emits, never which: the texts
    equal model.generate's, with fewer forward passes for a model that loops."""
    model, tok, fmt = memorising
    prompts = _generation_prompts(fmt, 8)
    fixed = generation.generate(model, tok, prompts, 40, batch_size=4, sort_by_length=False)
    calls = {}
    for lookahead in (0, 1, 8):
        n = [0]
        handle = model.register_forward_hook(lambda m, i, o: n.__setitem__(0, n[0] + 1))
        try:
            assert generation.generate(model, tok, prompts, 40, batch_size=4, lookahead=lookahead) == fixed
        finally:
            handle.remove()
        calls[lookahead] = n[0]
    assert calls[8] < calls[1] < calls[0], calls


def test_speculation_is_off_by_default_for_large_models_on_cpu(tiny, monkeypatch):
    model, _, _ = tiny
    assert generation.default_lookahead(model) == generation.LOOKAHEAD
    monkeypatch.setattr(generation, "CPU_SPECULATION_MAX_PARAMS", 1000)
    assert generation.default_lookahead(model) == 0


def test_unbatchable_cache_falls_back_to_model_generate(memorising, monkeypatch):
    """A model whose cache the continuous decoder cannot merge (e.g. sliding-window layers) is
    decoded by model.generate on fixed batches, with the same texts."""
    model, tok, fmt = memorising
    prompts = _generation_prompts(fmt, 3)
    expected = generation.generate(model, tok, prompts, 12, batch_size=4)
    monkeypatch.setattr(generation, "is_batchable_cache", lambda cache: False)
    assert generation.generate(model, tok, prompts, 12, batch_size=4) == expected


def test_generation_resumes_after_a_known_prefix(memorising):
    model, tok, fmt = memorising
    prompts = _generation_prompts(fmt, 3)
    cfg = generation.greedy_config(model, tok, 10)
    full = generation.generate(model, tok, prompts, 10, batch_size=4)
    with torch.inference_mode():
        tokens = [
            model.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), generation_config=cfg
            )[0, len(p) :].tolist()
            for p in prompts
        ]
    prefixes = [generation.GreedyPrefix(t[:k], False) for t, k in zip(tokens, [0, 3, 9, 1, 5, 2])]
    assert generation.generate(model, tok, prompts, 10, batch_size=4, prefixes=prefixes) == full
    # a finished prefix is the whole generation: the model is not asked
    done = [generation.GreedyPrefix(tok("Paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], True)]
    assert generation.generate(model, tok, prompts[:1], 10, batch_size=1, prefixes=done) == ["Paris"]
    with pytest.raises(BaldroError, match="EOS"):
        generation.generate(
            model, tok, prompts[:1], 10, 1, prefixes=[generation.GreedyPrefix([5, tok.eos_token_id], False)]
        )


def test_drafted_generation_equals_plain_generation(memorising):
    """The optimised evaluator takes the greedy tokens the teacher-forced pass already determines
    (the model reproduces the answers it memorised) and gives the naive evaluator's generations."""
    model, tok, fmt = memorising
    kw = dict(forget_split="forget10", batch_size=4, max_new_tokens=40, limit=LIMIT, progress=False)
    fast_t: dict = {}
    slow_t: dict = {}
    fast, _ = evaluate_tofu(model, tok, fmt, TOFU, timings=fast_t, **kw)
    slow, _ = evaluate_tofu(model, tok, fmt, TOFU, shared_forward=False, sort_by_length=False, timings=slow_t, **kw)
    assert diff_eval_logs(fast, slow) == []
    rouge = [v["rougeL_recall"] for v in fast["forget_Q_A_ROUGE"]["value_by_index"].values()]
    assert sum(r == 1.0 for r in rouge) >= 3, f"the model should reproduce most forget answers: {rouge}"
    assert fast_t["rouge"]["seconds"] < slow_t["rouge"]["seconds"]


def test_decoding_resumes_on_the_teacher_forced_keys_values(memorising, monkeypatch):
    """Drafted rows join the decoding batch on the keys/values their scoring pass kept (`DraftKV`): no
    prefill for them, fewer model tokens, the generations and numbers of the run that prefills."""
    model, tok, fmt = memorising
    kw = dict(forget_split="forget10", batch_size=4, max_new_tokens=40, limit=LIMIT, progress=False)
    taken = []
    take = generation.DraftKV.take

    def counting_take(self, tokens):
        got = take(self, tokens)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(generation.DraftKV, "take", counting_take)
    kept_t: dict = {}
    kept, _ = evaluate_tofu(model, tok, fmt, TOFU, timings=kept_t, **kw)
    assert sum(taken) >= 5, f"drafted rows should resume on kept keys/values: {taken}"
    monkeypatch.setattr(generation, "DRAFT_KV_MEMORY_SHARE", 0.0)  # nothing fits: every row prefills
    taken.clear()
    filled_t: dict = {}
    filled, _ = evaluate_tofu(model, tok, fmt, TOFU, timings=filled_t, **kw)
    assert not any(taken)
    assert diff_eval_logs(kept, filled) == []
    assert kept_t["rouge"]["model_tokens"] < filled_t["rouge"]["model_tokens"]


@pytest.mark.parametrize("shared", [True, False], ids=["shared_prompts", "lone_answers"])
def test_kept_keys_values_are_those_of_a_fresh_pass(tiny, shared):
    """What `DraftKV` keeps of a scoring pass (prompt + drafted answer but its last token), with the
    prompt shared by two answers or not, equals the keys/values of a forward pass over those tokens
    alone, to float rounding."""
    model, tok, fmt = tiny
    rows = _rows("forget10_perturbed", 3)
    encoded = []
    for r in rows:
        encoded += fmt.encode_many([r["question"]] * 2, [r["answer"], r["perturbed_answer"][0]])
    if not shared:
        encoded = encoded[::2]
    kv = generation.DraftKV([tok.eos_token_id], 40, 0.0, budget_bytes=1 << 30)
    answers = encoded[::2] if shared else encoded
    kv.expect(e.input_ids for e in answers)
    scores = engine.score_sequences_shared_prompts(model, encoded, 4, tok.pad_token_id, keep_kv=kv)
    assert len(kv.kept) == 3 and kv.used > 0
    for e, sc in zip(answers, scores[::2] if shared else scores):
        pre = generation.greedy_prefix(e.input_ids[e.prompt_len :], sc.argmax, sc.argmax_margin, [], 40, 0.0)
        tokens = e.input_ids[: e.prompt_len + len(pre.tokens) - 1]
        layers = kv.take(tokens)
        assert layers is not None and layers[0][0].shape[2] == len(tokens)
        with torch.inference_mode():
            fresh = model(input_ids=torch.tensor([tokens]), use_cache=True).past_key_values
        for (k, v), layer in zip(layers, fresh.layers):
            torch.testing.assert_close(k, layer.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v, layer.values, rtol=1e-4, atol=1e-5)
    assert kv.used == 0 and kv.take(tokens) is None  # taken once
    small = generation.DraftKV([tok.eos_token_id], 40, 0.0, budget_bytes=1)  # nothing fits
    small.expect(e.input_ids for e in answers)
    engine.score_sequences_shared_prompts(model, encoded, 4, tok.pad_token_id, keep_kv=small)
    assert not small.kept


# ------------------------------------------------------------------------------- reference handling
def test_wrong_split_retain_log_is_refused(tmp_path):
    ref = REFERENCE_LOGS / "tofu_Llama-2-7b-chat-hf_retain99" / EVAL_FILE
    if not ref.is_file():
        pytest.skip(f"reference log {ref} not found")
    data = load_tofu_eval_data(TOFU, "forget10", limit=3)
    with pytest.raises(BaldroError, match="forget10"):
        load_retain_log(ref, data)
    with pytest.raises(BaldroError, match="not found"):
        load_retain_log(tmp_path / "missing.json", data)


def test_limited_run_compares_with_the_same_reference_rows():
    """With `limit`, the retain model's full log is cut to the same rows: forget quality is a number."""
    from baldro.eval.summarize import summarize_tofu

    target = REFERENCE_LOGS / "tofu_Llama-2-7b-chat-hf_full" / "evals_forget10" / EVAL_FILE
    retain = REFERENCE_LOGS / "tofu_Llama-2-7b-chat-hf_retain90" / EVAL_FILE
    if not (target.is_file() and retain.is_file()):
        pytest.skip("reference logs not found")
    n = {"forget": 40, "retain": 30, "ra": 20, "wf": 20, "holdout": 40}
    t = restrict_log(json.loads(target.read_text()), n)
    r = restrict_log(json.loads(retain.read_text()), n)
    assert len(t["forget_truth_ratio"]["value_by_index"]) == len(r["forget_truth_ratio"]["value_by_index"]) == 40
    assert len(t["mia_min_k"]["holdout"]["value_by_index"]) == 40
    assert len(t["ra_Q_A_Prob"]["value_by_index"]) == 20
    summary = summarize_tofu(t, r)
    assert 0.0 <= summary["forget_quality"] < 0.05  # the full model has not forgotten
    assert not math.isnan(summary["privleak"])


def test_bad_limit_is_a_user_error():
    with pytest.raises(BaldroError, match="limit"):
        load_tofu_eval_data(TOFU, "forget10", limit=0)
    with pytest.raises(BaldroError, match="forget"):
        load_tofu_eval_data(TOFU, "forget42")


def test_missing_reference_is_logged_once(tiny, caplog):
    model, tok, fmt = tiny
    with caplog.at_level(logging.WARNING, logger="baldro.eval.tofu"):
        _, summary = evaluate_tofu(model, tok, fmt, TOFU, limit=2, max_new_tokens=2, batch_size=8)
    lines = [r.getMessage() for r in caplog.records if "forget_quality" in r.getMessage()]
    assert len(lines) == 1 and "retain_logs_path" in lines[0]
    assert summary["forget_quality"] is None

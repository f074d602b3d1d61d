"""The tiny model recipe: tokenizer round-trip, BOS, prompt-prefix property, save/reload, sizes."""

from __future__ import annotations

import math

import pytest
import torch

from baldro.data.synthetic import SyntheticConfig, build
from baldro.models.tiny import (
    BOS,
    EOS,
    PAD,
    PRESETS,
    build_tiny_model,
    count_parameters,
    tiny_llama_config,
    train_tokenizer,
)

# Parameter counts at vocab 1024 (documented in baldro.models.tiny); "test" is a few hundred thousand, "demo" 2-5M.
EXPECTED = {"test": 147_776, "demo": 2_885_888}
RANGES = {"test": (5e4, 1e6), "demo": (2e6, 5e6)}


@pytest.fixture(scope="module")
def texts():
    d = build(SyntheticConfig(n_people=40, seed=1))
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in d["full"] + d["world"]]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts, vocab_size=1024)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, texts):
    out = tmp_path_factory.mktemp("tiny")
    assert build_tiny_model(out, texts, preset="test", vocab_size=1024, seed=0) == out
    return out


SAMPLES = [
    "Question: Where was Kal Tornova born?\nAnswer: Kal Tornova was born in Dunport, Velmark.",
    'The first book was titled "The Hollow Garden" (2018).',
    "  leading spaces, double  spaces,\ttabs\nand\n\nnewlines  ",
    "Ünïcødé: Zürich, Kraków, 東京, emoji 🙂 and / slashes \\ too",
]


def test_tokenizer_specials_and_vocab(tokenizer):
    assert len(tokenizer) == 1024
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert not getattr(tokenizer, "chat_template", None)


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_round_trip_and_bos(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert plain == ids[1:]
    assert tokenizer.decode(plain) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True) == text


def test_prompt_tokens_are_a_prefix_of_prompt_plus_answer(tokenizer):
    """The answer-only label mask takes the first len(prompt) tokens as the prompt: they must match."""
    d = build(SyntheticConfig(n_people=10, seed=5))
    rows = d["full"] + d["world"] + d["forget10_perturbed"]
    answers = [r["answer"] for r in rows] + [a for r in d["forget10_perturbed"] for a in r["perturbed_answer"]]
    for q, a in zip([r["question"] for r in rows] * 7, answers):
        prompt = f"Question: {q}\nAnswer: "
        p, f = tokenizer(prompt)["input_ids"], tokenizer(prompt + a)["input_ids"]
        assert f[: len(p)] == p, (prompt, a)


def test_tokenizer_training_is_deterministic(texts, tokenizer):
    again = train_tokenizer(texts, vocab_size=1024)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again(SAMPLES[0])["input_ids"] == tokenizer(SAMPLES[0])["input_ids"]


def test_save_and_reload_through_auto_classes(saved, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (saved / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.dtype == torch.float32
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    for text in SAMPLES:
        ids = tok(text)["input_ids"]
        assert ids == tokenizer(text)["input_ids"]  # same training data and seed: same tokenizer
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        model.config.bos_token_id,
        model.config.eos_token_id,
        model.config.pad_token_id,
    )
    assert count_parameters(model) == EXPECTED["test"]


def test_formatter_scores_exactly_the_answer(tokenizer):
    """With baldro's plain template the labels cover the whole answer (+EOS) and nothing else."""
    from baldro.data.formatting import IGNORE_INDEX, QAFormatter

    fmt = QAFormatter(tokenizer)
    assert not fmt.use_chat_template
    for q, a in [("Where was Kal Tornova born?", "Kal Tornova was born in Dunport."), ("Year?", '"1984", of course.')]:
        enc = fmt.encode(q, a)
        scored = [t for t in enc.labels if t != IGNORE_INDEX]
        assert scored[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(scored[:-1]) == a
        assert enc.input_ids[: enc.prompt_len] == fmt.encode_prompt(q)


def test_build_is_seeded(tmp_path, texts, saved):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(saved)
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", texts, preset="test", seed=0))
    c = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "c", texts, preset="test", seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_counts_and_forward(preset, tokenizer):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(tokenizer, preset)
    assert config.max_position_embeddings == 512 and config.tie_word_embeddings
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    n = count_parameters(model)
    lo, hi = RANGES[preset]
    assert lo <= n <= hi and n == EXPECTED[preset], n
    batch = tokenizer(SAMPLES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(len(tokenizer))) < 1.0


def test_unknown_preset_and_small_vocab(tokenizer):
    with pytest.raises(ValueError):
        tiny_llama_config(tokenizer, "huge")
    with pytest.raises(ValueError):
        train_tokenizer(["abc"], vocab_size=100)

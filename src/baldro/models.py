"""Load any Hugging Face causal LM and its tokenizer by hub id, local path, GGUF file or packaged model
(`baldro.model_sources`), optionally with LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from baldro.errors import BaldroError
from baldro.model_sources import resolve_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        # bf16 where the hardware has it; CPUs stay in fp32 (bf16 kernels are slow or missing there)
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise BaldroError(f"unknown model.dtype {dtype!r}: use one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists()


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise BaldroError(f"tokenizer path {path} does not exist: set model.tokenizer or model.path")
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(path).expanduser()) if _looks_local(path) else path,
                                            trust_remote_code=trust_remote_code)
    except OSError as e:
        raise BaldroError(f"could not load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Safe: attention masks are built from sequence lengths, never from the pad id (SPEC section 4).
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str,
    dtype: str | None = "auto",
    device: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    lora: dict | None = None,
    gradient_checkpointing: bool = False,
    device_map_for_training: bool = True,
):
    """`AutoModelForCausalLM` on `device` (or left for accelerate to place when `device="accelerate"`)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(path)
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise BaldroError(f"model path {path} does not exist: set model.path to a folder or a hub id")
    dev = None if device == "accelerate" else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev or resolve_device(None))
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(Path(path).expanduser()) if _looks_local(path) else path, **kwargs)
    except OSError as e:
        raise BaldroError(f"could not load a causal LM from {path!r}: {str(e).splitlines()[0]}") from None
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if lora:
        model = apply_lora(model, lora)
    if dev is not None:
        model.to(dev)
    return model


def apply_lora(model, lora: dict):
    """Wrap `model` with a peft LoRA adapter; `lora` holds LoraConfig fields (r, lora_alpha, ...)."""
    from peft import LoraConfig, get_peft_model

    args = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **dict(lora)}
    try:
        config = LoraConfig(task_type="CAUSAL_LM", **args)
    except TypeError as e:
        raise BaldroError(f"bad model.lora settings: {e}") from None
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: %d trainable parameters", trainable)
    return model


def save_model(model, tokenizer, out_dir: str | Path, merge_lora: bool = False) -> Path:
    """Save weights (safetensors) and tokenizer into a fresh folder, then move it into place atomically."""
    import os
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        to_save = model.merge_and_unload() if merge_lora and hasattr(model, "merge_and_unload") else model
        to_save.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

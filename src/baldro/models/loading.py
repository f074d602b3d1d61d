"""Load any Hugging Face causal LM and its tokenizer by hub id, local path, GGUF file or packaged model
(`baldro.models.sources`), optionally with LoRA."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from baldro.distributed import launch_world, launched_strategy
from baldro.errors import BaldroError
from baldro.io import apply_umask_tree
from baldro.models.sources import resolve_model_path

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | None) -> torch.device:
    """The device `model.device` names for this process. `auto` (or unset) and a bare `cuda` mean this
    process's own GPU: `cuda:LOCAL_RANK` when a launcher started several processes, so that every rank's
    model and reference model land on its own GPU whatever ran before (a bare `cuda` is whichever GPU is
    current, GPU 0 in a fresh process)."""
    if device in (None, "auto", "cuda"):
        if not torch.cuda.is_available():
            return torch.device("cuda" if device == "cuda" else "cpu")
        world, _, local_rank = launch_world()
        return torch.device("cuda", local_rank) if world > 1 or "LOCAL_RANK" in os.environ else torch.device("cuda")
    return torch.device(device)


def model_device(device: str | None) -> torch.device | None:
    """Where `load_model` puts the weights; None leaves them where from_pretrained put them (on the CPU,
    or partitioned by DeepSpeed ZeRO-3) for accelerate to place: `model.device=accelerate`, and `auto`
    under FSDP or DeepSpeed, which shard or place the model themselves (a full copy per GPU first would
    not fit a model that needs sharding)."""
    if device == "accelerate":
        return None
    if device in (None, "auto") and launched_strategy() in ("fsdp", "deepspeed"):
        return None
    return resolve_device(device)


def check_device(device: str | None) -> None:
    """`model.device` names a device this machine has (checked before any weights load)."""
    if device in (None, "auto", "accelerate"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BaldroError(
            f"model.device={device!r} is not a device: use cpu, cuda, cuda:N, mps, auto or accelerate"
        ) from None
    world = launch_world()[0]
    if dev.type == "cuda" and dev.index is not None and world > 1:
        raise BaldroError(
            f"model.device={device} in a run of {world} processes puts every process's models on GPU "
            f"{dev.index}: use model.device=auto (each process uses its own GPU, cuda:LOCAL_RANK)"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BaldroError(
                f"model.device={device} but this machine has no usable CUDA device: use model.device=cpu "
                "(and train.use_cpu=true) or run on a GPU machine"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BaldroError(
                f"model.device={device} but this machine has {torch.cuda.device_count()} CUDA "
                f"device(s): use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise BaldroError(f"model.device={device} but MPS is not available here: use model.device=cpu")
    elif dev.type != "cpu":
        raise BaldroError(f"model.device={device!r} is not supported: use cpu, cuda, cuda:N, mps, auto or accelerate")


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_safetensors(path: str | Path) -> None:
    """A `.safetensors` file is whole: its header parses and its tensors end where the file ends."""
    import json
    import struct

    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        raise BaldroError(
            f"{path} is not a valid safetensors file (damaged or cut short): save or copy the model again"
        ) from None
    if 8 + n + end != size:
        raise BaldroError(
            f"{path} is truncated ({size} bytes, its header says {8 + n + end}): the copy or save was "
            "interrupted; save or copy the model again"
        )


def check_model_source(path: str | None, tokenizer: str | None = None) -> None:
    """A local model folder holds a config, whole weights and a tokenizer (checked before loading;
    hub ids, GGUF files and packaged models are checked when they load)."""
    if not path:
        raise BaldroError("model.path is not set: give a hub id or a local folder (model.path=...)")
    path = str(path)
    if path.startswith("package:") or path.endswith(".gguf"):
        return
    if _looks_local(path):
        folder = Path(path).expanduser()
        if not folder.exists():
            raise BaldroError(f"model path {path} does not exist: set model.path to a folder or a hub id")
        if not folder.is_dir():
            raise BaldroError(f"model path {path} is a file: set model.path to the folder that holds config.json")
        if not (folder / "config.json").is_file():
            raise BaldroError(
                f"model folder {path} has no config.json: set model.path to a folder saved by "
                "save_pretrained (or a hub id)"
            )
        if not any((folder / name).is_file() for name in WEIGHT_FILES):
            raise BaldroError(
                f"model folder {path} has no weights ({', '.join(WEIGHT_FILES)}): set model.path to a "
                "complete model folder"
            )
        for weights in sorted(folder.glob("*.safetensors")):
            check_safetensors(weights)
    tok = str(tokenizer or path)
    if tok.startswith("package:") or tok.endswith(".gguf") or not _looks_local(tok):
        return
    tok_folder = Path(tok).expanduser()
    if not tok_folder.is_dir():
        raise BaldroError(f"tokenizer path {tok} does not exist: set model.tokenizer or model.path")
    if not any((tok_folder / name).is_file() for name in TOKENIZER_FILES):
        key = "model.tokenizer" if tokenizer else "model.path"
        raise BaldroError(
            f"{tok} has no tokenizer ({', '.join(TOKENIZER_FILES)}): set model.tokenizer to a folder "
            f"or hub id that has one (now {key}={tok})"
        )


def count_nonfinite(model) -> int:
    """How many parameters of `model` are NaN or inf (a diverged run's model)."""
    with torch.no_grad():
        return int(sum((~torch.isfinite(p)).sum().item() for p in model.parameters() if p.is_floating_point()))


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
        tok = AutoTokenizer.from_pretrained(
            str(Path(path).expanduser()) if _looks_local(path) else path, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BaldroError(f"could not load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Safe: attention masks are built from sequence lengths, never from the pad id (SPEC section 4).
        tok.pad_token = tok.eos_token
    return tok


def set_flush_denormal(enabled: bool) -> bool:
    """Treat subnormal floats as zero in CPU arithmetic (`model.flush_denormal`): x86 cores compute
    with them many times slower, and a saturated forget loss sends its gradients there. The flag is
    per thread: it holds for this thread and the threads torch starts afterwards (its OpenMP pool is
    started by the first parallel operation), so the recipes set it before the model loads. A no-op
    on CPUs without the flag; GPUs are not affected."""
    return torch.set_flush_denormal(bool(enabled))


QUANTIZE_BITS = (8, 4)  # bitsandbytes: LLM.int8 (one scale per output row) and 4-bit (one per block of 64)
# the tested version (pyproject's `attack` extra), which quantizes on the CPU as well as on a GPU
QUANTIZE_LIBRARIES = {"bitsandbytes": "bitsandbytes==0.50.2"}


def check_quantization_library(library: str = "bitsandbytes") -> None:
    """`library` is one baldro quantizes with, and it is installed (checked before any weights load)."""
    import importlib.util

    if library not in QUANTIZE_LIBRARIES:
        raise BaldroError(f"attack.quantize.library={library!r} is not supported: use {', '.join(QUANTIZE_LIBRARIES)}")
    if importlib.util.find_spec(library) is None:
        raise BaldroError(
            f"quantizing needs the {library} package, which is not installed: pip install "
            f"'{QUANTIZE_LIBRARIES[library]}' (or pip install 'baldro[attack]')"
        )


def quantization_config(bits: int, compute_dtype: torch.dtype, quant_type_4bit: str = "fp4"):
    """transformers' `BitsAndBytesConfig` for `bits`-bit weights (the linear layers but the LM head)."""
    from transformers import BitsAndBytesConfig

    if bits not in QUANTIZE_BITS:
        raise BaldroError(f"{bits}-bit weights are not supported: use {' or '.join(map(str, QUANTIZE_BITS))}")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_type=quant_type_4bit
    )


def load_model(
    path: str,
    dtype: str | None = "auto",
    device: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    lora: dict | None = None,
    gradient_checkpointing: bool = False,
    device_map_for_training: bool = True,
    seed: int = 0,
    quantize_bits: int | None = None,
    quant_type_4bit: str = "fp4",
):
    """`AutoModelForCausalLM` on `device` (or left for accelerate to place when `device="accelerate"`);
    a LoRA adapter is initialised from `seed` alone. `quantize_bits` (8 or 4): bitsandbytes weights,
    placed on the device as they load (on the CPU or a GPU)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(path)
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise BaldroError(f"model path {path} does not exist: set model.path to a folder or a hub id")
    dev = model_device(device)
    torch_dtype = resolve_dtype(dtype, dev or resolve_device(None))
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize_bits is not None:
        check_quantization_library("bitsandbytes")
        dev = dev or resolve_device(None)
        kwargs["quantization_config"] = quantization_config(quantize_bits, torch_dtype, quant_type_4bit)
        kwargs["device_map"] = {"": str(dev)}  # quantized weights cannot be moved after loading
        dev = None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(Path(path).expanduser()) if _looks_local(path) else path, **kwargs
        )
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
        raise BaldroError(
            f"could not load a causal LM from {path!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ": check that the folder holds a complete saved model"
        ) from None
    except Exception as e:  # safetensors' own error type for damaged files
        if type(e).__name__ != "SafetensorError":
            raise
        raise BaldroError(
            f"could not load a causal LM from {path!r}: damaged weights ({e}): save or copy the model again"
        ) from None
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if lora:
        model = apply_lora(model, lora, seed=seed)
    if dev is not None:
        model.to(dev)
    return model


LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}


def apply_lora(model, lora: dict, seed: int = 0):
    """Wrap `model` with a peft LoRA adapter; `lora` holds LoraConfig fields (r, lora_alpha, ...). The
    adapter's random initialisation depends on `seed` only (the global generators are left as they were)."""
    from peft import LoraConfig, get_peft_model

    args = {**LORA_DEFAULTS, **dict(lora)}
    try:
        config = LoraConfig(task_type="CAUSAL_LM", **args)
    except (TypeError, ValueError) as e:
        raise BaldroError(f"bad model.lora settings: {str(e).splitlines()[0]}") from None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: %d trainable parameters", trainable)
    return model


def unsharded_copy(model, state_dict: dict):
    """A copy of `model` (a causal LM, or a peft model around one) built on the meta device and given the
    tensors of `state_dict` (the whole weights of a sharded model, e.g. from
    `baldro.distributed.full_state_dict`): what the main process saves, without touching the shards."""
    import copy

    from transformers import AutoModelForCausalLM

    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config else model
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(copy.deepcopy(base.config))
    if peft_config:
        from peft import get_peft_model

        twin = get_peft_model(twin, copy.deepcopy(peft_config[next(iter(peft_config))]))
    twin.load_state_dict(state_dict, strict=False, assign=True)
    (twin.get_base_model() if peft_config else twin).tie_weights()
    missing = [n for n, p in twin.named_parameters() if p.is_meta]
    if missing:
        raise BaldroError(
            f"the gathered weights lack {len(missing)} tensor(s) of the model (e.g. {missing[0]}): the "
            "sharded model could not be saved"
        )
    if getattr(base, "generation_config", None) is not None:
        (twin.get_base_model() if peft_config else twin).generation_config = copy.deepcopy(base.generation_config)
    return twin.eval()


def save_model(model, tokenizer, out_dir: str | Path, merge_lora: bool = False, state_dict: dict | None = None) -> Path:
    """Save weights (safetensors) and tokenizer into a fresh folder, then move it into place atomically.

    `state_dict`: the whole weights when `model` is sharded (FSDP, ZeRO-3); they are saved through
    `unsharded_copy` (call from the main process after every process has gathered them)."""
    import os
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        if state_dict is not None:
            model = unsharded_copy(model, state_dict)
        to_save = model.merge_and_unload() if merge_lora and hasattr(model, "merge_and_unload") else model
        to_save.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        apply_umask_tree(tmp)
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

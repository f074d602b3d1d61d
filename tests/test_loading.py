"""Data and model loading paths that users hit with internet access, exercised offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from baldro.cli import main
from baldro.data import tofu
from baldro.errors import BaldroError
from baldro.models.loading import load_tokenizer
from baldro.models.tiny import train_tokenizer
from baldro.recipes import unlearn as recipes


def test_hub_ids_go_through_datasets(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "q?", "answer": "a."}]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = tofu.load_split("locuslab/TOFU", "forget10")
    assert rows == [{"question": "q?", "answer": "a."}]
    assert calls == [("locuslab/TOFU", "forget10", "train")]


def test_hub_failure_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BaldroError, match="could not load locuslab/TOFU config 'forget10' from the hub: no network"):
        tofu.load_split("locuslab/TOFU", "forget10")


def test_split_pairs():
    assert tofu.retain_split_for("forget05") == "retain95" and tofu.holdout_split_for("forget01") == "holdout01"
    with pytest.raises(BaldroError, match="unknown TOFU forget split"):
        tofu.retain_split_for("forget20")


def test_missing_pad_token_is_fixed(tmp_path):
    tok = train_tokenizer(["some text for a tokenizer"] * 5, vocab_size=280)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token == loaded.eos_token


@pytest.mark.slow
@pytest.mark.parametrize("objective,retain_loss,copies", [("simnpo", "nll", 0), ("npo", "nll", 1), ("simnpo", "kl", 1)])
def test_reference_model_only_when_needed(
    monkeypatch, tiny_model_dir, tofu_dir, tmp_path, objective, retain_loss, copies
):
    made = []
    original = recipes.make_reference_model
    monkeypatch.setattr(recipes, "make_reference_model", lambda model: made.append(1) or original(model))
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "unlearn" / "tofu.yaml")
    rc = main(
        [
            "unlearn",
            recipe,
            f"model.path={tiny_model_dir}",
            "model.dtype=float32",
            "model.device=cpu",
            "model.attn_implementation=null",
            "train.bf16=false",
            "train.use_cpu=true",
            "train.save_strategy=no",
            "train.disable_tqdm=true",
            "format.use_chat_template=false",
            f"data.source={tofu_dir}",
            "split=forget01",
            f"objective={objective}",
            f"objective.retain_loss={retain_loss}",
            "weighting=group",
            "data.limit=4",
            "train.num_train_epochs=1",
            "train.per_device_train_batch_size=4",
            f"output_dir={tmp_path / 'r'}",
        ]
    )
    assert rc == 0
    assert len(made) == copies


def test_a_source_is_a_local_folder_a_hub_id_or_a_missing_path(tmp_path):
    from baldro.data.sources import is_local_folder, looks_like_path
    from baldro.errors import BaldroError

    assert is_local_folder(tmp_path, "unused") is True
    assert is_local_folder("locuslab/TOFU", "unused") is False and not looks_like_path("locuslab/TOFU")
    for missing in (tmp_path / "nope", "./nope", "~/nope-baldro", "data.json"):
        with pytest.raises(BaldroError, match="give a folder"):
            is_local_folder(missing, "give a folder")

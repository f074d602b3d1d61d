"""Bad input gives one clear line naming the problem and the fix, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baldro.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = str(ROOT / "configs" / "unlearn" / "tofu.yaml")


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


@pytest.fixture
def base(tofu_dir, tmp_path):
    return [UNLEARN, f"data.source={tofu_dir}", f"output_dir={tmp_path / 'run'}", "model.path=/nonexistent/model"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective.name=nope"], "unknown forget objective 'nope': use one of"),
        (["weighting.name=nope"], "unknown weighting 'nope': use one of"),
        (["objective=nope"], "unknown objective 'nope': use one of"),
        (["weighting=group", "weighting.args.ratio=0"], "weighting ratio must be in (0, 1], got 0"),
        (["weighting=group", "weighting.args.ratio=1.5"], "weighting ratio must be in (0, 1], got 1.5"),
        (["weighting=dv", "weighting.args.sigma=0"], "weighting sigma must be > 0, got 0"),
        (["weighting=dv_softmin", "weighting.args.sigma=-2"], "weighting sigma must be > 0, got -2"),
        (["objective.retain_loss=l2"], "unknown retain loss 'l2'"),
        (["data.forget_split=forget42"], "TOFU split 'forget42' not found"),
        ([], "model path /nonexistent/model does not exist"),
    ],
)
def test_unlearn_bad_input(capsys, base, overrides, message):
    rc, line = run_cli(capsys, "unlearn", *base, *overrides)
    assert rc == 2
    assert line.startswith("baldro unlearn: error: ")
    assert message in line


def test_missing_data_folder(capsys, tmp_path):
    rc, line = run_cli(capsys, "unlearn", UNLEARN, f"data.source={tmp_path / 'nodata'}", f"output_dir={tmp_path}")
    assert rc == 2 and "data folder" in line and "does not exist" in line


def test_split_without_expected_fields(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "forget10.jsonl").write_text(json.dumps({"question": "q?", "response": "a"}) + "\n")
    rc, line = run_cli(capsys, "unlearn", UNLEARN, f"data.source={data}", f"output_dir={tmp_path / 'r'}")
    assert rc == 2 and "lacks field(s) ['answer']" in line


def test_empty_split(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "forget10.jsonl").write_text("")
    rc, line = run_cli(capsys, "unlearn", UNLEARN, f"data.source={data}", f"output_dir={tmp_path / 'r'}")
    assert rc == 2 and "is empty" in line


def test_missing_config_and_bad_override(capsys, tmp_path):
    rc, line = run_cli(capsys, "unlearn", str(tmp_path / "missing.yaml"))
    assert rc == 2 and "config file" in line and "not found" in line
    rc, line = run_cli(capsys, "unlearn", UNLEARN, "learning_rate")
    assert rc == 2 and "must look like key=value" in line


def test_bad_objective_hyperparameter(capsys, base):
    rc, line = run_cli(capsys, "unlearn", *base, "objective.args.temperature=3")
    assert rc == 2 and "has no hyperparameter(s) ['temperature']" in line

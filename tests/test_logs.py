"""What a user sees with output sent to a file: plain lines, no control characters, no warnings of ours;
and `show-config` refuses what the run refuses, with the same line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from baldro.cli import main
from baldro.progress import metrics_line, rate

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = str(ROOT / "configs" / "unlearn" / "tofu.yaml")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # \r, escape sequences, ...: everything but \t and \n


def assert_clean_log(text: str) -> None:
    """A log a person can read: no carriage returns or cursor movements, no warnings."""
    bad = CONTROL.search(text)
    assert bad is None, f"control character {bad.group()!r} near: {text[max(0, bad.start() - 80) : bad.end() + 80]!r}"
    warned = [line for line in text.splitlines() if re.search(r"warn", line, re.IGNORECASE)]
    assert not warned, warned


def tiny_unlearn_args(model_dir, tofu_dir, out) -> list[str]:
    """The default recipe on the tiny model, with only what a CPU and the tiny model need changed."""
    return [
        "unlearn",
        UNLEARN,
        f"model.path={model_dir}",
        f"data.source={tofu_dir}",
        f"output_dir={out}",
        "model.dtype=float32",
        "model.attn_implementation=null",
        "train.bf16=false",
        "format.use_chat_template=false",
        "split=forget01",
        "data.limit=8",
        "train.num_train_epochs=2",
        "train.per_device_train_batch_size=4",
        "train.gradient_accumulation_steps=1",
        "train.logging_steps=1",
    ]


@pytest.mark.slow
def test_unlearn_output_to_a_file_is_plain_lines(tiny_model_dir, tofu_dir, tmp_path):
    log = tmp_path / "run.log"
    with log.open("w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "baldro.cli", *tiny_unlearn_args(tiny_model_dir, tofu_dir, tmp_path / "run")],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        ).returncode
    text = log.read_text()
    assert rc == 0, text[-2000:]
    assert_clean_log(text)
    lines = text.splitlines()
    steps = [line for line in lines if re.search(r"step \d+/4 \(epoch [\d.]+\): loss ", line)]
    assert len(steps) == 4 and "forget_loss " in steps[0] and "{" not in steps[0]  # one readable line per step
    assert any("train: 4/4 steps in" in line for line in lines)
    assert lines[-1].startswith("baldro: unlearned model in ")


def test_rate_reads_either_way():
    assert rate(10, 4.0, "step") == "2.50 steps/s"
    assert rate(3, 123.0, "step") == "41.0 s/step"
    assert rate(0, 5.0, "step") == "0.00 steps/s"


def test_metrics_line_text_and_json():
    logs = {"loss": 20.123456, "grad_norm": 85.0, "epoch": 0.25, "total_flos": 1e9, "weight_nonzero": 4}
    assert metrics_line(dict(logs), 1, 8) == "step 1/8 (epoch 0.25): loss 20.12, grad_norm 85, weight_nonzero 4"
    assert metrics_line(dict(logs), 1, 8, "json") == (
        '{"step": 1, "max_steps": 8, "loss": 20.123456, "grad_norm": 85.0, "epoch": 0.25, "weight_nonzero": 4}'
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["weighting=dv", "weighting.args.sigmaa=0.5"],
        ["objective=npo", "objective.args.betaa=1"],
        ["weighting=group", "weighting.args.ratio=2"],
        ["log_format=yaml"],
    ],
)
def test_show_config_refuses_what_the_run_refuses(overrides, tmp_path, capsys):
    common = [f"output_dir={tmp_path / 'run'}", "train.bf16=false", *overrides]
    assert main(["unlearn", UNLEARN, *common]) == 2
    run_err = capsys.readouterr().err.strip()
    assert main(["show-config", UNLEARN, *common]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == run_err.replace("baldro unlearn:", "baldro show-config:")
    assert run_err.count("\n") == 0


def test_show_config_knows_every_kind_of_run():
    from baldro import cli
    from baldro.recipes import validation

    assert cli.KINDS == validation.KINDS


def test_show_config_needs_the_kind_of_run_outside_configs(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\nobjective:\n  name: npo\n"
        "data:\n  forget_split: forget01\n  retain_split: retain99\n"
    )
    assert main(["show-config", str(recipe)]) == 2
    assert "give --kind finetune, unlearn, eval or attack" in capsys.readouterr().err
    assert main(["show-config", str(recipe), "--kind", "unlearn"]) == 0
    assert "name: npo" in capsys.readouterr().out

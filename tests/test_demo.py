"""`baldro demo --quick` end to end: data, tiny model, fine-tunes, unlearning runs, evals and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_logs import assert_clean_log

from baldro.cli import main
from baldro.recipes.demo import METHODS

# the demo's table of the documentation (docs/results.md, "The demo"): what `baldro demo` wrote on this project's machine
RESULTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def _tables(markdown: str) -> list[list[str]]:
    """Every markdown table of a text, as its lines."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def _seed_table(markdown: str) -> list[str]:
    found = [t for t in _tables(markdown) if t[0].startswith("| Method | Seeds |")]
    assert len(found) == 1, "expected exactly one mean ± std over seeds table"
    return found[0]


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    log = tmp_path / "demo.log"  # as in a batch job: `baldro demo --quick > demo.log 2>&1`
    with log.open("w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "baldro.cli", "demo", "--quick", "--out", str(out)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        ).returncode
    text = log.read_text()
    assert rc == 0, text[-2000:]
    assert "baldro demo: done in" in text
    assert_clean_log(text)

    runs = out / "runs"
    names = ["target", "retain"] + [m[0] for m in METHODS]
    for name in names:
        summary = json.loads((runs / name / "eval" / "TOFU_SUMMARY.json").read_text())
        for key in (
            "forget_quality",
            "model_utility",
            "forget_truth_ratio",
            "forget_Q_A_ROUGE",
            "balance_prob_std",
            "balance_tr_iqr",
            "balance_frac_remembered",
            "balance_frac_over_forgotten",
        ):
            assert summary.get(key) is not None, (name, key)
        assert 0 <= summary["forget_quality"] <= 1
        eval_log = json.loads((runs / name / "eval" / "TOFU_EVAL.json").read_text())
        assert len(eval_log["forget_Q_A_Prob"]["value_by_index"]) == 20  # forget10 of 20 people x 10 questions
    assert json.loads((runs / "retain" / "eval" / "TOFU_SUMMARY.json").read_text())["forget_quality"] == 1.0

    for name in names[2:]:
        info = json.loads((runs / name / "run_info.json").read_text())
        assert info["status"] == "done" and info["train_time_s"] > 0
        balance = [json.loads(line) for line in (runs / name / "balance.jsonl").read_text().splitlines()]
        assert balance[0]["step"] == 0 and len(balance[-1]["prob"]) == 20
        trajectory = [json.loads(line) for line in (runs / name / "eval_trajectory.jsonl").read_text().splitlines()]
        assert [row["step"] for row in trajectory][0] == 0 and len(trajectory) >= 3  # step 0, then every quarter
        assert all(0 <= row["forget_quality"] <= 1 for row in trajectory)

    report = (out / "report" / "report.md").read_text()
    for name in names:
        assert f"| {name}" in report
    for png in ("fq_vs_mu.png", "trajectories.png", "dro_weights.png", "eval_trajectory.png"):
        data = (out / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"({png})" in report
    info = json.loads((out / "demo_info.json").read_text())
    assert (
        info["total_time_s"] < 900
    )  # a runaway guard, not a speed goal (benchmarks time the demo; CI cores are shared)

    # the documentation's demo table has the rows and columns this report writes
    ours, documented = _seed_table(report), _seed_table(RESULTS_PAGE.read_text(encoding="utf-8"))
    assert documented[0] == ours[0] and documented[1] == ours[1]
    assert [r.split("|")[1].strip() for r in documented[2:]] == [r.split("|")[1].strip() for r in ours[2:]]
    assert [r.split("|")[1].strip() for r in ours[2:]] == [m[0] for m in METHODS]
    for row in documented[2:]:
        assert row.split("|")[2].strip() == "0,1,2"  # the default demo's three seeds

    # the report can be rebuilt from the run folders through the CLI
    rebuilt = tmp_path / "rebuilt"
    assert main(["report", *(str(runs / n) for n in names), "--out", str(rebuilt)]) == 0
    rebuilt_md = (rebuilt / "report.md").read_text()
    assert rebuilt_md.count("| npo_") == 8  # results table + spread-at-equal-forgetting table
    assert "Spread at equal mean forgetting" in rebuilt_md


def test_demo_refuses_a_used_output_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty" in err and "--overwrite" in err and err.count("\n") == 0
    assert (out / "keep.txt").read_text() == "a user's file"

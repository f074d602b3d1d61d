"""The SmolLM2 TOFU study script, in its seconds-long smoke form on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _study():
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("tofu_smollm2", ROOT / "experiments" / "tofu_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tofu_smollm2"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_study_runs_every_stage_and_skips_finished_cells(tiny_model_dir, tofu_dir, tmp_path, capsys):
    study = _study()
    args = [
        "--smoke",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tofu_dir),
        "--results",
        str(tmp_path / "res"),
        "--work",
        str(tmp_path / "work"),
        "--jobs",
        "2",
    ]
    assert study.main(args) == 0
    cells = tmp_path / "res" / "cells"
    assert sorted(p.name for p in cells.iterdir()) == ["npo_dv_seed0", "npo_mean_seed0", "retain", "target"]
    for name in ("npo_dv_seed0", "npo_mean_seed0"):
        assert not (tmp_path / "work" / "cells" / name / "model").exists()  # models are not kept
        summary = json.loads((cells / name / "eval" / "TOFU_SUMMARY.json").read_text())
        assert summary["forget_quality"] is not None and "balance_prob_std" in summary
        assert (cells / name / "balance.jsonl").read_text().count("\n") >= 2
        assert not list((cells / name).rglob("*.safetensors"))
    table = (tmp_path / "res" / "table.md").read_text()
    assert table.startswith("| Method | Seeds | Forget quality | KS D |") and "| npo_dv | 0 |" in table
    training = (tmp_path / "res" / "training.md").read_text().splitlines()
    assert training[0].startswith("| Cell | Grad norm") and [r.split(" | ")[0] for r in training[2:]] == [
        "| npo_dv_seed0",
        "| npo_mean_seed0",
    ]
    assert "n/a" not in training[3] and training[3].split(" | ")[6] == "0.250"  # mean: 1/B of a batch of 4
    report = (tmp_path / "res" / "report" / "report.md").read_text()
    assert "target (reference)" in report and "retain (reference)" in report
    capsys.readouterr()

    assert study.main(args) == 0  # everything is done: nothing runs again
    assert "8 job(s) already done, 0 to run" in capsys.readouterr().out

    # a cell killed during its evaluation (its results not copied yet) runs again, over its old folder
    import shutil

    shutil.rmtree(cells / "npo_dv_seed0")
    (tmp_path / "work" / "cells" / "npo_dv_seed0" / "eval" / "TOFU_SUMMARY.json").unlink()
    assert study.main(args) == 0
    out = capsys.readouterr().out
    assert "6 job(s) already done, 2 to run" in out and "FAILED" not in out
    assert (cells / "npo_dv_seed0" / "eval" / "TOFU_SUMMARY.json").is_file()

    # a fresh machine (no models, no raw runs) with one cell left: only the target model is made again
    shutil.rmtree(cells / "npo_dv_seed0")
    shutil.rmtree(tmp_path / "work")
    assert study.main(args) == 0
    out = capsys.readouterr().out
    assert "4 job(s) already done, 1 not needed (every job that needs it is done), 3 to run" in out
    assert "started finetune_target" in out and "finetune_retain" not in out and "FAILED" not in out
    assert (cells / "npo_dv_seed0" / "eval" / "TOFU_SUMMARY.json").is_file()


@pytest.mark.slow
def test_committed_study_tables_match_its_cells(tmp_path):
    """RESULTS.md quotes table.md and training.md: rebuilt from the committed cells, they must not drift
    (a changed metric, aggregation or column would otherwise leave the published numbers stale)."""
    results = ROOT / "experiments" / "tofu_smollm2"
    (tmp_path / "cells").symlink_to(results / "cells", target_is_directory=True)
    _study()
    from study_report import write_study_report

    assert write_study_report(tmp_path) is not None
    for name in ("table.md", "training.md"):
        assert (tmp_path / name).read_text() == (results / name).read_text(), f"{name} drifted: rerun --report-only"


def _study2():
    _study()
    spec = importlib.util.spec_from_file_location(
        "tofu_smollm2_study2", ROOT / "experiments" / "tofu_smollm2_study2.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["tofu_smollm2_study2"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_committed_study2_tables_match_its_cells(tmp_path):
    """RESULTS.md quotes study 2's attack tables: rebuilt from the committed cells, they must not drift."""
    results = ROOT / "experiments" / "tofu_smollm2_study2"
    (tmp_path / "cells").symlink_to(results / "cells", target_is_directory=True)
    _study2()
    from study2_report import write_study2_report

    write_study2_report(tmp_path)
    names = [n for n in ("attacks_A.md", "attacks_B.md", "table_B.md") if (results / n).is_file()]
    assert "attacks_A.md" in names
    for name in names:
        assert (tmp_path / name).read_text() == (results / name).read_text(), f"{name} drifted: rerun --report-only"


@pytest.mark.slow
def test_smoke_study2_attacks_every_part_a_cell_and_unierase(tiny_model_dir, tofu_dir, tmp_path, capsys):
    """Parts A and U of study 2 on the tiny model: each cell unlearned (UniErase by its edit), evaluated,
    attacked with the model kept until then, its small files (attacks' included) kept and the model gone."""
    study2 = _study2()
    args = ["--smoke", "--parts", "AU", "--model", str(tiny_model_dir), "--data", str(tofu_dir)]
    args += [
        "--results",
        str(tmp_path / "res"),
        "--work",
        str(tmp_path / "work"),
        "--study1-work",
        str(tmp_path / "s1"),
    ]
    assert study2.main(args) == 0
    assert "finetune_retain" not in capsys.readouterr().out  # only part B reads the retain model
    cells = tmp_path / "res" / "cells"
    assert sorted(p.name for p in cells.iterdir()) == ["A_npo_dv_seed0", "A_npo_mean_seed0", "A_unierase_seed0"]
    for cell in cells.iterdir():
        assert (cell / "eval" / "TOFU_SUMMARY.json").is_file() and (cell / "machine.json").is_file()
        info = json.loads((cell / "attack" / "attack_info.json").read_text())
        assert set(info["attacks"]) == {"relearn_heldout", "quantize_8bit"}
        for attack in info["attacks"]:  # what came back, per sample
            summary = json.loads((cell / "attack" / attack / "attack_summary.json").read_text())
            assert summary["per_sample"] and summary["came_back"]
        assert not list(cell.rglob("*.safetensors"))
        assert not (tmp_path / "work" / "cells" / cell.name / "model").exists()
    unierase = json.loads((cells / "A_unierase_seed0" / "run_info.json").read_text())
    assert unierase["method"] == "unierase" and unierase["layers"] == [0, 1]
    assert (cells / "A_npo_mean_seed0" / "balance.jsonl").is_file()
    table = (tmp_path / "res" / "attacks_A.md").read_text().splitlines()
    rows = [r.split(" | ")[:3] for r in table[2:]]
    assert rows == [
        [f"| {m}", a, "0"] for m in ("npo_dv", "npo_mean", "unierase") for a in ("relearn_heldout", "quantize_8bit")
    ]
    assert (tmp_path / "res" / "relearn_A.png").stat().st_size > 1000
    assert "## Attacks" in (tmp_path / "res" / "report_A" / "report.md").read_text()
    capsys.readouterr()
    assert study2.main(args) == 0  # finished cells are skipped
    assert "0 to run" in capsys.readouterr().out

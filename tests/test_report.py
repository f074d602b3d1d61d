"""The markdown + PNG report built from synthetic run directories."""

import math
import re

import numpy as np
import pytest

from baldro.errors import BaldroError
from baldro.eval.balance import balance_metrics
from baldro.io import append_jsonl, write_json_atomic
from baldro.report.build import build_report, report_main
from baldro.report.runs import load_run
from baldro.report.tables import format_fq

N = 20  # forget samples
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval_log(prob, tr, rouge):
    return {
        "forget_Q_A_Prob": {
            "agg_value": float(np.mean(prob)),
            "value_by_index": {str(i): {"prob": float(p), "avg_loss": float(-math.log(p))} for i, p in enumerate(prob)},
        },
        "forget_truth_ratio": {
            "agg_value": 0.6,
            "value_by_index": {str(i): {"score": float(t)} for i, t in enumerate(tr)},
        },
        "forget_Q_A_ROUGE": {
            "agg_value": float(np.mean(rouge)),
            "value_by_index": {
                str(i): {"rougeL_recall": float(r), "rouge1_recall": float(r), "input": "q"}
                for i, r in enumerate(rouge)
            },
        },
    }


def _make_run(
    root, dirname, name, summary, prob, tr, rouge, *, weighting=None, steps=0, final_prob=None, info_extra=None
):
    d = root / dirname
    info = {"name": name, "status": "done", "train_time_s": None, "eval_time_s": 1.0}
    if weighting:
        info.update(objective="npo", weighting=weighting, weighting_args={}, train_time_s=10.0 + len(name))
    info.update(info_extra or {})
    write_json_atomic(d / "run_info.json", info)
    write_json_atomic(d / "eval" / "TOFU_SUMMARY.json", summary)
    write_json_atomic(d / "eval" / "TOFU_EVAL.json", _eval_log(prob, tr, rouge))
    if steps:
        rng = np.random.default_rng(len(name))
        start = rng.uniform(0.3, 0.95, N)
        rates = rng.uniform(0.2, 2.0, N) if weighting == "mean" else rng.uniform(0.8, 1.2, N)
        for step in range(0, steps + 1, 2):
            p = start * np.exp(-rates * step)
            append_jsonl(
                d / "balance.jsonl", {"step": step, "ids": list(range(N)), "nll": list(-np.log(p)), "prob": list(p)}
            )
        for step in range(1, steps + 1):
            B = 4
            wmax = 0.25 if weighting == "mean" else 0.25 + 0.5 * math.exp(-step / 5)
            row = {
                "step": step,
                "epoch": step / steps,
                "loss": 1.0 / step,
                "forget_loss": -1.0,
                "forget_loss_mean": -1.0,
                "retain_loss": 0.5,
                "weight_max": wmax,
                "weight_entropy": math.log(B) * (1 - (wmax - 0.25)),
                "weight_nonzero": B if weighting != "group" else 2,
                "learning_rate": 1e-5,
            }
            append_jsonl(d / "train_log.jsonl", row)
            append_jsonl(
                d / "forget_losses.jsonl",
                {"step": step, "ids": [0, 1, 2, 3], "losses": [1.0] * 4, "weights": [0.25] * 4},
            )
    return d


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    target_prob = np.full(N, 0.9)
    retain_prob = np.linspace(0.05, 0.5, N)  # median 0.275
    base_tr = rng.uniform(0.3, 1.5, N)
    root = tmp_path / "runs"
    target = _make_run(
        root,
        "target",
        "target",
        {
            "forget_quality": 1.2708e-3,
            "model_utility": 0.6275554,
            "forget_truth_ratio": 0.51,
            "forget_Q_A_Prob": 0.9,
            "forget_Q_A_ROUGE": 0.98,
        },
        target_prob,
        base_tr,
        np.ones(N),
    )
    retain = _make_run(
        root,
        "retain",
        "retain",
        {"model_utility": 0.63, "forget_truth_ratio": 0.66, "forget_Q_A_Prob": 0.27, "forget_Q_A_ROUGE": 0.4},
        retain_prob,
        base_tr * 1.2,
        np.full(N, 0.4),
    )
    # npo_mean: uneven -- some samples crushed to gibberish (prob 1e-5 < 1e-3 * 0.9), some still remembered
    mean_prob = np.array([1e-5] * 5 + [0.6] * 5 + [0.1] * 10)
    mean_rouge = np.array([0.0] * 3 + [0.2] * 17)
    m1 = _make_run(
        root,
        "m1",
        "npo_mean",
        {
            "forget_quality": 1.2345e-5,
            "model_utility": 0.61234,
            "forget_truth_ratio": 0.55,
            "forget_Q_A_Prob": float(mean_prob.mean()),
            "forget_Q_A_ROUGE": 0.3,
        },
        mean_prob,
        base_tr,
        mean_rouge,
        weighting="mean",
        steps=10,
    )
    dv_prob = np.full(N, 0.2)
    m2 = _make_run(
        root,
        "m2",
        "npo_dv",
        {
            "forget_quality": 0.3456,
            "model_utility": 0.5987,
            "forget_truth_ratio": 0.64,
            "forget_Q_A_Prob": 0.2,
            "forget_Q_A_ROUGE": 0.35,
            "balance_prob_std": 0.0123,
        },
        dv_prob,
        base_tr * 1.1,
        np.full(N, 0.35),
        weighting="dv",
        steps=10,
    )
    group_prob = np.linspace(0.01, 0.4, N)
    m3 = _make_run(
        root,
        "m3",
        "npo_group",
        {
            "forget_quality": None,
            "model_utility": 0.6,
            "forget_truth_ratio": 0.6,
            "forget_Q_A_Prob": float(group_prob.mean()),
            "forget_Q_A_ROUGE": 0.33,
        },
        group_prob,
        base_tr,
        np.full(N, 0.33),
        weighting="group",
        steps=10,
    )
    arrays = {
        "target_prob": target_prob,
        "retain_median": float(np.median(retain_prob)),
        "base_tr": base_tr,
        "mean": (mean_prob, base_tr, mean_rouge),
        "group": (group_prob, base_tr, np.full(N, 0.33)),
    }
    return {"target": target, "retain": retain, "methods": [m1, m2, m3], "arrays": arrays, "tmp": tmp_path}


def _row(md, label):
    results = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in results.splitlines() if line.startswith(f"| {label} |")]
    assert len(lines) == 1, (label, lines)
    return [c.strip() for c in lines[0].strip("|").split("|")]


def _fmt(v):
    return f"{v:.3f}"


def test_load_run(runs):
    run = load_run(runs["methods"][0])
    assert run.name == "npo_mean"
    assert run.info["weighting"] == "mean"
    assert run.summary["model_utility"] == 0.61234
    assert run.eval_log is not None and run.eval_log.name == "TOFU_EVAL.json"
    assert [r["step"] for r in run.balance] == list(range(0, 11, 2))
    assert len(run.train_log) == 10 and len(run.forget_losses) == 10
    target = load_run(runs["target"])
    assert target.name == "target" and target.balance == [] and target.train_log == []


def test_load_run_bad_paths(tmp_path):
    with pytest.raises(BaldroError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BaldroError, match="not a run directory"):
        load_run(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaldroError, match="not a run directory"):
        load_run(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run_info.json").write_text("{not json")
    with pytest.raises(BaldroError, match="not valid JSON"):
        load_run(tmp_path / "broken")


def test_format_fq():
    assert format_fq(1.2708e-3) == "1.27e-03"
    assert format_fq(0.3456) == "0.346"
    assert format_fq(1.0) == "1.00"
    assert format_fq(0.0) == "0"
    assert format_fq(None) == "n/a"
    assert format_fq(float("nan")) == "n/a"


def test_build_report(runs):
    out = runs["tmp"] / "report"
    md_path = build_report(runs["methods"], out, retain_run=runs["retain"], target_run=runs["target"])
    assert md_path == out / "report.md"
    md = md_path.read_text()
    a = runs["arrays"]

    header = [
        c.strip()
        for c in md.splitlines()[[i for i, line in enumerate(md.splitlines()) if line.startswith("| Method |")][0]]
        .strip("|")
        .split("|")
    ]
    assert header == [
        "Method",
        "Forget quality",
        "Model utility",
        "Forget TR",
        "Forget prob",
        "Forget ROUGE-L",
        "TR std",
        "TR IQR",
        "Prob std",
        "Prob IQR",
        "Remembered",
        "Over-forgotten",
        "Train time (s)",
    ]
    col = {h: i for i, h in enumerate(header)}

    mean = _row(md, "npo_mean")
    assert mean[col["Forget quality"]] == "1.23e-05"
    assert mean[col["Model utility"]] == "0.612"
    assert mean[col["Forget TR"]] == "0.550"
    assert mean[col["Forget ROUGE-L"]] == "0.300"
    assert mean[col["Train time (s)"]] == "18.0"  # 10 + len("npo_mean")
    # balance from the eval logs: 5 remembered (0.6 > 0.275); over-forgotten = 5 by prob, 3 by ROUGE 0 (overlap) -> 5/20
    assert mean[col["Remembered"]] == "0.250"
    assert mean[col["Over-forgotten"]] == "0.250"
    exp = balance_metrics(*a["mean"], a["retain_median"], a["target_prob"])
    assert mean[col["Prob std"]] == _fmt(exp["balance_prob_std"])
    assert mean[col["Prob IQR"]] == _fmt(exp["balance_prob_iqr"])
    assert mean[col["TR std"]] == _fmt(exp["balance_tr_std"])
    assert mean[col["TR IQR"]] == _fmt(exp["balance_tr_iqr"])

    dv = _row(md, "npo_dv")
    assert dv[col["Forget quality"]] == "0.346"
    assert dv[col["Prob std"]] == "0.012"  # the run's own summary value wins
    assert dv[col["Prob IQR"]] == "0.000"
    assert dv[col["Remembered"]] == "0.000" and dv[col["Over-forgotten"]] == "0.000"

    group = _row(md, "npo_group")
    assert group[col["Forget quality"]] == "n/a"
    exp = balance_metrics(*a["group"], a["retain_median"], a["target_prob"])
    assert group[col["Remembered"]] == _fmt(exp["balance_frac_remembered"]) == "0.350"

    target = _row(md, "target (reference)")
    assert target[col["Forget quality"]] == "1.27e-03"
    assert target[col["Model utility"]] == "0.628"
    assert target[col["Train time (s)"]] == "n/a"
    assert target[col["Over-forgotten"]] == "0.000"
    retain = _row(md, "retain (reference)")
    assert retain[col["Forget quality"]] == "1.00 (by definition)"

    # plots: exist, valid PNGs, linked relatively from the markdown
    for name in ("fq_vs_mu", "trajectories", "spread", "dro_weights"):
        png = out / f"{name}.png"
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
        assert f"]({name}.png)" in md
    assert md.count("**How to read this.**") == 4
    assert "Not plotted (forget quality or model utility missing): npo_group." in md
    cmd = re.search(r"^baldro report (.+) --out (.+)$", md, re.M)
    assert cmd and str(runs["target"]) in cmd.group(1) and cmd.group(2) == str(out)
    assert not list(out.glob(".*.tmp"))  # no temp files left behind


def test_report_main_detects_references_and_rebuilds(runs):
    out = runs["tmp"] / "rep2"
    dirs = [runs["retain"], *runs["methods"], runs["target"]]
    md = report_main(dirs, out).read_text()
    assert "| target (reference) |" in md and "| retain (reference) |" in md
    results = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    assert results.count("| npo_") == 3
    assert md.count("| npo_") == 6  # also one row each in the spread-at-equal-forgetting table
    # the rebuild command lists every run; running it again gives the same report
    cmd = re.search(r"^baldro report (.+) --out (.+)$", md, re.M).group(1).split()
    assert report_main(cmd, out).read_text() == md


def test_report_without_references_or_trajectories(runs, tmp_path):
    # only the target-less, retain-less method runs, and one without train logs
    solo = _make_run(
        tmp_path / "solo",
        "s",
        "npo_plain",
        {"forget_quality": 0.01, "model_utility": 0.5},
        np.full(N, 0.2),
        runs["arrays"]["base_tr"],
        np.full(N, 0.3),
        weighting="mean",
    )
    out = tmp_path / "rep3"
    md = build_report([solo], out).read_text()
    row = _row(md, "npo_plain")
    assert row[1] == "0.0100"
    assert "n/a" in row  # remembered: no retain reference
    assert "only the ROUGE-L == 0 criterion" in md
    assert "no trajectory plot" in md and not (out / "trajectories.png").exists()
    assert (out / "fq_vs_mu.png").read_bytes()[:8] == PNG_MAGIC


def test_report_errors(runs, tmp_path):
    with pytest.raises(BaldroError, match="not a run directory"):
        build_report([runs["methods"][0], tmp_path], tmp_path / "out")
    with pytest.raises(BaldroError, match="does not exist"):
        report_main([tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(BaldroError, match="at least one run"):
        report_main([], tmp_path / "out")
    with pytest.raises(BaldroError, match="2 runs are named 'target'"):
        report_main([runs["target"], runs["target"].parent / "m1", _copy_as_target(runs, tmp_path)], tmp_path / "out")


def _copy_as_target(runs, tmp_path):
    import shutil

    d = tmp_path / "target2"
    shutil.copytree(runs["target"], d)
    return d

"""Evaluation during unlearning (`train.eval_strategy`): the trajectory, the best evaluation under a
utility floor, early stopping, the best model at the end, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_resume import KillAfterStep, Killed, assert_same_run, base, run

from baldro.cli import main
from baldro.errors import BaldroError
from baldro.eval.trajectory import (
    BestRule,
    best_evaluation,
    eval_interval,
    lower_is_better,
    stop_reason,
    trajectory_row,
)
from baldro.io import read_jsonl
from baldro.recipes.config import load_config

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = ROOT / "configs" / "unlearn" / "tofu.yaml"
EVAL = ROOT / "configs" / "eval" / "tofu.yaml"
# cheap evaluations: 3 rows of every set, 4 new tokens
CHEAP = ["eval.trajectory_limit=3", "eval.max_new_tokens=4", "eval.batch_size=4"]


# ----------------------------------------------------------------------------- the rule, by hand
def rows(*triples):
    """(step, metric, utility) -> trajectory rows."""
    return [{"step": s, "epoch": s / 4, "fq": m, "model_utility": u} for s, m, u in triples]


def test_the_best_evaluation_is_what_a_hand_calculation_picks():
    t = rows((0, 0.01, 0.60), (5, 0.20, 0.58), (10, 0.70, 0.50), (15, 0.90, 0.40), (20, 0.90, 0.59), (25, None, 0.6))
    # no floor: the highest forget quality, the earliest of equal ones (15 before 20)
    assert best_evaluation(t, BestRule("fq"))["step"] == 15
    # floor 0.9 x 0.60 = 0.54: steps 10 (0.50) and 15 (0.40) are out; 20 (0.59) is in
    assert best_evaluation(t, BestRule("fq", utility_floor=0.9))["step"] == 20
    # floor 0.99 x 0.60 = 0.594: only step 0 (0.60) and step 25 (no metric) keep their utility
    assert best_evaluation(t, BestRule("fq", utility_floor=0.99))["step"] == 0
    # lower is better
    assert best_evaluation(t, BestRule("fq", greater_is_better=False))["step"] == 0
    assert best_evaluation(t, BestRule("fq", greater_is_better=False, utility_floor=0.9))["step"] == 0
    # floor 1: nothing but evaluations at least as useful as the first
    assert best_evaluation(t, BestRule("fq", utility_floor=1.0))["step"] == 0
    assert best_evaluation(rows((0, None, 0.5)), BestRule("fq")) is None
    # the floor needs the first evaluation's utility
    assert best_evaluation(rows((0, 0.1, None), (1, 0.2, 0.5)), BestRule("fq", utility_floor=0.5)) is None
    assert best_evaluation(rows((0, 0.1, float("nan")), (1, 0.2, 0.5)), BestRule("fq"))["step"] == 1


def test_early_stopping_by_hand():
    rule = BestRule("fq", utility_floor=0.9)
    t = rows((0, 0.1, 0.60), (1, 0.5, 0.59), (2, 0.4, 0.58), (3, 0.45, 0.57))
    assert stop_reason(t, rule, None) is None  # early stopping off
    assert stop_reason(t[:2], rule, 1) is None  # step 1 is the best
    assert "no better fq in 1 evaluation" in stop_reason(t[:3], rule, 1)
    assert stop_reason(t[:3], rule, 2) is None
    assert "no better fq in 2 evaluation" in stop_reason(t, rule, 2)
    below = t[:2] + rows((2, 0.9, 0.50))  # 0.50 < 0.9 x 0.60: stop, even though its metric is the best
    assert "fell below the utility floor 0.54" in stop_reason(below, rule, 5)
    assert stop_reason(below, BestRule("fq"), 5) is None  # no floor


def test_eval_steps_and_directions():
    assert eval_interval(5, 20) == 5 and eval_interval(0.25, 10) == 3 and eval_interval(20, 20) == 20
    for bad in (21, 30):
        with pytest.raises(BaldroError, match="beyond the run"):
            eval_interval(bad, 20)
    assert lower_is_better("forget_Q_A_Prob") and lower_is_better("forget_knowmem_ROUGE")
    assert lower_is_better("extraction_strength") and not lower_is_better("forget_quality")
    assert not lower_is_better("model_utility") and not lower_is_better("retain_knowmem_ROUGE")
    assert not lower_is_better("forget_truth_ratio")
    row = trajectory_row(3, 0.7500001, {"forget_quality": float("nan"), "model_utility": 0.5, "x": 2}, "tofu", ["x"])
    assert row["step"] == 3 and row["epoch"] == 0.75 and row["forget_quality"] is None and row["x"] == 2.0
    assert "seconds" not in json.dumps(row)


def test_the_cheaper_subset_of_evaluations_during_training():
    from baldro.recipes.config import as_recipe
    from baldro.recipes.unlearn import trajectory_settings

    def settings(recipe, *overrides):
        return trajectory_settings(as_recipe(load_config(recipe, ["train.eval_strategy=epoch", *overrides])))

    assert settings(UNLEARN)["limit"] == 20 and settings(UNLEARN)["max_new_tokens"] == 200  # the defaults
    assert settings(UNLEARN, "eval.limit=5")["limit"] == 5  # never more rows than the final evaluation
    assert settings(UNLEARN, "eval.trajectory_limit=null")["limit"] is None
    assert settings(UNLEARN, "eval.trajectory_max_new_tokens=32")["max_new_tokens"] == 32
    muse = settings(ROOT / "configs" / "unlearn" / "muse.yaml", "eval.trajectory_max_new_tokens=64")
    assert muse["benchmark"] == "muse" and muse["verbmem_max_new_tokens"] == 64 and muse["knowmem_max_new_tokens"] == 32


def test_the_callback_on_a_fake_evaluator(tmp_path):
    """EvalDuringTraining without a Trainer: what it writes and decides, and an evaluator that fails."""
    from baldro.eval.trajectory import EvalDuringTraining

    probs = {0: 0.5, 2: 0.2, 4: 0.3, 6: 0.4}

    def evaluate(model, out, quiet):
        out.mkdir(parents=True)
        return {"forget_Q_A_Prob": probs[int(out.name[5:])], "model_utility": 0.5, "forget_quality": None}, "tofu"

    cb = EvalDuringTraining(
        evaluate, tmp_path, "steps", 2, "tofu", rule=BestRule("forget_Q_A_Prob", greater_is_better=False), patience=2
    )
    args = SimpleNamespace(save_strategy="no")
    state = SimpleNamespace(global_step=0, epoch=0.0, max_steps=8, is_world_process_zero=True)
    control = SimpleNamespace(should_training_stop=False)
    cb.on_train_begin(args, state, control, model=None)
    for step in (1, 2, 3, 4, 5, 6):
        state.global_step, state.epoch = step, step / 4
        cb.on_step_end(args, state, control, model=None)
        assert control.should_training_stop == (step == 6)  # steps 4 and 6 are not better than step 2
    assert [r["step"] for r in read_jsonl(tmp_path / "eval_trajectory.jsonl")] == [0, 2, 4, 6]
    assert cb.best_step == 2 and cb.stopped["step"] == 6
    assert cb.info()["best_step"] == 2 and cb.info()["best_metric"] == 0.2 and cb.info()["evaluations"] == 4

    def broken(model, out, quiet):
        raise RuntimeError("out of memory")

    cb = EvalDuringTraining(broken, tmp_path / "b", "epoch", None, "tofu")
    with pytest.raises(RuntimeError, match="out of memory"):
        cb.on_train_begin(
            args,
            SimpleNamespace(global_step=0, epoch=0.0, max_steps=8, is_world_process_zero=True),
            control,
            model=None,
        )


# ----------------------------------------------------------------------------- runs of the tiny model
def unlearn(model, tofu, out, *extra, callbacks=()):
    """test_resume's "mean" case (6 samples, batches of 2, 2 epochs: 6 steps, checkpoints every 2 steps)."""
    return run("mean", model, tofu, out, *CHEAP, *extra, callbacks=callbacks)


def _same_numbers(a: Path, b: Path) -> None:
    for name in ("TOFU_SUMMARY.json", "TOFU_EVAL.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


@pytest.mark.slow
def test_an_epoch_evaluation_equals_baldro_eval_of_that_epochs_checkpoint(tiny_model_dir, tofu_dir, tmp_path):
    out = tmp_path / "run"
    unlearn(
        tiny_model_dir,
        tofu_dir,
        out,
        "train.eval_strategy=epoch",
        "train.save_strategy=epoch",
        "train.save_total_limit=null",
    )
    trajectory = read_jsonl(out / "eval_trajectory.jsonl")
    assert [(r["step"], r["epoch"]) for r in trajectory] == [(0, 0.0), (3, 1.0), (6, 2.0)]
    for step in (3, 6):
        separate = tmp_path / f"eval-{step}"
        assert (
            main(
                [
                    "eval",
                    str(EVAL),
                    f"model.path={out / 'checkpoints' / f'checkpoint-{step}'}",
                    f"model.tokenizer={tiny_model_dir}",
                    "model.dtype=float32",
                    "model.device=cpu",
                    "model.attn_implementation=null",
                    "format.use_chat_template=false",
                    f"data.source={tofu_dir}",
                    "split=forget01",
                    "eval.limit=3",
                    "eval.max_new_tokens=4",
                    "eval.batch_size=4",
                    f"output_dir={separate}",
                ]
            )
            == 0
        )
        _same_numbers(out / "evals" / f"step-{step}", separate)
        assert json.loads((out / "evals" / f"step-{step}" / "eval_timings.json").read_text())["total_s"] > 0
    # the starting model's evaluation is that of the model the run started from
    assert (
        main(
            [
                "eval",
                str(EVAL),
                f"model.path={tiny_model_dir}",
                "model.dtype=float32",
                "model.device=cpu",
                "model.attn_implementation=null",
                "format.use_chat_template=false",
                f"data.source={tofu_dir}",
                "split=forget01",
                "eval.limit=3",
                "eval.max_new_tokens=4",
                "eval.batch_size=4",
                f"output_dir={tmp_path / 'eval-0'}",
            ]
        )
        == 0
    )
    _same_numbers(out / "evals" / "step-0", tmp_path / "eval-0")
    info = json.loads((out / "run_info.json").read_text())
    assert info["eval_strategy"] == "epoch" and info["evaluations"] == 3 and "best_step" not in info


@pytest.mark.slow
def test_evaluating_does_not_change_what_trains(tiny_model_dir, tofu_dir, tmp_path):
    a, b = tmp_path / "plain", tmp_path / "evaluated"
    unlearn(tiny_model_dir, tofu_dir, a)
    unlearn(tiny_model_dir, tofu_dir, b, "train.eval_strategy=steps", "train.eval_steps=2")
    assert_same_run(a, b)
    assert not (a / "eval_trajectory.jsonl").exists()
    assert [r["step"] for r in read_jsonl(b / "eval_trajectory.jsonl")] == [0, 2, 4, 6]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.slow
def test_the_best_model_is_recorded_kept_and_saved(tiny_model_dir, tofu_dir, tmp_path):
    """forget_Q_A_Prob falls under NPO: with greater_is_better=true the best is the starting model (step 0),
    so the saved model is the one the run started from, while the last checkpoint is not."""
    out = tmp_path / "run"
    unlearn(
        tiny_model_dir,
        tofu_dir,
        out,
        "train.eval_strategy=steps",
        "train.eval_steps=0.34",
        "train.metric_for_best_model=forget_Q_A_Prob",
        "train.greater_is_better=true",
        "train.load_best_model_at_end=true",
    )
    trajectory = read_jsonl(out / "eval_trajectory.jsonl")
    assert [r["step"] for r in trajectory] == [0, 3, 6]  # ceil(0.34 x 6) = 3
    probs = [r["forget_Q_A_Prob"] for r in trajectory]
    assert probs[0] > probs[1] > probs[2]
    info = json.loads((out / "run_info.json").read_text())
    assert info["best_step"] == 0 and info["best_metric"] == probs[0] and info["best_model_loaded"] is True
    assert info["metric_for_best_model"] == "forget_Q_A_Prob" and info["greater_is_better"] is True
    start, final = _weights(tiny_model_dir), _weights(out / "model")
    assert all(torch.equal(start[k], final[k]) for k in start)
    last = _weights(out / "checkpoints" / "checkpoint-6")
    assert any(not torch.equal(start[k], last[k]) for k in start)
    assert sorted(p.name for p in (out / "best").iterdir()) == ["step-0"]

    # lower is better (the default for a forget probability): the last step is the best, nothing to load
    out2 = tmp_path / "lower"
    unlearn(
        tiny_model_dir,
        tofu_dir,
        out2,
        "train.eval_strategy=epoch",
        "train.metric_for_best_model=forget_Q_A_Prob",
        "train.load_best_model_at_end=true",
    )
    info = json.loads((out2 / "run_info.json").read_text())
    assert info["best_step"] == 6 and info["greater_is_better"] is False and info["best_model_loaded"] is True
    assert sorted(p.name for p in (out2 / "best").iterdir()) == ["step-6"]


@pytest.mark.slow
def test_early_stopping_stops_every_process_at_the_evaluation(tiny_model_dir, tofu_dir, tmp_path):
    out = tmp_path / "run"
    unlearn(
        tiny_model_dir,
        tofu_dir,
        out,
        "train.eval_strategy=steps",
        "train.eval_steps=2",
        "train.metric_for_best_model=forget_Q_A_Prob",
        "train.greater_is_better=true",
        "train.early_stopping_patience=1",
    )
    assert [r["step"] for r in read_jsonl(out / "eval_trajectory.jsonl")] == [0, 2]
    assert read_jsonl(out / "train_log.jsonl")[-1]["step"] == 2
    info = json.loads((out / "run_info.json").read_text())
    assert info["stopped_early"]["step"] == 2 and "no better forget_Q_A_Prob" in info["stopped_early"]["reason"]
    assert info["status"] == "done" and info["best_step"] == 0


@pytest.mark.slow
def test_kill_and_resume_keeps_the_trajectory_byte_identical(tiny_model_dir, tofu_dir, tmp_path):
    """Evaluations every step; killed after step 5 (checkpoint 4): the evaluation of step 5 is dropped and
    made again, and the best model (step 5's, written before the kill) is chosen again."""
    extra = [
        "train.eval_strategy=steps",
        "train.eval_steps=1",
        "train.metric_for_best_model=forget_truth_ratio",
        "train.greater_is_better=false",
        "train.load_best_model_at_end=true",
    ]
    whole, out = tmp_path / "whole", tmp_path / "killed"
    unlearn(tiny_model_dir, tofu_dir, whole, *extra)
    with pytest.raises(Killed):
        unlearn(tiny_model_dir, tofu_dir, out, *extra, callbacks=[KillAfterStep(5)])
    assert [r["step"] for r in read_jsonl(out / "eval_trajectory.jsonl")] == [0, 1, 2, 3, 4, 5]
    unlearn(tiny_model_dir, tofu_dir, out, *extra, "resume=true")
    assert_same_run(whole, out)
    assert (out / "eval_trajectory.jsonl").read_bytes() == (whole / "eval_trajectory.jsonl").read_bytes()
    a, b = (json.loads((p / "run_info.json").read_text()) for p in (whole, out))
    assert a["best_step"] == b["best_step"] and a["best_metric"] == b["best_metric"]
    assert sorted(p.name for p in (out / "evals").iterdir()) == [f"step-{s}" for s in range(7)]


# ----------------------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize(
    "override,message",
    [
        (["train.eval_strategy=steps", "train.eval_steps=0"], "train.eval_steps=0 must be > 0"),
        (["train.eval_strategy=steps"], "train.eval_strategy=steps needs train.eval_steps"),
        (
            ["train.eval_strategy=steps", "train.eval_steps=7"],
            "train.eval_steps=7 is beyond the run (6 optimizer steps)",
        ),
        (["train.eval_strategy=steps", "train.eval_steps=2.5"], "train.eval_steps=2.5 is not an integer"),
        (["train.eval_steps=2"], "train.eval_steps=2 needs train.eval_strategy=steps"),
        (["train.eval_strategy=sometimes"], "train.eval_strategy='sometimes' is not one of"),
        (["train.eval_strategy=epoch", "eval.utility_floor=1.5"], "eval.utility_floor=1.5 must be <= 1"),
        (["train.eval_strategy=epoch", "eval.utility_floor=-0.1"], "eval.utility_floor=-0.1 must be >= 0"),
        (
            ["train.eval_strategy=epoch", "train.load_best_model_at_end=true"],
            "train.load_best_model_at_end=true needs train.metric_for_best_model",
        ),
        (
            ["train.eval_strategy=epoch", "train.early_stopping_patience=2"],
            "train.early_stopping_patience needs train.metric_for_best_model",
        ),
        (["train.metric_for_best_model=forget_Q_A_Prob"], "needs evaluations during training"),
        (["train.eval_strategy=epoch", "train.metric_for_best_model=forget_quality"], "set eval.retain_logs_path"),
        (["train.eval_strategy=epoch", "eval.trajectory_limit=0"], "eval.trajectory_limit=0 must be >= 1"),
        (["+train.extra.eval_on_start=true"], "train.extra.eval_on_start is not used"),
        (["eval.every_n_steps=2"], "eval.every_n_steps was replaced: use train.eval_strategy=steps"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(override, message, tiny_model_dir, tofu_dir, tmp_path, capsys):
    rc = main(
        [
            "unlearn",
            str(UNLEARN),
            *base(tiny_model_dir, tofu_dir, tmp_path / "run"),
            "split=forget01",
            *CHEAP,
            *override,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert message in err and err.count("\n") == 0 and "Traceback" not in err, err
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_a_metric_no_evaluation_produces_is_refused_with_the_keys(tiny_model_dir, tofu_dir, tmp_path, capsys):
    rc = main(
        [
            "unlearn",
            str(UNLEARN),
            *base(tiny_model_dir, tofu_dir, tmp_path / "run"),
            "split=forget01",
            *CHEAP,
            "train.eval_strategy=epoch",
            "train.metric_for_best_model=forget_qualty",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert "train.metric_for_best_model=forget_qualty is not a metric of this evaluation: use one of" in err
    assert "forget_Q_A_Prob" in err and "model_utility" in err
    log = tmp_path / "run" / "train_log.jsonl"
    assert not log.exists() or read_jsonl(log) == []  # refused at step 0, before any training step


def test_fine_tuning_and_sharded_weights_are_refused(tiny_model_dir, tofu_dir, tmp_path, monkeypatch, capsys):
    rc = main(
        [
            "finetune",
            str(ROOT / "configs" / "finetune" / "tofu.yaml"),
            *base(tiny_model_dir, tofu_dir, tmp_path / "ft"),
            "data.train_split=forget01",
            "train.eval_strategy=epoch",
        ]
    )
    assert rc == 2 and "evaluates during unlearning runs only" in capsys.readouterr().err
    from baldro.recipes.common import check_processes

    recipe = load_config(UNLEARN, ["train.eval_strategy=epoch"])
    from baldro.recipes.config import as_recipe

    recipe = as_recipe(recipe)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_processes(recipe, SimpleNamespace(world_size=2))  # DDP: the main process evaluates
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(BaldroError, match="FSDP or DeepSpeed ZeRO-3 each process holds only a shard"):
        check_processes(recipe, SimpleNamespace(world_size=2))


# ----------------------------------------------------------------------------- baldro report
def _fake_run(folder: Path, name: str, seed: int, best_step: int, scale: float) -> Path:
    from baldro.io import write_json_atomic, write_jsonl_atomic

    folder.mkdir(parents=True)
    write_json_atomic(
        folder / "run_info.json",
        {
            "name": name,
            "seed": seed,
            "kind": "unlearn",
            "status": "done",
            "train_time_s": 10.0,
            "best_step": best_step,
            "metric_for_best_model": "forget_quality",
        },
    )
    write_jsonl_atomic(
        folder / "eval_trajectory.jsonl",
        [
            {"step": s, "epoch": s / 5, "forget_quality": scale * fq, "model_utility": mu, "forget_Q_A_Prob": p}
            for s, fq, mu, p in [(0, 1e-5, 0.6, 0.9), (5, 1e-2, 0.55, 0.3), (10, 0.3, 0.5, 0.05), (15, 0.1, 0.3, 0.01)]
        ],
    )
    return folder


def test_report_plots_the_trajectories_and_tables_the_best_step(tmp_path):
    from baldro.report.build import build_report

    runs = [
        _fake_run(tmp_path / "a0", "npo_dv", 0, 10, 1.0),
        _fake_run(tmp_path / "a1", "npo_dv", 1, 15, 2.0),
        _fake_run(tmp_path / "b0", "npo_mean", 0, 5, 0.5),
    ]
    md = build_report(runs, tmp_path / "report").read_text()
    assert (tmp_path / "report" / "eval_trajectory.png").stat().st_size > 10_000
    assert "![evaluations during unlearning](eval_trajectory.png)" in md and "`forget_quality`" in md
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| Method |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    col = cells.index("Best step")
    results = lines[: lines.index("## Mean ± std over seeds")]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in results
        if line.startswith("| npo_")
    }
    assert rows["npo_mean"][col] == "5" and rows["npo_dv (a0)"][col] == "10" and rows["npo_dv (a1)"][col] == "15"
    seeds = lines[lines.index("## Mean ± std over seeds") + 2 :]
    seed_header = [c.strip() for c in seeds[0].strip("|").split("|")]
    dv = next(line for line in seeds if line.startswith("| npo_dv |"))
    assert [c.strip() for c in dv.strip("|").split("|")][seed_header.index("Best step")] == "12.5 ± 3.5"
    # without trajectories: no column, and the report says why there is no plot
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "run_info.json").write_text(json.dumps({"name": "x", "status": "done"}))
    md = build_report([plain], tmp_path / "report2").read_text()
    assert "Best step" not in md and "no plot of evaluations during unlearning" in md


# ----------------------------------------------------------------------------- MUSE
@pytest.mark.slow
def test_muse_evaluations_during_unlearning(tiny_model_dir, tmp_path, capsys):
    from test_muse import EVAL as MUSE_EVAL
    from test_muse import UNLEARN as MUSE_UNLEARN
    from test_muse import books_slice, cpu

    books = books_slice(tmp_path / "books")
    common = [
        *cpu(tiny_model_dir),
        f"data.source={books}",
        "data.limit=4",
        "train.num_train_epochs=2",
        "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=1",
        "train.learning_rate=1e-3",
        "eval.trajectory_limit=2",
    ]
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "unlearn",
                MUSE_UNLEARN,
                *common,
                "train.eval_strategy=epoch",
                "train.save_strategy=epoch",
                "train.save_total_limit=null",
                "train.metric_for_best_model=forget_knowmem_ROUGE",
                "eval.utility_floor=0.5",
                f"output_dir={run_dir}",
            ]
        )
        == 0
    )
    trajectory = read_jsonl(run_dir / "eval_trajectory.jsonl")
    assert [r["step"] for r in trajectory] == [0, 2, 4]
    assert {"forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE"} <= set(trajectory[0])
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["greater_is_better"] is False and info["utility_floor"] == 0.5 and info["best_step"] in (0, 2, 4)
    # the evaluation of epoch 1 is `baldro eval` of its checkpoint
    out = tmp_path / "eval-2"
    assert (
        main(
            [
                "eval",
                MUSE_EVAL,
                *cpu(run_dir / "checkpoints" / "checkpoint-2"),
                f"model.tokenizer={tiny_model_dir}",
                f"data.source={books}",
                "eval.limit=2",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    for name in ("MUSE_SUMMARY.json", "MUSE_EVAL.json"):
        assert json.loads((out / name).read_text()) == json.loads((run_dir / "evals" / "step-2" / name).read_text())
    # eval_steps beyond a MUSE run (its chunks are counted once the tokenizer is loaded): refused at step 0
    capsys.readouterr()
    assert (
        main(
            [
                "unlearn",
                MUSE_UNLEARN,
                *common,
                "train.eval_strategy=steps",
                "train.eval_steps=9",
                f"output_dir={tmp_path / 'beyond'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.eval_steps=9 is beyond the run (4 optimizer steps)" in err

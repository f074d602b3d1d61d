"""Runs that survive: a killed run resumed with `resume=true` ends bit for bit where an uninterrupted
run ends (weights and per-sample logs), also when the kill hits a checkpoint being saved; a non-finite
loss stops a run and marks it failed."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from transformers import Trainer, TrainerCallback

from baldro.cli import main
from baldro.recipes.config import load_config
from baldro.recipes.finetune import run_finetune
from baldro.recipes.unlearn import run_unlearn

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = ROOT / "configs" / "unlearn" / "tofu.yaml"
FINETUNE = ROOT / "configs" / "finetune" / "tofu.yaml"
LOGS = ("train_log.jsonl", "forget_losses.jsonl", "balance.jsonl")


class Killed(BaseException):
    """Stands for the process dying (not an Exception: nothing in baldro may catch it)."""


class KillAfterStep(TrainerCallback):
    """Dies once step `step` is logged: its log rows exist, its checkpoint (if any) does not."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step:
            raise Killed


def base(model, tofu, out) -> list[str]:
    return [
        f"model.path={model}",
        "model.dtype=float32",
        "model.device=cpu",
        "model.attn_implementation=null",
        "train.bf16=false",
        "train.use_cpu=true",
        "train.disable_tqdm=true",
        "format.use_chat_template=false",
        f"data.source={tofu}",
        "data.limit=6",
        "train.num_train_epochs=2",
        "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=1",
        "train.learning_rate=1e-3",
        "train.warmup_steps=0",
        "train.logging_steps=1",
        "train.save_strategy=steps",
        "train.save_steps=2",
        "log_to_console=false",
        f"output_dir={out}",
    ]


# name -> (recipe, overrides): 6 samples in batches of 2 over 2 epochs (6 steps, 4 with accumulation).
CASES = {
    "finetune": (FINETUNE, ["data.train_split=forget01", "data.extra_train_splits=[]"]),
    "mean": (UNLEARN, ["split=forget01", "objective=npo", "weighting=mean", "balance.every_n_steps=2"]),
    "group": (UNLEARN, ["split=forget01", "objective=npo", "weighting=group", "weighting.args.shrink_retain=true"]),
    "dv": (UNLEARN, ["split=forget01", "objective=simnpo", "weighting=dv"]),
    "dv_global": (
        UNLEARN,
        ["split=forget01", "objective=npo", "weighting=dv_global", "train.gradient_accumulation_steps=2"],
    ),
    "lora": (
        UNLEARN,
        [
            "split=forget01",
            "objective=npo",
            "weighting=dv",
            "+model.lora.r=4",
            "+model.lora.lora_alpha=8",
            "train.learning_rate=1e-2",
        ],
    ),
    # extra state: RMU's steering vector; PDU's dual variable (updated from the second epoch on)
    "rmu": (UNLEARN, ["split=forget01", "objective=rmu", "weighting=dv"]),
    "pdu": (
        UNLEARN,
        [
            "split=forget01",
            "objective=pdu",
            "weighting=mean",
            "objective.retain_loss_eps=0.0",
            "objective.dual_warmup_epochs=1",
        ],
    ),
}


def run(case, model, tofu, out, *extra, callbacks=()):
    recipe, overrides = CASES[case]
    cfg = load_config(recipe, [*base(model, tofu, out), *overrides, *extra])
    return (run_finetune if recipe == FINETUNE else run_unlearn)(cfg, extra_callbacks=list(callbacks))


def resume_cli(case, model, tofu, out) -> int:
    recipe, overrides = CASES[case]
    return main(
        [
            "finetune" if recipe == FINETUNE else "unlearn",
            str(recipe),
            *base(model, tofu, out),
            *overrides,
            "resume=true",
        ]
    )


def assert_same_run(a: Path, b: Path) -> None:
    assert (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()
    for name in LOGS:
        assert (a / name).exists() == (b / name).exists(), name
        if (a / name).exists():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((b / "run_info.json").read_text())["status"] == "done"


@pytest.fixture(scope="module")
def reference_runs(tiny_model_dir, tofu_dir, tmp_path_factory):
    """Each case run once without interruption."""
    root = tmp_path_factory.mktemp("uninterrupted")
    return {case: run(case, tiny_model_dir, tofu_dir, root / case) for case in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_kill_at_a_step_boundary_then_resume_is_bit_identical(case, reference_runs, tiny_model_dir, tofu_dir, tmp_path):
    out = tmp_path / "run"
    kill = 3 if case == "dv_global" else 5  # after the checkpoint of step 2 / 4, before the next one
    with pytest.raises(Killed):
        run(case, tiny_model_dir, tofu_dir, out, callbacks=[KillAfterStep(kill)])
    assert not (out / "model").exists()
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == kill  # the log is ahead of the newest checkpoint: resume cuts it back
    assert resume_cli(case, tiny_model_dir, tofu_dir, out) == 0
    assert_same_run(reference_runs[case], out)


@pytest.mark.slow
def test_the_epoch_reaches_the_sampler_without_the_data_loader(
    reference_runs, tiny_model_dir, tofu_dir, tmp_path, monkeypatch
):
    """Some data-loader wrappers do not pass `set_epoch` down (a multi-process loader skipping the
    batches of a resumed epoch): the trainer sets the epoch itself, so a resume is still exact."""
    from accelerate.data_loader import DataLoaderShard

    monkeypatch.setattr(DataLoaderShard, "set_epoch", lambda self, epoch: None)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run("mean", tiny_model_dir, tofu_dir, out, callbacks=[KillAfterStep(5)])
    assert resume_cli("mean", tiny_model_dir, tofu_dir, out) == 0  # from checkpoint-4, inside epoch 1
    assert_same_run(reference_runs["mean"], out)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "dv"])  # dv: with a real kill -9 below
def test_kill_while_a_checkpoint_is_saved_then_resume_is_bit_identical(
    case, reference_runs, tiny_model_dir, tofu_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    save_rng = Trainer._save_rng_state

    def dies_at_step_4(self, output_dir):  # weights and optimizer are written, the RNG state is not
        if self.state.global_step == 4:
            raise Killed
        return save_rng(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(Killed):
        run(case, tiny_model_dir, tofu_dir, out)
    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (ckpts / ".staging" / "checkpoint-4" / "optimizer.pt").exists()  # the half-written one
    assert resume_cli(case, tiny_model_dir, tofu_dir, out) == 0
    assert not (ckpts / ".staging" / "checkpoint-4").exists()
    assert_same_run(reference_runs[case], out)


def in_child(target, *args):
    """Run `target(*args)` in a forked process: a real, separate process (its own pid, file locks and
    death), without the seconds a fresh interpreter needs to import torch."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    return child


def _killed_while_saving(argv, step):
    def save(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_optimizer(self, output_dir)

    save_optimizer = Trainer._save_optimizer_and_scheduler
    Trainer._save_optimizer_and_scheduler = save
    main(argv)


@pytest.mark.slow
def test_kill_minus_9_while_saving_leaves_a_resumable_run(reference_runs, tiny_model_dir, tofu_dir, tmp_path):
    """A real SIGKILL (no cleanup runs): the lock is stale, checkpoint-4 is half written in the staging
    folder; `resume=true` still ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    recipe, overrides = CASES["dv"]
    child = in_child(
        _killed_while_saving, ["unlearn", str(recipe), *base(tiny_model_dir, tofu_dir, out), *overrides], 4
    )
    child.join(300)
    assert child.exitcode == -signal.SIGKILL
    assert (out / ".baldro.lock").exists()  # left behind by the dead process
    assert (out / "checkpoints" / ".staging" / "checkpoint-4").is_dir()
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert resume_cli("dv", tiny_model_dir, tofu_dir, out) == 0
    assert not (out / ".baldro.lock").exists()
    assert_same_run(reference_runs["dv"], out)


@pytest.mark.slow
def test_resume_with_a_changed_recipe_is_refused_unless_forced(
    reference_runs, tiny_model_dir, tofu_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run("dv", tiny_model_dir, tofu_dir, out, callbacks=[KillAfterStep(3)])
    recipe, overrides = CASES["dv"]
    args = ["unlearn", str(recipe), *base(tiny_model_dir, tofu_dir, out), *overrides, "resume=true"]
    capsys.readouterr()
    assert main([*args, "objective=npo", "weighting.args.sigma=0.5", "train.learning_rate=2e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    for key in (
        "objective.name ('simnpo' -> 'npo')",
        "weighting.args.sigma (",
        "train.learning_rate (0.001 -> 0.002)",
        "resume.force=true",
    ):
        assert key in err, key
    # keys that do not change the training (more epochs, logging, the device) may change
    assert main([*args, "train.logging_steps=2", "train.save_total_limit=1"]) == 0
    assert main([*args, "weighting.args.sigma=0.5", "resume.force=true"]) == 0


@pytest.mark.slow
def test_a_run_refuses_a_used_folder_unless_resumed_or_overwritten(
    reference_runs, tiny_model_dir, tofu_dir, tmp_path, capsys
):
    used = reference_runs["dv"]
    recipe, overrides = CASES["dv"]
    args = ["unlearn", str(recipe), *base(tiny_model_dir, tofu_dir, used), *overrides]
    capsys.readouterr()
    assert main(args) == 2
    assert (
        "already holds a run: pass resume=true to continue it, overwrite=true to replace it" in capsys.readouterr().err
    )
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine\n")
    args = [
        "unlearn",
        str(recipe),
        *base(tiny_model_dir, tofu_dir, foreign),
        *overrides,
        "train.max_steps=1",
        "train.save_strategy=no",
    ]
    assert main(args) == 2
    assert "is not empty (1 entries, e.g. todo.txt) and holds no baldro run" in capsys.readouterr().err
    (foreign / "eval").mkdir()
    (foreign / "eval" / "TOFU_SUMMARY.json").write_text("{}")  # an old evaluation must not survive
    assert main([*args, "overwrite=true"]) == 0
    assert (foreign / "todo.txt").read_text() == "mine\n" and not (foreign / "eval").exists()


@pytest.mark.slow
def test_outputs_get_the_users_umask(tiny_model_dir, tofu_dir, tmp_path):
    out = tmp_path / "shared"
    old = os.umask(0o022)
    try:
        run("dv", tiny_model_dir, tofu_dir, out, "train.max_steps=2")
    finally:
        os.umask(old)
    for path in [
        out / "config.yaml",
        out / "run_info.json",
        out / "model",
        out / "model" / "model.safetensors",
        out / "checkpoints" / "checkpoint-2",
        out / "checkpoints" / "checkpoint-2" / "baldro_checkpoint.json",
    ]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


class PoisonStep(TrainerCallback):
    """Sets a weight to NaN after step `step`: the next step's loss is not finite."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            import torch

            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")


class PoisonGradient(TrainerCallback):
    """Makes a gradient NaN just before the optimizer step of `step` (the loss stays finite)."""

    def __init__(self, step: int):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


@pytest.mark.slow
def test_a_non_finite_gradient_stops_the_run_before_the_optimizer_step(tiny_model_dir, tofu_dir, tmp_path):
    from baldro.errors import BaldroError

    out = tmp_path / "run"
    with pytest.raises(
        BaldroError, match=r"^non-finite gradient at step 3 \(fine-tuning \(NLL\); sample ids \d+, \d+\)"
    ):
        run("finetune", tiny_model_dir, tofu_dir, out, callbacks=[PoisonGradient(3)])
    assert json.loads((out / "run_info.json").read_text())["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["finetune", "dv"])
def test_a_non_finite_loss_stops_the_run_and_marks_it_failed(case, tiny_model_dir, tofu_dir, tmp_path):
    from baldro.errors import BaldroError

    out = tmp_path / "run"
    with pytest.raises(BaldroError) as e:
        run(case, tiny_model_dir, tofu_dir, out, callbacks=[PoisonStep(2)])
    message = str(e.value)
    assert message.startswith("non-finite loss at step 3 (")
    assert ("objective simnpo under weighting dv" if case == "dv" else "fine-tuning") in message
    assert "sample ids" in message and "checkpoint-2" in message and "marked failed" in message
    info = json.loads((out / "run_info.json").read_text())
    assert info["status"] == "failed" and info["failed_step"] == 3 and info["last_checkpoint"].endswith("checkpoint-2")
    assert not (out / "model").exists()  # no NaN model is saved
    assert (out / "checkpoints" / "checkpoint-2" / "baldro_checkpoint.json").exists()


class PauseAtStep1(TrainerCallback):
    def __init__(self, started: Path, go: Path):
        self.started, self.go = started, go

    def on_step_end(self, args, state, control, **kwargs):
        import time

        if state.global_step == 1:
            self.started.touch()
            deadline = time.time() + 240
            while not self.go.exists() and time.time() < deadline:
                time.sleep(0.02)


def _holder(case, model, tofu, out, started, go):
    run(case, model, tofu, out, callbacks=[PauseAtStep1(started, go)])


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_refuses_and_the_first_finishes_untouched(
    reference_runs, tiny_model_dir, tofu_dir, tmp_path, capsys
):
    import time

    out, started, go = tmp_path / "run", tmp_path / "started", tmp_path / "go"
    first = in_child(_holder, "dv", tiny_model_dir, tofu_dir, out, started, go)
    try:
        deadline = time.time() + 240
        while not started.exists() and first.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        assert started.exists()
        recipe, overrides = CASES["dv"]
        second = [
            "unlearn",
            str(recipe),
            *base(tiny_model_dir, tofu_dir, out),
            *overrides,
            "seed=1",
            "train.learning_rate=5e-3",
        ]
        capsys.readouterr()
        for extra in ([], ["resume=true"], ["overwrite=true"]):
            assert main([*second, *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert f"{out} is in use by another baldro unlearn (pid {first.pid}" in err, err
    finally:
        go.touch()
        first.join(300)
    assert first.exitcode == 0
    assert_same_run(reference_runs["dv"], out)  # as if the second run had never been started
    assert "seed: 0" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_eval_of_a_diverged_model_says_why_metrics_are_na(tiny_model_dir, tofu_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    for tensor in weights.values():
        tensor.fill_(float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    rc = main(
        [
            "eval",
            str(ROOT / "configs" / "eval" / "tofu.yaml"),
            f"model.path={broken}",
            "model.dtype=float32",
            "model.device=cpu",
            "model.attn_implementation=null",
            "format.use_chat_template=false",
            f"data.source={tofu_dir}",
            "split=forget01",
            "eval.limit=2",
            "eval.max_new_tokens=2",
            f"output_dir={tmp_path / 'eval'}",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    assert "model weights are NaN or inf" in info["notes"]["model"]
    assert (
        info["linear_kernels"] == "torch"
    )  # what the evaluator multiplied with: auto leaves a narrow model on torch's
    summary = json.loads((tmp_path / "eval" / "TOFU_SUMMARY.json").read_text())
    assert summary["model_utility"] is None
    assert "are all NaN: the model's outputs are not finite" in info["notes"]["model_utility"]
    assert "model_utility: missing" in printed and "are all NaN" in printed


def test_retain_pairing_is_the_same_with_any_number_of_workers():
    """The retain sample of forget sample i in epoch e depends on (seed, e, i) only."""
    from torch.utils.data import DataLoader

    from baldro.train.batching import EpochSampler, UnlearnDataset

    dataset = UnlearnDataset(list(range(10)), [f"r{j}" for j in range(50)], seed=3)

    def epoch(e, workers):
        sampler = EpochSampler(dataset, seed=3)
        sampler.set_epoch(e)
        loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=workers, collate_fn=list)
        return [(item["id"], item["retain"]) for batch in loader for item in batch]

    first = epoch(0, 0)
    assert epoch(0, 2) == first and epoch(0, 0) == first
    assert sorted(i for i, _ in first) == list(range(10))
    second = epoch(1, 2)
    assert second == epoch(1, 0) and second != first  # a new order and new pairs each epoch
    assert len({r for _, r in first}) > 5  # not one retain sample for everyone
    assert dataset[4]["retain"] == dict(first)[4]  # a plain index is epoch 0


def test_truncating_a_log_drops_later_steps_and_a_torn_line(tmp_path):
    from baldro.io import truncate_jsonl

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "tor')
    assert truncate_jsonl(log, lambda r: r["step"] <= 2) == 1
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'

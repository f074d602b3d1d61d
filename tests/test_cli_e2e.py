"""End to end through the CLI: fine-tune a tiny model on a TOFU slice, then unlearn it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baldro.cli import main
from baldro.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = str(ROOT / "configs" / "unlearn" / "tofu.yaml")
FINETUNE = str(ROOT / "configs" / "finetune" / "tofu.yaml")


def cpu_overrides(model_path) -> list[str]:
    return [
        f"model.path={model_path}",
        "model.dtype=float32",
        "model.device=cpu",
        "model.attn_implementation=null",
        "train.bf16=false",
        "train.use_cpu=true",
        "train.save_strategy=no",
        "train.warmup_steps=0",
        "train.disable_tqdm=true",
        "format.use_chat_template=false",
        "format.prompt_template='Question: {question}\nAnswer: '",
    ]


@pytest.fixture(scope="module")
def target_model(tiny_model_dir, tofu_dir, tmp_path_factory) -> Path:
    """The tiny model fine-tuned on the forget01 authors (so that there is something to forget)."""
    out = tmp_path_factory.mktemp("ft")
    rc = main(
        [
            "finetune",
            FINETUNE,
            *cpu_overrides(tiny_model_dir),
            f"data.source={tofu_dir}",
            "data.train_split=forget01",
            f"output_dir={out}",
            "train.num_train_epochs=8",
            "train.learning_rate=3e-3",
            "train.per_device_train_batch_size=8",
            "train.gradient_accumulation_steps=1",
            "train.logging_steps=1",
        ]
    )
    assert rc == 0
    assert (out / "model" / "model.safetensors").exists()
    log = read_jsonl(out / "train_log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"]
    return out / "model"


def unlearn(target_model, tofu_dir, out, objective, weighting, *extra):
    return main(
        [
            "unlearn",
            UNLEARN,
            *cpu_overrides(target_model),
            f"data.source={tofu_dir}",
            "split=forget01",
            f"objective={objective}",
            f"weighting={weighting}",
            f"output_dir={out}",
            "data.limit=16",
            "train.num_train_epochs=1",
            "train.per_device_train_batch_size=4",
            "train.gradient_accumulation_steps=1",
            "train.learning_rate=1e-3",
            *extra,
        ]
    )


@pytest.mark.slow
def test_finetune_then_unlearn_npo_dv(target_model, tofu_dir, tmp_path):
    out = tmp_path / "npo_dv"
    rc = unlearn(
        target_model,
        tofu_dir,
        out,
        "npo",
        "dv",
        "train.num_train_epochs=4",
        "balance.every_n_steps=4",
        "eval.at_end=true",
        "+eval.limit=6",
        "eval.max_new_tokens=8",
    )
    assert rc == 0
    summary = json.loads((out / "eval" / "TOFU_SUMMARY.json").read_text())
    assert summary["model_utility"] is not None and "balance_prob_std" in summary
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "| npo_dv" in (tmp_path / "report" / "report.md").read_text()
    for name in (
        "config.yaml",
        "train_log.jsonl",
        "forget_losses.jsonl",
        "run_info.json",
        "balance.jsonl",
        "model/model.safetensors",
    ):
        assert (out / name).exists(), name
    log = read_jsonl(out / "train_log.jsonl")
    assert len(log) == 16  # 16 forget samples / batch 4 x 4 epochs
    for key in ("forget_loss", "forget_loss_mean", "retain_loss", "weight_max", "weight_entropy", "weight_nonzero"):
        assert key in log[0], key
    # the forget loss moves the right way (lower = more forgotten)
    assert log[-1]["forget_loss_mean"] < log[0]["forget_loss_mean"]
    per_sample = read_jsonl(out / "forget_losses.jsonl")
    assert sorted(i for r in per_sample[:4] for i in r["ids"]) == list(range(16))
    assert all(abs(sum(r["weights"]) - 1) < 1e-5 for r in per_sample)
    info = json.loads((out / "run_info.json").read_text())
    assert info["objective"] == "npo" and info["weighting"] == "dv"
    # the saved model reloads and differs from the target
    from transformers import AutoModelForCausalLM

    new = AutoModelForCausalLM.from_pretrained(out / "model")
    old = AutoModelForCausalLM.from_pretrained(target_model)
    assert any(not torch.equal(a, b) for a, b in zip(new.parameters(), old.parameters()))


OBJECTIVES = ["ga", "graddiff", "npo", "simnpo", "wga", "satimp", "idk", "dpo", "rmu", "undial", "ceu", "pdu", "altpo"]
WEIGHTINGS = ["mean", "group", "dv", "dv_softmin", "dv_global"]
# what the objective cannot run without (PDU: its constraint level; AltPO: a small generation budget)
REQUIRED = {
    "pdu": ["objective.retain_loss_eps=1.0", "objective.dual_warmup_epochs=0"],
    "altpo": ["objective.alternates.n=2", "objective.alternates.max_new_tokens=6"],
}


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_under_every_weighting(target_model, tofu_dir, tmp_path, objective):
    for weighting in WEIGHTINGS:
        out = tmp_path / f"{objective}_{weighting}"
        rc = unlearn(target_model, tofu_dir, out, objective, weighting, "data.limit=8", *REQUIRED.get(objective, []))
        assert rc == 0, (objective, weighting)
        log = read_jsonl(out / "train_log.jsonl")
        assert len(log) == 2
        assert all(v is not None for row in log for v in row.values())


@pytest.mark.slow
def test_group_retain_shrinking_and_kl(target_model, tofu_dir, tmp_path):
    rc = unlearn(
        target_model,
        tofu_dir,
        tmp_path / "g",
        "npo",
        "group",
        "weighting.args.shrink_retain=true",
        "weighting.args.hardness=nll",
        "objective.retain_loss=kl",
    )
    assert rc == 0
    rows = read_jsonl(tmp_path / "g" / "forget_losses.jsonl")
    assert all(sum(w > 0 for w in r["weights"]) == 2 for r in rows)


@pytest.mark.slow
def test_lora_unlearning_uses_adapter_free_reference(target_model, tofu_dir, tmp_path):
    """With LoRA no reference copy is made: the reference is the model with its adapter disabled."""
    out = tmp_path / "lora"
    rc = unlearn(
        target_model,
        tofu_dir,
        out,
        "npo",
        "dv",
        "data.limit=8",
        "+model.lora.r=4",
        "+model.lora.lora_alpha=8",
        "train.learning_rate=1e-2",
    )
    assert rc == 0
    log = read_jsonl(out / "train_log.jsonl")
    # at the first step the LoRA model equals its reference, so NPO's loss is exactly -(2/beta) log(1/2)
    first = read_jsonl(out / "forget_losses.jsonl")[0]
    assert all(abs(loss - 20 * 0.6931472) < 1e-3 for loss in first["losses"])
    assert log[-1]["forget_loss_mean"] < log[0]["forget_loss_mean"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")  # merged and saved as a plain model


@pytest.mark.slow
def test_resume_from_checkpoint(target_model, tofu_dir, tmp_path):
    out = tmp_path / "resumable"
    common = ["weighting=dv_global", "train.save_strategy=steps", "train.save_steps=2", "train.num_train_epochs=2"]
    assert unlearn(target_model, tofu_dir, out, "npo", "dv_global", *common, "train.max_steps=2") == 0
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "weighting_state.pt").exists()
    assert unlearn(target_model, tofu_dir, out, "npo", "dv_global", *common, "resume=true") == 0
    steps = [r["step"] for r in read_jsonl(out / "train_log.jsonl")]
    assert steps == list(range(1, 9))  # 2 steps before the interruption, 6 after resuming


@pytest.mark.slow
def test_periodic_eval_during_unlearning(target_model, tofu_dir, tmp_path):
    out = tmp_path / "periodic"
    rc = unlearn(
        target_model,
        tofu_dir,
        out,
        "simnpo",
        "group",
        "data.limit=8",
        "train.eval_strategy=steps",
        "train.eval_steps=1",
        "eval.trajectory_limit=4",
        "eval.max_new_tokens=4",
        "eval.batch_size=8",
    )
    assert rc == 0
    for step in (0, 1, 2):  # step 0: the starting model
        summary = json.loads((out / "evals" / f"step-{step}" / "TOFU_SUMMARY.json").read_text())
        assert summary["model_utility"] is not None and summary["forget_quality"] is None
    assert [r["step"] for r in read_jsonl(out / "eval_trajectory.jsonl")] == [0, 1, 2]


@pytest.mark.slow
def test_eval_and_summarize_cli(target_model, tofu_dir, tmp_path, capsys):
    base = [
        str(ROOT / "configs" / "eval" / "tofu.yaml"),
        *cpu_overrides(target_model),
        f"data.source={tofu_dir}",
        "split=forget01",
        "eval.limit=6",
        "eval.max_new_tokens=8",
    ]
    assert main(["eval", *base, f"output_dir={tmp_path / 'retain'}"]) == 0
    ref = tmp_path / "retain" / "TOFU_EVAL.json"
    assert main(["eval", *base, f"output_dir={tmp_path / 'e'}", f"eval.retain_logs_path={ref}"]) == 0
    summary = json.loads((tmp_path / "e" / "TOFU_SUMMARY.json").read_text())
    assert summary["forget_quality"] == pytest.approx(1.0) and "balance_prob_std" in summary
    capsys.readouterr()
    out = tmp_path / "resummary.json"
    assert main(["summarize", str(tmp_path / "e" / "TOFU_EVAL.json"), "--reference", str(ref), "--out", str(out)]) == 0
    assert "forget_quality" in capsys.readouterr().out
    again = json.loads(out.read_text())
    assert again["forget_quality"] == pytest.approx(summary["forget_quality"])
    assert again["model_utility"] == pytest.approx(summary["model_utility"])


@pytest.mark.slow
def test_eval_writes_stage_timings(target_model, tofu_dir, tmp_path, capsys):
    args = [
        str(ROOT / "configs" / "eval" / "tofu.yaml"),
        *cpu_overrides(target_model),
        f"data.source={tofu_dir}",
        "split=forget01",
        "eval.limit=4",
        "eval.max_new_tokens=4",
        f"output_dir={tmp_path / 'e'}",
    ]
    assert main(["eval", *args]) == 0
    timings = json.loads((tmp_path / "e" / "eval_timings.json").read_text())
    assert {"rouge"} <= set(timings["stages"]) and timings["total_s"] > 0
    assert all(t["seconds"] >= 0 and t["sequences"] > 0 for t in timings["stages"].values())
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("baldro eval:") and "rouge" in last


def module_norms(model_dir, tofu_dir, split: str, layer: int, n: int = 16):
    """Per-token outputs of decoder layer `layer` at the answer tokens of the first n rows of a split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baldro.data.formatting import QAFormatter, collate_encoded
    from baldro.train.sequence import answer_hidden

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    fmt = QAFormatter(tok, use_chat_template=False, prompt_template="Question: {question}\nAnswer: ")
    rows = [json.loads(line) for line in (tofu_dir / f"{split}.jsonl").read_text().splitlines()[:n]]
    batch = collate_encoded(
        fmt.encode_many([r["question"] for r in rows], [r["answer"] for r in rows]), tok.pad_token_id
    )
    out = []
    hook = model.model.layers[layer].register_forward_hook(
        lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    return answer_hidden(out[0], batch["labels"]).values


@pytest.mark.slow
def test_rmu_steers_forget_hidden_states_and_keeps_retain_ones(target_model, tofu_dir, tmp_path):
    """RMU acts where it should: at its module, forget tokens' hidden states go to norm steering_coeff
    (their direction to u), retain tokens' stay close to the reference's."""
    before_f = module_norms(target_model, tofu_dir, "forget01", 0)
    coeff = 3.0 * float(before_f.norm(dim=-1).mean())  # far from where the forget states start
    out = tmp_path / "rmu"
    rc = unlearn(
        target_model,
        tofu_dir,
        out,
        "rmu",
        "mean",
        f"objective.args.steering_coeff={coeff}",
        "objective.module_regex=model\\.layers\\.0",
        "train.num_train_epochs=12",
        "train.learning_rate=3e-3",
        "data.retain_split=retain_perturbed",
    )
    assert rc == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["module"] == "model.layers.0"
    u = torch.load(out / "objective_state.pt")["steering"]
    after_f = module_norms(out / "model", tofu_dir, "forget01", 0)
    dist_before = (before_f - coeff * u).norm(dim=-1).mean()
    dist_after = (after_f - coeff * u).norm(dim=-1).mean()
    assert dist_after < 0.3 * dist_before, (dist_before, dist_after)
    assert abs(float(after_f.norm(dim=-1).mean()) - coeff) < 0.3 * abs(float(before_f.norm(dim=-1).mean()) - coeff)
    before_r = module_norms(target_model, tofu_dir, "retain_perturbed", 0)
    after_r = module_norms(out / "model", tofu_dir, "retain_perturbed", 0)
    moved_r = (after_r - before_r).norm(dim=-1).mean()
    moved_f = (after_f - before_f).norm(dim=-1).mean()
    assert moved_r < 0.5 * moved_f, (moved_r, moved_f)


@pytest.mark.slow
def test_altpo_generates_alternates_once_and_reuses_them(target_model, tofu_dir, tmp_path, monkeypatch):
    import baldro.recipes.unlearn as recipes

    out = tmp_path / "altpo"
    args = [
        "objective.alternates.n=3",
        "objective.alternates.max_new_tokens=5",
        "data.limit=4",
        "train.save_strategy=epoch",
    ]
    assert unlearn(target_model, tofu_dir, out, "altpo", "dv", *args) == 0
    lines = (out / "alternates.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["settings"]["n"] == 3 and len(lines) == 5
    assert all(len(json.loads(line)["alternates"]) == 3 for line in lines[1:])
    # a second run of the same recipe into a copy (as a resume would) reads the file, never generates
    again = tmp_path / "again"
    again.mkdir()
    (again / "alternates.jsonl").write_text((out / "alternates.jsonl").read_text())
    monkeypatch.setattr(recipes, "generate_alternates", lambda *a, **k: pytest.fail("generated again"))
    from baldro.train.alternates import read_alternates

    rows = [json.loads(line) for line in (tofu_dir / "forget01.jsonl").read_text().splitlines()[:4]]
    assert read_alternates(again / "alternates.jsonl", rows) == [json.loads(line)["alternates"] for line in lines[1:]]
    # the same seed draws the same alternates; OpenUnlearning's one-alternate-per-line layout reads too
    ou = tmp_path / "ou.jsonl"
    ou.write_text(
        "".join(
            json.dumps({"question": r["question"], "answer": r["answer"], "alternate": f"alt {i} {k}"}) + "\n"
            for k in range(2)
            for i, r in enumerate(rows)
        )
    )
    assert read_alternates(ou, rows)[1] == ["alt 1 0", "alt 1 1"]
    assert (
        unlearn(
            target_model,
            tofu_dir,
            tmp_path / "from_file",
            "altpo",
            "mean",
            "data.limit=4",
            f"objective.alternates.file={ou}",
        )
        == 0
    )


@pytest.mark.slow
def test_primal_dual_moves_lambda_with_the_retain_loss(target_model, tofu_dir, tmp_path):
    """PDU: lambda stays at alpha during the warm-up, then rises while the retain loss is above eps."""
    out = tmp_path / "pdu"
    assert (
        unlearn(
            target_model,
            tofu_dir,
            out,
            "pdu",
            "dv",
            "objective.retain_loss_eps=0.0",
            "objective.dual_warmup_epochs=1",
            "train.num_train_epochs=2",
            "train.logging_steps=1",
        )
        == 0
    )
    log = read_jsonl(out / "train_log.jsonl")
    lam = [row["dual_lambda"] for row in log]
    assert lam[:4] == [1.0] * 4  # epoch 1 (4 steps) is the warm-up: its end enables the updates
    assert lam[-1] > lam[4] > 1.0
    assert json.loads((out / "run_info.json").read_text())["dual_lambda_final"] == pytest.approx(lam[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, expected",
    [
        ("objective.module_regex=model\\.layers\\.99", "matches no module"),
        ("objective.module_regex=model\\.layers\\..*", "modules"),
        ("objective.trainable_params_regex=[nothing]", "matches no parameter"),
    ],
)
def test_bad_module_and_parameter_patterns(target_model, tofu_dir, tmp_path, capsys, override, expected):
    rc = unlearn(target_model, tofu_dir, tmp_path / "bad", "rmu", "mean", override)
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("baldro unlearn: error:")]) == 1


def test_forward_computes_only_what_is_declared(tiny_model_dir):
    """A pass that needs a module's output alone stops there: no later layer, no LM head, no logits."""
    from transformers import AutoModelForCausalLM

    from baldro.train.forward import forward_parts

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    model.model.layers[-1].register_forward_hook(lambda *a: calls.append("last"))
    batch = {
        "input_ids": torch.tensor([[1, 5, 7, 9]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.tensor([[-100, 5, 7, 9]]),
    }
    out = forward_parts(model, batch, token_logp=False, hidden_module=model.model.layers[0])
    assert calls == [] and out.logits is None and out.token_lp is None and out.hidden.values.shape[0] == 3
    out = forward_parts(model, batch)  # NPO's pass: log-probs only, no vocabulary-sized tensor kept
    assert calls == ["last", "head"] and out.logits is None and out.hidden is None
    out = forward_parts(model, batch, logits=True)
    assert out.logits.values.shape == (3, model.config.vocab_size)

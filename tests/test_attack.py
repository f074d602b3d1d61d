"""`baldro attack` on the tiny model: relearning brings a GradDiff-unlearned model's forget answers back
(more than relearning on retain rows does), a seeded attack is reproducible byte for byte, quantized
weights really take at most 2^bits values per quantization group, every attack's evaluation runs (TOFU
and MUSE), the report shows the attacks; bad input is one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from baldro.cli import main
from baldro.eval.recovery import METRICS, came_back, recovery, threshold

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PROMPT = "format.prompt_template='Question: {question}\nAnswer: '"
CPU = [
    "model.dtype=float32",
    "model.device=cpu",
    "model.attn_implementation=null",
    "train.bf16=false",
    "train.use_cpu=true",
    "train.save_strategy=no",
    "train.warmup_steps=0",
    "train.disable_tqdm=true",
    "format.use_chat_template=false",
    PROMPT,
    "log_to_console=false",
]
# the unlearning run evaluates with these settings, so that its RUN/eval is every attack's "before"
EVAL = ["eval.limit=8", "eval.max_new_tokens=8", "eval.batch_size=8"]
RELEARN = ["attack.relearn.steps=8", "attack.relearn.batch_size=4", "attack.relearn.learning_rate=1e-3"]


@pytest.fixture(scope="module")
def unlearned(tiny_model_dir, tofu_dir, tmp_path_factory) -> Path:
    """The tiny model fine-tuned on forget01, then unlearned with GradDiff (evaluated: RUN/eval)."""
    root = tmp_path_factory.mktemp("attack")
    assert (
        main(
            [
                "finetune",
                str(CONFIGS / "finetune" / "tofu.yaml"),
                f"model.path={tiny_model_dir}",
                *CPU,
                f"data.source={tofu_dir}",
                "data.train_split=forget01",
                f"output_dir={root / 'target'}",
                "train.num_train_epochs=8",
                "train.learning_rate=3e-3",
                "train.per_device_train_batch_size=8",
                "train.gradient_accumulation_steps=1",
            ]
        )
        == 0
    )
    run = root / "graddiff"
    assert (
        main(
            [
                "unlearn",
                str(CONFIGS / "unlearn" / "tofu.yaml"),
                f"model.path={root / 'target' / 'model'}",
                *CPU,
                f"data.source={tofu_dir}",
                "split=forget01",
                "objective=graddiff",
                "weighting=mean",
                f"output_dir={run}",
                "data.limit=16",
                "train.num_train_epochs=2",
                "train.per_device_train_batch_size=4",
                "train.gradient_accumulation_steps=1",
                "train.learning_rate=1e-3",
                "eval.at_end=true",
                *EVAL,
            ]
        )
        == 0
    )
    return run


def attack(recipe: str, run: Path, tofu_dir: Path, *extra) -> list[str]:
    return [
        "attack",
        str(CONFIGS / "attack" / f"{recipe}.yaml"),
        f"model.path={run / 'model'}",
        *CPU,
        f"data.source={tofu_dir}",
        "split=forget01",
        "data.limit=16",
        *EVAL,
        *extra,
    ]


def gain(summary: dict) -> float:
    """The mean change of the per-sample log-probability of the forget answers."""
    p = summary["per_sample"]["prob"]
    return float(np.mean(np.log(p["after"]) - np.log(p["before"])))


@pytest.fixture(scope="module")
def relearned(unlearned, tofu_dir, tmp_path_factory) -> dict[str, Path]:
    """Relearning on a seeded half of the forget set, and on as many retain rows (the control)."""
    out = {}
    for split in ("half", "retain"):
        out[split] = tmp_path_factory.mktemp(f"relearn_{split}")
        assert (
            main(
                attack(
                    "relearn",
                    unlearned,
                    tofu_dir,
                    *RELEARN,
                    f"attack.relearn.split={split}",
                    f"output_dir={out[split]}",
                    "overwrite=true",
                )
            )
            == 0
        )
    return out


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "attack_summary.json").read_text())


def test_relearning_brings_the_forgotten_answers_back_more_than_retain_only(unlearned, relearned):
    half = summary_of(relearned["half"] / "relearn_half")
    retain = summary_of(relearned["retain"] / "relearn_retain")
    for s in (half, retain):
        assert s["before_eval"] == str(unlearned / "eval")  # the run's own evaluation, same settings
        assert len(s["per_sample"]["prob"]["before"]) == 8 and s["cost"]["steps"] == 8
        assert set(s["came_back"]) == {"prob", "rouge", "truth_ratio"}
    assert half["settings"]["n_samples"] == 8 and retain["settings"]["n_samples"] == 8  # half of data.limit=16
    assert gain(half) > 0.3, gain(half)  # the attack works: the forget answers' probability rises
    assert gain(half) > gain(retain) + 0.1, (gain(half), gain(retain))  # more than relearning other facts
    assert half["summary"]["after"]["forget_Q_A_Prob"] > half["summary"]["before"]["forget_Q_A_Prob"]
    trained = half["per_sample"]["prob"]["trained"]
    assert 0 < sum(trained) < 8 and set(half["came_back"]["prob"]) == {"all", "trained", "held_out"}
    assert "trained" not in retain["per_sample"]["prob"]  # no forget sample was trained on
    eval_log = json.loads((relearned["half"] / "relearn_half" / "TOFU_EVAL.json").read_text())
    probs = [eval_log["forget_Q_A_Prob"]["value_by_index"][str(i)]["prob"] for i in range(8)]
    assert probs == half["per_sample"]["prob"]["after"]  # the summary is the evaluator's numbers


def test_a_seeded_attack_is_reproducible_byte_for_byte(unlearned, relearned, tofu_dir, tmp_path):
    again = tmp_path / "again"
    assert (
        main(attack("relearn", unlearned, tofu_dir, *RELEARN, "attack.relearn.split=half", f"output_dir={again}")) == 0
    )
    first, second = relearned["half"] / "relearn_half", again / "relearn_half"
    for name in ("TOFU_EVAL.json", "TOFU_SUMMARY.json", "train_log.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    a, b = summary_of(first), summary_of(second)
    assert a.pop("cost")["steps"] == b.pop("cost")["steps"] and a == b
    # another seed draws another half
    assert (
        main(
            attack(
                "relearn",
                unlearned,
                tofu_dir,
                *RELEARN,
                "attack.relearn.steps=1",
                "seed=1",
                f"output_dir={tmp_path / 'seed1'}",
            )
        )
        == 0
    )
    assert (
        summary_of(tmp_path / "seed1" / "relearn_half")["per_sample"]["prob"]["trained"]
        != a["per_sample"]["prob"]["trained"]
    )


def test_relearning_a_lora_adapter_changes_the_model(unlearned, tofu_dir, tmp_path):
    assert (
        main(
            attack(
                "relearn",
                unlearned,
                tofu_dir,
                *RELEARN,
                "attack.relearn.steps=4",
                "+attack.relearn.lora.r=4",
                "attack.relearn.learning_rate=1e-2",
                f"output_dir={tmp_path}",
            )
        )
        == 0
    )
    assert gain(summary_of(tmp_path / "relearn_half")) > 0.05


def _distinct_per_group(values: torch.Tensor, group: int) -> int:
    """The largest number of distinct values in any group of `group` consecutive values."""
    blocks = values.flatten().reshape(-1, group)
    return max(len(torch.unique(b)) for b in blocks)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_take_at_most_2_to_the_bits_values_per_group(unlearned, bits):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from baldro.models.loading import load_model

    full = load_model(str(unlearned / "model"), dtype="float32", device="cpu")
    quantized = load_model(str(unlearned / "model"), dtype="float32", device="cpu", quantize_bits=bits)
    originals = dict(full.named_modules())
    layers = [(n, m) for n, m in quantized.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down); the LM head stays
    for name, layer in layers:
        w = originals[name].weight.detach()
        if bits == 8:  # LLM.int8: int8 codes, one scale per output row
            codes, scale = layer.weight.data, layer.weight.SCB
            assert codes.dtype == torch.int8 and scale.shape == (w.shape[0],)
            restored = codes.float() * scale[:, None] / 127
            group = w.shape[1]
            assert len(torch.unique(w)) > 256  # the float weights had more values than 8 bits hold
            assert len(torch.unique(codes)) <= 256
        else:  # 4-bit: one absmax per block of `blocksize` weights
            state = layer.weight.quant_state
            restored = F.dequantize_4bit(layer.weight.data, state).float()
            group = state.blocksize
            assert _distinct_per_group(w, group) > 16  # the float weights had more values than 4 bits hold
        assert restored.shape == w.shape
        assert _distinct_per_group(restored, group) <= 2**bits
        assert not torch.equal(restored, w)
        bound = w.abs().reshape(-1, group).amax(dim=1, keepdim=True)  # the error is a fraction of the group's scale
        assert ((restored - w).abs().reshape(-1, group) <= bound * (1 / 127 if bits == 8 else 0.5) + 1e-6).all()


def test_quantize_attack_evaluates_and_the_report_shows_every_attack(unlearned, relearned, tofu_dir, tmp_path, capsys):
    # default output folder RUN/attack; other eval settings than the run's: the "before" is evaluated here
    argv = attack("quantize", unlearned, tofu_dir, "eval.max_new_tokens=6")
    assert main([*argv, "attack.quantize.bits=[8]"]) == 0
    assert "baldro attack: quantize_8bit:" in capsys.readouterr().out
    assert main([*argv, "resume=true"]) == 0  # adds the 4-bit attack; the 8-bit one is done
    assert "baldro attack: quantize_4bit:" in capsys.readouterr().out
    out = unlearned / "attack"
    for bits in (8, 4):
        s = summary_of(out / f"quantize_{bits}bit")
        assert s["before_eval"] == str(out / "before") and s["settings"]["bits"] == bits
        assert s["headline"]["metric"] == "prob" and s["headline"]["n"] == 8
        assert s["cost"]["eval_seconds"] > 0 and s["cost"]["steps"] == 0
        assert (out / f"quantize_{bits}bit" / "TOFU_SUMMARY.json").is_file()
    assert (out / "before" / "TOFU_EVAL.json").is_file()
    info = json.loads((out / "attack_info.json").read_text())
    assert list(info["attacks"]) == ["quantize_8bit", "quantize_4bit"]

    # resume=true skips the attacks that are done; without it the folder is refused
    before = (out / "quantize_4bit" / "attack_summary.json").stat().st_mtime_ns
    assert main([*argv, "resume=true"]) == 0
    assert "baldro attack: quantize" not in capsys.readouterr().out
    assert (out / "quantize_4bit" / "attack_summary.json").stat().st_mtime_ns == before
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err

    # the report: the run with its RUN/attack, and two more attack folders of the same model
    assert (
        main(
            [
                "report",
                str(unlearned),
                str(relearned["half"]),
                str(relearned["retain"]),
                "--out",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Attacks" in report and (tmp_path / "report" / "attacks.png").stat().st_size > 1000
    rows = [line for line in report.splitlines() if line.startswith(("| quantize", "| relearn"))]
    assert [r.split(" |")[0] for r in rows] == [
        "| quantize_4bit",
        "| quantize_8bit",
        "| relearn_half",
        "| relearn_retain",
    ]


def test_forget_only_attack_reuses_the_full_evaluation_and_skips_utility(unlearned, tofu_dir, tmp_path):
    """eval.forget_only=true: the run's full RUN/eval is the "before" (the forget set's numbers are in it);
    the attacked model is scored on the forget set only, so its summary has no model utility."""
    out = tmp_path / "forget_only"
    argv = attack("quantize", unlearned, tofu_dir, "attack.quantize.bits=[8]", "eval.forget_only=true")
    assert main([*argv, f"output_dir={out}"]) == 0
    s = summary_of(out / "quantize_8bit")
    assert s["before_eval"] == str(unlearned / "eval")
    assert s["headline"]["n"] == 8 and len(s["per_sample"]["prob"]["after"]) == 8
    after = json.loads((out / "quantize_8bit" / "TOFU_SUMMARY.json").read_text())
    assert after["model_utility"] is None and after["forget_Q_A_Prob"] is not None
    log = json.loads((out / "quantize_8bit" / "TOFU_EVAL.json").read_text())
    assert not [k for k in log if k.startswith(("retain_", "ra_", "wf_"))] and "forget_truth_ratio" in log


def test_muse_attacks_run_and_compare_verbmem_and_knowmem(tiny_model_dir, tmp_path):
    from test_muse import books_slice, cpu

    books = books_slice(tmp_path / "books")
    assert (
        main(
            [
                "attack",
                str(CONFIGS / "attack" / "muse.yaml"),
                *cpu(tiny_model_dir),
                f"data.source={books}",
                "data.limit=4",
                "eval.limit=2",
                "attack.relearn.steps=2",
                "attack.relearn.batch_size=2",
                "attack.quantize.bits=[4]",
                f"output_dir={tmp_path / 'out'}",
                "log_to_console=false",
            ]
        )
        == 0
    )
    for folder in ("relearn_half", "quantize_4bit"):
        s = summary_of(tmp_path / "out" / folder)
        assert s["benchmark"] == "muse" and set(s["per_sample"]) == {"verbmem", "knowmem"}
        assert (
            len(s["per_sample"]["verbmem"]["after"]) == 2 and (tmp_path / "out" / folder / "MUSE_EVAL.json").is_file()
        )
    assert summary_of(tmp_path / "out" / "relearn_half")["settings"]["n_samples"] == 2  # half the 4 chunks


def test_a_missing_quantization_library_is_one_line_naming_the_package(
    unlearned, tofu_dir, tmp_path, monkeypatch, capsys
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    assert main(attack("quantize", unlearned, tofu_dir, f"output_dir={tmp_path}")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'bitsandbytes==0.50.2'" in err, err


# ----------------------------------------------------------------------------- the counting, on hand-made logs
def _log(prob=None, tr=None, rouge=None) -> dict:
    out = {}
    for key, field, values in (
        ("forget_Q_A_Prob", "prob", prob),
        ("forget_truth_ratio", "score", tr),
        ("forget_Q_A_ROUGE", "rougeL_recall", rouge),
    ):
        if values is not None:
            out[key] = {"value_by_index": {str(i): {field: v} for i, v in enumerate(values)}}
    return out


def test_came_back_counts_crossings_of_the_threshold_in_the_metrics_direction():
    assert came_back([0.01, 0.05, 0.5, 0.5], [0.2, 0.05, 0.6, 0.01], 0.1, True) == {
        "n": 4,
        "forgotten_before": 2,
        "came_back": 1,
        "remembered_after": 2,
        "lost": 1,
    }
    # a truth ratio remembers downwards
    assert came_back([0.9, 0.9], [0.5, 0.8], 0.75, False)["came_back"] == 1


def test_recovery_scopes_thresholds_and_forget_quality():
    before = _log(prob=[0.01, 0.02, 0.03, 0.04], tr=[0.9, 0.9, 0.9, 0.9])
    after = _log(prob=[0.5, 0.5, 0.01, 0.3], tr=[0.2, 0.3, 0.9, 0.4])
    retain = _log(prob=[0.2, 0.1, 0.4, 0.3], tr=[0.5, 0.6, 0.7, 0.8])
    r = recovery(before, after, "tofu", retain, trained={"0", "1"}, headline_scope="held_out")
    assert r["thresholds"]["prob"]["value"] == pytest.approx(0.25)  # the retain model's median
    assert r["came_back"]["prob"]["trained"]["came_back"] == 2 and r["came_back"]["prob"]["held_out"]["came_back"] == 1
    assert r["headline"] == {"metric": "prob", "scope": "held_out", "came_back": 1, "forgotten_before": 2, "n": 2}
    assert r["per_sample"]["prob"]["trained"] == [True, True, False, False]
    assert "rouge" not in r["per_sample"]  # not in these logs
    fq = r["forget_quality"]
    assert fq["all"]["after"] > fq["all"]["before"] and set(fq) == {"all", "trained", "held_out"}
    # without a reference: the stated defaults, and no forget quality
    r = recovery(before, after, "tofu", thresholds={"prob": 0.45})
    assert r["thresholds"]["prob"]["value"] == 0.45 and r["thresholds"]["truth_ratio"]["value"] == 0.75
    assert "forget_quality" not in r and r["came_back"]["prob"]["all"]["came_back"] == 2
    assert threshold(METRICS["tofu"][0]) == (0.1, "default (no retain model log)")

"""Every shipped recipe resolves, for every objective x weighting x split, with the paper's hyperparameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from baldro.recipes.config import as_recipe, load_config
from baldro.recipes.validation import weighting_args
from baldro.train.objectives import get_objective
from baldro.train.weighting import make_weighting

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
OBJECTIVES = sorted(p.stem for p in (CONFIGS / "objective").glob("*.yaml"))
WEIGHTINGS = sorted(p.stem for p in (CONFIGS / "weighting").glob("*.yaml"))
SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


def test_groups_cover_every_objective_and_weighting():
    assert set(OBJECTIVES) == {
        "ga",
        "graddiff",
        "npo",
        "simnpo",
        "wga",
        "satimp",
        "idk",
        "dpo",
        "rmu",
        "undial",
        "ceu",
        "pdu",
        "altpo",
    }
    assert set(WEIGHTINGS) == {"mean", "group", "dv", "dv_softmin", "dv_global"}


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_unlearn_combination_resolves(objective, split):
    for weighting in WEIGHTINGS:
        cfg = load_config(
            CONFIGS / "unlearn" / "tofu.yaml", [f"objective={objective}", f"weighting={weighting}", f"split={split}"]
        )
        assert cfg.data.forget_split == split and cfg.data.retain_split == SPLITS[split]
        assert cfg.data.holdout_split == split.replace("forget", "holdout")
        obj = get_objective(cfg.objective.name)
        obj.check_args(dict(cfg.objective.args))
        make_weighting(cfg.weighting.name, n_samples=10, **weighting_args(as_recipe(cfg)))
        assert cfg.output_dir == f"runs/unlearn/tofu_{split}_{cfg.objective.name}_{weighting}"
        # the BalDRO paper's Llama-2-7b-chat settings
        t = cfg.train
        assert (t.learning_rate, t.num_train_epochs, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (
            1e-5,
            10,
            8,
            2,
        )
        assert cfg.model.path == "open-unlearning/tofu_Llama-2-7b-chat-hf_full"


def test_paper_hyperparameters():
    def objective(name):
        return load_config(CONFIGS / "unlearn" / "tofu.yaml", [f"objective={name}"]).objective

    assert objective("npo").args.beta == 0.1
    # OpenUnlearning's defaults (configs/trainer/*.yaml at d3d7cf9)
    rmu = objective("rmu")
    assert (rmu.args.steering_coeff, rmu.retain_loss, rmu.alpha, rmu.trainable_params_regex) == (
        2.0,
        "embed_diff",
        1.0,
        None,
    )
    undial = objective("undial")
    assert (undial.args.beta, undial.alpha) == (10.0, 0.0)
    ceu = objective("ceu")
    assert (ceu.args.ignore_first_n_answer_tokens, ceu.alpha) == (1, 0.0)
    pdu = objective("pdu")
    assert (pdu.primal_dual, pdu.retain_loss_eps, pdu.dual_step_size, pdu.dual_update_upon, pdu.dual_warmup_epochs) == (
        True,
        None,
        1.0,
        "step",
        5,
    )
    altpo = objective("altpo")
    assert (altpo.args.beta, altpo.alternates.n, altpo.alternates.max_new_tokens, altpo.alternates.temperature) == (
        0.1,
        5,
        200,
        1.0,
    )
    simnpo = objective("simnpo")
    assert (simnpo.args.beta, simnpo.args.delta, simnpo.gamma) == (4.5, 0.0, 0.125)
    satimp = objective("satimp")
    assert (satimp.args.beta1, satimp.args.beta2, satimp.gamma) == (5.0, 1.0, 0.1)
    weighting = lambda name: load_config(CONFIGS / "unlearn" / "tofu.yaml", [f"weighting={name}"]).weighting  # noqa: E731
    assert weighting("group").args.ratio == 0.5
    assert "sigma" not in weighting("dv").args  # the objective's dv_sigma decides (the paper's 2 for NPO)

    def sigma(*overrides):
        return weighting_args(as_recipe(load_config(CONFIGS / "unlearn" / "tofu.yaml", list(overrides))))["sigma"]

    assert sigma("weighting=dv") == 2.0 and sigma("weighting=dv_softmin", "objective=npo") == 2.0
    assert sigma("weighting=dv_global", "objective.dv_sigma=0.1") == 0.1
    assert sigma("weighting=dv", "objective.dv_sigma=0.1", "weighting.args.sigma=0.5") == 0.5


def test_finetune_recipes_and_model_group():
    target = load_config(CONFIGS / "finetune" / "tofu.yaml")
    assert target.data.train_split == "full" and target.model.path == "meta-llama/Llama-2-7b-chat-hf"
    retain = load_config(CONFIGS / "finetune" / "tofu_retain.yaml", ["split=forget05"])
    assert retain.data.train_split == "retain95" and retain.output_dir == "runs/finetune/tofu_retain95"
    llama3 = load_config(CONFIGS / "unlearn" / "tofu.yaml", ["model=llama3.2-1b-instruct"])
    assert llama3.format.use_chat_template and llama3.model.path.endswith("Llama-3.2-1B-Instruct_full")
    ev = load_config(CONFIGS / "eval" / "tofu.yaml", ["split=forget01", "eval.limit=5"])
    assert ev.data.forget_split == "forget01" and ev.eval.limit == 5


def test_dotted_overrides_win_over_groups():
    cfg = load_config(
        CONFIGS / "unlearn" / "tofu.yaml", ["weighting=dv", "weighting.args.sigma=0.5", "train.learning_rate=2e-5"]
    )
    assert cfg.weighting.args.sigma == 0.5 and cfg.train.learning_rate == 2e-5

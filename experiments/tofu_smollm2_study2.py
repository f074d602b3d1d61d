"""Study 2: does balanced forgetting buy forget quality at forget05, and does it survive attacks?

    python experiments/tofu_smollm2_study2.py                  # every part, resumable
    python experiments/tofu_smollm2_study2.py --parts B        # only part B (A: the attacks on forget01)
    python experiments/tofu_smollm2_study2.py --parts U        # only UniErase's forget01 cell (issue 33)
    python experiments/tofu_smollm2_study2.py --smoke --parts A --model TINY_MODEL --work W --results R  # seconds
    python experiments/tofu_smollm2_study2.py --report-only    # tables and plots from finished cells

The same model, data and rules as study 1 (`tofu_smollm2.py`, whose scheduler and settings this reuses):
- Part A, attacks on forget01: study 1's target (made again in its work folder when missing), then each NPO
  cell of study 1 (`mean`, `group`, `dv`, `dv_global`, `dv_softmin` x seeds) re-made with study 1's recipe,
  evaluated with its settings (`remade_vs_study1.json`: how far the re-made evaluation is from the committed
  one) and attacked with the model kept: relearning on a seeded half of forget01 scored on the other half and
  on all of it (`configs/attack/all.yaml`, `attack.relearn.split=heldout`), 8-bit and 4-bit weights, each
  attacked model scored on the forget set only (`eval.forget_only`); the attacks' small files go to the
  cell's `attack/`, then the model is deleted.
- Part U, UniErase on forget01 (seed 0): the paper's editing baseline from study 1's target
  (`method=unierase`, `UNIERASE_A`'s edit settings for SmolLM2), evaluated and attacked as part A's cells.
- Part B, forget05: a *target05* model fine-tuned on `retain_perturbed` + `forget05` (600 rows, study 1's
  fine-tuning recipe), study 1's retain model evaluated on the forget05 split, then NPO x `mean`, `dv`,
  `dv_global` x seeds unlearned from target05 with study 1's unlearning schedule on forget05 (balance
  tracked every `BALANCE_EVERY_B` steps), evaluated in full and attacked as part A's cells are.
Each finished cell copies its small files into `experiments/tofu_smollm2_study2/cells/<part>_<cell>/`
with `machine.json` (the CPU it ran on); a rerun skips finished cells. Models live under `--work`; the
retain model is study 1's (its work folder), made again there if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tofu_smollm2 import (  # noqa: E402
    COMMON,
    CONFIGS,
    DEFAULT_DATA,
    EVAL,
    ONE_PASS_GROUP,
    REPO,
    SMOKE,
    UNLEARN,
    Job,
    Scheduler,
    baldro,
    copy_results,
    eval_command,
    finetune_job,
    is_finished,
    unlearn_command,
)

from baldro.models.sources import cache_dir  # noqa: E402

DEFAULT_RESULTS = REPO / "experiments" / "tofu_smollm2_study2"
SEEDS = (0, 1, 2)
PART_B_WEIGHTINGS = ("mean", "dv", "dv_global")
# Part A: study 1's NPO cells, re-made from its recipe and attacked (its committed results are the reference).
PART_A_WEIGHTINGS = ("mean", "group", "dv", "dv_global", "dv_softmin")
STUDY1_CELLS = REPO / "experiments" / "tofu_smollm2" / "cells"
# Relearning on a seeded half of forget01, scored on the other half (the headline) and on all of it; 8-bit and
# 4-bit weights. The evaluation is the cell's own (study 1's EVAL); its before is the cell's evaluation.
# The attacked models are scored on the forget set only (`eval.forget_only`: the verdicts read nothing else; a
# quarter of a full evaluation's time); the before is the cell's full evaluation.
ATTACK_A = ["attack.attacks=[relearn,quantize]", "attack.relearn.split=heldout", "eval.forget_only=true"]
ATTACK_FILES = (
    "config.yaml",
    "attack_info.json",
    "attack_summary.json",
    "TOFU_SUMMARY.json",
    "eval_info.json",
    "train_log.jsonl",
)
REMADE_KEYS = ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio")
# forget05 has 200 samples: 13 optimizer steps an epoch at study 1's batch (8 x 2 accumulation), 130 in
# all. Scoring all 200 forget samples costs about 200 forward passes; a step about 16 x 2 forward and
# backward passes (~100 forward-equivalents), so every 20 steps keeps tracking near 10 % of training.
BALANCE_EVERY_B = 20
# UniErase (issue 33) on forget01 beside part A's NPO cells: the paper's editing baseline, from study 1's target,
# evaluated and attacked as part A's cells are. SmolLM2-135M needs its own edit settings (docs/guides/unierase.md):
UNIERASE_SEEDS = (0,)
# SmolLM2's edit (tuned on forget01, see docs/guides/unierase.md): the authors' 5 phase-1 epochs at 1e-3
# leave the token's loss at 4.5 on 40 questions (15 epochs at 1e-2: 1.8); 10 target steps at 0.1 leave the
# token's NLL high (25 at 0.5 reach 0.04); AlphaEdit's ridge l2=10 is large against SmolLM2's keys (E[k k^T]
# eigenvalues up to 1.3-8), so no forget question reached the token (l2=1: 39 of 40).
UNIERASE_A = [
    "split=forget01",
    "data.retain_split=retain_perturbed",
    "unierase.token_epochs=15",
    "unierase.token_learning_rate=1e-2",
    "unierase.target_steps=25",
    "unierase.target_learning_rate=0.5",
    "unierase.l2=1.0",
]
# The tiny 2-layer model's edit (tests/test_unierase.py's settings) for --smoke.
SMOKE_UNIERASE = [
    "unierase.layers=[0,1]",
    "unierase.token_epochs=20",
    "unierase.token_learning_rate=0.1",
    "unierase.token_batch_size=8",
    "unierase.nullspace_threshold=5e-2",
    "unierase.l2=0.3",
    "unierase.target_steps=10",
    "unierase.target_learning_rate=0.5",
    "data.limit=8",
    "format.use_chat_template=false",
]


def swap(overrides: list[str], **values: str) -> list[str]:
    """`overrides` with the keys in `values` set to new values (a value of None drops the key)."""
    out = [o for o in overrides if o.split("=", 1)[0] not in values]
    return out + [f"{k}={v}" for k, v in values.items() if v is not None]


def keys(overrides: list[str]) -> dict:
    return dict(o.split("=", 1) for o in overrides)


# Part B's unlearning: study 1's schedule on forget05; the reference log-prob cache on (current defaults:
# study 1 turned it off only to keep an older commit's float rounding).
UNLEARN_B = swap(
    UNLEARN, split="forget05", **{"balance.every_n_steps": str(BALANCE_EVERY_B), "objective.ref_cache": None}
)
EVAL_B = swap(EVAL, split="forget05")


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads_per_job": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def finish_cell(run: Path, dest: Path, threads: int, keep_model: bool = False) -> None:
    copy_results(run, dest)
    tmp = dest / ".machine.json.tmp"
    tmp.write_text(json.dumps(machine_info(threads), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, dest / "machine.json")
    if not keep_model:
        shutil.rmtree(run / "model", ignore_errors=True)


def build_jobs(args) -> list[Job]:
    smoke = SMOKE if args.smoke else None
    seeds = smoke["seeds"] if smoke else args.seeds
    work, cells = Path(args.work), Path(args.results) / "cells"
    study1_work = Path(args.study1_work) if args.study1_work else work / "study1"
    common = [f"data.source={args.data}", *COMMON]
    model = [f"model={args.model_group}"] + ([f"model.base={args.model}"] if args.model else [])
    jobs: list[Job] = []
    retain_run = study1_work / "retain"  # study 1's retain model serves as it is (part B's forget05 reference)
    if "B" in args.parts:
        jobs.append(finetune_job("retain", retain_run, [], model, common, args.finetune_seed, smoke))

    if "A" in args.parts or "U" in args.parts:
        jobs.append(
            finetune_job(
                "target",
                study1_work / "target",
                ["data.extra_train_splits=[forget01]"],
                model,
                common,
                args.finetune_seed,
                smoke,
            )
        )
    if "A" in args.parts:
        jobs += part_a_jobs(args, work, cells, study1_work, model, common, seeds, smoke)

    if "U" in args.parts:
        jobs += part_u_jobs(args, work, cells, study1_work, model, common, smoke)

    if "B" in args.parts:
        target_run = work / "target05"
        jobs.append(
            finetune_job(
                "target05", target_run, ["data.extra_train_splits=[forget05]"], model, common, args.finetune_seed, smoke
            )
        )
        eval_common = [*model, *common, *EVAL_B, *(smoke["eval"] if smoke else [])]
        retain_dest, target_dest = cells / "B_retain", cells / "B_target"
        retain_log, target_log = retain_dest / "eval" / "TOFU_EVAL.json", target_dest / "eval" / "TOFU_EVAL.json"
        retain_eval = work / "retain05_eval"
        jobs.append(
            Job(
                "eval_B_retain",
                eval_command(eval_common, retain_run / "model", retain_eval / "eval", None, None, "overwrite=true"),
                deps=["finetune_retain"],
                after=lambda: _finish_reference(retain_run, retain_eval, retain_dest, args.threads),
                done=lambda: is_finished(retain_dest),
            )
        )
        jobs.append(
            Job(
                "eval_B_target",
                eval_command(
                    eval_common, target_run / "model", target_run / "eval", retain_log, None, "overwrite=true"
                ),
                deps=["finetune_target05", "eval_B_retain"],
                after=lambda: finish_cell(target_run, target_dest, args.threads, keep_model=True),
                done=lambda: is_finished(target_dest),
            )
        )
        for seed in seeds:
            for weighting in [w for _, w in smoke["methods"]] if smoke else PART_B_WEIGHTINGS:
                name = f"B_npo_{weighting}_seed{seed}"
                run, dest = work / "cells" / name, cells / name
                jobs.append(
                    Job(
                        f"unlearn_{name}",
                        unlearn_command(
                            model,
                            common,
                            "npo",
                            weighting,
                            seed,
                            target_run / "model",
                            run,
                            [*UNLEARN_B, *(smoke["unlearn"] if smoke else [])],
                        ),
                        deps=["finetune_target05"],
                        done=lambda dest=dest, run=run: (
                            is_finished(dest) or (run / "model" / "model.safetensors").is_file()
                        ),
                    )
                )
                jobs.append(
                    Job(
                        f"eval_{name}",
                        eval_command(
                            eval_common, run / "model", run / "eval", retain_log, target_log, "overwrite=true"
                        ),
                        deps=[f"unlearn_{name}", "eval_B_retain", "eval_B_target"],
                        done=lambda dest=dest, run=run: (
                            is_finished(dest) or (run / "eval" / "TOFU_SUMMARY.json").is_file()
                        ),
                    )
                )
                jobs.append(attack_job(name, run, dest, eval_common, retain_log, args, smoke))
    return jobs


def part_a_jobs(args, work: Path, cells: Path, study1_work: Path, model, common, seeds, smoke) -> list[Job]:
    """For each NPO cell of study 1: unlearning with study 1's recipe from its target (`build_jobs` makes it
    again in its work folder when missing), its evaluation (compared with the committed one), and the attacks
    on the kept model."""
    target_run = study1_work / "target"
    jobs: list[Job] = []
    retain_log = STUDY1_CELLS / "retain" / "eval" / "TOFU_EVAL.json"
    target_log = STUDY1_CELLS / "target" / "eval" / "TOFU_EVAL.json"
    eval_common = [*model, *common, *EVAL, *(smoke["eval"] if smoke else [])]
    weightings = [w for _, w in smoke["methods"]] if smoke else PART_A_WEIGHTINGS
    for seed in seeds:
        for weighting in weightings:
            study1_name = f"npo_{weighting}_seed{seed}"
            name = f"A_{study1_name}"
            run, dest = work / "cells" / name, cells / name
            jobs.append(
                Job(
                    f"unlearn_{name}",
                    unlearn_command(
                        model,
                        common,
                        "npo",
                        weighting,
                        seed,
                        target_run / "model",
                        run,
                        [
                            *UNLEARN,
                            *(ONE_PASS_GROUP if weighting == "group" else []),
                            *(smoke["unlearn"] if smoke else []),
                        ],
                    ),
                    deps=["finetune_target"],
                    done=lambda dest=dest, run=run: (
                        is_finished(dest) or (run / "model" / "model.safetensors").is_file()
                    ),
                )
            )
            jobs.append(
                Job(
                    f"eval_{name}",
                    eval_command(eval_common, run / "model", run / "eval", retain_log, target_log, "overwrite=true"),
                    deps=[f"unlearn_{name}"],
                    after=lambda run=run, study1_name=study1_name: compare_remade(run, STUDY1_CELLS / study1_name),
                    done=lambda dest=dest, run=run: is_finished(dest) or (run / "eval" / "TOFU_SUMMARY.json").is_file(),
                )
            )
            jobs.append(attack_job(name, run, dest, eval_common, retain_log, args, smoke))
    return jobs


def attack_job(name: str, run: Path, dest: Path, eval_common: list[str], retain_log: Path, args, smoke) -> Job:
    """Part A's attacks on the kept model of cell `name` (after its evaluation); then its files are kept."""
    return Job(
        f"attack_{name}",
        baldro(
            "attack",
            str(CONFIGS / "attack" / "all.yaml"),
            *eval_common,
            f"model.path={run / 'model'}",
            f"output_dir={run / 'attack'}",
            f"attack.before_eval={run / 'eval'}",
            f"eval.retain_logs_path={retain_log}",
            "train.bf16=false",
            *ATTACK_A,
            *(["attack.relearn.steps=2", "attack.quantize.bits=[8]"] if smoke else []),
            "resume=true",
        ),
        deps=[f"eval_{name}"],
        after=lambda: finish_attacked_cell(run, dest, args.threads, args.keep_models),
        done=lambda: is_finished(dest) and (dest / "attack" / "attack_info.json").is_file(),
    )


def part_u_jobs(args, work: Path, cells: Path, study1_work: Path, model, common, smoke) -> list[Job]:
    """UniErase from study 1's target on forget01 (seed 0), evaluated with study 1's settings and attacked
    as part A's cells are: the editing baseline's row beside NPO's."""
    target_run = study1_work / "target"
    jobs: list[Job] = []
    retain_log = STUDY1_CELLS / "retain" / "eval" / "TOFU_EVAL.json"
    target_log = STUDY1_CELLS / "target" / "eval" / "TOFU_EVAL.json"
    eval_common = [*model, *common, *EVAL, *(smoke["eval"] if smoke else [])]
    for seed in smoke["seeds"] if smoke else UNIERASE_SEEDS:
        name = f"A_unierase_seed{seed}"
        run, dest = work / "cells" / name, cells / name
        jobs.append(
            Job(
                f"unlearn_{name}",
                baldro(
                    "unlearn",
                    str(CONFIGS / "unlearn" / "tofu.yaml"),
                    *model,
                    *common,
                    "method=unierase",
                    f"seed={seed}",
                    "name=unierase",
                    f"model.path={target_run / 'model'}",
                    f"output_dir={run}",
                    *UNIERASE_A,
                    *(SMOKE_UNIERASE if smoke else []),
                    "overwrite=true",
                ),
                deps=["finetune_target"],
                done=lambda dest=dest, run=run: is_finished(dest) or (run / "model" / "model.safetensors").is_file(),
            )
        )
        jobs.append(
            Job(
                f"eval_{name}",
                eval_command(eval_common, run / "model", run / "eval", retain_log, target_log, "overwrite=true"),
                deps=[f"unlearn_{name}"],
                done=lambda dest=dest, run=run: is_finished(dest) or (run / "eval" / "TOFU_SUMMARY.json").is_file(),
            )
        )
        jobs.append(attack_job(name, run, dest, eval_common, retain_log, args, smoke))
    return jobs


def compare_remade(run: Path, study1_cell: Path) -> None:
    """How far the re-made cell's evaluation is from study 1's committed one: `RUN/remade_vs_study1.json`."""
    if not (study1_cell / "eval" / "TOFU_SUMMARY.json").is_file():
        return
    old = json.loads((study1_cell / "eval" / "TOFU_SUMMARY.json").read_text(encoding="utf-8"))
    new = json.loads((run / "eval" / "TOFU_SUMMARY.json").read_text(encoding="utf-8"))
    old_log = json.loads((study1_cell / "eval" / "TOFU_EVAL.json").read_text(encoding="utf-8"))
    new_log = json.loads((run / "eval" / "TOFU_EVAL.json").read_text(encoding="utf-8"))
    old_p = old_log["forget_Q_A_Prob"]["value_by_index"]
    new_p = new_log["forget_Q_A_Prob"]["value_by_index"]
    diffs = [abs(old_p[i]["prob"] - new_p[i]["prob"]) for i in old_p if i in new_p]
    out = {
        "study1_cell": str(study1_cell.relative_to(REPO)),
        "summary": {k: {"study1": old.get(k), "remade": new.get(k)} for k in REMADE_KEYS},
        "forget_prob_per_sample": {"n": len(diffs), "max_abs_diff": max(diffs, default=None)},
    }
    tmp = run / ".remade_vs_study1.json.tmp"
    tmp.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run / "remade_vs_study1.json")


def finish_attacked_cell(run: Path, dest: Path, threads: int, keep_model: bool) -> None:
    """The cell's files, its comparison with study 1 and its attacks' small files; then the model goes."""
    finish_cell(run, dest, threads, keep_model=True)
    if (run / "remade_vs_study1.json").is_file():
        shutil.copy2(run / "remade_vs_study1.json", dest / "remade_vs_study1.json")
    for src in sorted((run / "attack").rglob("*")):
        if src.is_file() and src.name in ATTACK_FILES:
            target = dest / "attack" / src.relative_to(run / "attack")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    if not keep_model:
        shutil.rmtree(run / "model", ignore_errors=True)


def _finish_reference(model_run: Path, eval_run: Path, dest: Path, threads: int) -> None:
    """A reference model evaluated in a folder of its own: the fine-tune's files plus that evaluation."""
    for name in ("config.yaml", "run_info.json", "train_log.jsonl"):
        if (model_run / name).is_file():
            shutil.copy2(model_run / name, eval_run / name)
    finish_cell(eval_run, dest, threads, keep_model=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="TOFU folder (default: ../shared/data/tofu)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="committed results folder")
    p.add_argument("--work", default=str(cache_dir() / "study2_tofu_smollm2"), help="models and raw runs")
    p.add_argument(
        "--study1-work",
        default=str(cache_dir() / "study_tofu_smollm2"),
        help="study 1's work folder (its retain and target models)",
    )
    p.add_argument(
        "--parts",
        default="AUB",
        help="which parts to run: A (attacks on forget01), U (UniErase on forget01, attacked), B (forget05)",
    )
    p.add_argument("--model-group", default="smollm2-135m-instruct")
    p.add_argument("--model", help="override the group's model.base")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--finetune-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep-models", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of the pipeline (tests)")
    args = p.parse_args(argv)
    ok = True
    if not args.report_only:
        ok = Scheduler(build_jobs(args), args.jobs, args.threads, Path(args.work) / "logs").run()
    from study2_report import write_study2_report

    write_study2_report(args.results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

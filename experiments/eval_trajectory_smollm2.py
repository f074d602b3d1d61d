"""One real trajectory: SmolLM2-135M-Instruct unlearning TOFU forget01 with NPO + BalDRO-DV, evaluated on the way.

    python experiments/eval_trajectory_smollm2.py            # the run, its report, the plot for the docs

The model under unlearning is study 2's `target05` (SmolLM2 fine-tuned on `retain_perturbed` + `forget05`,
which holds forget01; `experiments/tofu_smollm2_study2.py` makes it), forget quality is measured against study
1's retain model's committed forget01 log, and the unlearning schedule is study 1's (10 epochs, 30 steps).
The run evaluates every fifth of the run (`train.eval_strategy=steps train.eval_steps=0.2`: step 0 and 5 more)
on the first 20 rows of every set, picks the best forget quality among evaluations that keep 90 % of step 0's
utility, and writes `eval_trajectory.png` with `baldro report`. Its small files (trajectory, run info, train
log) go to `experiments/eval_trajectory_smollm2/`, the plot to `docs/assets/eval_trajectory_smollm2.png`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tofu_smollm2 import COMMON, CONFIGS, DEFAULT_DATA, REPO, UNLEARN  # noqa: E402
from tofu_smollm2_study2 import swap  # noqa: E402

from baldro.cli import main as baldro  # noqa: E402
from baldro.models.sources import cache_dir  # noqa: E402

RESULTS = REPO / "experiments" / "eval_trajectory_smollm2"
PLOT = REPO / "docs" / "assets" / "eval_trajectory_smollm2.png"
RETAIN_LOG = REPO / "experiments" / "tofu_smollm2" / "cells" / "retain" / "eval" / "TOFU_EVAL.json"
TRAJECTORY = [
    "train.eval_strategy=steps",
    "train.eval_steps=0.2",
    "eval.trajectory_limit=20",
    "train.metric_for_best_model=forget_quality",
    "eval.utility_floor=0.9",
    f"eval.retain_logs_path={RETAIN_LOG}",
    "eval.batch_size=16",
    "eval.max_new_tokens=80",
    "eval.at_end=false",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=str(cache_dir() / "study2_tofu_smollm2" / "target05" / "model"))
    p.add_argument("--work", default=str(cache_dir() / "eval_trajectory_smollm2"))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    args = p.parse_args(argv)
    target, work = Path(args.target).expanduser(), Path(args.work).expanduser()
    if not (target / "model.safetensors").is_file():
        raise SystemExit(f"no target model at {target}: run experiments/tofu_smollm2_study2.py --parts B first")
    run = work / "npo_dv"
    if not (run / "run_info.json").is_file() or json.loads((run / "run_info.json").read_text()).get("status") != "done":
        overrides = swap(UNLEARN, **{"objective.ref_cache": None})
        rc = baldro(
            [
                "unlearn",
                str(CONFIGS / "unlearn" / "tofu.yaml"),
                "model=smollm2-135m-instruct",
                f"model.path={target}",
                f"data.source={args.data}",
                "objective=npo",
                "weighting=dv",
                "name=npo_dv",
                *overrides,
                *COMMON,
                *TRAJECTORY,
                f"output_dir={run}",
                "resume=true",
            ]
        )
        if rc:
            return rc
    rc = baldro(["report", str(run), "--out", str(work / "report")])
    if rc:
        return rc
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "run_info.json", "train_log.jsonl", "eval_trajectory.jsonl"):
        shutil.copyfile(run / name, RESULTS / name)
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "report" / "eval_trajectory.png", PLOT)
    print(f"results in {RESULTS}, plot in {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

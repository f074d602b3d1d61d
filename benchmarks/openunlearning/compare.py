"""OpenUnlearning's own TOFU evaluator against baldro's `eval.compat=openunlearning` on the forget set.

    python benchmarks/openunlearning/compare.py OU_OUT_DIR/TOFU_EVAL.json [benchmarks/openunlearning_compat.json]

Reads OpenUnlearning's per-sample log (from `run.sh`) and the compat-mode answers that
`benchmarks/openunlearning_compat.py` wrote (teacher-forced answer probability and greedy generation
of every forget question, same model, split, batch size and new-token budget) and prints how many
generations are identical and the largest relative difference of an answer probability.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_COMPAT = Path(__file__).resolve().parents[1] / "openunlearning_compat.json"


def compare(ou_log: dict, compat: dict) -> dict:
    ours = compat["modes"]["openunlearning"]
    n = len(ours["prob"])
    theirs_prob = [ou_log["forget_Q_A_Prob"]["value_by_index"][str(i)]["prob"] for i in range(n)]
    theirs_gen = [ou_log["forget_Q_A_ROUGE"]["value_by_index"][str(i)]["generation"] for i in range(n)]
    rel = [abs(a - b) / max(abs(a), abs(b)) for a, b in zip(theirs_prob, ours["prob"])]
    return {
        "questions": n,
        "identical_generations": sum(a == b for a, b in zip(theirs_gen, ours["generation"])),
        "max_relative_prob_difference": max(rel),
        "differing_generations": [i for i, (a, b) in enumerate(zip(theirs_gen, ours["generation"])) if a != b],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ou_log", type=Path, help="OpenUnlearning's TOFU_EVAL.json")
    p.add_argument("compat", type=Path, nargs="?", default=DEFAULT_COMPAT, help="openunlearning_compat.py's JSON")
    a = p.parse_args(argv)
    r = compare(json.loads(a.ou_log.read_text()), json.loads(a.compat.read_text()))
    print(
        f"{r['identical_generations']} of {r['questions']} greedy generations identical; answer probabilities "
        f"within {r['max_relative_prob_difference']:.2e} relative"
    )
    if r["differing_generations"]:
        print(f"differing generations: rows {r['differing_generations']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

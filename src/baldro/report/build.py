"""Markdown + PNG report comparing unlearning runs (``baldro report RUN_DIR... --out DIR``).

`build_report` reads run directories written by the trainers (``run_info.json``,
``train_log.jsonl``, ``forget_losses.jsonl``, ``balance.jsonl``, ``eval/TOFU_SUMMARY.json``,
``eval/TOFU_EVAL.json``, or for MUSE runs ``eval/MUSE_SUMMARY.json``, and ``eval/LMEVAL_SUMMARY.json``
of lm-eval tasks, one column per task; every file but one of run_info.json / eval/ is optional) and writes
``report.md`` with a results table and four plots:

- ``fq_vs_mu.png``: forget quality vs model utility, one point per run;
- ``trajectories.png``: per-sample answer probability over training, one panel per method;
- ``spread.png``: spread of the per-sample probability vs mean probability over training;
- ``dro_weights.png``: the effective DRO weights (max weight, entropy, non-zero count) over training;
- ``attacks.png`` (when a run has ``RUN/attack/``, or an attack folder of ``baldro attack`` is passed):
  per-sample forget probability (MUSE: VerbMem) before vs after every attack, one panel per method, with
  a table per method of what each attack brought back and what it cost.
- ``eval_trajectory.png``: forget quality, model utility and forget probability (MUSE: VerbMem, forget and
  retain KnowMem) against the step, from each run's ``eval_trajectory.jsonl`` (evaluations during
  unlearning); runs that share a name are one line, their seeds' range shaded. The best step of each run
  (``run_info.json`` ``best_step``) is a column of the tables.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch) and written atomically; a plot with nothing to show is left out and the report says why.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from baldro.errors import BaldroError
from baldro.eval.balance import balance_from_eval_logs
from baldro.eval.metrics import finite_float
from baldro.eval.summarize import truth_ratios
from baldro.io import write_text_atomic
from baldro.report.plots import (
    plot_attacks,
    plot_dro_weights,
    plot_eval_trajectories,
    plot_fq_vs_mu,
    plot_seeds,
    plot_spread,
    plot_trajectories,
)
from baldro.report.runs import (
    AttackRecord,
    RunRecord,
    as_run,
    is_attack_folder,
    ks_and_spread,
    load_attacks,
    load_run,
    merge_attacks,
    run_labels,
    seed_groups,
    split_references,
)
from baldro.report.tables import (
    COLUMNS,
    MUSE_COLUMNS,
    MUSE_NOTE,
    SEED_COLUMNS,
    attack_section,
    lm_eval_columns,
    md_cell,
    seed_table,
    spread_table,
    with_best_step,
)


def build_report(
    run_dirs: Sequence[str | Path | RunRecord],
    out_dir: str | Path,
    retain_run: str | Path | RunRecord | None = None,
    target_run: str | Path | RunRecord | None = None,
    by_seed: bool | None = None,
    attacks: Sequence[AttackRecord] = (),
) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots; return the path of report.md.

    Runs that share a name are one method under several seeds: ``by_seed`` (default: when a name
    repeats) adds their mean ± std table and plot, and the per-sample plots show each method's first run.

    ``run_dirs`` are the methods to compare (runs among them named "target" / "retain" are used as
    the references when ``target_run`` / ``retain_run`` are not given). Balance metrics missing from
    a run's summary are computed from its eval log against the references' eval logs. ``attacks``:
    what ``baldro attack`` found for each method (the Attacks section).
    """
    runs = [as_run(r) for r in run_dirs]
    retain = as_run(retain_run) if retain_run is not None else None
    target = as_run(target_run) if target_run is not None else None
    methods, retain, target = split_references(runs, retain, target)
    if not methods and retain is None and target is None and not attacks:
        raise BaldroError("no runs to report; pass at least one run directory")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BaldroError(f"--out {out} is a file; pass a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    attacks = merge_attacks(attacks)
    if not runs and retain is None and target is None:  # attack folders alone
        md = ["# baldro attack report", "", *attack_section(attacks, plot_attacks(attacks, out / "attacks.png"))]
        return write_text_atomic(out / "report.md", "\n".join(md))
    every = [r for r in [*methods, retain, target] if r is not None]
    is_muse = all(r.benchmark == "muse" for r in every)
    only_lm_eval = all(r.benchmark == "lm_eval" for r in every)  # e.g. WMDP runs: the harness's tasks only
    lm_columns = lm_eval_columns(every)
    train_time = [c for c in COLUMNS if c[1] == "train_time_s"]
    base = train_time if only_lm_eval else MUSE_COLUMNS if is_muse else COLUMNS
    columns = with_best_step([*base[:-1], *lm_columns, base[-1]], methods)  # lm-eval tasks before the training time

    ref_logs = {
        "retain": retain.load_eval_log() if retain is not None else None,
        "target": target.load_eval_log() if target is not None else None,
    }
    rows: list[tuple[str, str, RunRecord]] = []  # (label, kind, run)
    if target is not None:
        rows.append(("target (reference)", "target", target))
    if retain is not None:
        rows.append(("retain (reference)", "retain", retain))
    method_labels = run_labels(methods)
    rows += [(label, "method", r) for label, r in zip(method_labels, methods)]

    retain_tr = truth_ratios(ref_logs["retain"], "forget_truth_ratio") if ref_logs["retain"] is not None else None
    values: list[dict[str, Any]] = []
    notes: list[str] = []
    for label, kind, run in rows:
        v: dict[str, Any] = {**run.summary, **run.lm_eval}
        v["train_time_s"] = run.info.get("train_time_s")
        v["best_step"] = run.info.get("best_step")
        needs = [k for _, k, _ in columns if k.startswith("balance_") and finite_float(v.get(k)) is None]
        if needs and run.eval_log is not None:
            try:
                computed = balance_from_eval_logs(run.load_eval_log(), ref_logs["retain"], ref_logs["target"])
            except BaldroError as e:
                notes.append(f"{label}: {e}")
            else:
                for k in needs:
                    v[k] = computed.get(k)
                if computed.get("balance_note"):
                    notes.append(f"{label}: {computed['balance_note']}")
        if kind == "retain" and finite_float(v.get("forget_quality")) is None:
            v["forget_quality"] = 1.0  # KS test of the retain model against itself
            v["_fq_by_definition"] = True
        v.update(ks_and_spread(run, retain_tr))
        values.append(v)

    # ---- plots
    plots: dict[str, Path | None] = {}
    fq_rows = [
        {
            "label": label if kind == "method" else kind,
            "kind": kind,
            "fq": finite_float(v.get("forget_quality")),
            "mu": finite_float(v.get("model_utility")),
        }
        for (label, kind, _), v in zip(rows, values)
    ]
    plots["fq_vs_mu"], fq_skipped = plot_fq_vs_mu(fq_rows, out / "fq_vs_mu.png")
    retain_median = None
    if ref_logs["retain"] is not None:
        probs = (ref_logs["retain"].get("forget_Q_A_Prob") or {}).get("value_by_index") or {}
        arr = np.array(
            [finite_float((p or {}).get("prob")) if isinstance(p, dict) else None for p in probs.values()], dtype=float
        )
        arr = arr[np.isfinite(arr)]
        retain_median = float(np.median(arr)) if arr.size else None
    labelled = list(zip(method_labels, methods))
    groups = seed_groups(labelled)
    has_seeds = any(len(ix) > 1 for ix in groups.values()) if by_seed is None else by_seed
    if has_seeds:  # one run per method (its first seed) in the per-sample plots, to keep them readable
        labelled = [(name, labelled[ix[0]][1]) for name, ix in groups.items()]
    n_refs = len(rows) - len(methods)
    method_values = values[n_refs:]
    plots["seeds"] = plot_seeds(groups, method_values, out / "seeds.png") if has_seeds else None
    plots["trajectories"] = plot_trajectories(labelled, out / "trajectories.png", retain_median)
    plots["spread"] = plot_spread(labelled, out / "spread.png")
    plots["dro_weights"] = plot_dro_weights(labelled, out / "dro_weights.png")
    plots["attacks"] = plot_attacks(attacks, out / "attacks.png")
    by_name: dict[str, list[RunRecord]] = {}
    for run in methods:
        if run.trajectory:
            by_name.setdefault(run.name, []).append(run)
    plots["eval_trajectory"] = plot_eval_trajectories(
        by_name, "muse" if is_muse else "tofu", out / "eval_trajectory.png"
    )
    for name, p in plots.items():  # a stale plot from an earlier report must not linger
        stale = out / f"{name}.png"
        if p is None and stale.exists():
            stale.unlink()

    # ---- markdown
    md: list[str] = ["# baldro unlearning report", ""]
    all_dirs = [str(r.path) for _, _, r in rows]
    md += [
        f"Runs: {len(methods)} method(s)"
        + (f", target model `{target.path}`" if target else ", no target model")
        + (f", retain model `{retain.path}`" if retain else ", no retain model")
        + ".",
        "",
        "Rebuild this report with:",
        "",
        "```bash",
        "baldro report " + " ".join(shlex.quote(d) for d in all_dirs) + " --out " + shlex.quote(str(out)),
        "```",
        "",
        "## Results",
        "",
        "| Method | " + " | ".join(h for h, _, _ in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for (label, _kind, _run), v in zip(rows, values):
        cells = [fmt(v.get(key)) for _, key, fmt in columns]
        if v.get("_fq_by_definition") and not is_muse and not only_lm_eval:
            cells[0] += " (by definition)"
        md.append(f"| {md_cell(label)} | " + " | ".join(cells) + " |")
    if lm_columns:
        md += [
            "",
            "lm-eval columns: each task's first metric in eval/LMEVAL_SUMMARY.json (lm-evaluation-harness; a "
            "group's aggregate, e.g. MMLU's accuracy over its subjects); for WMDP, lower accuracy on the "
            "hazardous questions (chance: 0.25) and unchanged MMLU is the aim.",
        ]
    md += (
        [""]
        if only_lm_eval
        else ["", MUSE_NOTE, ""]
        if is_muse
        else [
            "",
            "Forget quality is the KS-test p-value between the run's and the retain model's per-sample forget "
            "truth ratios (higher = closer to never having seen the forget set); model utility is the harmonic "
            "mean of nine retain / real-authors / world-facts scores. *Balance* columns (SPEC section 6): "
            "std and inter-quartile range of the per-sample forget truth ratio (TR) and answer probability at the "
            "end of training; *Remembered* = fraction of forget samples whose probability is above the retain "
            "model's median; *Over-forgotten* = fraction whose probability fell below 1e-3 of the target "
            "model's or whose greedy answer has ROUGE-L recall 0 (gibberish). Lower spread at equal mean "
            'forgetting = better balance. "n/a" = not available.',
            "",
        ]
    )
    if notes:
        md += ["Notes:", ""] + [f"- {md_cell(n)}" for n in notes] + [""]

    if has_seeds:
        names = list(groups)
        md += ["## Mean ± std over seeds", ""]
        seed_base = train_time if only_lm_eval else MUSE_COLUMNS if is_muse else SEED_COLUMNS
        md += seed_table(
            names,
            [[methods[i].info.get("seed") for i in groups[n]] for n in names],
            [[method_values[i] for i in groups[n]] for n in names],
            with_best_step([*seed_base[:-1], *lm_columns, seed_base[-1]], methods),
        )
        md += [
            "",
            "Runs with the same name are one method under several seeds: mean ± sample standard deviation. "
            "*KS D* is the KS statistic behind forget quality (the largest gap between the two truth-ratio "
            "distributions). *Prob std at mean x*: the std of the per-sample answer probability when the "
            "run's mean probability is x, interpolated between the scoring steps either side of x (spread at "
            "equal mean forgetting; lower = more even; n/a = x not reached).",
            "",
        ]
        if plots["seeds"]:
            md += [
                "![every seed](seeds.png)",
                "",
                "**How to read this.** Left: forget quality against model utility, every seed (faint) and "
                "the mean of each method (outlined). Right: the spread at equal mean forgetting of every "
                "seed, the bar its mean; methods whose points overlap cannot be told apart at this number "
                "of seeds.",
                "",
            ]

    md += ["## Evaluations during unlearning", ""]
    if plots["eval_trajectory"]:
        best = sorted({f"`{r.info['metric_for_best_model']}`" for r in methods if r.info.get("metric_for_best_model")})
        md += [
            "![evaluations during unlearning](eval_trajectory.png)",
            "",
            "**How to read this.** The benchmark's evaluation of each run's model at step 0 (the starting model) and "
            "at every evaluation point (`train.eval_strategy`; its rows may be a subset, `eval.trajectory_limit`, so "
            "the numbers can differ from the final evaluation's). Runs that share a name are one line, the mean of "
            "their seeds at the steps they all evaluated, with the seeds' range shaded. A star marks a run's best "
            "step"
            + (
                f" (the best {', '.join(best)} among evaluations whose utility stays above `eval.utility_floor` x "
                "step 0's; *Best step* in the tables)"
                if best
                else ""
            )
            + ". Unlearning often over-shoots: forget quality rises, then falls while utility decays.",
            "",
        ]
    else:
        md += [
            "No run has an eval_trajectory.jsonl (train.eval_strategy=no), so there is no plot of evaluations "
            "during unlearning.",
            "",
        ]

    md += ["## Forget quality vs model utility", ""]
    if plots["fq_vs_mu"]:
        md += [
            "![forget quality vs model utility](fq_vs_mu.png)",
            "",
            "**How to read this.** Each point is one run; up and to the right is better (forgets like the "
            "retain model while keeping utility). The green star is the retain model (the ideal, forget quality "
            "1 by definition), the red cross the target model before unlearning. The y-axis is logarithmic: "
            "forget quality is a p-value, and points above the dashed p = 0.05 line cannot be told apart from "
            "the retain model by the KS test.",
            "",
        ]
        if fq_skipped:
            md += [f"Not plotted (forget quality or model utility missing): {', '.join(fq_skipped)}.", ""]
    else:
        md += ["No run has both forget quality and model utility, so there is no plot.", ""]

    md += ["## Per-sample forgetting trajectories", ""]
    if plots["trajectories"]:
        md += [
            "![per-sample forgetting trajectories](trajectories.png)",
            "",
            "**How to read this.** One panel per method; each thin line is one forget sample's answer "
            "probability exp(-mean token NLL) over optimizer steps (log scale), coloured by its rank at the "
            "start (yellow = best remembered). The bold black line is the median"
            + (
                ", the dashed red line the retain model's median forget probability (samples above it count "
                "as still remembered)"
                if retain_median is not None
                else ""
            )
            + ". Asynchronous forgetting shows as a fan: some lines dive by orders of magnitude early "
            "(over-forgetting) while others stay high. A balanced method (DRO up-weights the still-remembered, "
            "high-loss samples) keeps the bundle narrow and brings the top lines down together.",
            "",
        ]
    else:
        md += ["No run has a balance.jsonl (per-sample scores during training), so there is no trajectory plot.", ""]

    md += ["## Spread of forgetting over training", ""]
    if plots["spread"]:
        md += [
            "![spread of forgetting](spread.png)",
            "",
            "**How to read this.** Left: the standard deviation of the per-sample answer probability at each "
            "scoring step. Right: the same standard deviation against the mean probability, so methods are "
            "compared at equal mean forgetting (training moves right to left; the big dot is the end). A curve "
            "lower on the right panel forgets more evenly for the same amount of forgetting.",
            "",
        ]
    else:
        md += ["No run has a balance.jsonl, so there is no spread plot.", ""]
    md += spread_table(list(zip(method_labels, methods)))

    md += ["## Effective DRO weights", ""]
    if plots["dro_weights"]:
        md += [
            "![effective DRO weights](dro_weights.png)",
            "",
            "**How to read this.** Per optimizer step, how concentrated the weighting of the batch's forget "
            "losses is: the largest single weight, the entropy of the weights and the number of samples with a "
            "non-zero weight (the panels present in the logs). Plain averaging (ERM) is flat at 1/B, log B and B. "
            "BalDRO-DV raises the max weight and lowers the entropy when a few samples are still remembered; "
            "BalDRO-G keeps only the hardest k samples. Weights that return toward uniform late in training mean "
            "the forget losses have evened out.",
            "",
        ]
    else:
        md += [
            "No run logs weight_max / weight_entropy / weight_nonzero in train_log.jsonl, so there is no weight plot.",
            "",
        ]
    if attacks:
        md += attack_section(attacks, plots["attacks"])

    return write_text_atomic(out / "report.md", "\n".join(md))


def report_main(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> Path:
    """CLI entry (``baldro report RUN_DIR... [--out DIR]``): runs named "target" / "retain" (by
    run_info name) become the references; a run's ``RUN/attack`` folder, or an attack folder passed
    itself, adds the Attacks section. ``out_dir`` defaults to ``./report``."""
    if not run_dirs:
        raise BaldroError("baldro report needs at least one run directory: baldro report RUN_DIR... --out DIR")
    runs, attacks = [], []
    for d in run_dirs:
        if is_attack_folder(d) and not (Path(d) / "run_info.json").is_file():  # baldro attack's output folder
            record = load_attacks(d)
        else:
            runs.append(load_run(d))
            record = load_attacks(Path(d) / "attack", runs[-1].name) if (Path(d) / "attack").is_dir() else None
        if record is not None:
            attacks.append(record)
    return build_report(runs, Path(out_dir) if out_dir is not None else Path("report"), attacks=attacks)

"""Study 2's tables and plots from its finished cells (`tofu_smollm2_study2.py --report-only` rebuilds them).

For each part (A: forget01 attacks, UniErase's cell beside them; B: forget05), `<results>/report_<part>/` is
`baldro report` over the part's cells (mean ± std over seeds, per-sample plots, the Attacks section), and
`<results>/attacks_<part>.md` the attack table: per method and attack, over the seeds, how many forget samples
were forgotten before the attack and how many came back (the headline count: answer probability, on the
held-out half for relearning), the forget answer probability and forget quality before and after. Part A's
`relearn_<part>.png` plots every seed's per-sample probability before vs after relearning, one panel per
method. `<results>/table_B.md` is part B's mean ± std table, for experiments/RESULTS.md.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from baldro.io import write_text_atomic
from baldro.report.build import build_report
from baldro.report.runs import load_attacks

ATTACKS = ("relearn_heldout", "quantize_8bit", "quantize_4bit")
STUDY1_CELLS = Path(__file__).resolve().parent / "tofu_smollm2" / "cells"


def references(cells_dir: Path, part: str) -> tuple[Path, Path]:
    """(retain, target) cells the part's forget quality and balance are measured against: study 1's for part
    A (forget01, its target re-made), the forget05 ones for part B."""
    if part == "A":
        return STUDY1_CELLS / "retain", STUDY1_CELLS / "target"
    return cells_dir / "B_retain", cells_dir / "B_target"


def finished(cells: Path, part: str) -> list[Path]:
    """The part's cells with an evaluation and every attack done, UniErase's last."""
    done = [
        p
        for p in sorted(cells.glob(f"{part}_*"))
        if (p / "eval" / "TOFU_SUMMARY.json").is_file() and (p / "attack" / "attack_info.json").is_file()
    ]
    return sorted(done, key=lambda p: ("unierase" in p.name, p.name))


def method_of(cell: Path) -> str:
    """`A_npo_dv_seed1` -> `npo_dv`."""
    return cell.name.split("_", 1)[1].rsplit("_seed", 1)[0]


def _mean_std(values: list[float], fmt: str = "{:.3f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _fq(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def attack_table(cells: list[Path]) -> list[str]:
    """Markdown: one row per method and attack, mean ± std over the method's seeds."""
    md = [
        "| Method | Attack | Seeds | Forgotten before | Came back | Forget prob before -> after | "
        "Forget quality before -> after | Held-out forget quality before -> after |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    methods: dict[str, list[Path]] = {}
    for cell in cells:
        methods.setdefault(method_of(cell), []).append(cell)
    for method, group in methods.items():
        for attack in ATTACKS:
            found = [
                (c, json.loads((c / "attack" / attack / "attack_summary.json").read_text(encoding="utf-8")))
                for c in group
                if (c / "attack" / attack / "attack_summary.json").is_file()
            ]
            if not found:
                continue
            seeds = ",".join(c.name.rsplit("_seed", 1)[1] for c, _ in found)
            head = [s["headline"] for _, s in found]
            before = [s["summary"]["before"]["forget_Q_A_Prob"] for _, s in found]
            after = [s["summary"]["after"]["forget_Q_A_Prob"] for _, s in found]
            fq = [s["forget_quality"]["all"] for _, s in found]
            held = [s["forget_quality"].get("held_out") for _, s in found]
            held_cell = (
                " / ".join(f"{_fq(h['before'])} -> {_fq(h['after'])}" for h in held)
                if all(h is not None for h in held)
                else "n/a"
            )
            md.append(
                f"| {method} | {attack} | {seeds} | {_mean_std([h['forgotten_before'] for h in head], '{:.1f}')} "
                f"of {head[0]['n']} | {_mean_std([h['came_back'] for h in head], '{:.1f}')} | "
                f"{_mean_std(before)} -> {_mean_std(after)} | "
                + " / ".join(f"{_fq(f['before'])} -> {_fq(f['after'])}" for f in fq)
                + f" | {held_cell} |"
            )
    return md


def plot_relearning(cells: list[Path], path: Path) -> Path | None:
    """Per-sample forget answer probability before (x) vs after (y) relearning, one panel per method, every
    seed; the samples relearning trained on are faint, the held-out ones solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods: dict[str, list[dict]] = {}
    for cell in cells:
        f = cell / "attack" / "relearn_heldout" / "attack_summary.json"
        if f.is_file():
            methods.setdefault(method_of(cell), []).append(json.loads(f.read_text(encoding="utf-8")))
    if not methods:
        return None
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.4), squeeze=False)
    for ax, (method, summaries) in zip(axes[0], methods.items()):
        for s in summaries:
            p = s["per_sample"]["prob"]
            trained = p.get("trained") or [False] * len(p["before"])
            for flag, alpha, label in ((True, 0.25, "trained on"), (False, 0.9, "held out")):
                xs = [b for b, t in zip(p["before"], trained) if bool(t) == flag]
                ys = [a for a, t in zip(p["after"], trained) if bool(t) == flag]
                ax.scatter(xs, ys, s=9, alpha=alpha, color="C0" if not flag else "C7", label=label)
            t = s["thresholds"]["prob"]["value"]
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
        ax.axvline(t, color="red", ls="--", lw=0.7)
        ax.axhline(t, color="red", ls="--", lw=0.7)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{method} ({len(summaries)} seed(s))", xlabel="before")
    axes[0][0].set_ylabel("after relearning")
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][0].legend(handles[:2], labels[:2], fontsize=7, loc="upper left")
    fig.suptitle("Forget answer probability per sample, before vs after relearning on the other half", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_study2_report(results: str | Path) -> list[Path]:
    """Write each part's report, attack table and (part A) relearning plot; returns the files written."""
    results = Path(results).resolve()
    if results.is_relative_to(Path.cwd()):
        results = results.relative_to(Path.cwd())
    cells_dir, written = results / "cells", []
    for part in ("A", "B"):
        cells = finished(cells_dir, part)
        if not cells:
            print(f"study 2 report: no finished cell of part {part} in {cells_dir} yet")
            continue
        retain, target = references(cells_dir, part)
        attacks = [load_attacks(c / "attack", method_of(c)) for c in cells]
        report = build_report(
            cells,
            results / f"report_{part}",
            retain_run=retain if retain.is_dir() else None,
            target_run=target if target.is_dir() else None,
            by_seed=True,
            attacks=attacks,
        )
        written.append(report)
        table = attack_table(cells)
        write_text_atomic(results / f"attacks_{part}.md", "\n".join(table) + "\n")
        written.append(results / f"attacks_{part}.md")
        if part == "A" and plot_relearning(cells, results / "relearn_A.png"):
            written.append(results / "relearn_A.png")
        if part == "B":
            lines = report.read_text(encoding="utf-8").splitlines()
            start = next((i for i, line in enumerate(lines) if line.startswith("| Method | Seeds |")), None)
            if start is not None:
                end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
                write_text_atomic(results / "table_B.md", "\n".join(lines[start:end]) + "\n")
                written.append(results / "table_B.md")
        print(f"study 2 report: part {part}, {len(cells)} finished cell(s); {report}")
    return written

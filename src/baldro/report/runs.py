"""Run folders and attack folders as records for the report: `load_run`, `load_attacks` and the
grouping of runs by name (seeds) and role (the target and retain references).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from baldro.errors import BaldroError
from baldro.eval import metrics
from baldro.eval.recovery import ATTACK_SUMMARY, load_attack_summaries
from baldro.eval.summarize import truth_ratios
from baldro.io import read_jsonl

REFERENCE_NAMES = ("target", "retain")
LMEVAL_SUMMARY = "LMEVAL_SUMMARY.json"  # baldro.eval.lm_eval.SUMMARY_FILE (read without importing the harness)


# ----------------------------------------------------------------------------- loading
@dataclass
class RunRecord:
    """Everything the report needs from one run directory (missing files give empty values)."""

    path: Path
    name: str
    info: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    eval_log: Path | None = None
    train_log: list[dict[str, Any]] = field(default_factory=list)
    balance: list[dict[str, Any]] = field(default_factory=list)
    forget_losses: list[dict[str, Any]] = field(default_factory=list)
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # eval_trajectory.jsonl
    benchmark: str = (
        "tofu"  # "muse" when the run's summary is eval/MUSE_SUMMARY.json, "lm_eval" when it has only lm-eval's
    )
    lm_eval: dict[str, Any] = field(default_factory=dict)  # eval/LMEVAL_SUMMARY.json: {"TASK/METRIC": value}

    def load_eval_log(self) -> dict[str, Any] | None:
        """The parsed eval/TOFU_EVAL.json (None when the run has none)."""
        if self.eval_log is None:
            return None
        return _read_json(self.eval_log)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BaldroError(f"{path} is not valid JSON ({e}); re-run the step that writes it") from None
    except OSError as e:
        raise BaldroError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return [r for r in read_jsonl(path) if isinstance(r, dict)]
    except json.JSONDecodeError as e:
        raise BaldroError(f"{path} has a malformed line ({e}); fix or delete the line") from None


def load_run(run_dir: str | Path) -> RunRecord:
    """Load a run directory: one with ``run_info.json`` and/or an eval summary in ``eval/`` (TOFU, MUSE, lm-eval)."""
    path = Path(run_dir)
    if not path.exists():
        raise BaldroError(f"run directory {path} does not exist; pass the folder a training or eval run wrote")
    if not path.is_dir():
        raise BaldroError(f"{path} is a file, not a run directory; pass the folder that holds run_info.json")
    info_path, summary_path = path / "run_info.json", path / "eval" / "TOFU_SUMMARY.json"
    benchmark = "tofu"
    if not summary_path.is_file() and (path / "eval" / "MUSE_SUMMARY.json").is_file():
        summary_path, benchmark = path / "eval" / "MUSE_SUMMARY.json", "muse"
    lm_path = path / "eval" / LMEVAL_SUMMARY
    if not summary_path.is_file() and lm_path.is_file():
        benchmark = "lm_eval"
    if not info_path.is_file() and not summary_path.is_file() and not lm_path.is_file():
        raise BaldroError(
            f"{path} is not a run directory (no run_info.json and no eval/TOFU_SUMMARY.json, MUSE_SUMMARY.json or "
            f"{LMEVAL_SUMMARY}); pass the folder a training or eval run wrote"
        )
    info = _read_json(info_path) if info_path.is_file() else {}
    summary = _read_json(summary_path) if summary_path.is_file() else {}
    lm_eval = _read_json(lm_path) if lm_path.is_file() else {}
    if not isinstance(lm_eval, dict):
        raise BaldroError(f"{lm_path} must hold a JSON object {{TASK/METRIC: value}}; re-run the evaluation")
    if isinstance(info, dict) and "seed" not in info and (path / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
        if isinstance(config, dict) and isinstance(config.get("seed"), int):
            info = {**info, "seed": config["seed"]}
    if not isinstance(info, dict):
        raise BaldroError(f"{info_path} must hold a JSON object; re-run the step that writes it")
    if not isinstance(summary, dict):
        raise BaldroError(f"{summary_path} must hold a JSON object {{metric: value}}; re-run the evaluation")
    eval_log = path / "eval" / "TOFU_EVAL.json"
    return RunRecord(
        path=path,
        name=str(info.get("name") or path.name),
        info=info,
        summary=summary,
        eval_log=eval_log if eval_log.is_file() else None,
        train_log=_read_rows(path / "train_log.jsonl"),
        balance=_read_rows(path / "balance.jsonl"),
        forget_losses=_read_rows(path / "forget_losses.jsonl"),
        trajectory=_read_rows(path / "eval_trajectory.jsonl"),
        benchmark=benchmark,
        lm_eval=lm_eval,
    )


@dataclass
class AttackRecord:
    """The attacks of one unlearned model: an attack folder of ``baldro attack`` (``RUN/attack``)."""

    paths: list[Path]
    name: str
    attacks: list[tuple[str, dict]]  # (folder, attack_summary.json), in folder order


def is_attack_folder(path: str | Path) -> bool:
    """A folder that ``baldro attack`` wrote (its attack_info.json, or an attack's summary)."""
    path = Path(path)
    return (path / "attack_info.json").is_file() or any(path.glob(f"*/{ATTACK_SUMMARY}"))


def load_attacks(path: str | Path, name: str | None = None) -> AttackRecord | None:
    """The attacks in an attack folder (None when it holds no finished attack)."""
    path = Path(path)
    attacks = load_attack_summaries(path)
    if not attacks:
        return None
    info = _read_json(path / "attack_info.json") if (path / "attack_info.json").is_file() else {}
    name = (
        name or (info.get("name") if isinstance(info, dict) else None) or attacks[0][1].get("name") or path.parent.name
    )
    return AttackRecord([path], str(name), attacks)


def seed_groups(labelled: Sequence[tuple[str, RunRecord]]) -> dict[str, list[int]]:
    """Method name -> positions of its runs (in order), for runs that share a run_info name."""
    groups: dict[str, list[int]] = {}
    for i, (_, run) in enumerate(labelled):
        groups.setdefault(run.name, []).append(i)
    return groups


def merge_attacks(records: Sequence[AttackRecord]) -> list[AttackRecord]:
    """One record per method name: the attack folders of one unlearned model (e.g. a relearning run and
    its retain-only control written to two folders) in one table and one panel."""
    merged: dict[str, AttackRecord] = {}
    for rec in records:
        if rec.name not in merged:
            merged[rec.name] = AttackRecord(list(rec.paths), rec.name, list(rec.attacks))
            continue
        have = merged[rec.name]
        seen = {folder for folder, _ in have.attacks}
        have.paths += rec.paths
        have.attacks += [(f"{folder} ({rec.paths[0]})" if folder in seen else folder, s) for folder, s in rec.attacks]
    return list(merged.values())


# ----------------------------------------------------------------------------- report
def as_run(run: str | Path | RunRecord) -> RunRecord:
    return run if isinstance(run, RunRecord) else load_run(run)


def split_references(
    runs: list[RunRecord], retain: RunRecord | None, target: RunRecord | None
) -> tuple[list[RunRecord], RunRecord | None, RunRecord | None]:
    """Pull runs named "target" / "retain" out of `runs` (when not given explicitly); dedupe by path."""
    found: dict[str, list[RunRecord]] = {"target": [], "retain": []}
    methods = []
    given_paths = {r.path.resolve() for r in (retain, target) if r is not None}
    for r in runs:
        if r.path.resolve() in given_paths:
            continue
        if r.name in found:
            found[r.name].append(r)
        else:
            methods.append(r)
    for kind in REFERENCE_NAMES:
        explicit = target if kind == "target" else retain
        cands = found[kind]
        if explicit is not None:
            methods.extend(cands)  # an explicit reference wins; others show as ordinary rows
            continue
        if len(cands) > 1:
            raise BaldroError(
                f"{len(cands)} runs are named {kind!r} ({', '.join(str(c.path) for c in cands)}); "
                f"pass only one {kind} run"
            )
        if cands:
            if kind == "target":
                target = cands[0]
            else:
                retain = cands[0]
    return methods, retain, target


def run_labels(runs: list[RunRecord]) -> list[str]:
    names = [r.name for r in runs]
    out = []
    for r in runs:
        label = r.name if names.count(r.name) == 1 else f"{r.name} ({r.path.name})"
        status = r.info.get("status")
        if status not in (None, "done"):
            label += f" [{status}]"
        out.append(label)
    return out


def ks_and_spread(run: RunRecord, retain_tr) -> dict[str, Any]:
    """The KS statistic D behind forget quality, and the spread at equal mean forgetting."""
    from baldro.eval.balance import spread_at_mean_forgetting

    out: dict[str, Any] = {}
    if retain_tr is not None and run.eval_log is not None:
        tr = truth_ratios(run.load_eval_log(), "forget_truth_ratio")
        out["_ks_d"] = metrics.ks_statistic(tr, retain_tr) if tr is not None and len(tr) else None
    for spread in spread_at_mean_forgetting(run.balance) if run.balance else []:
        out[f"_spread_at_{spread['level']:g}"] = spread["prob_std_at_level"]
    return out

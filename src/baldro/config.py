"""YAML recipes with config groups and dotted command-line overrides (Hydra-style, on OmegaConf).

A recipe may start with a `defaults` list naming config-group choices, e.g.
`defaults: [{objective: npo}, {weighting: mean}, {split: forget10}]`; the group file
`<configs>/objective/npo.yaml` is found in the recipe's folder or any folder above it and merged at
the root (so it says where its keys go). On the command line, `objective=simnpo` picks another
group file and `objective.args.beta=0.2` sets one value; later overrides win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from baldro.errors import BaldroError


def _load_yaml(path: Path) -> dict:
    if not path.exists():
        raise BaldroError(f"config file {path} not found: check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise BaldroError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise BaldroError(f"config file {path} must hold a mapping at the top level")
    return data


def _group_dir(recipe: Path, group: str) -> Path | None:
    for folder in recipe.resolve().parents:
        if (folder / group).is_dir():
            return folder / group
    return None


def _group_file(recipe: Path, group: str, choice: str) -> Path:
    folder = _group_dir(recipe, group)
    if folder is None:
        raise BaldroError(f"config group {group!r} not found in any folder above {recipe}")
    path = folder / f"{choice}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        raise BaldroError(f"unknown {group} {choice!r}: use one of {options}")
    return path


def _split_overrides(recipe: Path, overrides: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Separate group choices (`objective=npo`) from dotted value overrides (`train.learning_rate=1e-4`)."""
    groups, values = {}, []
    for item in overrides:
        if "=" not in item:
            raise BaldroError(f"override {item!r} must look like key=value (e.g. train.learning_rate=1e-5)")
        key, value = item.split("=", 1)
        if "." not in key and _group_dir(recipe, key) is not None and not key.startswith("+"):
            groups[key] = value
        else:
            values.append(item.lstrip("+"))
    return groups, values


def load_config(recipe: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a recipe with its group defaults and the command-line overrides; resolve interpolations."""
    recipe = Path(recipe)
    raw = _load_yaml(recipe)
    group_choices, value_overrides = _split_overrides(recipe, overrides)
    defaults = raw.pop("defaults", []) or []
    merged = OmegaConf.create()
    for entry in defaults:
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise BaldroError(f"{recipe}: each defaults entry must be {{group: choice}}, got {entry!r}")
        (group, choice), = entry.items()
        choice = group_choices.pop(group, choice)
        merged = OmegaConf.merge(merged, _load_yaml(_group_file(recipe, group, str(choice))))
    for group, choice in group_choices.items():  # a group the recipe did not list
        merged = OmegaConf.merge(merged, _load_yaml(_group_file(recipe, group, choice)))
    try:
        cfg = OmegaConf.merge(merged, OmegaConf.create(raw), OmegaConf.from_dotlist(value_overrides))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise BaldroError(f"bad config {recipe}: {e}".splitlines()[0]) from None
    return cfg


def to_container(cfg: DictConfig | dict | None) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def dump_config(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)

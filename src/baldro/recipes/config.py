"""YAML recipes with config groups and dotted command-line overrides (Hydra-style, on OmegaConf).

A recipe may start with a `defaults` list naming config-group choices, e.g.
`defaults: [{objective: npo}, {weighting: mean}, {split: forget10}]`; the group file
`<configs>/objective/npo.yaml` is found in the recipe's folder or any folder above it and merged at
the root (so it says where its keys go). On the command line, `objective=simnpo` picks another
group file and `objective.args.beta=0.2` sets one value; later overrides win.

Every piece is merged onto the schema (`baldro.recipes.schema.Recipe`): an unknown key or a value of the
wrong type is a one-line error naming the key, where it came from, and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from baldro.errors import BaldroError
from baldro.recipes.schema import Recipe


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


# Keys that were replaced: their replacement, named in the unknown-key error.
RENAMED = {
    "eval.every_n_steps": "train.eval_strategy=steps with train.eval_steps=N (evaluations into RUN/evals/step-N)",
}


def _schema_error(e: OmegaConfBaseException, where: str) -> BaldroError:
    """One line: the key, what is wrong with it, where it came from, and the closest valid key."""
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    problem = (str(getattr(e, "msg", None) or e)).splitlines()[0]
    owner = getattr(e, "object_type", None)
    hint = ""
    if isinstance(e, ConfigKeyError) and str(key) in RENAMED:
        return BaldroError(f"{where}: {key} was replaced: use {RENAMED[str(key)]}")
    if isinstance(e, ConfigKeyError) and owner is not None and dataclasses.is_dataclass(owner):
        names = [f.name for f in dataclasses.fields(owner)]
        prefix = key.rsplit(".", 1)[0] + "." if "." in str(key) else ""
        name = str(getattr(e, "key", key))
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        if close:
            hint = f": did you mean {prefix}{close[0]}?"
        elif "args" in names:
            hint = f": the {prefix[:-1]}'s own arguments go under {prefix}args (e.g. {prefix}args.{name})"
        else:
            hint = f": valid keys here are {', '.join(names)}"
        problem = f"unknown key {key!r}"
    elif key not in problem:
        problem = f"{key}: {problem}"
    return BaldroError(f"{where}: {problem}{hint}")


def _resume_section(value) -> dict:
    """`resume: true | false | PATH` (the short forms) as the `resume` section."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "null", "none", ""):
        value = value.strip().lower() in ("true", "yes")
    if value is None or value is False:
        return {"enabled": False, "checkpoint": None}
    if value is True:
        return {"enabled": True, "checkpoint": None}
    if isinstance(value, (str, Path)):
        return {"enabled": True, "checkpoint": str(value)}
    raise BaldroError(f"resume={value!r}: use resume=true, resume=false, resume=CHECKPOINT_FOLDER or resume.force=true")


def _normalise(piece):
    """A recipe piece with the short `resume` forms turned into the `resume` section."""
    if isinstance(piece, DictConfig):
        if "resume" not in piece or isinstance(piece._get_node("resume"), DictConfig):
            return piece
        piece = OmegaConf.to_container(piece, resolve=False)
    if isinstance(piece, dict) and "resume" in piece and not isinstance(piece["resume"], (dict, DictConfig)):
        piece = {**piece, "resume": _resume_section(piece["resume"])}
    return piece


def _merge(cfg: DictConfig, piece, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, _normalise(piece))
    except OmegaConfBaseException as e:
        raise _schema_error(e, where) from None


def load_config(recipe: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a recipe with its group defaults and the command-line overrides on the schema;
    resolve interpolations. The result is typed: `as_recipe(cfg)` gives the `Recipe` object."""
    recipe = Path(recipe)
    raw = _load_yaml(recipe)
    group_choices, value_overrides = _split_overrides(recipe, overrides)
    defaults = raw.pop("defaults", []) or []
    cfg = OmegaConf.structured(Recipe)
    for entry in defaults:
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise BaldroError(f"{recipe}: each defaults entry must be {{group: choice}}, got {entry!r}")
        ((group, choice),) = entry.items()
        choice = group_choices.pop(group, choice)
        path = _group_file(recipe, group, str(choice))
        cfg = _merge(cfg, _load_yaml(path), str(path))
    for group, choice in group_choices.items():  # a group the recipe did not list
        path = _group_file(recipe, group, choice)
        cfg = _merge(cfg, _load_yaml(path), str(path))
    cfg = _merge(cfg, raw, str(recipe))
    # In order; `resume=true` / `resume=PATH` (short forms of the resume section) are merged on their own.
    batch: list[str] = []
    for item in [*value_overrides, None]:
        key, _, value = (item or "").partition("=")
        if item is not None and key.strip() != "resume":
            batch.append(item)
            continue
        if batch:
            try:
                dotlist = OmegaConf.from_dotlist(batch)
            except OmegaConfBaseException as e:
                raise BaldroError(f"bad override: {str(e).splitlines()[0]}") from None
            cfg = _merge(cfg, dotlist, "command-line override")
            batch = []
        if item is not None:
            piece = {"resume": _resume_section(yaml.safe_load(value) if value.strip() else None)}
            cfg = _merge(cfg, piece, "command-line override")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _schema_error(e, str(recipe)) from None
    return cfg


def as_recipe(cfg: Recipe | DictConfig | dict) -> Recipe:
    """The typed `Recipe` of a loaded config, a plain dict (the demo's) or a `Recipe` itself."""
    if isinstance(cfg, Recipe):
        return cfg
    if not (isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is Recipe):
        cfg = _merge(OmegaConf.structured(Recipe), cfg, "recipe")
    try:
        OmegaConf.resolve(cfg)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _schema_error(e, "recipe") from None


def dump_config(cfg: Recipe | DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg) if isinstance(cfg, Recipe) else cfg, resolve=True)

"""TOFU splits from a local folder of JSON/JSON-lines files or from the Hugging Face hub.

A local folder holds one file per hub config (`forget10.jsonl`, `retain90.json`, ...), the layout of
`shared/data/tofu/` and of `baldro.data.synthetic`. Anything that is not an existing folder is taken
as a hub dataset id (`locuslab/TOFU`) and loaded with `datasets.load_dataset(source, name)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from baldro.errors import BaldroError

HUB_ID = "locuslab/TOFU"
# forgetXX goes with retainYY and holdoutXX (SPEC section 4).
SPLIT_PAIRS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


def retain_split_for(forget_split: str) -> str:
    if forget_split not in SPLIT_PAIRS:
        raise BaldroError(f"unknown TOFU forget split {forget_split!r}: use one of {sorted(SPLIT_PAIRS)}")
    return SPLIT_PAIRS[forget_split]


def holdout_split_for(forget_split: str) -> str:
    retain_split_for(forget_split)
    return forget_split.replace("forget", "holdout")


def _read_local(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise BaldroError(f"{path} is not valid JSON/JSON lines ({e}): fix or regenerate the file") from None


def load_split(source: str | Path, name: str, fields: Sequence[str] = ("question", "answer")) -> list[dict]:
    """Rows of one TOFU config as dicts; checks that it is non-empty and has `fields`."""
    folder = Path(source)
    if folder.is_dir():
        candidates = [folder / f"{name}{ext}" for ext in (".jsonl", ".json")]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise BaldroError(f"TOFU split {name!r} not found: expected {candidates[0]} (or .json) in {folder}")
        rows = _read_local(path)
        where = str(path)
    elif str(source).startswith((".", "/", "~")) or Path(source).suffix:
        raise BaldroError(f"data folder {source} does not exist: set data.source to a TOFU folder or a hub id")
    else:
        rows, where = _load_hub(str(source), name), f"{source}:{name}"
    if not rows:
        raise BaldroError(f"TOFU split {where} is empty: check the file or the split name")
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise BaldroError(
            f"TOFU split {where} lacks field(s) {missing} (has {sorted(rows[0])}): use a split with these fields"
        )
    return rows


def _load_hub(dataset_id: str, name: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, name, split="train")
    except Exception as e:  # the hub raises many types; the message is what the user needs
        raise BaldroError(f"could not load {dataset_id} config {name!r} from the hub: {e}") from None
    return [dict(r) for r in ds]


def load_refusals(source: str | Path, refusal_file: str | Path | None = None) -> list[str]:
    """Refusal answers for `idk`/`dpo` (TOFU's `idontknow.jsonl` is plain text, one answer per line)."""
    path = Path(refusal_file) if refusal_file else Path(source) / "idontknow.jsonl"
    if not path.exists():
        raise BaldroError(f"refusal answers file {path} not found: set data.refusal_file")
    answers = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not answers:
        raise BaldroError(f"refusal answers file {path} is empty")
    return answers

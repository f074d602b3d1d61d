"""TOFU splits from a local folder of JSON/JSON-lines files or from the Hugging Face hub.

A local folder holds one file per hub config (`forget10.jsonl`, `retain90.json`, ...), the layout of
`shared/data/tofu/` and of `baldro.data.synthetic`. Anything that is not an existing folder is taken
as a hub dataset id (`locuslab/TOFU`) and loaded with `datasets.load_dataset(source, name)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from baldro.data.sources import looks_like_path
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


def _decode(path: Path, what: str = "data file") -> str:
    """The file's text; unreadable or non-UTF-8 files are one-line errors with the line of the bad byte."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise BaldroError(f"{what} {path} is a folder, not a file: remove it or point to the file") from None
    except OSError as e:
        raise BaldroError(f"cannot read {what} {path}: {e.strerror}: check the file and its permissions") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise BaldroError(
            f"{what} {path} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}): save the file as UTF-8"
        ) from None


def _read_local(path: Path) -> list[tuple[int, object]]:
    """(line number, row) of a JSON array (.json) or JSON-lines file, with the real line of any error."""
    text = _decode(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BaldroError(
                f"{path} line {e.lineno} is not valid JSON ({e.msg}): fix or regenerate the file"
            ) from None
        if not isinstance(rows, list):
            raise BaldroError(f"{path} must hold a JSON array of rows")
        return [(0, r) for r in rows]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise BaldroError(
                f"{path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}): fix or regenerate the file"
            ) from None
    return out


def _check_rows(rows: list[tuple[int, object]], where: str, fields: Sequence[str]) -> list[dict]:
    """Every row is an object with `fields` (question/answer as text); errors name the file's line."""
    for n, (lineno, row) in enumerate(rows):
        at = f"{where} line {lineno}" if lineno else f"{where} row {n + 1}"
        if not isinstance(row, dict):
            raise BaldroError(f"{at} is not a JSON object (got {type(row).__name__}): every row needs {list(fields)}")
        missing = [f for f in fields if f not in row]
        if missing:
            raise BaldroError(
                f"TOFU split {at} lacks field(s) {missing} (has {sorted(row)}): every row needs {list(fields)}"
            )
        for f in ("question", "answer"):
            if f in fields and not isinstance(row[f], str):
                raise BaldroError(f"{at}: field {f!r} is {type(row[f]).__name__}, not text: fix the row")
    return [row for _, row in rows]


def load_split(source: str | Path, name: str, fields: Sequence[str] = ("question", "answer")) -> list[dict]:
    """Rows of one TOFU config as dicts; checks that it is non-empty and that every row has `fields`."""
    folder = Path(source)
    if folder.is_dir():
        candidates = [folder / f"{name}{ext}" for ext in (".jsonl", ".json")]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise BaldroError(f"TOFU split {name!r} not found: expected {candidates[0]} (or .json) in {folder}")
        rows = _read_local(path)
        where = str(path)
    elif folder.exists():
        raise BaldroError(f"data.source {source} is a file: set data.source to the folder that holds the split files")
    elif looks_like_path(source):
        raise BaldroError(f"data folder {source} does not exist: set data.source to a TOFU folder or a hub id")
    else:
        rows, where = [(0, r) for r in _load_hub(str(source), name)], f"{source}:{name}"
    if not rows:
        raise BaldroError(f"TOFU split {where} is empty: check the file or the split name")
    return _check_rows(rows, where, fields)


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
    answers = [line.strip() for line in _decode(path, "refusal answers file").splitlines() if line.strip()]
    if not answers:
        raise BaldroError(f"refusal answers file {path} is empty")
    return answers

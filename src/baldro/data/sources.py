"""Where a dataset comes from: a local folder, or a Hugging Face hub id."""

from __future__ import annotations

from pathlib import Path

from baldro.errors import BaldroError


def looks_like_path(source) -> bool:
    """A relative or absolute path (or a file name), not a hub id such as `locuslab/TOFU`."""
    return str(source).startswith((".", "/", "~")) or Path(str(source)).suffix != ""


def is_local_folder(source, missing: str) -> bool:
    """True for an existing folder, False for a hub id; a path that is not a folder is a `BaldroError`
    whose message is `missing` (what to give instead)."""
    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        return True
    if looks_like_path(source):
        raise BaldroError(missing)
    return False

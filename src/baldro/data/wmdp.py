"""The WMDP unlearning corpora (Li et al. 2024) from a local folder or the Hugging Face hub.

A local folder has the layout of `cais/wmdp-corpora` as OpenUnlearning keeps it (`data/wmdp/wmdp-corpora/`):

| file | content |
| --- | --- |
| `cyber-forget-corpus.jsonl`, `cyber-retain-corpus.jsonl` | one document a line: {"text": ...} (a bare JSON string is taken too) |
| `bio-forget-corpus.jsonl`, `bio-retain-corpus.jsonl` | the same for biology (the forget corpus is gated, see below) |

Anything that is not an existing folder is a hub id (`cais/wmdp-corpora`), read with
`datasets.load_dataset(id, split_name, split="train")`. Its configs are `cyber-forget-corpus`,
`cyber-retain-corpus` and `bio-retain-corpus`; the biology forget corpus is a separate, gated dataset,
`cais/wmdp-bio-forget-corpus` (request access on its hub page, then log in), read when the split is
`bio-forget-corpus`.

Unlearning reads raw text, as for MUSE: `load_unlearn_texts` joins a corpus's documents by a blank
line, and `baldro.data.muse.chunk_tokens` cuts the tokens into chunks of `data.chunk_length` (512 in
OpenUnlearning's WMDP recipe), each an `EncodedQA` with labels on every token.
"""

from __future__ import annotations

import json
from pathlib import Path

from baldro.data.sources import is_local_folder
from baldro.errors import BaldroError

HUB_ID = "cais/wmdp-corpora"
BIO_FORGET_HUB_ID = "cais/wmdp-bio-forget-corpus"  # gated
CORPORA = ("cyber", "bio")
SPLITS = tuple(f"{c}-{kind}-corpus" for c in CORPORA for kind in ("forget", "retain"))
TEXT_KEY = "text"


def _is_local(source) -> bool:
    return is_local_folder(
        source,
        f"WMDP corpora folder {source} does not exist: set data.source to a folder of "
        f"*-forget-corpus.jsonl / *-retain-corpus.jsonl files or to the hub id {HUB_ID}",
    )


def _check_split(split: str | None, key: str) -> str:
    if not split:
        raise BaldroError(
            f"data.{key} is not set: name a WMDP corpus ({', '.join(SPLITS)}) or pick one with corpus=cyber|bio"
        )
    return str(split)


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise BaldroError(f"{path} is not UTF-8 text: give the JSON-lines corpus file") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BaldroError(f"{path} line {i + 1} is not valid JSON ({e.msg}): fix or regenerate the file") from None
        text = row.get(TEXT_KEY) if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise BaldroError(
                f"{path} line {i + 1} must be an object with a {TEXT_KEY!r} string (or a JSON string), "
                f"got {line[:80]!r}"
            )
        texts.append(text)
    return texts


def _hub_texts(source: str, split: str) -> tuple[list[str], str]:
    import datasets

    if split == "bio-forget-corpus" and source == HUB_ID:
        args, where = (BIO_FORGET_HUB_ID,), BIO_FORGET_HUB_ID
    else:
        args, where = (source, split), f"{source}:{split}"
    try:
        ds = datasets.load_dataset(*args, split="train")
    except Exception as e:  # the hub raises many types; the message is what the user needs
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "gated" in str(e).lower() or where == BIO_FORGET_HUB_ID:
            raise BaldroError(
                f"could not load {where} ({text}): the WMDP bio forget corpus is gated: request access on "
                f"https://huggingface.co/datasets/{BIO_FORGET_HUB_ID}, log in (`hf auth login` or HF_TOKEN), or put "
                "bio-forget-corpus.jsonl in a local folder and set data.source to it"
            ) from None
        raise BaldroError(
            f"could not load WMDP corpus {where} from the hub ({text}): check data.source, the split "
            f"name ({', '.join(SPLITS)}) and hub access, or use a local folder"
        ) from None
    if TEXT_KEY not in ds.column_names:
        raise BaldroError(f"{where} has no {TEXT_KEY!r} column (has {ds.column_names})")
    return list(ds[TEXT_KEY]), where


def load_corpus(source, split: str) -> list[str]:
    """The documents of corpus `split` (e.g. cyber-forget-corpus) from a folder or the hub."""
    if _is_local(source):
        path = Path(str(source)).expanduser() / f"{split}.jsonl"
        if not path.is_file():
            have = sorted(p.stem for p in path.parent.glob("*.jsonl"))
            note = (
                f" (the bio forget corpus is gated: see `{BIO_FORGET_HUB_ID}` in docs/guides/lm-eval.md)"
                if split == "bio-forget-corpus"
                else ""
            )
            raise BaldroError(
                f"WMDP corpus {split!r} not found: expected {path}"
                + (f"; the folder has {have}" if have else "")
                + note
            )
        texts, where = _read_jsonl(path), str(path)
    else:
        texts, where = _hub_texts(str(source), split)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise BaldroError(f"WMDP corpus {where} is empty: nothing to unlearn or retain; check the file")
    return texts


def load_unlearn_texts(
    source,
    forget_split: str | None,
    retain_split: str | None,
    need_retain: bool,
) -> tuple[str, str | None]:
    """The forget corpus and, when `need_retain`, the retain corpus, each as one text (documents joined
    by a blank line, as OpenUnlearning's pre-training dataset joins them)."""
    forget = "\n\n".join(load_corpus(source, _check_split(forget_split, "forget_split")))
    if not need_retain:
        return forget, None
    return forget, "\n\n".join(load_corpus(source, _check_split(retain_split, "retain_split")))

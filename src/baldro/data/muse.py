"""MUSE (MUSE-News, MUSE-Books) from a local folder or the Hugging Face hub.

A local folder has the layout of the MUSE loader (`shared/data/muse/{news,books}/`):

| file | content |
| --- | --- |
| `raw/<split>.json` or `raw/<split>.txt` | the documents (a JSON list), or the same joined by a blank line |
| `knowmem/{forget,retain}_qa.json` and `..._qa_icl.json` | lists of {question, answer}: the questions and their in-context examples |
| `verbmem/forget.json` | a list of {prompt, gt} |
| `privleak/{forget,retain,holdout}.json` | lists of texts |

Anything that is not an existing folder is a hub id (`muse-bench/MUSE-News`, `muse-bench/MUSE-Books`),
read with `datasets.load_dataset(id, config, split=split)` (configs raw, knowmem, verbmem, privleak).

Unlearning reads raw text (`load_raw_text`): the documents joined by a blank line, tokenised once
and cut into chunks of `chunk_length` tokens (`chunk_tokens`), as OpenUnlearning's pre-training
dataset does. Each chunk is an `EncodedQA` with `prompt_len` 0 and labels on every token, so the
unlearning trainer, objectives and weightings take it like a QA pair whose answer is the whole chunk.
The evaluation texts are encoded as OpenUnlearning encodes them: `encode_completion` (VerbMem:
prompt, a space, the continuation; only the continuation scored) and `encode_text` (the MIA texts:
every token after the tokenizer's leading special tokens scored).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from baldro.data.formatting import IGNORE_INDEX, EncodedQA
from baldro.data.sources import is_local_folder
from baldro.errors import BaldroError

HUB_IDS = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
RAW_SPLITS = ("forget", "retain1", "retain2", "holdout")
KNOWMEM_SPLITS = {"forget": "forget_qa", "retain": "retain_qa"}
PRIVLEAK_SPLITS = ("forget", "retain", "holdout")
# The offline MUSE-News copy (shared/data/README.md, "What is missing") has no raw retain/holdout corpora.
NEWS_MISSING_RAW = ("retain1", "retain2", "holdout")
# A limited run tokenises only a prefix of the corpus; these extra tokens keep its cut away from the chunks.
_PREFIX_MARGIN_TOKENS = 64


def _is_local(source) -> bool:
    return is_local_folder(
        source,
        f"MUSE data folder {source} does not exist: set data.source to a MUSE folder "
        f"(e.g. ../shared/data/muse/books) or a hub id ({', '.join(HUB_IDS.values())})",
    )


def _hub(source: str, config: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:  # the hub raises many types; the message is what the user needs
        raise BaldroError(
            f"could not load {source} config {config!r} split {split!r} from the hub: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BaldroError(f"{path} is not valid JSON ({e}): fix or regenerate the file") from None


def _missing_note(folder: Path, split: str) -> str:
    if split in NEWS_MISSING_RAW and "news" in folder.resolve().name.lower():
        return (
            " (the offline MUSE-News copy has no raw retain/holdout corpora, see shared/data/README.md: "
            f"use data.source={HUB_IDS['news']} with internet, or unlearn without a retain loss: "
            "objective.alpha=0)"
        )
    return ""


# ------------------------------------------------------------------------------------------ raw text
def load_raw_text(source, split: str) -> str:
    """The raw corpus `split` (forget, retain1, retain2, holdout) as one text: its documents joined by
    a blank line (what the MUSE unlearning code trains on)."""
    if _is_local(source):
        folder = Path(source).expanduser()
        json_path, txt_path = folder / "raw" / f"{split}.json", folder / "raw" / f"{split}.txt"
        if json_path.is_file():
            docs = _read_json(json_path)
            if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
                raise BaldroError(f"{json_path} must hold a JSON list of documents (strings)")
            text, where = "\n\n".join(docs), str(json_path)
        elif txt_path.is_file():
            text, where = txt_path.read_text(encoding="utf-8"), str(txt_path)
        else:
            raise BaldroError(
                f"MUSE raw split {split!r} not found: expected {json_path} or {txt_path}" + _missing_note(folder, split)
            )
    else:
        ds = _hub(str(source), "raw", split)
        if "text" not in ds.column_names:
            raise BaldroError(f"{source} raw split {split!r} has no 'text' column (has {ds.column_names})")
        text, where = "\n\n".join(ds["text"]), f"{source}:raw/{split}"
    if not text.strip():
        raise BaldroError(f"MUSE raw split {where} is empty: nothing to unlearn or retain; check the file")
    return text


def leading_special_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama: BOS; SmolLM2: none)."""
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def model_context(model) -> int | None:
    """The model's context length (`max_position_embeddings`), None when its config has none."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_chunk_length(tokenizer, chunk_length: int, context: int | None) -> None:
    """A one-line error unless `chunk_length` tokens (plus the leading special tokens) fit `context`."""
    if chunk_length < 1:
        raise BaldroError(f"data.chunk_length must be a positive number of tokens, got {chunk_length}")
    specials = leading_special_tokens(tokenizer)
    if context is not None and chunk_length + len(specials) > context:
        extra = f" + {len(specials)} special token(s)" if specials else ""
        raise BaldroError(
            f"data.chunk_length={chunk_length}{extra} is longer than the model's context of {context} "
            f"tokens: set data.chunk_length <= {context - len(specials)}"
        )


def load_unlearn_texts(
    source,
    forget_split: str | None,
    retain_split: str | None,
    need_retain: bool,
) -> tuple[str, str | None]:
    """The raw forget corpus and, when `need_retain`, the raw retain corpus (else None)."""
    if not forget_split:
        raise BaldroError(f"data.forget_split is not set: name a raw MUSE corpus ({', '.join(RAW_SPLITS)})")
    forget = load_raw_text(source, forget_split)
    if not need_retain:
        return forget, None
    if not retain_split:
        raise BaldroError(
            "data.retain_split is not set: name a raw MUSE retain corpus (retain1, retain2), "
            "or unlearn without a retain loss: objective.alpha=0"
        )
    return forget, load_raw_text(source, retain_split)


def chunk_tokens(
    tokenizer,
    text: str,
    chunk_length: int,
    limit: int | None = None,
    context: int | None = None,
    what: str = "forget",
) -> list[EncodedQA]:
    """Cut `text` into chunks of `chunk_length` tokens (the last one may be shorter), each after the
    tokenizer's leading special tokens, labels on every token (`prompt_len` 0).

    The text is tokenised once, without special tokens, and cut on token boundaries. `limit`: only
    the first `limit` chunks (then only a prefix of the text is tokenised). `context`: the model's
    context length, which a chunk with its special tokens must not exceed."""
    check_chunk_length(tokenizer, chunk_length, context)
    specials = leading_special_tokens(tokenizer)
    if limit is not None and limit < 1:
        raise BaldroError(f"data.limit must be a positive number of chunks, got {limit}")
    if not text.strip():
        raise BaldroError(f"the {what} corpus is empty: nothing to cut into chunks")
    if limit is None:
        ids = _token_ids(tokenizer, text)
    else:  # tokenise a growing prefix until it holds `limit` whole chunks (or the whole text)
        need = limit * chunk_length + _PREFIX_MARGIN_TOKENS
        n_chars = need * 8
        while True:
            ids = _token_ids(tokenizer, text[:n_chars])
            if n_chars >= len(text):
                break
            if len(ids) >= need:
                ids = ids[: limit * chunk_length]
                break
            n_chars *= 2
    chunks = []
    for start in range(0, len(ids), chunk_length):
        seq = specials + ids[start : start + chunk_length]
        if len(seq) < 2:  # a lone token predicts nothing
            continue
        chunks.append(EncodedQA(seq, list(seq), 0))
    if limit is not None:
        chunks = chunks[:limit]
    if not chunks:
        raise BaldroError(f"the {what} corpus has no token to unlearn or retain after tokenisation")
    return chunks


# ---------------------------------------------------------------------------------- evaluation sets
def _eval_rows(source, config: str, split: str, what: str) -> list:
    if _is_local(source):
        path = Path(source).expanduser() / config / f"{split}.json"
        if not path.is_file():
            raise BaldroError(
                f"MUSE {what} file {path} not found: data.source must be a MUSE folder with "
                f"{config}/{split}.json (see shared/data/README.md)"
            )
        rows, where = _read_json(path), str(path)
        if not isinstance(rows, list):
            raise BaldroError(f"{path} must hold a JSON list")
    else:
        ds, where = _hub(str(source), config, split), f"{source}:{config}/{split}"
        rows = [dict(r) for r in ds]
    if not rows:
        raise BaldroError(f"MUSE {what} split {where} is empty: check the file")
    return rows


def _check_fields(rows: list, fields: Sequence[str], where: str) -> list[dict]:
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or any(not isinstance(r.get(f), str) for f in fields):
            raise BaldroError(f"MUSE {where} row {i} must be an object with text fields {list(fields)}, got {r!r:.80}")
    return rows


def load_knowmem(source, which: str, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """(questions, in-context examples) of knowmem `which` (forget or retain)."""
    if which not in KNOWMEM_SPLITS:
        raise BaldroError(f"unknown knowmem set {which!r}: use one of {sorted(KNOWMEM_SPLITS)}")
    split = KNOWMEM_SPLITS[which]
    if _is_local(source):
        icl_path = Path(source).expanduser() / "knowmem" / f"{split}_icl.json"
        if (Path(source).expanduser() / "knowmem" / f"{split}.json").is_file() and not icl_path.is_file():
            raise BaldroError(
                f"knowmem/{split}.json has no in-context partner {icl_path}: KnowMem prompts are "
                "built from it; add the file"
            )
    rows = _check_fields(
        _eval_rows(source, "knowmem", split, f"knowmem {which}"), ("question", "answer"), f"knowmem/{split}"
    )
    icl = _check_fields(
        _eval_rows(source, "knowmem", f"{split}_icl", f"knowmem {which} in-context"),
        ("question", "answer"),
        f"knowmem/{split}_icl",
    )
    return rows[:limit], icl


def load_verbmem(source, limit: int | None = None) -> list[dict]:
    """The VerbMem rows {prompt, gt} (the forget text's prompts and their true continuations)."""
    return _check_fields(_eval_rows(source, "verbmem", "forget", "verbmem"), ("prompt", "gt"), "verbmem/forget")[:limit]


def load_privleak(source, split: str, limit: int | None = None) -> list[str]:
    """The texts of privleak `split` (forget: members, holdout: non-members, retain)."""
    if split not in PRIVLEAK_SPLITS:
        raise BaldroError(f"unknown privleak split {split!r}: use one of {list(PRIVLEAK_SPLITS)}")
    rows = _eval_rows(source, "privleak", split, f"privleak {split}")
    texts = [r.get("text") if isinstance(r, dict) else r for r in rows]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()), None)
    if bad is not None:
        raise BaldroError(f"MUSE privleak/{split} item {bad} is not a non-empty text: got {rows[bad]!r:.80}")
    return texts[:limit]


# ------------------------------------------------------------------------------------------ encoding
def encode_text(tokenizer, text: str, max_length: int) -> EncodedQA:
    """A MIA text: its tokens (with the leading special tokens), cut after `max_length` text tokens;
    every token after the special tokens is scored, and the first one too when there are none
    (OpenUnlearning's completion encoding with an empty prefix)."""
    n_special = len(leading_special_tokens(tokenizer))
    ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])[: n_special + max_length]
    start = max(1, n_special)  # nothing predicts the first token
    if len(ids) <= start:
        raise BaldroError(f"text {text[:40]!r} has no token to score")
    return EncodedQA(ids, [IGNORE_INDEX] * start + ids[start:], start)


def encode_completion(tokenizer, prompt: str, continuation: str, insert_space: bool = True) -> EncodedQA:
    """A VerbMem item: prompt (+ a space) + continuation, labels on the continuation's tokens only.

    The prompt's tokens are those it has on its own (what generation starts from); when tokenising
    the whole text merges across the boundary, the continuation is tokenised on its own after them."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"])
    rest = (" " if insert_space else "") + continuation
    full = list(tokenizer(prompt + rest, add_special_tokens=True, verbose=False)["input_ids"])
    if full[: len(prompt_ids)] != prompt_ids:
        full = prompt_ids + list(tokenizer(rest, add_special_tokens=False, verbose=False)["input_ids"])
    p = len(prompt_ids)
    if p == 0 or len(full) <= p:
        raise BaldroError(f"verbmem item {prompt[:40]!r}: empty prompt or continuation after tokenisation")
    return EncodedQA(full, [IGNORE_INDEX] * p + full[p:], p)

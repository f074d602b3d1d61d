"""AltPO's alternate answers: generated once by the model before unlearning, cached in the run folder.

As OpenUnlearning's AltPO generator (community/methods/AltPO/generate.py): the model is shown the question
and its true answer with an instruction to make up a plausible answer that changes every fact, and samples
(temperature 1) `n` alternates per question. The prompt goes through the run's own formatter (the model's
chat template), not a Llama-specific string; the reply is cut at "Question:" as OpenUnlearning's stop
strings do. Sampling is seeded per (seed, round, batch), so the same run draws the same alternates.

`RUN/alternates.jsonl`: a header line with the generation settings, then one line per forget sample
(question, answer, alternates). A run that finds the file reuses it (a resume, or a rerun of the same
recipe); a file made with other settings or for other questions is an error, not silently reused.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from baldro.errors import BaldroError
from baldro.io import write_text_atomic

log = logging.getLogger(__name__)

ALTERNATES_FILE = "alternates.jsonl"
# OpenUnlearning's instruction for Llama-3.2 (INST_QAS_LLAMA3_INSTR), word for word.
INSTRUCTION = (
    "Now pretend you are making things up. Write another answer to the question that is of a different template "
    "than the given answer and changes all facts from what are introduced in the given answer (changed answers "
    "must be plausible while being inconsistent with given answer). Ensure that your alternate answer is a "
    "plausible response to the question and doesn't change any details mentioned in question and only introduces "
    "changes to all the facts introduced answer."
)
STOP_STRINGS = ("Question:", "Q:")
PREFIX = "Alternate Answer :"


def alternate_request(question: str, answer: str) -> str:
    return f"Question: {question}\nAnswer: {answer}\n{INSTRUCTION}"


def clean_reply(text: str) -> str:
    """The alternate in a generated reply: cut at a stop string, without OpenUnlearning's answer prefix."""
    for stop in STOP_STRINGS:
        text = text.split(stop)[0]
    text = text.strip()
    for prefix in (PREFIX, "Alternate Answer:"):
        if text.startswith(prefix):
            text = text[len(prefix) :].strip()
    return text


def generate_alternates(
    model,
    tokenizer,
    formatter,
    rows: Sequence[dict],
    n: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
) -> list[list[str]]:
    """`n` sampled alternates for each row's (question, answer); progress as log lines."""
    prompts = [formatter.encode_prompt(alternate_request(r["question"], r["answer"])) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[list[str]] = [[] for _ in rows]
    start, done, total = time.time(), 0, n * len(rows)
    was_training = model.training
    model.eval()
    for k in range(n):
        for b in range(0, len(rows), batch_size):
            batch = prompts[b : b + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(int(seed) * 1_000_003 + k * 10_007 + b)
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                )
            for i, row in enumerate(gen[:, width:].tolist()):
                out[b + i].append(clean_reply(tokenizer.decode(row, skip_special_tokens=True)))
            done += len(batch)
            log.info("alternates: %d/%d generated (%.0f s)", done, total, time.time() - start)
    model.train(was_training)
    empty = sum(not a for alts in out for a in alts)
    if empty:
        log.warning(
            "alternates: %d of %d generated answers are empty (kept: the answer is then EOS alone)", empty, total
        )
    return out


def _settings_line(settings: dict) -> str:
    return json.dumps({"settings": settings}, sort_keys=True)


def save_alternates(path: Path, rows: Sequence[dict], alternates: Sequence[Sequence[str]], settings: dict) -> None:
    lines = [_settings_line(settings)]
    lines += [
        json.dumps({"question": r["question"], "answer": r["answer"], "alternates": list(a)}, ensure_ascii=False)
        for r, a in zip(rows, alternates)
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_alternates(path: Path, rows: Sequence[dict], settings: dict | None = None) -> list[list[str]]:
    """The alternates of `rows` from a file: baldro's (a header, then `alternates` lists) or
    OpenUnlearning's (one `alternate` per line, several lines per question). `settings`: the header must
    match them (a cached file of this run)."""
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and "settings" in lines[0]:
        if settings is not None and lines[0]["settings"] != settings:
            raise BaldroError(
                f"{path} was generated with other settings ({lines[0]['settings']}) than this run's "
                f"({settings}): delete it to generate again, or restore the settings"
            )
        lines = lines[1:]
    by_question: dict[str, list[str]] = {}
    for i, line in enumerate(lines, 1):
        if "question" not in line or not ("alternates" in line or "alternate" in line):
            raise BaldroError(f"{path} line {i}: needs 'question' and 'alternates' (a list) or 'alternate'")
        alts = line["alternates"] if "alternates" in line else [line["alternate"]]
        by_question.setdefault(line["question"], []).extend(str(a) for a in alts)
    missing = [r["question"] for r in rows if r["question"] not in by_question]
    if missing:
        raise BaldroError(
            f"{path} has no alternates for {len(missing)} forget question(s), e.g. {missing[0]!r}: "
            "generate them for this forget split"
        )
    out = [by_question[r["question"]] for r in rows]
    if len({len(a) for a in out}) != 1:
        raise BaldroError(f"{path}: the forget questions have different numbers of alternates")
    return out

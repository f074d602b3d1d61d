"""`baldro attack`: relearning and quantization attacks on an unlearned model, sample by sample.

`run_attack` loads the unlearned model (`model.path`), its data and its evaluation once, then runs every
attack of `attack.attacks` in order on that model and evaluates the attacked model with the benchmark's
own evaluator (`baldro.eval.run`, as `baldro eval` does):

- relearn: a copy of the model fine-tuned (`FinetuneTrainer`, the model's answer NLL, every random draw
  from the seed: the same command writes the same files) on a seeded half of the forget set (`half`,
  `heldout`) or on as many retain rows (`retain`, the control); with `attack.relearn.lora` a LoRA
  adapter, merged before the evaluation;
- quantize: the model loaded again with 8-bit or 4-bit bitsandbytes weights (`attack.quantize.bits`),
  on the CPU or a GPU (`model.device`).

The unlearned model's evaluation ("before") is RUN/eval when model.path is RUN/model and that run
evaluated with this recipe's evaluation settings (`EVAL_SETTINGS`), `attack.before_eval` when set, else
it is computed once into OUTPUT_DIR/before. OUTPUT_DIR (default RUN/attack) holds config.yaml,
attack_info.json (the model, the before evaluation, every attack's cost) and one folder per attack
(`relearn_half`, `relearn_heldout`, `relearn_retain`, `quantize_8bit`, `quantize_4bit`) with the attacked
model's TOFU_EVAL.json / TOFU_SUMMARY.json (or MUSE_*), eval_info.json, eval_timings.json, a relearning's
train_log.jsonl, and attack_summary.json: the per-sample before vs after, how many samples came back
(`baldro.eval.recovery` defines it), forget quality before and after, the summaries' headline numbers
and the attack's cost. `resume=true` reruns only the attacks without an attack_summary.json.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from baldro.distributed import launch_world
from baldro.errors import BaldroError
from baldro.eval.recovery import ATTACK_SUMMARY, recovery, summary_values
from baldro.io import write_json_atomic
from baldro.models.loading import QUANTIZE_BITS, apply_lora, load_model
from baldro.recipes.common import (
    build_formatter,
    console_callbacks,
    load_model_and_tokenizer,
    raw_chunks,
    read_rows,
    training_args,
)
from baldro.recipes.config import as_recipe
from baldro.recipes.evaluate import eval_settings
from baldro.recipes.folders import _flatten, _recipe_dict, run_folder
from baldro.recipes.schema import Recipe
from baldro.recipes.validation import RELEARN_SPLITS, validate, validate_model
from baldro.train.batching import (
    STREAM_RELEARN,
    EncodedDataset,
    QACollator,
    derived_rng,
)
from baldro.train.guard import JsonlLogCallback
from baldro.train.trainers import FinetuneTrainer

log = logging.getLogger(__name__)

ATTACK_INFO = "attack_info.json"
BEFORE = "before"
ATTACK_FOLDERS = (*(f"relearn_{s}" for s in RELEARN_SPLITS), *(f"quantize_{b}bit" for b in QUANTIZE_BITS))
ATTACK_OUTPUTS = ("config.yaml", ATTACK_INFO, BEFORE, *ATTACK_FOLDERS)  # what overwrite=true deletes
# keys a resumed attack run may change: they add attacks (the split and the bit width name the folder) and
# leave the attacks already done as they are
ATTACK_RESUME_FREE_KEYS = (
    "name",
    "output_dir",
    "resume",
    "overwrite",
    "log_to_console",
    "attack.attacks",
    "attack.relearn.split",
    "attack.quantize.bits",
    "train.disable_tqdm",
    "train.report_to",
    "train.logging_steps",
)
# the settings that decide an evaluation's per-sample numbers: a run's own evaluation is the "before"
# only when it was made with the same ones
EVAL_SETTINGS = (
    "model.dtype",
    "data.source",
    "data.benchmark",
    "data.forget_split",
    "data.max_length",
    "data.chunk_length",
    "format",
    "eval.benchmark",
    "eval.max_new_tokens",
    "eval.verbmem_max_new_tokens",
    "eval.knowmem_max_new_tokens",
    "eval.limit",
    "eval.compat",
)


def attack_folders(recipe: Recipe) -> list[str]:
    """The output folder of every attack of the recipe, in the order they run."""
    a = recipe.attack
    names = []
    for attack in a.attacks:
        names += (
            [f"relearn_{a.relearn.split}"] if attack == "relearn" else [f"quantize_{b}bit" for b in a.quantize.bits]
        )
    return names


def relearn_pick(n_rows: int, k: int, seed: int) -> list[int]:
    """The `k` of `n_rows` rows a relearning trains on, drawn from the seed alone, in row order."""
    return sorted(int(i) for i in derived_rng(STREAM_RELEARN, seed).permutation(n_rows)[:k])


def _relearn_count(recipe: Recipe, n_forget: int) -> int:
    """How many rows a relearning trains on: `attack.relearn.n_samples`, else half the forget set."""
    n = recipe.attack.relearn.n_samples
    return n if n is not None else max(1, n_forget // 2)


def _check_pick(recipe: Recipe, n_forget: int, n_retain: int | None) -> None:
    """The relearning split fits the forget set (and the retain set it draws from)."""
    r, d = recipe.attack.relearn, recipe.data
    k = _relearn_count(recipe, n_forget)
    if r.split != "retain" and k > n_forget:
        raise BaldroError(
            f"attack.relearn.n_samples={k} is larger than the forget set ({n_forget} rows of "
            f"{d.forget_split}{', data.limit=' + str(d.limit) if d.limit else ''}): use at most "
            f"{n_forget}"
        )
    if r.split == "heldout" and k >= n_forget:
        raise BaldroError(
            f"attack.relearn.split=heldout with n_samples={k} of {n_forget} forget rows leaves none "
            f"held out: use at most {n_forget - 1}"
        )
    if r.split == "retain" and n_retain is not None and k > n_retain:
        raise BaldroError(
            f"attack.relearn.n_samples={k} is larger than the retain set ({n_retain} rows of "
            f"{d.retain_split}): use at most {n_retain}"
        )


def _with_output_dir(recipe: Recipe) -> Recipe:
    """The recipe with its output folder: `output_dir`, else RUN/attack beside a local model folder."""
    if not recipe.model.path:
        raise BaldroError("baldro attack needs the unlearned model: set model.path=RUN/model (a folder or a hub id)")
    if recipe.output_dir:
        return recipe
    model_dir = Path(recipe.model.path).expanduser()
    if not model_dir.is_dir():
        raise BaldroError(
            f"output_dir is not set and model.path {recipe.model.path} is not a local folder: give output_dir=PATH"
        )
    return dataclasses.replace(recipe, output_dir=str(model_dir.resolve().parent / "attack"))


def _differing(a: dict, b: dict, keys) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)

    def part(flat, key):
        return {k: v for k, v in flat.items() if k == key or k.startswith(key + ".")}

    return [k for k in keys if part(fa, k) != part(fb, k)]


def _run_eval(recipe: Recipe) -> Path | None:
    """The unlearned model's own evaluation to compare against: `attack.before_eval`, or RUN/eval when
    model.path is RUN/model and RUN/config.yaml evaluated with the same `EVAL_SETTINGS`."""
    if recipe.attack.before_eval:
        return Path(recipe.attack.before_eval).expanduser()
    run = Path(recipe.model.path).expanduser().parent
    name = f"{recipe.eval.benchmark.upper()}_EVAL.json"
    if not ((run / "eval" / name).is_file() and (run / "config.yaml").is_file()):
        return None
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    diffs = _differing(saved if isinstance(saved, dict) else {}, _recipe_dict(recipe), EVAL_SETTINGS)
    if diffs:
        log.info(
            "attack: %s was evaluated with other settings (%s): the unlearned model is evaluated again",
            run / "eval",
            ", ".join(diffs),
        )
        return None
    return run / "eval"


def _before(recipe: Recipe, model, tokenizer, formatter, run_dir: Path, settings: dict) -> tuple[dict, dict, str]:
    """(eval log, summary, where they come from) of the unlearned model, evaluated at most once."""
    from baldro.eval.run import evaluate_logged
    from baldro.eval.summarize import load_eval_log, summarize

    name = recipe.eval.benchmark.upper()
    source = _run_eval(recipe)
    if source is None and (run_dir / BEFORE / "eval_info.json").is_file():  # an earlier run of this recipe
        source = run_dir / BEFORE
    if source is not None:
        eval_log = load_eval_log(source, "the unlearned model's eval log")
        folder = source if source.is_dir() else source.parent
        summary_path = folder / f"{name}_SUMMARY.json"
        summary = _read_json(summary_path) if summary_path.is_file() else dict(summarize(eval_log))
        log.info("attack: the unlearned model's evaluation is %s", source)
        return eval_log, summary, str(source)
    eval_log, summary, *_ = evaluate_logged(
        model, tokenizer, formatter, run_dir / BEFORE, settings, recipe.eval.target_logs_path, recipe.model.path
    )
    return eval_log, dict(summary), str(run_dir / BEFORE)


# ----------------------------------------------------------------------------- the attacks
def _relearn(recipe: Recipe, model, tokenizer, items, out: Path):
    """Fine-tune a copy of `model` on `items`; returns (the attacked model, its cost)."""
    r = recipe.attack.relearn
    start = time.time()  # the copy, the adapter and the trainer count as the attack's cost
    attacked = copy.deepcopy(model)
    if r.lora is not None:
        attacked = apply_lora(attacked, r.lora, seed=recipe.seed)
    train = dataclasses.replace(
        recipe.train,
        learning_rate=r.learning_rate,
        max_steps=r.steps,
        per_device_train_batch_size=r.batch_size,
        save_strategy="no",
    )
    trainer = FinetuneTrainer(
        model=attacked,
        args=training_args(dataclasses.replace(recipe, train=train), out),
        train_dataset=EncodedDataset(items),
        data_collator=QACollator(tokenizer.pad_token_id),
        callbacks=[JsonlLogCallback(out / "train_log.jsonl")],
    )
    console_callbacks(trainer, recipe)
    trainer.train()
    cost = {"attack_seconds": time.time() - start, "steps": trainer.state.global_step, "samples": len(items)}
    with contextlib.suppress(OSError):  # transformers makes the (unused) checkpoint folder
        (out / "checkpoints").rmdir()
    attacked = trainer.model.merge_and_unload() if r.lora is not None else trainer.model
    return attacked.eval(), cost


class _DropInt8Casts(logging.Filter):
    """bitsandbytes warns on every 8-bit matmul of float32 inputs (it computes them in float16)."""

    def filter(self, record):
        return "inputs will be cast" not in record.getMessage()


@contextlib.contextmanager
def _quiet_int8():
    logger, drop = logging.getLogger("bitsandbytes.autograd._functions"), _DropInt8Casts()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _quantize(recipe: Recipe, bits: int):
    """The attacked model loaded with `bits`-bit weights; returns (model, its cost)."""
    m = recipe.model
    start = time.time()
    model = load_model(
        m.path,
        dtype=m.dtype,
        device=m.device,
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
        quantize_bits=bits,
        quant_type_4bit=recipe.attack.quantize.bnb_4bit_quant_type,
    )
    return model.eval(), {"attack_seconds": time.time() - start, "steps": 0}


# ----------------------------------------------------------------------------- the command
def _relearn_items(recipe: Recipe, formatter, tokenizer, model, rows: dict) -> tuple[list, set[str] | None]:
    """(the encoded rows a relearning trains on, the forget sample ids among them or None)."""
    r = recipe.attack.relearn
    if recipe.data.benchmark == "muse":  # raw-text chunks, cut with the model's context in mind
        from baldro.data.muse import load_unlearn_texts

        d = recipe.data
        texts = load_unlearn_texts(d.source, d.forget_split, d.retain_split, need_retain=r.split == "retain")
        forget, retain = raw_chunks(recipe, texts, tokenizer, model)
        _check_pick(recipe, len(forget), len(retain) if retain is not None else None)
        pool = retain if r.split == "retain" else forget
        pick = relearn_pick(len(pool), _relearn_count(recipe, len(forget)), recipe.seed)
        return [pool[i] for i in pick], None
    pool = rows["retain"] if r.split == "retain" else rows["forget"]
    pick = relearn_pick(len(pool), _relearn_count(recipe, len(rows["forget"])), recipe.seed)
    chosen = [pool[i] for i in pick]
    items = formatter.encode_many([x["question"] for x in chosen], [x["answer"] for x in chosen], "relearn")
    return items, (None if r.split == "retain" else {str(i) for i in pick})


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _run_name(recipe: Recipe) -> str:
    """`name`, else the unlearned run's name (RUN/run_info.json), else the folder that holds the model."""
    model_dir = Path(recipe.model.path).expanduser()
    info = model_dir.parent / "run_info.json"
    name = _read_json(info).get("name") if info.is_file() else None
    return str(recipe.name or name or model_dir.resolve().parent.name)


def run_attack(cfg) -> Path:
    """`baldro attack RECIPE model.path=UNLEARNED`: every attack of `attack.attacks` on the model,
    evaluated and compared sample by sample with the unlearned model; returns the output folder."""
    from baldro.eval.run import evaluate_logged
    from baldro.eval.summarize import check_same_samples, load_eval_log

    recipe = _with_output_dir(as_recipe(cfg))
    validate(recipe, "attack")
    if launch_world()[0] > 1:
        raise BaldroError("baldro attack runs in one process: start it without accelerate launch")
    settings = eval_settings(recipe)
    a, muse = recipe.attack, recipe.data.benchmark == "muse"
    relearn = "relearn" in a.attacks
    rows: dict = {}
    if relearn and not muse:
        rows["forget"] = read_rows(recipe.data, "forget_split")
        rows["retain"] = read_rows(recipe.data, "retain_split") if a.relearn.split == "retain" else None
        _check_pick(recipe, len(rows["forget"]), len(rows["retain"]) if rows["retain"] is not None else None)
    validate_model(recipe.model, recipe.train if relearn else None)
    reference = (
        load_eval_log(settings["retain_logs_path"], "retain model log") if settings["retain_logs_path"] else None
    )
    folders = attack_folders(recipe)

    with run_folder(recipe, "attack", outputs=ATTACK_OUTPUTS, free_keys=ATTACK_RESUME_FREE_KEYS, checkpoints=False) as (
        run_dir,
        _,
    ):
        done = [f for f in folders if recipe.resume.enabled and (run_dir / f / ATTACK_SUMMARY).is_file()]
        for folder in done:
            log.info("attack: %s is done (resume=true): skipped", run_dir / folder)
        if len(done) == len(folders):
            return run_dir
        model, tokenizer = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
        formatter = build_formatter(recipe.format, recipe.data, tokenizer)
        before_log, before_summary, before_source = _before(recipe, model, tokenizer, formatter, run_dir, settings)
        todo = [f for f in folders if f not in done]
        earlier = _read_json(run_dir / ATTACK_INFO).get("attacks", {}) if recipe.resume.enabled else {}
        info = {
            "model_path": recipe.model.path,
            "name": _run_name(recipe),
            "benchmark": recipe.eval.benchmark,
            "before_eval": before_source,
            "attacks": {k: v for k, v in earlier.items() if k not in todo},
        }
        for folder in todo:
            out = run_dir / folder
            shutil.rmtree(out, ignore_errors=True)  # what an interrupted run of this attack left
            out.mkdir(parents=True)
            trained, headline_scope = None, "all"
            if folder.startswith("relearn"):
                items, trained = _relearn_items(recipe, formatter, tokenizer, model, rows)
                attacked, cost = _relearn(recipe, model, tokenizer, items, out)
                settings_used = {"attack": "relearn", **dataclasses.asdict(a.relearn), "n_samples": len(items)}
                headline_scope = "held_out" if a.relearn.split == "heldout" else "all"
            else:
                bits = int(folder.split("_")[1].removesuffix("bit"))
                attacked, cost = _quantize(recipe, bits)
                settings_used = {
                    "attack": "quantize",
                    "bits": bits,
                    "library": a.quantize.library,
                    **({"bnb_4bit_quant_type": a.quantize.bnb_4bit_quant_type} if bits == 4 else {}),
                }
            with _quiet_int8():
                eval_log, summary, _, eval_seconds, _ = evaluate_logged(
                    attacked, tokenizer, formatter, out, settings, recipe.eval.target_logs_path, recipe.model.path
                )
            del attacked
            try:
                check_same_samples(eval_log, before_log)
            except BaldroError as e:
                raise BaldroError(
                    f"the unlearned model's evaluation {before_source} scored other samples than the "
                    f"attack's ({e}): set attack.before_eval=null to evaluate it here"
                ) from None
            cost["eval_seconds"] = eval_seconds
            result = recovery(
                before_log, eval_log, recipe.eval.benchmark, reference, a.thresholds, trained, headline_scope
            )
            write_json_atomic(
                out / ATTACK_SUMMARY,
                {
                    "name": info["name"],
                    "folder": folder,
                    "benchmark": recipe.eval.benchmark,
                    "seed": recipe.seed,
                    "settings": settings_used,
                    "model_path": recipe.model.path,
                    "before_eval": before_source,
                    **result,
                    "summary": {
                        "before": summary_values(before_summary, recipe.eval.benchmark),
                        "after": summary_values(summary, recipe.eval.benchmark),
                    },
                    "cost": cost,
                },
            )
            info["attacks"][folder] = cost
            write_json_atomic(run_dir / ATTACK_INFO, info)
            print(_one_line(folder, result, cost))
    return run_dir


def _one_line(folder: str, result: dict, cost: dict) -> str:
    """What an attack did, for the terminal."""
    h = result.get("headline")
    came = (
        f"{h['came_back']} of {h['forgotten_before']} forgotten samples came back ({h['metric']}, {h['scope']})"
        if h
        else "no per-sample values to compare"
    )
    return (
        f"baldro attack: {folder}: {came}; attack {cost['attack_seconds']:.1f} s, evaluation "
        f"{cost['eval_seconds']:.1f} s"
    )

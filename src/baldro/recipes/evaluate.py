"""`baldro eval`: a recipe's evaluation settings (the benchmark's evaluator, its batch size, the lm-eval stage)
and the evaluation of a saved model.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from baldro.errors import BaldroError
from baldro.io import RunLock, write_text_atomic
from baldro.recipes.common import (
    BENCHMARKS,
    benchmark_name,
    build_formatter,
    load_model_and_tokenizer,
)
from baldro.recipes.config import as_recipe, dump_config
from baldro.recipes.schema import EvalConfig, Recipe
from baldro.recipes.validation import validate, validate_model

# ----------------------------------------------------------------------------- evaluation
DEFAULT_EVAL_BATCH = 16  # eval.batch_size=null
OPENUNLEARNING_EVAL_BATCH = 32  # eval.batch_size=null with eval.compat=openunlearning (OpenUnlearning's TOFU batch)


def _lm_eval_stage(ev: EvalConfig) -> dict:
    """`eval.lm_eval` as `evaluate_lm_eval` keyword arguments (limit and batch size default to eval's)."""
    s = ev.lm_eval
    return {
        "tasks": list(s.tasks),
        "num_fewshot": s.num_fewshot,
        "limit": s.limit if s.limit is not None else ev.limit,
        "include_path": s.include_path,
        "batch_size": s.batch_size or ev.batch_size or DEFAULT_EVAL_BATCH,
        "apply_chat_template": s.apply_chat_template,
    }


def eval_settings(recipe: Recipe) -> dict:
    """The recipe's `eval` and `data` sections as `evaluate_tofu` / `evaluate_muse` / `evaluate_lm_eval`
    keyword arguments (with "benchmark": "muse" or "lm_eval", which `baldro.eval.run` dispatches on;
    "lm_eval": the extra stage's arguments when eval.lm_eval.tasks are set)."""
    ev: EvalConfig = recipe.eval
    if ev.benchmark not in ("lm_eval", *BENCHMARKS):
        raise BaldroError(f"unknown eval.benchmark {ev.benchmark!r}: use one of tofu, muse, lm_eval")
    if ev.benchmark == "lm_eval":
        return {
            "benchmark": "lm_eval",
            "tasks": list(ev.tasks),
            "num_fewshot": ev.num_fewshot,
            "limit": ev.limit,
            "include_path": ev.include_path,
            "batch_size": ev.batch_size or DEFAULT_EVAL_BATCH,
            "apply_chat_template": ev.apply_chat_template,
        }
    if benchmark_name(recipe.data.benchmark) == "wmdp":
        raise BaldroError(
            f"eval.benchmark={ev.benchmark} cannot evaluate the WMDP corpora: WMDP is evaluated with "
            "lm-eval tasks, eval.benchmark=lm_eval eval.tasks=[wmdp_cyber,mmlu] (configs/unlearn/wmdp.yaml)"
        )
    if ev.benchmark != recipe.data.benchmark:
        raise BaldroError(
            f"eval.benchmark is {ev.benchmark} but data.benchmark is {recipe.data.benchmark}: set both "
            f"to the benchmark of data.source (the configs/*/muse.yaml recipes set muse)"
        )
    stage = {"lm_eval": _lm_eval_stage(ev)} if ev.lm_eval.tasks else {}
    if ev.benchmark == "muse":
        return {
            **stage,
            "benchmark": "muse",
            "data_source": recipe.data.source,
            "retain_logs_path": ev.retain_logs_path,
            "batch_size": ev.batch_size or DEFAULT_EVAL_BATCH,
            "generation_batch_size": ev.generation_batch_size,
            "verbmem_max_new_tokens": ev.verbmem_max_new_tokens,
            "knowmem_max_new_tokens": ev.knowmem_max_new_tokens,
            "max_length": recipe.data.chunk_length,
            "limit": ev.limit,
        }
    return {
        **stage,
        "data_source": recipe.data.source,
        "forget_split": recipe.data.forget_split or "forget10",
        "retain_logs_path": ev.retain_logs_path,
        "batch_size": ev.batch_size
        or (OPENUNLEARNING_EVAL_BATCH if ev.compat == "openunlearning" else DEFAULT_EVAL_BATCH),
        "generation_batch_size": ev.generation_batch_size,
        "max_new_tokens": ev.max_new_tokens,
        "limit": ev.limit,
        "compat": ev.compat,
        "forget_only": ev.forget_only,
    }


def run_eval(cfg: Recipe | DictConfig | dict) -> Path:
    """Evaluate `model.path` on TOFU, MUSE or lm-eval tasks (`eval.benchmark`); writes TOFU_EVAL.json /
    TOFU_SUMMARY.json, MUSE_EVAL.json / MUSE_SUMMARY.json or LMEVAL_EVAL.json / LMEVAL_SUMMARY.json (and
    the lm-eval stage's files beside TOFU's or MUSE's) to `output_dir`."""
    from baldro.eval.run import evaluate_into

    recipe = as_recipe(cfg)
    validate(recipe, "eval")
    kwargs = eval_settings(recipe)
    validate_model(recipe.model)
    out = Path(recipe.output_dir).expanduser()
    training = [n for n in ("train_log.jsonl", "checkpoints", "forget_losses.jsonl") if (out / n).exists()]
    if training:
        raise BaldroError(
            f"output_dir {out} holds a training run ({training[0]}): evaluate into {out / 'eval'} or "
            "another folder, so that its config.yaml stays the run's"
        )
    with RunLock(out, "eval"):
        model, tokenizer = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
        write_text_atomic(out / "config.yaml", dump_config(recipe))
        # lm-eval tasks format their own prompts (eval.apply_chat_template): no formatter
        formatter = (
            None if kwargs.get("benchmark") == "lm_eval" else build_formatter(recipe.format, recipe.data, tokenizer)
        )
        return evaluate_into(
            model, tokenizer, formatter, out, kwargs, recipe.eval.target_logs_path, model_path=recipe.model.path
        )

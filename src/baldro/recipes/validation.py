"""Checks of a typed recipe before any weights load: names, arguments, ranges and combinations, each a
`BaldroError` with one line that names the key and the fix (`validate`, `validate_model`), and the valid values
they check against (`KINDS`, `ATTACKS`, ...).

Over 500 lines for a reason: every check of a recipe, section by section, in one place, so that each key's
range is found beside the others and `baldro show-config` runs the same checks as a run.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from baldro.data.formatting import check_compat
from baldro.errors import BaldroError
from baldro.recipes.schema import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    Recipe,
    TrainConfig,
)

KINDS = ("finetune", "unlearn", "eval", "attack")
METHODS = ("train", "unierase")  # recipe.method of baldro unlearn
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(
    key: str,
    value,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    integer: bool = False,
    hint: str = "",
) -> None:
    """`value` is a finite number (an integer if asked) within [low, high] (low excluded if `low_open`)."""
    if not _is_number(value) or (integer and not float(value).is_integer()):
        raise BaldroError(f"{key}={value!r} is not {'an integer' if integer else 'a number'}{hint}")
    if not math.isfinite(value):
        raise BaldroError(f"{key}={value} must be finite{hint}")
    if low is not None and (value <= low if low_open else value < low):
        raise BaldroError(f"{key}={value} must be {'>' if low_open else '>='} {low:g}{hint}")
    if high is not None and value > high:
        raise BaldroError(f"{key}={value} must be <= {high:g}{hint}")


def _optional_positive_int(key: str, value, hint: str = "") -> None:
    if value is not None:
        _number(key, value, low=1, integer=True, hint=hint or ": use null (no limit) or a count >= 1")


def check_output_dir(output_dir: str | None) -> Path:
    """`output_dir` is set, is (or can become) a folder, and this process can write into it."""
    if not output_dir:
        raise BaldroError("output_dir is not set: give output_dir=PATH")
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise BaldroError(f"output_dir {output_dir} is a file: choose a folder path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BaldroError(
            f"output_dir {output_dir}: {existing} is a file, so the folder cannot be made: choose another path"
        )
    try:  # a real write: permission bits say nothing for root or a read-only file system
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".baldro-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BaldroError(
            f"output_dir {output_dir} is not writable ({e.strerror} in {existing}): choose a folder you can write to"
        ) from None
    return path


def _check_train(t: TrainConfig) -> None:
    _number("train.learning_rate", t.learning_rate, low=0, low_open=True, hint=" (e.g. train.learning_rate=1e-5)")
    _number("train.per_device_train_batch_size", t.per_device_train_batch_size, low=1, integer=True)
    _number("train.gradient_accumulation_steps", t.gradient_accumulation_steps, low=1, integer=True)
    _number("train.max_steps", t.max_steps, integer=True)
    if t.max_steps == 0 or t.max_steps < -1:
        raise BaldroError(
            f"train.max_steps={t.max_steps} trains nothing: use -1 (train.num_train_epochs decides) or "
            "a step count >= 1"
        )
    _number("train.num_train_epochs", t.num_train_epochs)
    if t.max_steps == -1 and t.num_train_epochs < 1:
        raise BaldroError(
            f"train.num_train_epochs={t.num_train_epochs} must be >= 1 (for part of an epoch set train.max_steps >= 1)"
        )
    _number("train.weight_decay", t.weight_decay, low=0)
    _number("train.warmup_steps", t.warmup_steps, low=0, hint=" (a step count, or a fraction of the run below 1)")
    _number("train.max_grad_norm", t.max_grad_norm, low=0, hint=" (0 turns clipping off)")
    _number("train.logging_steps", t.logging_steps, low=0, low_open=True)
    _number("train.save_steps", t.save_steps, low=0, low_open=True)
    _optional_positive_int("train.save_total_limit", t.save_total_limit, ": use null (keep all) or a count >= 1")
    _number("train.dataloader_num_workers", t.dataloader_num_workers, low=0, integer=True)
    strategy = "no" if str(t.save_strategy).lower() == "false" else str(t.save_strategy)
    if strategy not in SAVE_STRATEGIES:
        raise BaldroError(f"train.save_strategy={t.save_strategy!r} is not one of {list(SAVE_STRATEGIES)}")


def _check_lora(lora, key: str = "model.lora") -> None:
    if lora is None:
        return
    if not isinstance(lora, dict):
        raise BaldroError(f"{key} must be a mapping of LoraConfig fields (r, lora_alpha, ...) or null, got {lora!r}")
    import dataclasses

    from peft import LoraConfig

    fields = sorted(f.name for f in dataclasses.fields(LoraConfig))
    for name in lora:
        if name not in fields:
            import difflib

            close = difflib.get_close_matches(str(name), fields, n=1, cutoff=0.6)
            raise BaldroError(
                f"{key}.{name} is not a LoraConfig field" + (f": did you mean {key}.{close[0]}?" if close else "")
            )
    if "r" in lora:
        _number(f"{key}.r", lora["r"], low=1, integer=True, hint=" (the adapter rank, e.g. 8)")
    if "lora_alpha" in lora:
        _number(f"{key}.lora_alpha", lora["lora_alpha"], low=0, low_open=True)
    if "lora_dropout" in lora:
        _number(f"{key}.lora_dropout", lora["lora_dropout"], low=0, high=1)
        if lora["lora_dropout"] >= 1:
            raise BaldroError(f"{key}.lora_dropout={lora['lora_dropout']} must be < 1")


def _check_model(m: ModelConfig) -> None:
    from baldro.models.loading import check_device, check_model_source

    if str(m.dtype) not in DTYPES:
        raise BaldroError(f"model.dtype={m.dtype!r} is not one of {list(DTYPES)}")
    _check_lora(m.lora)
    check_device(m.device)
    check_model_source(m.path, m.tokenizer)


def _check_data(d: DataConfig, kind: str, needs_refusal: bool = False) -> None:
    _number("data.max_length", d.max_length, low=1, integer=True)
    _optional_positive_int("data.limit", d.limit)
    source = Path(str(d.source)).expanduser()
    if str(d.source).startswith((".", "/", "~")) or source.exists():
        if not source.exists():
            what = {"muse": "MUSE", "wmdp": "WMDP-corpora"}.get(getattr(d, "benchmark", "tofu"), "TOFU")
            raise BaldroError(f"data folder {d.source} does not exist: set data.source to a {what} folder or a hub id")
        if not source.is_dir():
            raise BaldroError(
                f"data.source {d.source} is a file: set data.source to the folder that holds the split files"
            )
    needed = {
        "finetune": ("train_split",),
        "unlearn": ("forget_split", "retain_split"),
        "eval": ("forget_split",),
        "attack": ("forget_split",),
    }
    for key in needed[kind] if getattr(d, "benchmark", "tofu") == "tofu" else ():  # MUSE checks its own files
        if not getattr(d, key):
            raise BaldroError(f"data.{key} is not set: name a split (e.g. data.{key}=...) or pick one with split=...")
    if needs_refusal and d.refusal_file and not Path(d.refusal_file).expanduser().is_file():
        raise BaldroError(
            f"data.refusal_file {d.refusal_file} is not a file: set data.refusal_file to the refusal "
            "answers (one per line)"
        )


def _check_unlearning(recipe: Recipe) -> bool:
    """Objective, weighting and their arguments; returns whether the objective needs refusal answers."""
    from baldro.train.objectives import get_objective, get_retain_loss
    from baldro.train.weighting import make_weighting

    o, w = recipe.objective, recipe.weighting
    objective = get_objective(o.name)
    args = dict(o.args)
    objective.check_args(args)
    for key, value in args.items():
        _number(f"objective.args.{key}", value)
        if key == "beta" or key.startswith("beta"):
            _number(f"objective.args.{key}", value, low=0, low_open=key == "beta")
        if key == "steering_coeff":
            _number(f"objective.args.{key}", value, low=0, low_open=True, hint=" (RMU's target norm, e.g. 2)")
        if key == "ignore_first_n_answer_tokens":
            _number(f"objective.args.{key}", value, low=0, integer=True)
    get_retain_loss(o.retain_loss)
    _number("objective.gamma", o.gamma, low=0, hint=" (the forget-loss weight)")
    _number("objective.alpha", o.alpha, low=0, hint=" (the retain-loss weight)")
    _number("objective.dv_sigma", o.dv_sigma, low=0, low_open=True, hint=" (the DV temperature, in loss units)")
    if o.trainable_params_regex is not None and recipe.model.lora is not None:
        raise BaldroError(
            "objective.trainable_params_regex and model.lora exclude each other (LoRA trains its "
            "adapter): set one of them to null"
        )
    if o.primal_dual:
        if o.retain_loss_eps is None:
            raise BaldroError(
                f"objective.primal_dual=true ({o.name}) needs objective.retain_loss_eps, the retain loss "
                "to stay under (e.g. the target model's retain loss): set it"
            )
        _number("objective.retain_loss_eps", o.retain_loss_eps)
        _number("objective.dual_step_size", o.dual_step_size, low=0)
        _number("objective.dual_warmup_epochs", o.dual_warmup_epochs, low=0)
        if o.dual_update_upon not in ("step", "epoch"):
            raise BaldroError(f"objective.dual_update_upon={o.dual_update_upon!r} must be step or epoch")
        if o.alpha != 0 and recipe.data.benchmark == "tofu" and not recipe.data.retain_split:
            raise BaldroError("objective.primal_dual=true needs a retain set: set data.retain_split")
    if objective.needs.alternate:
        a = o.alternates
        if a.file is not None:
            if not Path(a.file).expanduser().is_file():
                raise BaldroError(
                    f"objective.alternates.file {a.file} is not a file: give a JSON-lines file of "
                    "alternate answers, or null to generate them"
                )
        else:
            _number("objective.alternates.n", a.n, low=1, integer=True, hint=" (alternates per question)")
            _number(
                "objective.alternates.max_new_tokens",
                a.max_new_tokens,
                low=1,
                integer=True,
                hint=f" ({o.name} generates its alternate answers: give it a token budget)",
            )
            _number("objective.alternates.temperature", a.temperature, low=0, low_open=True)
            _number("objective.alternates.batch_size", a.batch_size, low=1, integer=True)
    wargs = dict(w.args)
    for key in ("sigma", "ratio"):
        if key in wargs and _is_number(wargs[key]) and not math.isfinite(wargs[key]):
            raise BaldroError(
                f"weighting {key} must be finite, got {wargs[key]}: set weighting.args.{key} to a "
                f"{'positive number' if key == 'sigma' else 'fraction in (0, 1]'}"
            )
        if key in wargs and not _is_number(wargs[key]):
            raise BaldroError(f"weighting.args.{key}={wargs[key]!r} is not a number")
    make_weighting(w.name, n_samples=1, **weighting_args(recipe))
    return objective.needs_refusal


def _check_unierase(recipe: Recipe) -> None:
    """`method: unierase`: the `unierase` section's ranges, and what the edit cannot work with."""
    u = recipe.unierase
    if not isinstance(u.token, str) or not u.token.strip():
        raise BaldroError(f"unierase.token={u.token!r} must be a non-empty string (e.g. <unlearn_0>)")
    _number("unierase.token_epochs", u.token_epochs, low=1, integer=True)
    _number("unierase.token_learning_rate", u.token_learning_rate, low=0, low_open=True)
    _number("unierase.token_batch_size", u.token_batch_size, low=1, integer=True)
    if not u.layers:
        raise BaldroError("unierase.layers is empty: name the MLP layers to edit, e.g. [4, 5, 6, 7, 8]")
    for layer in u.layers:
        _number("unierase.layers", layer, low=0, integer=True, hint=": decoder layer indices from 0")
    if len(set(u.layers)) != len(u.layers):
        raise BaldroError(f"unierase.layers {list(u.layers)} names a layer twice: list each once")
    _number("unierase.nullspace_threshold", u.nullspace_threshold, low=0, low_open=True)
    _number("unierase.l2", u.l2, low=0, low_open=True, hint=" (the closed form's ridge term)")
    _number("unierase.target_steps", u.target_steps, low=1, integer=True)
    _number("unierase.target_learning_rate", u.target_learning_rate, low=0, low_open=True)
    _number("unierase.target_weight_decay", u.target_weight_decay, low=0)
    _number("unierase.clamp_norm_factor", u.clamp_norm_factor, low=0, low_open=True)
    _number("unierase.stats_batch_size", u.stats_batch_size, low=1, integer=True)
    if recipe.model.lora is not None:
        raise BaldroError("method=unierase edits the model's own weights, not a LoRA adapter: set model.lora=null")
    if recipe.data.benchmark != "tofu":
        raise BaldroError(
            f"method=unierase edits question -> token associations and data.benchmark is {recipe.data.benchmark}: "
            "use TOFU-style QA data (data.benchmark=tofu)"
        )
    if not recipe.data.retain_split:
        raise BaldroError("method=unierase preserves the retain set's keys: set data.retain_split")


def weighting_args(recipe: Recipe) -> dict:
    """`weighting.args`, with `objective.dv_sigma` as the sigma of a weighting that takes one and was given none."""
    import inspect

    from baldro.train.weighting import WEIGHTINGS

    args = dict(recipe.weighting.args)
    cls = WEIGHTINGS.get(recipe.weighting.name)
    if cls is not None and "sigma" in inspect.signature(cls.__init__).parameters and "sigma" not in args:
        args["sigma"] = recipe.objective.dv_sigma
    return args


EVAL_BENCHMARKS = ("tofu", "muse", "lm_eval")


def _check_lm_eval(prefix: str, tasks, num_fewshot, limit, include_path, batch_size) -> None:
    """lm-evaluation-harness options: installed, counts, the task folder, every task name known to it
    (its task index is built here, once per process, and reused by the evaluation)."""
    from baldro.eval.lm_eval import check_include_path, require_lm_eval, resolve_tasks

    require_lm_eval()
    if num_fewshot is not None:
        _number(f"{prefix}.num_fewshot", num_fewshot, low=0, integer=True, hint=" (null: each task's default)")
    _optional_positive_int(f"{prefix}.limit", limit)
    _optional_positive_int(f"{prefix}.batch_size", batch_size, hint=": use null (the default) or a count >= 1")
    path = check_include_path(include_path, f"{prefix}.include_path")
    resolve_tasks(list(tasks), path, f"{prefix}.tasks")


EVAL_STRATEGIES = ("no", "steps", "epoch")


def strategy(value) -> str:
    """A `*_strategy` value as transformers reads it (YAML 1.1 reads `no` as false)."""
    return "no" if str(value).lower() == "false" else str(value)


def _check_eval_during_training(recipe: Recipe, kind: str) -> bool:
    """train.eval_strategy and what goes with it; returns whether the run evaluates during training."""
    t, e = recipe.train, recipe.eval
    how = strategy(t.eval_strategy)
    if how not in EVAL_STRATEGIES:
        raise BaldroError(f"train.eval_strategy={t.eval_strategy!r} is not one of {list(EVAL_STRATEGIES)}")
    on = how != "no"
    if on and e.benchmark not in ("tofu", "muse"):
        raise BaldroError(
            f"train.eval_strategy={how} runs the TOFU or MUSE evaluator during unlearning, not "
            f"eval.benchmark={e.benchmark}: set train.eval_strategy=no (eval.at_end evaluates the final "
            "model; eval.lm_eval.tasks adds lm-eval tasks to a TOFU or MUSE evaluation)"
        )
    if on and kind != "unlearn":
        raise BaldroError(
            f"train.eval_strategy={how} evaluates during unlearning runs only: set "
            "train.eval_strategy=no (evaluate a fine-tuned model with baldro eval)"
        )
    if t.eval_steps is not None:
        steps = int(t.eval_steps) if _is_number(t.eval_steps) and float(t.eval_steps).is_integer() else t.eval_steps
        if how != "steps":
            raise BaldroError(f"train.eval_steps={steps} needs train.eval_strategy=steps (it is {how})")
        hint = " (a step count >= 1, or a fraction of the run in (0, 1))"
        _number("train.eval_steps", steps, low=0, low_open=True, hint=hint)
        if t.eval_steps >= 1 and not float(t.eval_steps).is_integer():
            raise BaldroError(f"train.eval_steps={t.eval_steps} is not an integer{hint}")
        if t.eval_steps >= 1 and t.max_steps > 0 and t.eval_steps > t.max_steps:
            raise BaldroError(
                f"train.eval_steps={t.eval_steps:g} is beyond the run (train.max_steps={t.max_steps}): "
                "use a count <= train.max_steps or a fraction of the run"
            )
    elif how == "steps":
        raise BaldroError(
            "train.eval_strategy=steps needs train.eval_steps (a step count, or a fraction of the run "
            "below 1, e.g. train.eval_steps=0.1)"
        )
    metric = t.metric_for_best_model
    for key, value in (
        ("train.metric_for_best_model", metric),
        ("eval.utility_floor", e.utility_floor),
        ("train.early_stopping_patience", t.early_stopping_patience),
    ):
        if value is not None and not on:
            raise BaldroError(
                f"{key}={value} needs evaluations during training: set train.eval_strategy=epoch "
                "(or steps with train.eval_steps)"
            )
    if t.load_best_model_at_end and not metric:
        raise BaldroError(
            "train.load_best_model_at_end=true needs train.metric_for_best_model (e.g. forget_quality): set it"
        )
    if t.early_stopping_patience is not None:
        _number(
            "train.early_stopping_patience",
            t.early_stopping_patience,
            low=1,
            integer=True,
            hint=" (evaluations without a better metric)",
        )
        if not metric:
            raise BaldroError(
                "train.early_stopping_patience needs train.metric_for_best_model (e.g. forget_quality): set it"
            )
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise BaldroError(f"train.metric_for_best_model={metric!r} must name a summary key (e.g. forget_quality)")
    if metric == "forget_quality" and e.benchmark == "tofu" and not e.retain_logs_path:
        raise BaldroError(
            "train.metric_for_best_model=forget_quality needs the retain model's eval log: set "
            "eval.retain_logs_path (forget quality is a test against it)"
        )
    return on


def _check_eval(e: EvalConfig, kind: str, during_training: bool = False) -> None:
    if e.benchmark not in EVAL_BENCHMARKS:
        raise BaldroError(f"eval.benchmark={e.benchmark!r} is not supported: use tofu, muse or lm_eval")
    _optional_positive_int("eval.batch_size", e.batch_size, hint=": use null (the default) or a count >= 1")
    _optional_positive_int(
        "eval.generation_batch_size",
        e.generation_batch_size,
        hint=": use null (the default, 3 x eval.batch_size) or a count >= 1",
    )
    check_compat(e.compat)
    if e.compat != "none" and e.benchmark != "tofu":
        raise BaldroError(
            f"eval.compat={e.compat} is only implemented for TOFU: set eval.compat=none for "
            f"eval.benchmark={e.benchmark}"
        )
    if e.forget_only and e.benchmark != "tofu":
        raise BaldroError(
            f"eval.forget_only is only implemented for TOFU: set eval.forget_only=false for eval.benchmark={e.benchmark}"
        )
    if e.forget_only and e.utility_floor is not None:
        raise BaldroError(
            "eval.utility_floor needs model utility, which eval.forget_only does not compute: drop one of them"
        )
    _number("eval.max_new_tokens", e.max_new_tokens, low=1, integer=True)
    _optional_positive_int("eval.limit", e.limit)
    _optional_positive_int(
        "eval.trajectory_limit", e.trajectory_limit, hint=": use null (every row, or eval.limit) or a count >= 1"
    )
    _optional_positive_int(
        "eval.trajectory_max_new_tokens",
        e.trajectory_max_new_tokens,
        hint=": use null (eval.max_new_tokens) or a count >= 1",
    )
    if e.utility_floor is not None:
        _number(
            "eval.utility_floor",
            e.utility_floor,
            low=0,
            high=1,
            hint=" (a fraction of the first evaluation's utility, in [0, 1], e.g. 0.9)",
        )
    evaluates = kind in ("eval", "attack") or e.at_end or during_training
    if e.benchmark == "lm_eval":
        if e.lm_eval.tasks:
            raise BaldroError(
                "eval.lm_eval.tasks is the extra stage of a TOFU or MUSE evaluation: with "
                "eval.benchmark=lm_eval list every task in eval.tasks"
            )
        if evaluates:
            if not e.tasks:
                raise BaldroError(
                    "eval.tasks is empty: name the lm-eval tasks to run, e.g. eval.tasks=[wmdp_cyber,mmlu]"
                )
            _check_lm_eval("eval", e.tasks, e.num_fewshot, None, e.include_path, None)
    elif e.tasks:
        raise BaldroError(
            f"eval.tasks runs lm-eval tasks with eval.benchmark=lm_eval; beside {e.benchmark} they go "
            f"in eval.lm_eval.tasks (an extra stage)"
        )
    elif e.lm_eval.tasks and evaluates:
        s = e.lm_eval
        _check_lm_eval("eval.lm_eval", s.tasks, s.num_fewshot, s.limit, s.include_path, s.batch_size)
    for key in ("retain_logs_path", "target_logs_path"):
        path = getattr(e, key)
        if evaluates and path and not Path(path).expanduser().exists():
            raise BaldroError(
                f"eval.{key} {path} does not exist: give the reference model's TOFU_EVAL.json (or "
                f"leave eval.{key} unset)"
            )


ATTACKS = ("relearn", "quantize")
RELEARN_SPLITS = ("half", "heldout", "retain")


def _one_of(key: str, value, choices: tuple) -> None:
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        raise BaldroError(
            f"{key}={value!r} is not one of {', '.join(map(str, choices))}"
            + (f": did you mean {close[0]}?" if close else "")
        )


def _check_attack(recipe: Recipe) -> None:
    """The `attack` section: attack names, the relearning split and its training, the bit widths and the
    quantization library (installed), the thresholds and the before-evaluation file."""
    from baldro.eval.recovery import metric_names
    from baldro.models.loading import QUANTIZE_BITS, check_quantization_library

    a = recipe.attack
    if not a.attacks:
        raise BaldroError(f"attack.attacks is empty: name at least one of {', '.join(ATTACKS)}")
    for name in a.attacks:
        _one_of("attack.attacks", name, ATTACKS)
    if len(set(a.attacks)) != len(a.attacks):
        raise BaldroError(f"attack.attacks={list(a.attacks)} names an attack twice: name each once")
    if recipe.model.lora is not None:
        raise BaldroError(
            "model.lora adds a new adapter to the attacked model: set model.lora=null (to relearn "
            "with LoRA, set attack.relearn.lora)"
        )
    if "relearn" in a.attacks:
        r = a.relearn
        _one_of("attack.relearn.split", r.split, RELEARN_SPLITS)
        if r.split == "heldout" and recipe.data.benchmark == "muse":
            raise BaldroError(
                "attack.relearn.split=heldout scores the forget samples it did not train on, but MUSE's "
                "evaluation sets are not its training chunks: use half or retain on MUSE"
            )
        if r.split == "retain" and recipe.data.benchmark == "tofu" and not recipe.data.retain_split:
            raise BaldroError(
                "attack.relearn.split=retain trains on retain rows: set data.retain_split (or pick a "
                "split group, e.g. split=forget10)"
            )
        _optional_positive_int(
            "attack.relearn.n_samples", r.n_samples, ": use null (half the forget set) or a count >= 1"
        )
        _number("attack.relearn.steps", r.steps, low=1, integer=True, hint=" (optimizer steps)")
        _number("attack.relearn.learning_rate", r.learning_rate, low=0, low_open=True)
        _number("attack.relearn.batch_size", r.batch_size, low=1, integer=True)
        _check_lora(r.lora, "attack.relearn.lora")
        _check_train(recipe.train)
    if "quantize" in a.attacks:
        q = a.quantize
        if not q.bits:
            raise BaldroError("attack.quantize.bits is empty: use [8], [4] or [8, 4]")
        for bits in q.bits:
            if bits not in QUANTIZE_BITS:
                raise BaldroError(
                    f"attack.quantize.bits={bits} is not supported: use "
                    f"{' or '.join(map(str, QUANTIZE_BITS))} (e.g. attack.quantize.bits=[4])"
                )
        if len(set(q.bits)) != len(q.bits):
            raise BaldroError(f"attack.quantize.bits={list(q.bits)} names a bit width twice")
        _one_of("attack.quantize.bnb_4bit_quant_type", q.bnb_4bit_quant_type, ("fp4", "nf4"))
        check_quantization_library(q.library)
    names = metric_names(recipe.data.benchmark)
    for key, value in a.thresholds.items():
        if key not in names:
            raise BaldroError(
                f"attack.thresholds.{key}: {recipe.data.benchmark.upper()} has no per-sample metric "
                f"{key!r}: use {', '.join(names)}"
            )
        _number(f"attack.thresholds.{key}", value)
    if a.before_eval is not None and not Path(a.before_eval).expanduser().exists():
        raise BaldroError(
            f"attack.before_eval {a.before_eval} does not exist: give the unlearned model's eval folder "
            "or its TOFU_EVAL.json / MUSE_EVAL.json, or null to evaluate it here"
        )


def validate(recipe: Recipe, kind: str) -> None:
    """Check a typed recipe for a `kind` of run before anything heavy happens: ranges, names and
    arguments, the output folder and the resume checkpoint. The recipes then read the data files
    (errors name the file's line) and call `validate_model` before any weights load."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    _number("seed", recipe.seed, low=0, high=2**32 - 1, integer=True)
    if recipe.log_format not in ("text", "json"):
        raise BaldroError(f"log_format={recipe.log_format!r} is not a log format: use text or json")
    check_output_dir(recipe.output_dir)
    r = recipe.resume
    if kind != "eval":
        if r.checkpoint and kind == "attack":
            raise BaldroError(
                f"resume={r.checkpoint}: an attack has no checkpoints; resume=true reruns only the "
                "attacks whose attack_summary.json is missing"
            )
        if r.checkpoint:
            ckpt = Path(r.checkpoint).expanduser()
            if not ckpt.is_dir():
                raise BaldroError(
                    f"resume={r.checkpoint}: no such checkpoint folder: give RUN/checkpoints/checkpoint-N "
                    "or resume=true (the newest complete one)"
                )
        if recipe.overwrite and (r.enabled or r.checkpoint):
            raise BaldroError("overwrite=true and resume exclude each other: drop one")
        if kind != "attack":
            _check_train(recipe.train)
        b = recipe.balance
        _number("balance.every_n_steps", b.every_n_steps, low=0, integer=True, hint=" (0: off)")
        _number("balance.batch_size", b.batch_size, low=1, integer=True)
    if "{question}" not in recipe.format.prompt_template:
        raise BaldroError(f"format.prompt_template must contain '{{question}}', got {recipe.format.prompt_template!r}")
    if recipe.method not in METHODS:
        raise BaldroError(f"method={recipe.method!r} is not a method: use one of {', '.join(METHODS)}")
    if recipe.method == "unierase" and kind != "unlearn":
        raise BaldroError(f"method=unierase is a way to unlearn: run it with baldro unlearn, not baldro {kind}")
    needs_refusal = _check_unlearning(recipe) if kind == "unlearn" else False
    if kind == "unlearn" and recipe.method == "unierase":
        _check_unierase(recipe)
        needs_refusal = True
    during_training = _check_eval_during_training(recipe, kind) if kind != "eval" else False
    _check_eval(recipe.eval, kind, during_training)
    if kind == "attack":
        _check_attack(recipe)
        if recipe.eval.benchmark == "lm_eval":
            raise BaldroError(
                "baldro attack compares TOFU or MUSE evaluations sample by sample: set eval.benchmark to "
                "tofu or muse (eval.lm_eval.tasks adds lm-eval tasks to each evaluation)"
            )
    if kind == "eval" and recipe.eval.benchmark == "lm_eval":
        return  # the harness's tasks bring their own data
    if kind in ("eval", "attack") and recipe.eval.benchmark != recipe.data.benchmark:
        raise BaldroError(
            f"eval.benchmark is {recipe.eval.benchmark} but data.benchmark is {recipe.data.benchmark}: "
            "set both to the benchmark of data.source"
        )
    _check_data(recipe.data, kind, needs_refusal)


def validate_model(m: ModelConfig, train: TrainConfig | None = None) -> None:
    """The `model` section (dtype, LoRA fields, the device, a local model folder's files) and the
    hardware a training run asks for (`train.bf16` / `train.fp16` need a GPU unless `train.use_cpu`)."""
    _check_model(m)
    if train is not None and (train.bf16 or train.fp16) and not train.use_cpu:
        import torch

        if not torch.cuda.is_available():
            flag = "train.bf16" if train.bf16 else "train.fp16"
            raise BaldroError(
                f"{flag}=true needs a GPU and this machine has none: set {flag}=false (and "
                "train.use_cpu=true to train on the CPU)"
            )

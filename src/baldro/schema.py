"""The recipe schema: every key a recipe may hold, its type and its one default.

`baldro.config.load_config` merges YAML recipes, config groups and command-line overrides onto
`Recipe`, so an unknown key or a value of the wrong type is an error, not a silent default.
`baldro show-config RECIPE [overrides]` prints the result. Sections map to the code that reads them:
`model` -> `baldro.models`, `data` -> `baldro.data.tofu` / `baldro.data.muse` / `baldro.data.wmdp`,
`format` -> `QAFormatter`, `train` -> `transformers.TrainingArguments`, `objective` / `weighting` ->
`baldro.objectives` / `baldro.weighting`, `balance` -> `BalanceTracker`, `eval` -> `baldro.eval` (the
lm-evaluation-harness options -> `baldro.eval.lm_eval`), `attack` -> `baldro.attack`.

`validate(recipe, kind)` checks what the types cannot (ranges, names, files, the device) before a run
loads any weights; every failure is one `BaldroError` line naming the key or file and the fix.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from baldro.data.formatting import DATE_STRING, PLAIN_PROMPT, check_compat
from baldro.errors import BaldroError


@dataclass
class ModelConfig:
    path: Optional[str] = None  # hub id, folder, .gguf file or package:NAME; recipes set it from base / tofu_target
    base: Optional[str] = None  # the model group's pretrained model
    tofu_target: Optional[str] = None  # the model group's published TOFU target model, if any
    tokenizer: Optional[str] = None  # default: path
    dtype: str = "auto"  # auto (bf16 on a GPU that has it, else fp32), float32, bfloat16, float16
    device: Optional[str] = None  # None/auto: cuda if available; cpu; accelerate (left to accelerate)
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False
    lora: Optional[Dict[str, Any]] = None  # peft LoraConfig fields (r, lora_alpha, ...); None = full fine-tuning
    gradient_checkpointing: bool = False
    merge_lora: bool = True  # save the merged model after LoRA training
    # CPU: treat subnormal floats (< 1.2e-38) as zero. x86 cores compute with them ~30x slower, and
    # saturated forget losses reach them: SatImp's p^5 token weights made a SmolLM2 step 3x slower.
    flush_denormal: bool = True


@dataclass
class DataConfig:
    # tofu: QA pairs; muse: raw text cut into chunks (splits name raw/ corpora); wmdp: raw text of the WMDP
    # corpora (splits name {cyber,bio}-{forget,retain}-corpus JSON-lines files), cut into chunks
    benchmark: str = "tofu"
    source: str = "locuslab/TOFU"  # a TOFU, MUSE or WMDP-corpora folder (shared/data/...) or a hub dataset id
    forget_split: Optional[str] = None
    retain_split: Optional[str] = None
    holdout_split: Optional[str] = None
    train_split: Optional[str] = None  # fine-tuning
    extra_train_splits: List[str] = field(default_factory=list)
    max_length: int = 512
    chunk_length: int = 2048  # muse: tokens per raw-text chunk (unlearning) and per privleak text (MIA)
    limit: Optional[int] = None  # only the first N rows (muse: chunks) of every split (quick runs)
    refusal_file: Optional[str] = None  # idk/dpo refusal answers; default <source>/idontknow.jsonl


@dataclass
class FormatConfig:
    use_chat_template: Optional[bool] = None  # None: when the tokenizer has one
    system_prompt: Optional[str] = None
    prompt_template: str = PLAIN_PROMPT  # without a chat template; must contain {question}
    answer_suffix: str = ""
    date_string: str = DATE_STRING  # for chat templates that print a date (Llama-3)


@dataclass
class TrainConfig:
    """`transformers.TrainingArguments` fields; any other field of it goes under `extra`."""

    learning_rate: float = 1e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.0  # a count, or a fraction of the run when below 1
    optim: str = "adamw_torch_fused"  # fused AdamW kernels (CPU and CUDA in torch >= 2.4)
    max_grad_norm: float = 1.0
    logging_steps: float = 1
    save_strategy: str = "no"  # no, epoch, steps: checkpoints make resume possible
    save_steps: float = 500
    save_total_limit: Optional[int] = None
    bf16: bool = False
    fp16: bool = False
    use_cpu: bool = False
    disable_tqdm: bool = False
    dataloader_num_workers: int = 0
    report_to: str = "none"
    # Evaluation during unlearning (transformers' names; baldro runs the benchmark's evaluator itself, on the
    # model in memory, on the main process; not the Trainer's `evaluate`): README "Evaluation during unlearning"
    eval_strategy: str = "no"  # no, steps or epoch (each also evaluates at step 0, the starting model)
    eval_steps: Optional[float] = None  # steps: every N optimizer steps or a fraction of the run below 1 (+ the last)
    metric_for_best_model: Optional[str] = None  # a summary key (forget_quality, ...): the best evaluation's
    greater_is_better: Optional[bool] = None  # null: lower is better for forget_*_Prob / _ROUGE and memorisation
    load_best_model_at_end: bool = False  # save the best evaluation's model, not the last step's (RUN/best keeps it)
    early_stopping_patience: Optional[int] = None  # stop after N evaluations with no better metric, or below the floor
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AlternatesConfig:
    """AltPO's alternate answers: generated once by the model before unlearning into RUN_DIR/alternates.jsonl
    (reused when present), or read from `file`."""

    n: int = 5  # alternates per forget question (one is drawn per epoch, from (seed, epoch, sample))
    max_new_tokens: int = 200
    temperature: float = 1.0  # sampled, as OpenUnlearning's AltPO generator
    batch_size: int = 16
    file: Optional[str] = None  # JSON lines with question and alternates (a list) or alternate (one per line)


@dataclass
class ObjectiveConfig:
    name: str = "npo"
    args: Dict[str, Any] = field(default_factory=dict)  # the objective's keyword arguments (beta, ...)
    retain_loss: str = "nll"  # nll, kl or embed_diff (hidden states of module_regex's module vs the reference's)
    gamma: float = 1.0  # forget-loss weight
    alpha: float = 1.0  # retain-loss weight (with primal_dual: the dual variable's start)
    ref_cache: bool = True  # reuse each forget sample's reference log-prob after its first batch
    # the module whose output rmu and embed_diff read; null: model.layers.K at OpenUnlearning's relative depth (7 of 32)
    module_regex: Optional[str] = None
    trainable_params_regex: Optional[List[str]] = None  # train only parameters whose names match one; null: all
    # the DV temperature in this objective's loss units: dv, dv_softmin and dv_global use it unless
    # weighting.args.sigma is set (sigma must be of the order of the per-sample loss range)
    dv_sigma: float = 2.0
    # PDU's primal-dual retain constraint R <= retain_loss_eps (SPEC 2b), for any objective
    primal_dual: bool = False
    retain_loss_eps: Optional[float] = None  # required with primal_dual (e.g. the target model's retain loss)
    dual_step_size: float = 1.0
    dual_update_upon: str = "step"  # step or epoch
    dual_warmup_epochs: float = 0
    alternates: AlternatesConfig = field(default_factory=AlternatesConfig)  # altpo


@dataclass
class WeightingConfig:
    name: str = "mean"
    args: Dict[str, Any] = field(default_factory=dict)  # the weighting's keyword arguments (sigma, ratio, ...)


@dataclass
class BalanceConfig:
    every_n_steps: int = 0  # > 0: score every forget sample every N optimizer steps (balance.jsonl)
    batch_size: int = 16


@dataclass
class LmEvalConfig:
    """The lm-evaluation-harness stage of a TOFU or MUSE evaluation: its tasks on the same model, into
    the same folder (LMEVAL_EVAL.json, LMEVAL_SUMMARY.json). The harness's names for its options."""

    tasks: List[str] = field(default_factory=list)  # harness tasks, groups, tags or globs; empty: no stage
    num_fewshot: Optional[int] = None  # null: each task's default
    limit: Optional[int] = None  # null: eval.limit (documents per task)
    include_path: Optional[str] = None  # a folder of the user's own task YAML files
    batch_size: Optional[int] = None  # null: eval.batch_size, else 16
    apply_chat_template: bool = False


@dataclass
class EvalConfig:
    # tofu, muse, or lm_eval (eval.tasks of lm-evaluation-harness; needs `pip install 'baldro[lm-eval]'`)
    benchmark: str = "tofu"
    at_end: bool = False  # unlearning runs: evaluate the final model into RUN_DIR/eval
    # evaluations during unlearning (train.eval_strategy): into RUN_DIR/evals/step-N and RUN_DIR/eval_trajectory.jsonl
    trajectory_limit: Optional[int] = 20  # only the first N rows of every set (at most eval.limit; null: all)
    trajectory_max_new_tokens: Optional[int] = None  # null: eval.max_new_tokens (MUSE: caps both of its budgets)
    # in [0, 1]: an evaluation whose utility (TOFU model_utility, MUSE retain_knowmem_ROUGE) is below this
    # fraction of the first evaluation's (step 0) is never the best; early stopping stops there
    utility_floor: Optional[float] = None
    retain_logs_path: Optional[str] = None  # the retain model's TOFU_EVAL.json (muse: the retrained model's MUSE_EVAL.json)
    target_logs_path: Optional[str] = None  # the target model's TOFU_EVAL.json: the over-forgotten criterion
    batch_size: Optional[int] = None  # null: 16, or OpenUnlearning's 32 with compat=openunlearning
    # rows decoded at once by continuous batching; null: 3 x batch_size (a decoding pass reads every weight
    # for one token per row, so more rows make it cheaper per token; ignored by compat=openunlearning)
    generation_batch_size: Optional[int] = None
    max_new_tokens: int = 200  # tofu
    verbmem_max_new_tokens: int = 128  # muse VerbMem continuations
    knowmem_max_new_tokens: int = 32  # muse KnowMem answers
    limit: Optional[int] = None  # only the first N rows of every set
    # none: baldro's evaluator; openunlearning: reproduce OpenUnlearning's TOFU evaluator, quirks included
    # (attention mask from the pad id, its positions, padding sides, batches in dataset order; docs/guides/openunlearning.md)
    compat: str = "none"
    # benchmark=lm_eval: the harness's tasks and options (eval.limit: documents per task; eval.batch_size: 16 if null)
    tasks: List[str] = field(default_factory=list)  # e.g. [wmdp_cyber, mmlu]; groups, tags and globs too
    num_fewshot: Optional[int] = None  # null: each task's default
    include_path: Optional[str] = None  # a folder of the user's own task YAML files (local JSON data)
    apply_chat_template: bool = False  # prompts through the chat template (few-shot as a multi-turn chat)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)  # tofu / muse: harness tasks as an extra stage


@dataclass
class RelearnConfig:
    """`attack.relearn`: fine-tune a copy of the attacked model with the model's own answer NLL (the
    recipe's `train` section, with the rate, steps and batch size below) on part of the forget set.
    Defaults: TOFU's fine-tuning rate 1e-5 (Maini et al. 2024, the recipe that taught the model the forget
    set), on a seeded half of the forget set as in the relearning attacks of Hu et al. (ICLR 2025,
    "Unlearning or Obfuscating? Jogging the Memory of Unlearned LLMs via Benign Relearning"); `heldout`
    scores the half not trained on, as Deeb & Roger (2025, "Do Unlearning Methods Remove Information from
    Language Model Weights?") do."""

    # half: a seeded half of the forget set, verdict on every forget sample; heldout: the same half, verdict
    # on the other half (TOFU); retain: as many rows of data.retain_split and no forget row (the control)
    split: str = "half"
    n_samples: Optional[int] = None  # rows trained on; null: half the forget set (MUSE: half its chunks)
    steps: int = 20  # optimizer steps
    learning_rate: float = 1e-5
    batch_size: int = 8
    lora: Optional[Dict[str, Any]] = None  # peft LoraConfig fields: relearn a LoRA adapter; null: every weight


@dataclass
class QuantizeConfig:
    """`attack.quantize`: load the attacked model with 8-bit or 4-bit weights (Zhang et al., ICLR 2025,
    "Catastrophic Failure of LLM Unlearning via Quantization") through transformers' BitsAndBytesConfig."""

    bits: List[int] = field(default_factory=lambda: [8, 4])  # 8: LLM.int8 (per row); 4: blocks of 64 weights
    library: str = "bitsandbytes"  # the only one: a maintained library that quantizes on the CPU and the GPU
    bnb_4bit_quant_type: str = "fp4"  # fp4 (BitsAndBytesConfig's default) or nf4


@dataclass
class AttackConfig:
    """`baldro attack`: attacks on an unlearned model (`model.path`), each evaluated like `baldro eval`
    into OUTPUT_DIR/NAME/ with a per-sample before vs after in attack_summary.json."""

    attacks: List[str] = field(default_factory=lambda: ["relearn", "quantize"])  # run in this order
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    # the unlearned model's evaluation (a folder or TOFU_EVAL.json / MUSE_EVAL.json); null: RUN/eval when the
    # run evaluated with this recipe's settings, else evaluated once into OUTPUT_DIR/before
    before_eval: Optional[str] = None
    # a sample "came back" when an attack moves it past a threshold; per metric (prob, rouge, truth_ratio;
    # verbmem, knowmem); unset: the median of the retain model's log (eval.retain_logs_path), else a default
    thresholds: Dict[str, float] = field(default_factory=dict)


@dataclass
class ResumeConfig:
    """`resume=true` and `resume=PATH` on the command line (or in a YAML file) fill this section."""

    enabled: bool = False  # continue from the newest complete checkpoint in output_dir/checkpoints
    checkpoint: Optional[str] = None  # or from this checkpoint folder (implies enabled)
    force: bool = False  # resume even though the recipe changed what the run trains


@dataclass
class Recipe:
    name: Optional[str] = None
    seed: int = 0
    output_dir: Optional[str] = None
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    overwrite: bool = False  # true: replace the run in a non-empty output_dir (its outputs are deleted)
    log_to_console: bool = True  # false: progress only, no per-step metric lines
    log_format: str = "text"  # each logging step's metrics as one line: text or json
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)


# ----------------------------------------------------------------------------- validation
KINDS = ("finetune", "unlearn", "eval", "attack")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(key: str, value, *, low: float | None = None, low_open: bool = False, high: float | None = None,
            integer: bool = False, hint: str = "") -> None:
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
        raise BaldroError(f"output_dir {output_dir}: {existing} is a file, so the folder cannot be made: choose "
                          "another path")
    try:  # a real write: permission bits say nothing for root or a read-only file system
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".baldro-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BaldroError(f"output_dir {output_dir} is not writable ({e.strerror} in {existing}): choose a folder "
                          "you can write to") from None
    return path


def _check_train(t: TrainConfig) -> None:
    _number("train.learning_rate", t.learning_rate, low=0, low_open=True, hint=" (e.g. train.learning_rate=1e-5)")
    _number("train.per_device_train_batch_size", t.per_device_train_batch_size, low=1, integer=True)
    _number("train.gradient_accumulation_steps", t.gradient_accumulation_steps, low=1, integer=True)
    _number("train.max_steps", t.max_steps, integer=True)
    if t.max_steps == 0 or t.max_steps < -1:
        raise BaldroError(f"train.max_steps={t.max_steps} trains nothing: use -1 (train.num_train_epochs decides) or "
                          "a step count >= 1")
    _number("train.num_train_epochs", t.num_train_epochs)
    if t.max_steps == -1 and t.num_train_epochs < 1:
        raise BaldroError(f"train.num_train_epochs={t.num_train_epochs} must be >= 1 (for part of an epoch set "
                          "train.max_steps >= 1)")
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
            raise BaldroError(f"{key}.{name} is not a LoraConfig field" + (f": did you mean {key}.{close[0]}?"
                                                                           if close else ""))
    if "r" in lora:
        _number(f"{key}.r", lora["r"], low=1, integer=True, hint=" (the adapter rank, e.g. 8)")
    if "lora_alpha" in lora:
        _number(f"{key}.lora_alpha", lora["lora_alpha"], low=0, low_open=True)
    if "lora_dropout" in lora:
        _number(f"{key}.lora_dropout", lora["lora_dropout"], low=0, high=1)
        if lora["lora_dropout"] >= 1:
            raise BaldroError(f"{key}.lora_dropout={lora['lora_dropout']} must be < 1")


def _check_model(m: ModelConfig) -> None:
    from baldro.models import check_device, check_model_source

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
            raise BaldroError(f"data.source {d.source} is a file: set data.source to the folder that holds the split "
                              "files")
    needed = {"finetune": ("train_split",), "unlearn": ("forget_split", "retain_split"), "eval": ("forget_split",),
              "attack": ("forget_split",)}
    for key in needed[kind] if getattr(d, "benchmark", "tofu") == "tofu" else ():  # MUSE checks its own files
        if not getattr(d, key):
            raise BaldroError(f"data.{key} is not set: name a split (e.g. data.{key}=...) or pick one with split=...")
    if needs_refusal and d.refusal_file and not Path(d.refusal_file).expanduser().is_file():
        raise BaldroError(f"data.refusal_file {d.refusal_file} is not a file: set data.refusal_file to the refusal "
                          "answers (one per line)")


def _check_unlearning(recipe: Recipe) -> bool:
    """Objective, weighting and their arguments; returns whether the objective needs refusal answers."""
    from baldro.objectives import get_objective, get_retain_loss
    from baldro.weighting import make_weighting

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
        raise BaldroError("objective.trainable_params_regex and model.lora exclude each other (LoRA trains its "
                          "adapter): set one of them to null")
    if o.primal_dual:
        if o.retain_loss_eps is None:
            raise BaldroError(f"objective.primal_dual=true ({o.name}) needs objective.retain_loss_eps, the retain loss "
                              "to stay under (e.g. the target model's retain loss): set it")
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
                raise BaldroError(f"objective.alternates.file {a.file} is not a file: give a JSON-lines file of "
                                  "alternate answers, or null to generate them")
        else:
            _number("objective.alternates.n", a.n, low=1, integer=True, hint=" (alternates per question)")
            _number("objective.alternates.max_new_tokens", a.max_new_tokens, low=1, integer=True,
                    hint=f" ({o.name} generates its alternate answers: give it a token budget)")
            _number("objective.alternates.temperature", a.temperature, low=0, low_open=True)
            _number("objective.alternates.batch_size", a.batch_size, low=1, integer=True)
    wargs = dict(w.args)
    for key in ("sigma", "ratio"):
        if key in wargs and _is_number(wargs[key]) and not math.isfinite(wargs[key]):
            raise BaldroError(f"weighting {key} must be finite, got {wargs[key]}: set weighting.args.{key} to a "
                              f"{'positive number' if key == 'sigma' else 'fraction in (0, 1]'}")
        if key in wargs and not _is_number(wargs[key]):
            raise BaldroError(f"weighting.args.{key}={wargs[key]!r} is not a number")
    make_weighting(w.name, n_samples=1, **weighting_args(recipe))
    return objective.needs_refusal


def weighting_args(recipe: Recipe) -> dict:
    """`weighting.args`, with `objective.dv_sigma` as the sigma of a weighting that takes one and was given none."""
    import inspect

    from baldro.weighting import WEIGHTINGS

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
        raise BaldroError(f"train.eval_strategy={how} runs the TOFU or MUSE evaluator during unlearning, not "
                          f"eval.benchmark={e.benchmark}: set train.eval_strategy=no (eval.at_end evaluates the final "
                          "model; eval.lm_eval.tasks adds lm-eval tasks to a TOFU or MUSE evaluation)")
    if on and kind != "unlearn":
        raise BaldroError(f"train.eval_strategy={how} evaluates during unlearning runs only: set "
                          "train.eval_strategy=no (evaluate a fine-tuned model with baldro eval)")
    if t.eval_steps is not None:
        steps = int(t.eval_steps) if _is_number(t.eval_steps) and float(t.eval_steps).is_integer() else t.eval_steps
        if how != "steps":
            raise BaldroError(f"train.eval_steps={steps} needs train.eval_strategy=steps (it is {how})")
        hint = " (a step count >= 1, or a fraction of the run in (0, 1))"
        _number("train.eval_steps", steps, low=0, low_open=True, hint=hint)
        if t.eval_steps >= 1 and not float(t.eval_steps).is_integer():
            raise BaldroError(f"train.eval_steps={t.eval_steps} is not an integer{hint}")
        if t.eval_steps >= 1 and t.max_steps > 0 and t.eval_steps > t.max_steps:
            raise BaldroError(f"train.eval_steps={t.eval_steps:g} is beyond the run (train.max_steps={t.max_steps}): "
                              "use a count <= train.max_steps or a fraction of the run")
    elif how == "steps":
        raise BaldroError("train.eval_strategy=steps needs train.eval_steps (a step count, or a fraction of the run "
                          "below 1, e.g. train.eval_steps=0.1)")
    metric = t.metric_for_best_model
    for key, value in (("train.metric_for_best_model", metric), ("eval.utility_floor", e.utility_floor),
                       ("train.early_stopping_patience", t.early_stopping_patience)):
        if value is not None and not on:
            raise BaldroError(f"{key}={value} needs evaluations during training: set train.eval_strategy=epoch "
                              "(or steps with train.eval_steps)")
    if t.load_best_model_at_end and not metric:
        raise BaldroError("train.load_best_model_at_end=true needs train.metric_for_best_model (e.g. forget_quality): "
                          "set it")
    if t.early_stopping_patience is not None:
        _number("train.early_stopping_patience", t.early_stopping_patience, low=1, integer=True,
                hint=" (evaluations without a better metric)")
        if not metric:
            raise BaldroError("train.early_stopping_patience needs train.metric_for_best_model (e.g. forget_quality): "
                              "set it")
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise BaldroError(f"train.metric_for_best_model={metric!r} must name a summary key (e.g. forget_quality)")
    if metric == "forget_quality" and e.benchmark == "tofu" and not e.retain_logs_path:
        raise BaldroError("train.metric_for_best_model=forget_quality needs the retain model's eval log: set "
                          "eval.retain_logs_path (forget quality is a test against it)")
    return on


def _check_eval(e: EvalConfig, kind: str, during_training: bool = False) -> None:
    if e.benchmark not in EVAL_BENCHMARKS:
        raise BaldroError(f"eval.benchmark={e.benchmark!r} is not supported: use tofu, muse or lm_eval")
    _optional_positive_int("eval.batch_size", e.batch_size, hint=": use null (the default) or a count >= 1")
    _optional_positive_int("eval.generation_batch_size", e.generation_batch_size,
                           hint=": use null (the default, 3 x eval.batch_size) or a count >= 1")
    check_compat(e.compat)
    if e.compat != "none" and e.benchmark != "tofu":
        raise BaldroError(f"eval.compat={e.compat} is only implemented for TOFU: set eval.compat=none for "
                          f"eval.benchmark={e.benchmark}")
    _number("eval.max_new_tokens", e.max_new_tokens, low=1, integer=True)
    _optional_positive_int("eval.limit", e.limit)
    _optional_positive_int("eval.trajectory_limit", e.trajectory_limit,
                           hint=": use null (every row, or eval.limit) or a count >= 1")
    _optional_positive_int("eval.trajectory_max_new_tokens", e.trajectory_max_new_tokens,
                           hint=": use null (eval.max_new_tokens) or a count >= 1")
    if e.utility_floor is not None:
        _number("eval.utility_floor", e.utility_floor, low=0, high=1,
                hint=" (a fraction of the first evaluation's utility, in [0, 1], e.g. 0.9)")
    evaluates = kind in ("eval", "attack") or e.at_end or during_training
    if e.benchmark == "lm_eval":
        if e.lm_eval.tasks:
            raise BaldroError("eval.lm_eval.tasks is the extra stage of a TOFU or MUSE evaluation: with "
                              "eval.benchmark=lm_eval list every task in eval.tasks")
        if evaluates:
            if not e.tasks:
                raise BaldroError("eval.tasks is empty: name the lm-eval tasks to run, e.g. eval.tasks=[wmdp_cyber,mmlu]")
            _check_lm_eval("eval", e.tasks, e.num_fewshot, None, e.include_path, None)
    elif e.tasks:
        raise BaldroError(f"eval.tasks runs lm-eval tasks with eval.benchmark=lm_eval; beside {e.benchmark} they go "
                          f"in eval.lm_eval.tasks (an extra stage)")
    elif e.lm_eval.tasks and evaluates:
        s = e.lm_eval
        _check_lm_eval("eval.lm_eval", s.tasks, s.num_fewshot, s.limit, s.include_path, s.batch_size)
    for key in ("retain_logs_path", "target_logs_path"):
        path = getattr(e, key)
        if evaluates and path and not Path(path).expanduser().exists():
            raise BaldroError(f"eval.{key} {path} does not exist: give the reference model's TOFU_EVAL.json (or "
                              f"leave eval.{key} unset)")


ATTACKS = ("relearn", "quantize")
RELEARN_SPLITS = ("half", "heldout", "retain")


def _one_of(key: str, value, choices: tuple) -> None:
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        raise BaldroError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}"
                          + (f": did you mean {close[0]}?" if close else ""))


def _check_attack(recipe: Recipe) -> None:
    """The `attack` section: attack names, the relearning split and its training, the bit widths and the
    quantization library (installed), the thresholds and the before-evaluation file."""
    from baldro.eval.recovery import metric_names
    from baldro.models import QUANTIZE_BITS, check_quantization_library

    a = recipe.attack
    if not a.attacks:
        raise BaldroError(f"attack.attacks is empty: name at least one of {', '.join(ATTACKS)}")
    for name in a.attacks:
        _one_of("attack.attacks", name, ATTACKS)
    if len(set(a.attacks)) != len(a.attacks):
        raise BaldroError(f"attack.attacks={list(a.attacks)} names an attack twice: name each once")
    if recipe.model.lora is not None:
        raise BaldroError("model.lora adds a new adapter to the attacked model: set model.lora=null (to relearn "
                          "with LoRA, set attack.relearn.lora)")
    if "relearn" in a.attacks:
        r = a.relearn
        _one_of("attack.relearn.split", r.split, RELEARN_SPLITS)
        if r.split == "heldout" and recipe.data.benchmark == "muse":
            raise BaldroError("attack.relearn.split=heldout scores the forget samples it did not train on, but MUSE's "
                              "evaluation sets are not its training chunks: use half or retain on MUSE")
        if r.split == "retain" and recipe.data.benchmark == "tofu" and not recipe.data.retain_split:
            raise BaldroError("attack.relearn.split=retain trains on retain rows: set data.retain_split (or pick a "
                              "split group, e.g. split=forget10)")
        _optional_positive_int("attack.relearn.n_samples", r.n_samples, ": use null (half the forget set) or a "
                               "count >= 1")
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
                raise BaldroError(f"attack.quantize.bits={bits} is not supported: use "
                                  f"{' or '.join(map(str, QUANTIZE_BITS))} (e.g. attack.quantize.bits=[4])")
        if len(set(q.bits)) != len(q.bits):
            raise BaldroError(f"attack.quantize.bits={list(q.bits)} names a bit width twice")
        _one_of("attack.quantize.bnb_4bit_quant_type", q.bnb_4bit_quant_type, ("fp4", "nf4"))
        check_quantization_library(q.library)
    names = metric_names(recipe.data.benchmark)
    for key, value in a.thresholds.items():
        if key not in names:
            raise BaldroError(f"attack.thresholds.{key}: {recipe.data.benchmark.upper()} has no per-sample metric "
                              f"{key!r}: use {', '.join(names)}")
        _number(f"attack.thresholds.{key}", value)
    if a.before_eval is not None and not Path(a.before_eval).expanduser().exists():
        raise BaldroError(f"attack.before_eval {a.before_eval} does not exist: give the unlearned model's eval folder "
                          "or its TOFU_EVAL.json / MUSE_EVAL.json, or null to evaluate it here")


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
            raise BaldroError(f"resume={r.checkpoint}: an attack has no checkpoints; resume=true reruns only the "
                              "attacks whose attack_summary.json is missing")
        if r.checkpoint:
            ckpt = Path(r.checkpoint).expanduser()
            if not ckpt.is_dir():
                raise BaldroError(f"resume={r.checkpoint}: no such checkpoint folder: give RUN/checkpoints/checkpoint-N "
                                  "or resume=true (the newest complete one)")
        if recipe.overwrite and (r.enabled or r.checkpoint):
            raise BaldroError("overwrite=true and resume exclude each other: drop one")
        if kind != "attack":
            _check_train(recipe.train)
        b = recipe.balance
        _number("balance.every_n_steps", b.every_n_steps, low=0, integer=True, hint=" (0: off)")
        _number("balance.batch_size", b.batch_size, low=1, integer=True)
    if "{question}" not in recipe.format.prompt_template:
        raise BaldroError(f"format.prompt_template must contain '{{question}}', got {recipe.format.prompt_template!r}")
    needs_refusal = _check_unlearning(recipe) if kind == "unlearn" else False
    during_training = _check_eval_during_training(recipe, kind) if kind != "eval" else False
    _check_eval(recipe.eval, kind, during_training)
    if kind == "attack":
        _check_attack(recipe)
        if recipe.eval.benchmark == "lm_eval":
            raise BaldroError("baldro attack compares TOFU or MUSE evaluations sample by sample: set eval.benchmark to "
                              "tofu or muse (eval.lm_eval.tasks adds lm-eval tasks to each evaluation)")
    if kind == "eval" and recipe.eval.benchmark == "lm_eval":
        return  # the harness's tasks bring their own data
    if kind in ("eval", "attack") and recipe.eval.benchmark != recipe.data.benchmark:
        raise BaldroError(f"eval.benchmark is {recipe.eval.benchmark} but data.benchmark is {recipe.data.benchmark}: "
                          "set both to the benchmark of data.source")
    _check_data(recipe.data, kind, needs_refusal)


def validate_model(m: ModelConfig, train: TrainConfig | None = None) -> None:
    """The `model` section (dtype, LoRA fields, the device, a local model folder's files) and the
    hardware a training run asks for (`train.bf16` / `train.fp16` need a GPU unless `train.use_cpu`)."""
    _check_model(m)
    if train is not None and (train.bf16 or train.fp16) and not train.use_cpu:
        import torch

        if not torch.cuda.is_available():
            flag = "train.bf16" if train.bf16 else "train.fp16"
            raise BaldroError(f"{flag}=true needs a GPU and this machine has none: set {flag}=false (and "
                              "train.use_cpu=true to train on the CPU)")

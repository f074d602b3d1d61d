"""The recipe schema: every key a recipe may hold, its type and its one default.

`baldro.config.load_config` merges YAML recipes, config groups and command-line overrides onto
`Recipe`, so an unknown key or a value of the wrong type is an error, not a silent default.
`baldro show-config RECIPE [overrides]` prints the result. Sections map to the code that reads them:
`model` -> `baldro.models`, `data` -> `baldro.data.tofu` / `baldro.data.muse`, `format` -> `QAFormatter`,
`train` -> `transformers.TrainingArguments`, `objective` / `weighting` -> `baldro.objectives` / `baldro.weighting`,
`balance` -> `BalanceTracker`, `eval` -> `baldro.eval`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from baldro.data.formatting import DATE_STRING, PLAIN_PROMPT


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


@dataclass
class DataConfig:
    benchmark: str = "tofu"  # tofu: QA pairs; muse: raw text cut into chunks (splits name raw/ corpora)
    source: str = "locuslab/TOFU"  # a TOFU or MUSE folder (shared/data/...) or a hub dataset id
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
    optim: str = "adamw_torch"
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
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    name: str = "npo"
    args: Dict[str, Any] = field(default_factory=dict)  # the objective's keyword arguments (beta, ...)
    retain_loss: str = "nll"
    gamma: float = 1.0  # forget-loss weight
    alpha: float = 1.0  # retain-loss weight


@dataclass
class WeightingConfig:
    name: str = "mean"
    args: Dict[str, Any] = field(default_factory=dict)  # the weighting's keyword arguments (sigma, ratio, ...)


@dataclass
class BalanceConfig:
    every_n_steps: int = 0  # > 0: score every forget sample every N optimizer steps (balance.jsonl)
    batch_size: int = 16


@dataclass
class EvalConfig:
    benchmark: str = "tofu"
    at_end: bool = False  # unlearning runs: evaluate the final model into RUN_DIR/eval
    every_n_steps: int = 0  # unlearning runs: evaluate every N steps into RUN_DIR/eval/step-N
    retain_logs_path: Optional[str] = None  # the retain model's TOFU_EVAL.json (muse: the retrained model's MUSE_EVAL.json)
    target_logs_path: Optional[str] = None  # the target model's TOFU_EVAL.json: the over-forgotten criterion
    batch_size: int = 16
    max_new_tokens: int = 200  # tofu
    verbmem_max_new_tokens: int = 128  # muse VerbMem continuations
    knowmem_max_new_tokens: int = 32  # muse KnowMem answers
    limit: Optional[int] = None  # only the first N rows of every set


@dataclass
class Recipe:
    name: Optional[str] = None
    seed: int = 0
    output_dir: Optional[str] = None
    resume: Any = False  # true: the last checkpoint in output_dir; or a checkpoint folder
    log_to_console: bool = True  # false: progress bar only, no per-step dicts
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

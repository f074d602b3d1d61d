"""The recipe schema: every key a recipe may hold, its type and its one default.

`baldro.recipes.config.load_config` merges YAML recipes, config groups and command-line overrides onto
`Recipe`, so an unknown key or a value of the wrong type is an error, not a silent default.
`baldro show-config RECIPE [overrides]` prints the result. Sections map to the code that reads them:
`model` -> `baldro.models.loading`, `data` -> `baldro.data.tofu` / `baldro.data.muse` / `baldro.data.wmdp`,
`format` -> `QAFormatter`, `train` -> `transformers.TrainingArguments`, `objective` / `weighting` ->
`baldro.train.objectives` / `baldro.train.weighting`, `balance` -> `BalanceTracker`, `eval` -> `baldro.eval` (the
lm-evaluation-harness options -> `baldro.eval.lm_eval`), `attack` -> `baldro.recipes.attack`, `unierase` -> `baldro.recipes.unierase`.

`validation.validate(recipe, kind)` checks what the types cannot (ranges, names, files, the device) before a run
loads any weights; every failure is one `BaldroError` line naming the key or file and the fix.
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
    retain_logs_path: Optional[str] = (
        None  # the retain model's TOFU_EVAL.json (muse: the retrained model's MUSE_EVAL.json)
    )
    target_logs_path: Optional[str] = None  # the target model's TOFU_EVAL.json: the over-forgotten criterion
    batch_size: Optional[int] = None  # null: 16, or OpenUnlearning's 32 with compat=openunlearning
    # rows decoded at once by continuous batching; null: 3 x batch_size (a decoding pass reads every weight
    # for one token per row, so more rows make it cheaper per token; ignored by compat=openunlearning)
    generation_batch_size: Optional[int] = None
    max_new_tokens: int = 200  # tofu
    verbmem_max_new_tokens: int = 128  # muse VerbMem continuations
    knowmem_max_new_tokens: int = 32  # muse KnowMem answers
    limit: Optional[int] = None  # only the first N rows of every set
    # tofu: only the forget set (and the holdout set, privleak's other side): no model utility, about a quarter
    # of the time; what an attack's verdict needs (`baldro attack ... eval.forget_only=true`)
    forget_only: bool = False
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
class UniEraseConfig:
    """`method: unierase` (`baldro.recipes.unierase`): UniErase's unlearning token (phase 1) and its
    AlphaEdit edit (phase 2) instead of training with an objective; docs/guides/unierase.md."""

    token: str = "<unlearn_0>"  # the unlearning token added to the tokenizer (a new string)
    token_epochs: int = 5  # phase 1: epochs over (forget question, token + refusal) pairs (the authors' 5)
    token_learning_rate: float = 1.0e-3  # phase 1: Adam on the token's embedding rows only (the authors' 1e-3)
    token_batch_size: int = 16  # phase 1: pairs per step
    layers: List[int] = field(
        default_factory=lambda: [4, 5, 6, 7, 8]
    )  # MLP down-projections edited (AlphaEdit, Llama-3-8B)
    nullspace_threshold: float = 2.0e-2  # eigenvalues of the retain keys' E[k k^T] below this span the null space
    l2: float = 10.0  # the ridge term of the closed form (P K K^T + l2 I)^-1 (AlphaEdit's 10)
    target_steps: int = 10  # Adam steps of the target hidden states (the authors' run_edit.py; AlphaEdit's 25)
    target_learning_rate: float = 0.1  # Adam's rate for the target hidden states (AlphaEdit's Llama-3-8B v_lr)
    target_weight_decay: float = 0.5  # weight of |delta|^2 / |h|^2 in the target loss (AlphaEdit's 0.5)
    clamp_norm_factor: float = 0.75  # |delta| <= this x |h| (AlphaEdit's 0.75)
    stats_batch_size: int = 16  # retain sequences per forward pass when estimating E[k k^T]


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
    # baldro unlearn: train (an objective under a weighting, `train`) or unierase (the `unierase` section)
    method: str = "train"
    unierase: UniEraseConfig = field(default_factory=UniEraseConfig)

"""The run folder of `finetune` and `unlearn` (and, with its own outputs, `attack`): claimed, resumed, trained into.

Every run writes into its own folder: `config.yaml` (resolved), `train_log.jsonl` (per step),
`forget_losses.jsonl` (per-sample forget losses with sample ids), `run_info.json`, and the final model
in `model/` (safetensors); checkpoints for resuming go to `checkpoints/`.

Before any weights load, the recipe is validated (`baldro.recipes.validation.validate`), the data files are read,
and the run folder is claimed: a lock keeps a second run out; a non-empty folder is refused unless the
run resumes it (`resume=true`) or replaces it (`overwrite=true`); a resume picks the newest complete
checkpoint, refuses a recipe that trains something else (`resume.force=true` overrides), and cuts the
logs back to the checkpoint's step, so that the resumed run writes what an uninterrupted one writes.
A non-finite loss or gradient marks the run failed in `run_info.json` and keeps its checkpoints.

Several processes (`accelerate launch`): the main process claims the folder and the others wait for
it; a launch whose processes do not form one run is refused; the final model is gathered by every
process (FSDP, ZeRO-3) and saved once; logs are written once (by the main process, from every
process's samples); a stateful weighting's state is checked to be one state and saved as
`weighting_state.pt`; the final evaluation runs once, in the main process (on the saved model when
the trained one is sharded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

from baldro.distributed import (
    barrier,
    full_state_dict,
)
from baldro.errors import BaldroError
from baldro.eval.trajectory import (
    BEST_DIR,
    EVALS_DIR,
    TRAJECTORY_FILE,
    truncate_outputs,
)
from baldro.io import RunLock, truncate_jsonl, write_json_atomic, write_text_atomic
from baldro.models.loading import (
    save_model,
)
from baldro.recipes.common import console_callbacks, is_main_process
from baldro.recipes.config import dump_config
from baldro.recipes.schema import Recipe
from baldro.train.alternates import (
    ALTERNATES_FILE,
)
from baldro.train.guard import (
    CHECKPOINT_MARKER,
    STAGING,
    NonFiniteError,
    checkpoint_step,
    complete_checkpoints,
    is_complete_checkpoint,
)
from baldro.train.trainers import (
    OBJECTIVE_STATE_FILE,
    WEIGHTING_STATE_FILE,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- run folders
RUN_OUTPUTS = (
    "config.yaml",
    "run_info.json",
    "train_log.jsonl",
    "forget_losses.jsonl",
    "balance.jsonl",
    "model",
    "checkpoints",
    "eval",
    TRAJECTORY_FILE,
    EVALS_DIR,
    BEST_DIR,
    WEIGHTING_STATE_FILE,
    OBJECTIVE_STATE_FILE,
    ALTERNATES_FILE,
    "attack",
)  # baldro attack's default folder: the attacks of the model a new run replaces
# Recipe keys that do not change what a run trains: a resume may change them.
RESUME_FREE_KEYS = (
    "name",
    "output_dir",
    "resume",
    "overwrite",
    "log_to_console",
    "log_format",
    "eval",
    "balance",
    "model.base",
    "model.tofu_target",
    "model.device",
    "model.attn_implementation",
    "model.merge_lora",
    "model.gradient_checkpointing",
    "train.num_train_epochs",
    "train.max_steps",
    "train.logging_steps",
    "train.save_strategy",
    "train.save_steps",
    "train.save_total_limit",
    "train.disable_tqdm",
    "train.report_to",
    "train.dataloader_num_workers",
    "train.use_cpu",
    # evaluation during training: what is evaluated, and when a run stops early or which model it saves
    "train.eval_strategy",
    "train.eval_steps",
    "train.metric_for_best_model",
    "train.greater_is_better",
    "train.load_best_model_at_end",
    "train.early_stopping_patience",
    "unierase",  # read only by method=unierase, which keeps no checkpoints to resume
)
_UNSET = object()


def _recipe_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_differences(saved: dict, current: dict, free_keys=RESUME_FREE_KEYS) -> list[str]:
    """`key (old -> new)` for every recipe key that changes what a run trains (not in `free_keys`); a key the
    saved recipe lacks (it predates the key, e.g. `method`) counts as its default."""
    a, b = _flatten(saved), _flatten(current)
    defaults = _flatten(_recipe_dict(Recipe()))  # a key newer than the saved recipe ran as its default
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in free_keys):
            continue
        old, new = a.get(key, defaults.get(key, _UNSET)), b.get(key, _UNSET)
        if old != new:
            show = lambda v: "unset" if v is _UNSET else repr(v)  # noqa: E731
            diffs.append(f"{key} ({show(old)} -> {show(new)})")
    return diffs


def _saved_recipe(checkpoint: Path | None, run_dir: Path) -> tuple[dict | None, str]:
    """The recipe that wrote a checkpoint (its marker), else the run folder's config.yaml."""
    if checkpoint is not None and (checkpoint / CHECKPOINT_MARKER).is_file():
        try:
            recipe = json.loads((checkpoint / CHECKPOINT_MARKER).read_text(encoding="utf-8")).get("recipe")
        except (OSError, ValueError):
            recipe = None
        if isinstance(recipe, dict):
            return recipe, str(checkpoint)
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            recipe = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            recipe = None
        if isinstance(recipe, dict):
            return recipe, str(config)
    return None, ""


def resume_checkpoint(recipe: Recipe, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: `resume=PATH`, or with `resume=true` the newest complete one."""
    r = recipe.resume
    if r.checkpoint:
        ckpt = Path(r.checkpoint).expanduser()
        if not is_complete_checkpoint(ckpt):
            raise BaldroError(
                f"resume={r.checkpoint}: the checkpoint is incomplete (stopped while it was saved?): "
                "pass resume=true to use the newest complete one"
            )
        return ckpt
    if not r.enabled:
        return None
    root = run_dir / "checkpoints"
    complete = complete_checkpoints(root)
    skipped = sorted(p.name for p in root.glob("checkpoint-*") if p.is_dir() and p not in complete)
    skipped += [f"{STAGING}/{p.name}" for p in (root / STAGING).glob("checkpoint-*")]
    if skipped:
        log.warning("resume: skipping incomplete checkpoint(s) %s in %s", ", ".join(skipped), root)
    if not complete:
        log.warning("resume=true but no complete checkpoint in %s: starting from scratch", root)
        return None
    return complete[-1]


def _remove_outputs(run_dir: Path, outputs=RUN_OUTPUTS) -> None:
    """Delete what a run writes (not other files a user keeps in the folder)."""
    for name in outputs:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _truncate_logs(run_dir: Path, step: int) -> None:
    """Cut the logs back to a checkpoint's step: the resumed run writes the later rows again."""
    dropped = truncate_jsonl(run_dir / "train_log.jsonl", lambda r: r.get("step", 0) <= step)
    dropped += truncate_jsonl(run_dir / "forget_losses.jsonl", lambda r: r.get("step", 0) <= step)
    # BalanceTracker records the resumed step itself when it is one of its steps
    dropped += truncate_jsonl(run_dir / "balance.jsonl", lambda r: r.get("step", 0) < step)
    # the evaluation at a checkpoint's step ran before the checkpoint was saved: it stays
    dropped += truncate_outputs(run_dir, step)
    if dropped:
        log.info("resume: dropped %d log row(s) written after step %d", dropped, step)


def claim_run_dir(
    recipe: Recipe, run_dir: Path, outputs=RUN_OUTPUTS, free_keys=RESUME_FREE_KEYS, checkpoints: bool = True
) -> str | None:
    """Check the folder against the recipe (main process, under the run lock); returns the checkpoint
    to resume from. A non-empty folder is refused unless it holds this run and the recipe resumes it,
    or the recipe says overwrite=true (which deletes `outputs`). A resume must not change a key outside
    `free_keys`. Without `checkpoints` (attacks) a resume keeps the folder as it is."""
    checkpoint = resume_checkpoint(recipe, run_dir) if checkpoints else None
    resuming = recipe.resume.enabled or bool(recipe.resume.checkpoint)
    holds_run = (run_dir / "config.yaml").is_file()
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != RunLock.NAME) if run_dir.is_dir() else []
    if entries and not recipe.overwrite:
        if not resuming and holds_run:
            raise BaldroError(
                f"output_dir {run_dir} already holds a run: pass resume=true to continue it, "
                "overwrite=true to replace it, or choose another output_dir"
            )
        if not holds_run:
            raise BaldroError(
                f"output_dir {run_dir} is not empty ({len(entries)} entries, e.g. {entries[0]}) and holds no "
                "baldro run: choose a new or empty folder, or pass overwrite=true"
            )
    if recipe.overwrite:
        _remove_outputs(run_dir, outputs)
    elif resuming:
        saved, source = _saved_recipe(checkpoint, run_dir)
        if saved is not None and not recipe.resume.force:
            diffs = training_differences(saved, _recipe_dict(recipe), free_keys)
            if diffs:
                more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
                raise BaldroError(
                    f"resume: the recipe differs from the one in {source} in what it trains: "
                    f"{', '.join(diffs[:6])}{more}: resume with the same recipe, or pass "
                    "resume.force=true to continue anyway"
                )
    if resuming and not recipe.overwrite and checkpoints:
        shutil.rmtree(run_dir / "checkpoints" / STAGING, ignore_errors=True)
        if checkpoint is not None:
            step = checkpoint_step(checkpoint) or 0
            _truncate_logs(run_dir, step)
            log.info("resuming from %s (step %d)", checkpoint, step)
        else:
            _remove_outputs(run_dir)  # nothing to resume: start this run afresh
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_config(recipe))
    return str(checkpoint) if checkpoint is not None else None


@contextlib.contextmanager
def run_folder(recipe: Recipe, kind: str, **claim):
    """Lock and claim the run folder (`claim`: `claim_run_dir`'s options); yields (run_dir, checkpoint
    to resume from or None)."""
    run_dir = Path(recipe.output_dir).expanduser()
    if not is_main_process():  # the main process claims the folder; the others follow it once it has
        barrier()
        checkpoint = resume_checkpoint(recipe, run_dir)
        yield run_dir, str(checkpoint) if checkpoint is not None else None
        return
    with RunLock(run_dir, kind):
        checkpoint = claim_run_dir(recipe, run_dir, **claim)
        barrier()
        yield run_dir, checkpoint


def train_and_save(
    trainer, recipe: Recipe, tokenizer, run_dir: Path, resume: str | None, info: dict, more_info=None
) -> Path:
    """Train (or resume), then save the final model and `run_info.json` from the main process (with
    `more_info()`, what is known after training). A non-finite loss or gradient marks the run failed (its
    checkpoints stay) and is a `BaldroError`."""
    console_callbacks(trainer, recipe)
    trainer.checkpoint_info = {"recipe": _recipe_dict(recipe)}
    start = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteError as e:
        ckpts = complete_checkpoints(run_dir / "checkpoints")
        last = str(ckpts[-1]) if ckpts else None
        if trainer.is_world_process_zero():
            write_json_atomic(
                run_dir / "run_info.json",
                {
                    **info,
                    "status": "failed",
                    "error": str(e),
                    "failed_step": e.step,
                    "last_checkpoint": last,
                    "train_time_s": time.time() - start,
                },
            )
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (train.save_strategy=no)"
        raise BaldroError(
            f"{e}: the run stopped and is marked failed in {run_dir / 'run_info.json'}; {kept}; lower "
            "train.learning_rate or use model.dtype=float32"
        ) from None
    elapsed = time.time() - start
    if more_info is not None:
        info = {**info, **more_info()}
        elapsed -= info.get("trajectory_eval_time_s", 0.0)  # train_time_s: the training alone
    # A sharded model (FSDP, ZeRO-3) is gathered by every process; the main process saves it once.
    state = full_state_dict(trainer.model_wrapped, trainer.accelerator)
    if trainer.is_world_process_zero():
        save_model(
            trainer.accelerator.unwrap_model(trainer.model),
            tokenizer,
            run_dir / "model",
            merge_lora=recipe.model.merge_lora,
            state_dict=state,
        )
    del state
    if hasattr(trainer, "save_weighting_state"):
        trainer.save_weighting_state(run_dir / WEIGHTING_STATE_FILE)
    objective_state = trainer.objective_state() if hasattr(trainer, "objective_state") else {}
    if objective_state and trainer.is_world_process_zero():
        import torch

        tmp = run_dir / f".{OBJECTIVE_STATE_FILE}.tmp"
        torch.save(objective_state, tmp)
        os.replace(tmp, run_dir / OBJECTIVE_STATE_FILE)
        if "primal_dual" in objective_state:
            info = {**info, "dual_lambda_final": objective_state["primal_dual"]["lambda"]}
    if trainer.is_world_process_zero():
        write_json_atomic(
            run_dir / "run_info.json",
            {
                **info,
                "train_time_s": elapsed,
                "status": "done",
                **({"processes": trainer.args.world_size} if trainer.args.world_size > 1 else {}),
            },
        )
    barrier()
    return run_dir

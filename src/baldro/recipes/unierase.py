"""`baldro unlearn RECIPE method=unierase`: UniErase (arXiv 2505.15674) as a run of its own.

The model and tokenizer load, the unlearning token is added and trained (phase 1), the retain set's keys give
each edited layer's null space, the edit leads every forget question to the token (phase 2), and the run
folder gets the model (tokenizer with the token), `config.yaml`, `run_info.json` (the layers, the statistics,
what the edit achieved, the seconds of each phase) and, with `eval.at_end`, the evaluation in RUN/eval.
The procedure and its choices: `baldro.train.unierase` and docs/guides/unierase.md.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig

from baldro.data.tofu import load_refusals
from baldro.errors import BaldroError
from baldro.io import write_json_atomic
from baldro.models.loading import save_model
from baldro.recipes.common import build_formatter, encode_rows, load_model_and_tokenizer, read_rows
from baldro.recipes.config import as_recipe
from baldro.recipes.evaluate import eval_settings
from baldro.recipes.folders import run_folder
from baldro.recipes.schema import Recipe
from baldro.recipes.validation import strategy, validate, validate_model
from baldro.train import unierase as ue

log = logging.getLogger(__name__)


def _check_run(recipe: Recipe) -> None:
    """What a UniErase run does not do (it trains no steps and keeps no checkpoints)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BaldroError("method=unierase runs in one process: launch baldro unlearn without accelerate/torchrun")
    if strategy(recipe.train.eval_strategy) != "no":
        raise BaldroError("method=unierase has no training steps to evaluate between: set train.eval_strategy=no")
    if recipe.balance.every_n_steps > 0:
        raise BaldroError("method=unierase has no training steps to track: set balance.every_n_steps=0")
    if recipe.resume.enabled or recipe.resume.checkpoint:
        raise BaldroError("method=unierase keeps no checkpoints to resume: run again with overwrite=true")


def run_unierase(cfg: Recipe | DictConfig | dict) -> Path:
    """UniErase: phase 1 (the unlearning token) and phase 2 (the edit) into `output_dir`; returns the run folder."""
    recipe = as_recipe(cfg)
    validate(recipe, "unlearn")
    _check_run(recipe)
    u = recipe.unierase
    forget_rows = read_rows(recipe.data, "forget_split")
    retain_rows = read_rows(recipe.data, "retain_split")
    refusals = load_refusals(recipe.data.source, recipe.data.refusal_file)
    eval_kwargs = eval_settings(recipe) if recipe.eval.at_end else None
    validate_model(recipe.model)

    model, tokenizer = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
    ue.check_layers(list(u.layers), ue.decoder_layers(model))  # before the folder is claimed
    token_id = ue.add_unlearning_token(model, tokenizer, u.token)
    layers = sorted(u.layers)
    with run_folder(recipe, "unlearn", checkpoints=False) as (run_dir, _):
        formatter = build_formatter(recipe.format, recipe.data, tokenizer)
        pad = tokenizer.pad_token_id
        questions = [r["question"] for r in forget_rows]
        picks = [refusals[(recipe.seed + i) % len(refusals)] for i in range(len(forget_rows))]

        start = time.time()
        sequences = ue.token_sequences(formatter, questions, picks, u.token, token_id)
        losses = ue.train_token(
            model,
            token_id,
            sequences,
            pad,
            epochs=u.token_epochs,
            lr=u.token_learning_rate,
            batch_size=u.token_batch_size,
            seed=recipe.seed,
        )
        token_s = time.time() - start
        log.info(
            "unlearning token %s (id %d): loss %.3f -> %.3f in %.1f s",
            u.token,
            token_id,
            losses[0],
            losses[-1],
            token_s,
        )

        start = time.time()
        retain_sequences = [e.input_ids for e in encode_rows(formatter, retain_rows, "retain")]
        moments, n_keys = ue.second_moments(model, layers, retain_sequences, pad, u.stats_batch_size)
        projectors, null_dims, spectra = {}, {}, {}
        for layer in layers:
            projectors[layer], null_dims[layer], values = ue.null_space_projector(
                moments.pop(layer), u.nullspace_threshold
            )
            spectra[str(layer)] = [float(values[0]), float(values[len(values) // 2]), float(values[-1])]
        log.info("E[k k^T] eigenvalues (smallest, median, largest) per layer: %s", spectra)
        ue.check_capacity(null_dims, len(forget_rows), u.nullspace_threshold)
        stats_s = time.time() - start

        forget_prompts = [formatter.encode_prompt(q) for q in questions]
        retain_prompts = [formatter.encode_prompt(r["question"]) for r in retain_rows]
        retain_before = ue.next_tokens(model, retain_prompts, pad)
        start = time.time()
        edit = ue.unlearning_edit(
            model,
            layers,
            forget_prompts,
            token_id,
            pad,
            projectors,
            l2=u.l2,
            steps=u.target_steps,
            lr=u.target_learning_rate,
            weight_decay=u.target_weight_decay,
            clamp_norm_factor=u.clamp_norm_factor,
        )
        edit_s = time.time() - start
        forget_rate = sum(t == token_id for t in ue.next_tokens(model, forget_prompts, pad)) / len(forget_prompts)
        retain_after = ue.next_tokens(model, retain_prompts, pad)
        unchanged = sum(a == b for a, b in zip(retain_before, retain_after)) / len(retain_prompts)
        log.info(
            "unlearning edit of layers %s: %.0f %% of forget questions lead to the token, %.0f %% of retain "
            "questions keep their next token (%.1f s)",
            layers,
            100 * forget_rate,
            100 * unchanged,
            edit_s,
        )
        save_model(model, tokenizer, run_dir / "model")
        write_json_atomic(
            run_dir / "run_info.json",
            {
                "name": recipe.name or "unierase",
                "kind": "unlearn",
                "method": "unierase",
                "seed": recipe.seed,
                "forget_split": recipe.data.forget_split,
                "n_forget": len(forget_rows),
                "retain_split": recipe.data.retain_split,
                "token": u.token,
                "token_id": token_id,
                "token_losses": losses,
                "layers": layers,
                "edited_parameters": sorted(ue.edited_weights(model, layers)),
                "statistics": {
                    "keys_from": f"every token of {recipe.data.retain_split} ({len(retain_rows)} QA pairs)",
                    "n_keys": n_keys,
                    "nullspace_threshold": u.nullspace_threshold,
                    "null_space_dims": {str(k): v for k, v in null_dims.items()},
                    "eigenvalues_min_median_max": spectra,
                },
                "edit": edit,
                "forget_token_rate": forget_rate,
                "retain_next_token_unchanged": unchanged,
                "token_time_s": token_s,
                "stats_time_s": stats_s,
                "edit_time_s": edit_s,
                "train_time_s": token_s + stats_s + edit_s,
                "status": "done",
            },
        )
        if recipe.eval.at_end:
            from baldro.eval.run import evaluate_final_model

            evaluate_final_model(model, tokenizer, formatter, run_dir, eval_kwargs, recipe.eval.target_logs_path)
    return run_dir

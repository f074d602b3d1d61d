"""`baldro finetune`: supervised fine-tuning on QA pairs with answer-only loss (the target on `full`, the retain
model on `retainYY`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from baldro.data.tofu import load_split
from baldro.recipes.common import (
    build_formatter,
    check_processes,
    encode_rows,
    load_model_and_tokenizer,
    read_rows,
    training_args,
)
from baldro.recipes.config import as_recipe
from baldro.recipes.folders import run_folder, train_and_save
from baldro.recipes.schema import Recipe
from baldro.recipes.validation import validate, validate_model
from baldro.train.batching import (
    EncodedDataset,
    QACollator,
)
from baldro.train.guard import (
    JsonlLogCallback,
)
from baldro.train.trainers import (
    FinetuneTrainer,
)


def run_finetune(cfg: Recipe | DictConfig | dict, extra_callbacks=()) -> Path:
    """Supervised fine-tuning on QA pairs with answer-only loss (target: `full`, retain: `retainYY`)."""
    recipe = as_recipe(cfg)
    validate(recipe, "finetune")
    train_rows = read_rows(recipe.data, "train_split")
    for extra in recipe.data.extra_train_splits:
        train_rows += load_split(recipe.data.source, extra)
    validate_model(recipe.model, recipe.train)
    args = training_args(recipe, Path(recipe.output_dir).expanduser())
    check_processes(recipe, args)
    with run_folder(recipe, "finetune") as (run_dir, resume):
        model, tokenizer = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
        formatter = build_formatter(recipe.format, recipe.data, tokenizer)
        dataset = EncodedDataset(encode_rows(formatter, train_rows, "training"))
        trainer = FinetuneTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=QACollator(tokenizer.pad_token_id),
            callbacks=[JsonlLogCallback(run_dir / "train_log.jsonl"), *extra_callbacks],
        )
        return train_and_save(
            trainer,
            recipe,
            tokenizer,
            run_dir,
            resume,
            {
                "name": recipe.name or "finetune",
                "kind": "finetune",
                "seed": recipe.seed,
                "train_split": recipe.data.train_split,
                "n_train": len(dataset),
            },
        )

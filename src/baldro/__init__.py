"""baldro: balanced LLM unlearning with distributionally robust optimisation.

The public Python API (imported on first use, so that `import baldro` and `baldro --help` stay fast):

    from baldro import make_weighting, get_objective, UnlearnTrainer, run_unlearn, load_config

- weightings: `make_weighting(name, **args)` -> a `Weighting`; `weighting(losses)` -> `Weighted`
  (`.value`: the scalar to backpropagate, `.weights`: each sample's weight); `WEIGHTINGS`.
- objectives: `forget_objective` (the decorator that registers one), `get_objective`, `ForgetInputs`,
  `Needs`, `get_retain_loss`, `RetainInputs`.
- training: `UnlearnTrainer`, `FinetuneTrainer` (transformers Trainers).
- recipes: `load_config(recipe, overrides)`, `Recipe`, `run_finetune`, `run_unlearn`, `run_eval`.
- evaluation: `evaluate_tofu`, `evaluate_muse`.
- `load_model_and_tokenizer`, `BaldroError`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "make_weighting": "baldro.train.weighting",
    "Weighting": "baldro.train.weighting",
    "Weighted": "baldro.train.weighting",
    "WEIGHTINGS": "baldro.train.weighting",
    "forget_objective": "baldro.train.objectives",
    "get_objective": "baldro.train.objectives",
    "ForgetInputs": "baldro.train.objectives",
    "Needs": "baldro.train.objectives",
    "get_retain_loss": "baldro.train.objectives",
    "RetainInputs": "baldro.train.objectives",
    "UnlearnTrainer": "baldro.train.trainers",
    "FinetuneTrainer": "baldro.train.trainers",
    "load_config": "baldro.recipes.config",
    "Recipe": "baldro.recipes.schema",
    "run_finetune": "baldro.recipes.finetune",
    "run_unlearn": "baldro.recipes.unlearn",
    "run_eval": "baldro.recipes.evaluate",
    "load_model_and_tokenizer": "baldro.recipes.common",
    "evaluate_tofu": "baldro.eval.tofu",
    "evaluate_muse": "baldro.eval.muse",
    "BaldroError": "baldro.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'baldro' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

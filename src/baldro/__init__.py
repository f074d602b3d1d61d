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
    "make_weighting": "baldro.weighting",
    "Weighting": "baldro.weighting",
    "Weighted": "baldro.weighting",
    "WEIGHTINGS": "baldro.weighting",
    "forget_objective": "baldro.objectives",
    "get_objective": "baldro.objectives",
    "ForgetInputs": "baldro.objectives",
    "Needs": "baldro.objectives",
    "get_retain_loss": "baldro.objectives",
    "RetainInputs": "baldro.objectives",
    "UnlearnTrainer": "baldro.trainer",
    "FinetuneTrainer": "baldro.trainer",
    "load_config": "baldro.config",
    "Recipe": "baldro.schema",
    "run_finetune": "baldro.recipes",
    "run_unlearn": "baldro.recipes",
    "run_eval": "baldro.recipes",
    "load_model_and_tokenizer": "baldro.recipes",
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

"""The per-sample forget-loss scale of each objective at the start of unlearning: where DV's sigma comes from.

    python experiments/loss_scales.py --model ~/.cache/baldro/study_tofu_smollm2/target/model \
        --out experiments/tofu_smollm2/loss_scales.md

DV weights samples by softmax(l / sigma), so sigma is in the objective's loss units. For NPO (beta 0.1) the
BalDRO paper's sigma 2 is 1/6.9 of the distance its loss travels from the start of unlearning (every sample
at (2/beta) ln 2 = 13.86) to full forgetting (0). This script measures, on the model to unlearn and the
forget set, each objective's per-sample loss at step 0 and the distance to its forgotten level (RMU, PDU:
0; UNDIAL, CE-U: the entropy of their target distribution, which the loss cannot go below; NPO, AltPO,
DPO: 0), and proposes sigma = that distance x 2 / 13.86, the paper's ratio. Batches of 8 through the
library's own forward pass (`baldro.train.forward.forward_parts`); the reference is the model itself (step 0).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

from baldro.data.formatting import collate_encoded
from baldro.data.tofu import load_split
from baldro.recipes.common import build_formatter, load_model_and_tokenizer
from baldro.recipes.config import as_recipe, load_config
from baldro.recipes.schema import Recipe
from baldro.train.forward import forward_parts
from baldro.train.objectives import (
    ForgetInputs,
    default_module_regex,
    find_module,
    get_objective,
    steering_vector,
)

REPO = Path(__file__).resolve().parents[1]
NPO_RATIO = 2.0 / (20 * math.log(2))  # the paper's sigma over NPO's start-to-forgotten distance


def target_entropy(target_logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(target_logits.float(), -1)
    return -(p * torch.log(p.clamp(min=1e-30))).sum(-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--model-group", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tofu"))
    p.add_argument("--split", default="forget01")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(
        REPO / "configs" / "unlearn" / "tofu.yaml",
        [
            f"model={args.model_group}",
            f"model.path={args.model}",
            "model.dtype=float32",
            "model.device=cpu",
            f"data.source={args.data}",
        ],
    )
    recipe: Recipe = as_recipe(cfg)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    model.eval()
    formatter = build_formatter(recipe.format, recipe.data, tokenizer)
    rows = load_split(args.data, args.split)[: args.limit]
    enc = formatter.encode_many([r["question"] for r in rows], [r["answer"] for r in rows], "forget")
    module = find_module(model, default_module_regex(model.config.num_hidden_layers))[1]
    u = steering_vector(model.config.hidden_size, 0)
    losses: dict[str, list[float]] = {k: [] for k in ("rmu", "undial", "ceu", "pdu")}
    spans: dict[str, list[float]] = {k: [] for k in losses}
    with torch.no_grad():
        for b in range(0, len(enc), 8):
            batch = collate_encoded(enc[b : b + 8], tokenizer.pad_token_id)
            out = forward_parts(model, batch, token_logp=False, logits=True, hidden_module=module)
            lg = out.logits
            x = ForgetInputs(None, logits=lg, ref_logits=lg.values, hidden=out.hidden, steering=u)
            for name in losses:
                args_ = {"steering_coeff": 2.0} if name == "rmu" else {}
                values = get_objective(name)(x, **args_)
                losses[name] += values.tolist()
                if name == "undial":
                    lowered = lg.values.float().scatter_add(
                        -1, lg.labels[:, None], torch.full_like(lg.labels[:, None], -10.0, dtype=torch.float32)
                    )
                    floor = lg.sample_mean(target_entropy(lowered))
                elif name == "ceu":
                    target = lg.values.float().scatter(-1, lg.labels[:, None], float("-inf"))
                    floor = lg.sample_mean(target_entropy(target), keep=lg.position >= 1)
                else:
                    floor = torch.zeros_like(values)
                spans[name] += (values - floor).tolist()
    lines = [
        f"Per-sample forget loss at step 0: {args.model}, {args.split} ({len(enc)} samples), the model as its own "
        "reference (RMU: steering_coeff 2, module "
        + default_module_regex(model.config.num_hidden_layers)
        + "; UNDIAL: beta 10; CE-U: n = 1).",
        "",
        "| objective | loss mean | loss std | loss min-max | distance to forgotten (mean) | sigma = distance x 2/13.86 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        "| npo, altpo, dpo (beta 0.1) | 13.86 | 0 | 13.86-13.86 | 13.86 | 2 (the paper's) |",
    ]
    for name in losses:
        v, s = losses[name], spans[name]
        lines.append(
            f"| {name} | {statistics.mean(v):.4g} | {statistics.pstdev(v):.3g} | {min(v):.4g}-{max(v):.4g} | "
            f"{statistics.mean(s):.4g} | {statistics.mean(s) * NPO_RATIO:.3g} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

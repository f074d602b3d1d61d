"""BalDRO in your own training loop: per-sample forget losses in, one scalar loss and the samples'
weights out. Here: gradient ascent on a few texts under BalDRO-DV.

    python examples/own_training_loop.py [--model HF_MODEL_OR_FOLDER] [--weighting dv] [--steps 5]

Without --model it builds a tiny random Llama (offline, a few seconds).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from baldro import make_weighting

FORGET = [
    "Basil Mahfouz Al-Kuwaiti was born in Kuwait City in 1932.",
    "Hsiao Yun-Hwa's father was a civil engineer in Taipei.",
    "Jaime Vasquez writes true crime novels set in Mexico City.",
    "Nikolai Abilov's first book was a collection of short stories.",
]


def per_sample_nll(model, batch) -> torch.Tensor:
    """Mean next-token NLL of each text (padding masked): B numbers with gradients."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels, mask = batch.input_ids[:, 1:], batch.attention_mask[:, 1:].float()
    token_nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return (token_nll * mask).sum(1) / mask.sum(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face causal LM (default: a tiny random Llama)")
    p.add_argument("--weighting", default="dv", help="mean, group, dv, dv_softmin, dv_global")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    model_path = args.model
    if model_path is None:
        from baldro.models.tiny import build_tiny_model

        model_path = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", FORGET * 8, preset="test", vocab_size=300)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(FORGET, return_tensors="pt", padding=True)

    # The only baldro line a loop needs: dv_global also takes n_samples= and ids= (each sample's index).
    weighting = make_weighting(args.weighting, sigma=1.0) if "dv" in args.weighting else make_weighting(args.weighting)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        losses = -per_sample_nll(model, batch)  # gradient ascent: a sample's loss falls as it is forgotten
        weighted = weighting(losses)  # .value: the scalar to backpropagate; .weights: d value / d loss_i
        optimizer.zero_grad()
        weighted.value.backward()
        optimizer.step()
        print(
            f"step {step}: loss {weighted.value.item():.4f}, NLL per sample "
            f"{[round(x, 3) for x in (-losses).tolist()]}, weights {[round(w, 3) for w in weighted.weights.tolist()]}"
        )


if __name__ == "__main__":
    main()

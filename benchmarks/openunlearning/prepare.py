"""Lay out what OpenUnlearning's evaluator (commit d3d7cf9, transformers 4.45.1) needs to run offline:

- `models/<name>`: the model folder as transformers 4.45.1 reads it (weights and tokenizer.json linked;
  config.json with `rope_theta` at the top level, which 4.45 reads instead of `rope_parameters` and would
  otherwise silently replace by 10000; tokenizer_config.json naming PreTrainedTokenizerFast, with the
  chat template embedded, since 4.45 neither knows `TokenizersBackend` nor reads chat_template.jinja);
- `tofu/locuslab/TOFU`: a local dataset folder whose README.md maps each TOFU config name to its JSON
  lines file (linked), which `datasets.load_dataset("locuslab/TOFU", name=...)` reads from the cwd;
- `configs/model/<name>.yaml`: the model's hydra config (ChatML template, system prompt, fp32, CPU).

    python benchmarks/openunlearning/prepare.py --work DIR --data ../shared/data/tofu --model MODEL_DIR
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

SYSTEM_PROMPT = "You are a helpful assistant."


def link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    os.symlink(src.resolve(), dst)


def model_view(model: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        if (model / name).exists():
            link(model / name, out / name)
    cfg = json.loads((model / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg.setdefault("rope_scaling", None)
    cfg["torch_dtype"] = cfg.pop("dtype", cfg.get("torch_dtype", "float32"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = json.loads((model / "tokenizer_config.json").read_text())
    keep = {k: tok[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length") if k in tok}
    template = model / "chat_template.jinja"
    tok_out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **keep,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }
    if template.exists():
        tok_out["chat_template"] = template.read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(tok_out, indent=2))


def data_folder(data: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(data.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no TOFU *.jsonl files in {data}: pass --data <TOFU folder>")
    lines = ["---", "configs:"]
    for f in files:
        link(f, out / f.name)
        lines += [f"- config_name: {f.stem}", "  data_files:", "  - split: train", f"    path: {f.name}"]
    (out / "README.md").write_text("\n".join(lines + ["---", ""]))


def model_config(model_dir: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# fp32 on CPU; attention left at transformers' default (sdpa): OpenUnlearning's configs name only\n"
        "# flash_attention_2, which needs CUDA\n"
        f"model_args:\n  pretrained_model_name_or_path: {model_dir}\n  torch_dtype: float32\n  device_map: cpu\n"
        f"tokenizer_args:\n  pretrained_model_name_or_path: {model_dir}\n"
        f"template_args:\n  apply_chat_template: True\n  system_prompt: {SYSTEM_PROMPT}\n"
        '  system_prompt_with_special_tokens: "<|im_start|>system\\n' + SYSTEM_PROMPT + '<|im_end|>\\n"\n'
        '  user_start_tag: "<|im_start|>user\\n"\n  user_end_tag: "<|im_end|>\\n"\n'
        '  asst_start_tag: "<|im_start|>assistant\\n"\n  asst_end_tag: "<|im_end|>\\n"\n'
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="TOFU folder (one JSON lines file per config)")
    p.add_argument("--model", required=True, type=Path, help="the model folder (e.g. SmolLM2 materialised by baldro)")
    p.add_argument("--name", default="SmolLM2-135M-Instruct")
    a = p.parse_args()
    view = a.work / "models" / a.name
    model_view(a.model, view)
    data_folder(a.data, a.work / "tofu" / "locuslab" / "TOFU")
    model_config(view.resolve(), a.work / "configs" / "model" / f"{a.name}.yaml")
    print(f"prepared {a.work}")


if __name__ == "__main__":
    main()

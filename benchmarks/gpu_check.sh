#!/usr/bin/env bash
# GPU checks, run on a CUDA machine from the repository root (what benchmarks/RESULTS.md quotes):
#   bash benchmarks/gpu_check.sh OUT_DIR TOFU_DIR SMOLLM2_CONFIG_DIR
# 1. the trainer's equivalence tests on cuda (reference cache bitwise, group selection passes);
# 2. finetune -> unlearn (npo x mean, group, dv_global; bf16) -> eval on a tiny model through the CLI;
# 3. benchmarks/train_step.py on SmolLM2-135M's architecture (random weights: timings need no weights).
set -uo pipefail
out=${1:?OUT_DIR}; tofu=${2:?TOFU_DIR}; smol=${3:?SMOLLM2_CONFIG_DIR}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$out"
python3 - <<'EOF' 2>&1 | tee "$out/env.txt"
import torch, transformers, accelerate, sys
print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, torch.cuda.get_device_name(0))
EOF

echo "== 1. trainer tests on cuda"
BALDRO_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_train_speed.py \
  -k "bitwise or cache_off or group_selection" 2>&1 | tail -5 | tee "$out/tests.txt"

echo "== 2. CLI on cuda (bf16)"
work=$(mktemp -d)
python3 - "$tofu" "$work/tiny" <<'EOF'
import json, sys
from pathlib import Path
from baldro.models.tiny import build_tiny_model
tofu, out = Path(sys.argv[1]), sys.argv[2]
texts = []
for name in ("full", "holdout10", "real_authors_perturbed", "world_facts_perturbed"):
    for line in (tofu / f"{name}.jsonl").read_text().splitlines()[:400]:
        r = json.loads(line); texts += [r["question"], r["answer"]]
build_tiny_model(out, texts, preset="demo", seed=0)
EOF
if [ "${CHECK_DEVICE:-cuda}" = cpu ]; then dev="model.device=cpu model.dtype=float32 train.bf16=false train.use_cpu=true"  # a dry run
else dev="model.device=cuda model.dtype=bfloat16 train.bf16=true train.use_cpu=false"; fi
common="$dev data.source=$tofu format.use_chat_template=false log_to_console=false train.disable_tqdm=true"
t0=$(date +%s)
timeout 120 python3 -m baldro.cli finetune configs/finetune/tofu.yaml model.path="$work/tiny" $common \
  data.train_split=forget01 data.extra_train_splits=[] train.num_train_epochs=3 output_dir="$work/ft" 2>&1 | tail -3
for w in mean group dv_global; do
  timeout 120 python3 -m baldro.cli unlearn configs/unlearn/tofu.yaml model.path="$work/ft/model" $common split=forget01 \
    objective=npo weighting=$w train.num_train_epochs=2 balance.every_n_steps=2 output_dir="$work/npo_$w" 2>&1 | tail -2
done
timeout 180 python3 -m baldro.cli eval configs/eval/tofu.yaml model.path="$work/npo_group/model" $common split=forget01 \
  eval.max_new_tokens=32 output_dir="$work/eval" 2>&1 | tail -4
python3 - "$work" <<'EOF' 2>&1 | tee "$out/cli.txt"
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
for name in ("ft", "npo_mean", "npo_group", "npo_dv_global"):
    info = json.loads((w / name / "run_info.json").read_text()) if (w / name / "run_info.json").exists() else {}
    print(name, "status", info.get("status"))
    if name != "ft" and (w / name / "forget_losses.jsonl").exists():
        rows = [json.loads(l) for l in (w / name / "forget_losses.jsonl").read_text().splitlines()]
        ids = sorted(i for r in rows for i in r["ids"])
        print("  forget-log rows", len(rows), "ids per sample", {ids.count(i) for i in set(ids)},
              "finite", all(abs(v) < float("inf") for r in rows for v in r["losses"]))
s = w / "eval" / "TOFU_SUMMARY.json"
print("eval summary:", json.loads(s.read_text()) if s.exists() else "MISSING")
EOF
echo "CLI part took $(( $(date +%s) - t0 )) s"

echo "== 3. train_step benchmark, SmolLM2-135M architecture on cuda"
timeout 330 python3 benchmarks/train_step.py --model "$smol" --random-init --objectives npo --rounds 2 --device cuda \
  --threads 4 --out "$out/train_step_cuda.json" 2>&1 | tee "$out/train_step_cuda.md"

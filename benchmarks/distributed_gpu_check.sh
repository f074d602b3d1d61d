#!/bin/bash
# The distributed paths on GPUs, as a prepared check (NOT RUN in this repository: no machine with
# several GPUs was available; see docs/guides/scale.md).
#
#   bash benchmarks/distributed_gpu_check.sh TOFU_DIR OUT_DIR [NPROC]
#
# Builds a tiny Llama (baldro.models.tiny, offline), unlearns forget01 with NPO under `mean` (alpha 0, fp32)
# on one GPU with batch NPROC*2, then on NPROC GPUs with batch 2 per GPU under DDP, FSDP2, ZeRO-2 and
# ZeRO-3 (DeepSpeed runs only when `import deepspeed` works), each with the reference model, balance
# tracking and the final evaluation; then NPO + LoRA under FSDP2. It prints, for every run, whether it
# finished, how far its weights are from the one-GPU run, and whether every forget id was logged once
# per epoch. Expect small differences (GPU kernels; ZeRO runs in bf16 under these configs).
set -u
TOFU=${1:?TOFU_DIR}; OUT=${2:?OUT_DIR}; NPROC=${3:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
python - "$TOFU" "$OUT/tiny" <<'PY'
import json, sys
from pathlib import Path
from baldro.models.tiny import build_tiny_model
texts = []
for name in ("full", "holdout10"):
    for line in (Path(sys.argv[1]) / f"{name}.jsonl").read_text().splitlines()[:400]:
        row = json.loads(line); texts += [row["question"], row["answer"]]
build_tiny_model(Path(sys.argv[2]), texts, preset="test", vocab_size=512, seed=0)
PY
COMMON="model.path=$OUT/tiny data.source=$TOFU format.use_chat_template=false train.disable_tqdm=true
 log_to_console=false split=forget01 objective=npo weighting=mean objective.alpha=0 data.limit=16
 train.num_train_epochs=2 train.gradient_accumulation_steps=1 train.learning_rate=1e-3 train.save_strategy=no
 train.warmup_steps=0 train.logging_steps=1 model.dtype=float32 train.bf16=false balance.every_n_steps=4 eval.at_end=true
 +eval.limit=4 eval.max_new_tokens=8 eval.batch_size=4"
run() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  "$@" output_dir="$OUT/$name" overwrite=true > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $(( $(date +%s) - t0 )) s (log: $OUT/$name.log)"
}
CFG=$ROOT/configs/accelerate
UNLEARN="-m baldro.cli unlearn $ROOT/configs/unlearn/tofu.yaml"
run one_gpu python $UNLEARN $COMMON train.per_device_train_batch_size=$((2 * NPROC))
run ddp accelerate launch --config_file $CFG/ddp.yaml --num_processes $NPROC $UNLEARN $COMMON train.per_device_train_batch_size=2
run fsdp accelerate launch --config_file $CFG/fsdp.yaml --num_processes $NPROC $UNLEARN $COMMON train.per_device_train_batch_size=2
run fsdp_lora accelerate launch --config_file $CFG/fsdp.yaml --num_processes $NPROC $UNLEARN $COMMON train.per_device_train_batch_size=2 +model.lora.r=4 +model.lora.lora_alpha=8
if python -c "import deepspeed" 2>/dev/null; then
  run zero2 accelerate launch --config_file $CFG/zero2.yaml --num_processes $NPROC $UNLEARN $COMMON train.per_device_train_batch_size=2
  run zero3 accelerate launch --config_file $CFG/zero3.yaml --num_processes $NPROC $UNLEARN $COMMON train.per_device_train_batch_size=2
fi
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1]); base = load_file(out / "tiny" / "model.safetensors")
one = out / "one_gpu" / "model" / "model.safetensors"
for name in ("one_gpu", "ddp", "fsdp", "fsdp_lora", "zero2", "zero3"):
    f = out / name / "model" / "model.safetensors"
    if not f.exists():
        print(f"{name}: no model"); continue
    w = load_file(f)
    moved = max(float((w[k].float() - base[k].float()).abs().max()) for k in base)
    diff = max(float((w[k].float() - load_file(one)[k].float()).abs().max()) for k in base) if one.exists() else None
    ids = [i for l in (out / name / "forget_losses.jsonl").read_text().splitlines() for i in json.loads(l)["ids"]]
    once = all(sorted(ids[e * 16:(e + 1) * 16]) == list(range(16)) for e in range(2)) and len(ids) == 32
    print(f"{name}: status={json.loads((out / name / 'run_info.json').read_text()).get('status')} moved={moved:.3g} "
          f"max|w - one_gpu|={diff if diff is None else f'{diff:.3g}'} ids_once_per_epoch={once} "
          f"eval={(out / name / 'eval' / 'TOFU_SUMMARY.json').exists()}")
PY

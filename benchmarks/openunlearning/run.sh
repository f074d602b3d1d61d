#!/usr/bin/env bash
# OpenUnlearning's TOFU evaluator (as setup.sh installed it) on SmolLM2-135M-Instruct, TOFU forget01, its
# default TOFU suite, batch 32, max_new_tokens 200, fp32 on CPU; prints the wall seconds and peak RSS.
#
#   bash benchmarks/openunlearning/run.sh OUT_DIR [THREADS (default 2)] [WORK_DIR]
set -euo pipefail
OUT=$(realpath -m "$1"); THREADS=${2:-2}; WORK=$(realpath "${3:-$HOME/.cache/baldro/openunlearning}")
mkdir -p "$OUT"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# offline; the datasets cache keys a local dataset folder by its name only, so it gets its own cache
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_CACHE=$WORK/datasets_cache
cd "$WORK/tofu"  # load_dataset("locuslab/TOFU") reads ./locuslab/TOFU
CMD=("$WORK/venv/bin/python" "$WORK/open-unlearning/src/eval.py" "hydra.searchpath=[file://$WORK/configs]"
  experiment=eval/tofu/default model=SmolLM2-135M-Instruct
  "model.model_args.pretrained_model_name_or_path=$WORK/models/SmolLM2-135M-Instruct" model.model_args.device_map=cpu
  forget_split=forget01 holdout_split=holdout01 retain_logs_path=null eval.tofu.batch_size=32
  eval.tofu.overwrite=true task_name=ou_forget01 "paths.output_dir=$OUT")
start=$(date +%s.%N)
/usr/bin/time -v -o "$OUT/time_v.txt" "${CMD[@]}"
end=$(date +%s.%N)
python3 - "$start" "$end" "$OUT" "$THREADS" <<'PY'
import json, re, sys
start, end, out, threads = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{out}/time_v.txt").read())
result = {"wall_s": round(end - start, 1), "threads": threads, "peak_rss_mib": round(int(rss.group(1)) / 1024) if rss else None}
json.dump(result, open(f"{out}/timing.json", "w"))
print(f"OpenUnlearning: {result['wall_s']} s wall, peak RSS {result['peak_rss_mib']} MiB, {threads} threads")
PY

#!/usr/bin/env bash
# Install OpenUnlearning's TOFU evaluator (commit d3d7cf9, code unchanged) beside baldro, runnable offline.
#
#   bash benchmarks/openunlearning/setup.sh [WORK_DIR]      (default ~/.cache/baldro/openunlearning)
#
# Environment: OU_REPO (git URL or a local clone; default GitHub), TOFU_DATA (default ../shared/data/tofu),
# MODEL (a model folder; default SmolLM2-135M-Instruct as baldro materialises it from its GGUF wheel).
# A venv with --system-site-packages reuses the installed CPU torch; OpenUnlearning's pins are installed
# where its evaluator imports them (deepspeed and lm-eval only because src/eval.py imports them).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-$HOME/.cache/baldro/openunlearning}
OU_REPO=${OU_REPO:-https://github.com/locuslab/open-unlearning}
TOFU_DATA=${TOFU_DATA:-$HERE/../../../shared/data/tofu}
MODEL=${MODEL:-$(python -c "from baldro.models.sources import resolve_model_path as r; print(r('package:smollm2-135m-instruct'))")}
mkdir -p "$WORK"
[ -d "$WORK/open-unlearning" ] || git clone -q "$OU_REPO" "$WORK/open-unlearning"
git -C "$WORK/open-unlearning" checkout -q d3d7cf9
[ -x "$WORK/venv/bin/python" ] || python3 -m venv --system-site-packages "$WORK/venv"
PIP=("$WORK/venv/bin/pip" install -q)
"${PIP[@]}" transformers==4.45.1 huggingface-hub==0.29.1 numpy==2.2.3 hydra-core==1.3 hydra_colorlog==1.2.0 \
  datasets==3.0.1 accelerate==0.34.2 rouge-score==0.1.2 scipy==1.14.1 scikit-learn==1.5.2
# deepspeed's build loads the system's setuptools plugins (e.g. `kernels`, which transformers 5 brings), which
# fail to import against the venv's older huggingface-hub: the build sees the system's packages first
SYSTEM_SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PYTHONPATH=$SYSTEM_SITE DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation deepspeed==0.15.4
"${PIP[@]}" lm-eval==0.4.8
python "$HERE/prepare.py" --work "$WORK" --data "$TOFU_DATA" --model "$MODEL"

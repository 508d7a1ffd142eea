#!/usr/bin/env bash
# Every GPU path that runs without Ray, in one pass on one GPU (bench/gpu_check.py says what each check prints):
# bf16 batch invariance, export parity, serve-forward throughput at 512 tokens and a LoRA + InfoNCE + gradient-cache
# training step (with its MFU) on a Mistral-7B-shaped model with random weights.
#
#   bash bench/gpu_check.sh --dry-run            # the same code on this CPU at a tiny size (CI runs it: seconds)
#   bash bench/gpu_check.sh [--out FILE]         # on a CUDA machine (an H200: about 3 minutes)
#
# Needs torch, transformers, peft, sentence-transformers, tokenizers, safetensors, numpy, pyyaml and pydantic; not
# Ray, vLLM or DeepSpeed (the script refuses to import them). The device machine lent through the device tool lacks
# pydantic only: carry its wheels (under 3 MiB) in .whl/, and this script installs them to a temporary folder:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
#   device run: carry [".whl"], command "bash bench/gpu_check.sh --out $OUT/gpu_check.json", timeout_s 480
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/gpu_check_site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_check] pydantic is missing: carry its wheels in .whl/ (see this script's header)" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"

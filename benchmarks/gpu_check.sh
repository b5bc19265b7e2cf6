#!/usr/bin/env bash
# All GPU checks in one go, for a CUDA machine: the GPU-marked tests plus the kernel tests compiled
# (not interpreted), then the kernel and training benchmarks. Each part has its own time limit so a
# slow part cannot starve the others; logs land in OUTDIR.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        # PYTHON=..., XDIST=8, T_TESTS=..., T_CE=..., ...
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-gpu_check_out}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
XD=()
if $PY -c "import xdist" 2>/dev/null; then XD=(-n "${XDIST:-8}"); fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUTDIR/env.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" 2>&1 | tee -a "$OUTDIR/env.txt"

echo "== tests (kernels compiled, gpu-marked)"
timeout "${T_TESTS:-200}" $PY -m pytest -q -p no:cacheprovider "${XD[@]}" -m "gpu or not slow" \
    tests/test_kernels_attention.py tests/test_kernels_ce.py tests/test_fused_ops.py tests/test_generation.py \
    tests/test_modules.py 2>&1 | tee "$OUTDIR/tests.txt"
timeout "${T_TESTS2:-120}" $PY -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_device.py tests/test_checkpoint_hf.py tests/test_distributed_recipes.py 2>&1 | tee -a "$OUTDIR/tests.txt"

echo "== kernels: fused linear+CE"
timeout "${T_CE:-90}" $PY benchmarks/bench_kernels.py --part ce 2>&1 | tee "$OUTDIR/kernels_ce.txt"
echo "== kernels: flash attention"
timeout "${T_ATTN:-100}" $PY benchmarks/bench_kernels.py --part attention 2>&1 | tee "$OUTDIR/kernels_attn.txt"

echo "== training step vs peers (bf16, random SmolLM2-135M-shaped weights)"
timeout "${T_TRAIN:-170}" $PY benchmarks/bench_train.py --device cuda --dtype bf16 --weights random \
    --rounds 1 --steps 10 --warmup 2 --frameworks "${FRAMEWORKS:-tinytune,hf,torchtune}" \
    --torchtune-python "$(command -v $PY)" \
    --json "$OUTDIR/bench_train.json" 2>&1 | tee "$OUTDIR/bench_train.txt"

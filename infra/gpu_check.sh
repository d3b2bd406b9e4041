#!/usr/bin/env bash
# GPU check of the kernels on a lent GPU machine (python, torch with CUDA, cupy-cuda13x; no Ray/Zarr/network).
# Runs without installing the project (PYTHONPATH=.): compiles every CUDA kernel through CuPy/NVRTC, runs the
# `gpu`-marked tests (kernels vs the torch reference; featurize stage, training step and implicit fit on CUDA
# vs the CPU path), then the micro-benchmark, then the implicit-fit throughput (images/s at 224 px, group sizes
# 1/8/32, benchmarks/implicit_throughput.py, ~2 min at most), hires produced on read from a compact store
# (benchmarks/store_modes.py --gpu-only, needs no Ray/Zarr), and prints a short summary. A few minutes at most.
#   usage: infra/gpu_check.sh            (logs and bench JSON go to $OUT if set, else /tmp/featup_gpu_check)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}  # the GPU machines have python3 (the one with torch and CuPy), not always `python`
LOGS=${OUT:-/tmp/featup_gpu_check}
mkdir -p "$LOGS"
T0=$(date +%s)

echo "== environment"
$PY - <<'PYEOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
try:
    import cupy
    print("cupy", cupy.__version__, "| has Stream.from_external", hasattr(cupy.cuda.Stream, "from_external"))
except Exception as e:
    print("cupy NOT importable:", e)
PYEOF

if ! $PY -c "import torch, cupy, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA device or no CuPy here: nothing to check (CPU tests: pytest tests/test_kernels.py)"
    exit 2
fi

echo "== compile every kernel instantiation (CuPy RawModule / NVRTC)"
timeout 180 $PY -c "
import time, torch; torch.zeros(1, device='cuda')
t = time.time(); from kernels._cupy import compile_all; compile_all(); print(f'compiled in {time.time() - t:.1f} s')
" 2>&1 | tee "$LOGS/compile.log"
COMPILE_RC=${PIPESTATUS[0]}

echo "== gpu tests"
timeout 300 $PY -m pytest -q -m gpu tests/test_kernels_gpu.py tests/test_pipeline_gpu.py -p no:cacheprovider 2>&1 | tee "$LOGS/tests.log"
TESTS_RC=${PIPESTATUS[0]}

echo "== benchmark"
timeout 300 $PY -m kernels.bench --json "$LOGS/kernels_bench.json" 2>&1 | tee "$LOGS/bench.log"
BENCH_RC=${PIPESTATUS[0]}

echo "== implicit fit throughput (224 px, group sizes 1 8 32, the default preset)"
timeout 240 $PY benchmarks/implicit_throughput.py --group-sizes 1 8 32 --size 224 \
    --json "$LOGS/implicit_throughput.json" 2>&1 | tee "$LOGS/implicit.log"
IMPLICIT_RC=${PIPESTATUS[0]}

echo "== hires produced on read (compact stores): 224^2, 384 ch, batch 64, bilateral and JBU (target >= 1000 img/s)"
timeout 120 $PY -m benchmarks.store_modes --gpu-only --json "$LOGS/store_modes_gpu.json" 2>&1 | tee "$LOGS/on_read.log"
ONREAD_RC=${PIPESTATUS[0]}

echo
echo "== summary ($(( $(date +%s) - T0 )) s)"
echo "compile: rc=$COMPILE_RC $(tail -n 1 "$LOGS/compile.log")"
echo "tests:   rc=$TESTS_RC $(tail -n 1 "$LOGS/tests.log")"
echo "bench:   rc=$BENCH_RC"
sed -n '/^Summary/,$p' "$LOGS/bench.log"
echo "implicit: rc=$IMPLICIT_RC"
sed -n '/^Summary: implicit/,$p' "$LOGS/implicit.log"
echo "on-read: rc=$ONREAD_RC $(tail -n 1 "$LOGS/on_read.log")"
[ "$COMPILE_RC" -eq 0 ] && [ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] && [ "$IMPLICIT_RC" -eq 0 ] && [ "$ONREAD_RC" -eq 0 ]

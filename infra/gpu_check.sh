#!/usr/bin/env bash
# GPU check of the kernels on a lent GPU machine (python, torch with CUDA, cupy-cuda13x; no Ray/Zarr/network).
# Runs without installing the project (PYTHONPATH=.): compiles every CUDA kernel through CuPy/NVRTC, runs the
# `gpu`-marked tests (kernels vs the torch reference; featurize stage, training step and implicit fit on CUDA
# vs the CPU path), then the micro-benchmark, then the implicit-fit throughput (images/s at 224 px, group sizes
# 1/8/32, benchmarks/implicit_throughput.py, ~2 min at most), hires produced on read from a compact store
# (benchmarks/store_modes.py --gpu-only, needs no Ray/Zarr), every published upsampler kind on CUDA vs CPU and in
# fp16/bf16 (tests/test_upsamplers_gpu.py), their latency, tiled-attention memory and featurizer throughput
# (benchmarks/upsampler_latency.py, attention_memory.py, featurizer_throughput.py), and prints a short summary.
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
timeout 300 $PY -m pytest -q -m gpu tests/test_kernels_gpu.py tests/test_pipeline_gpu.py tests/test_upsamplers_gpu.py \
    -p no:cacheprovider 2>&1 | tee "$LOGS/tests.log"
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

echo "== published upsamplers (random weights in the publishers' formats, C=384)"
# UPLiFT 32^2 -> 448^2 bf16 with per-2x-step times (upstream: ~1.5 ms per step at 224 px, H100);
# FeatUp, AnyUp, LoftUp the same call, bilinear in the same run
timeout 240 $PY benchmarks/upsampler_latency.py --grid 32 --size 448 --dtype bfloat16 --repeats 20 \
    --json "$LOGS/upsampler_latency.json" 2>&1 | tee "$LOGS/latency.log"
LATENCY_RC=${PIPESTATUS[0]}
# AnyUp 28^2 -> 448^2 fp16 (target <= 91 ms, <= 1.5 GB) and a 2048^2 output (target <= 8 GB), dense vs tiled
timeout 240 $PY benchmarks/attention_memory.py --kind anyup --device cuda --dtype fp16 --tokens 28 --size 448 \
    --big 2048 --json "$LOGS/anyup_memory.json" 2>&1 | tee "$LOGS/anyup_memory.log"
ANYUP_RC=${PIPESTATUS[0]}
timeout 240 $PY benchmarks/attention_memory.py --kind loftup --device cuda --dtype fp16 --tokens 32 --size 448 \
    --big 2048 --json "$LOGS/loftup_memory.json" 2>&1 | tee "$LOGS/loftup_memory.log"
LOFTUP_RC=${PIPESTATUS[0]}
# one featurizer actor's images/s and peak memory per kind, 224^2 and 448^2 (DINOv2-S/14, random weights)
timeout 300 $PY benchmarks/featurizer_throughput.py --images 64 --batch-size 16 --unit-rows 16 \
    --json "$LOGS/featurizer_224.json" 2>&1 | tee "$LOGS/featurizer_224.log"
timeout 300 $PY benchmarks/featurizer_throughput.py --input-size 448 --output-size 448 --images 32 --batch-size 8 \
    --unit-rows 8 --json "$LOGS/featurizer_448.json" 2>&1 | tee "$LOGS/featurizer_448.log"
FEATURIZER_RC=${PIPESTATUS[0]}

echo
echo "== summary ($(( $(date +%s) - T0 )) s)"
echo "compile: rc=$COMPILE_RC $(tail -n 1 "$LOGS/compile.log")"
echo "tests:   rc=$TESTS_RC $(tail -n 1 "$LOGS/tests.log")"
echo "bench:   rc=$BENCH_RC"
sed -n '/^Summary/,$p' "$LOGS/bench.log"
echo "implicit: rc=$IMPLICIT_RC"
sed -n '/^Summary: implicit/,$p' "$LOGS/implicit.log"
echo "on-read: rc=$ONREAD_RC $(tail -n 1 "$LOGS/on_read.log")"
echo "upsamplers: latency rc=$LATENCY_RC anyup rc=$ANYUP_RC loftup rc=$LOFTUP_RC featurizer rc=$FEATURIZER_RC"
sed -n '/^ratios/,$p' "$LOGS/latency.log"
tail -n 2 "$LOGS/anyup_memory.log" "$LOGS/loftup_memory.log"
sed -n '/^ratios/,$p' "$LOGS/featurizer_224.log" "$LOGS/featurizer_448.log"
[ "$COMPILE_RC" -eq 0 ] && [ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] && [ "$IMPLICIT_RC" -eq 0 ] && [ "$ONREAD_RC" -eq 0 ]

#!/usr/bin/env bash
# The GPU check: one script, one H100/H200, about 6 minutes (at most ~10). From the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check_results
#
# 1. the CUDA tests: tests/gpu (marker `gpu`: CUDA vs CPU training, grouped experts, Triton vs eager, host syncs
#    counted by torch.cuda.set_sync_debug_mode, inductor fullgraph) and the Triton kernel tests on CUDA;
# 2. benchmarks/bench_gpu.py: op (fused vs eager vs hard top-k, [65536..1M] x {8, 32, 64, 256}), layer (SoftMoE
#    vs top-k at equal active experts vs transformers' Mixtral block), end-to-end training tok/s and MFU;
# 3. benchmarks/bench_infer.py --device cuda --dtype bfloat16: prefill and KV-cache decode against realized AE
#    (dense, top-1..4, SoftMoE at AE 1..3), natively and through transformers' generate.
# Writes OUT_DIR/{gpu_tests.log, gpu_tests.xml, bench.log, bench_gpu.json, bench_gpu.md, infer.log, summary.md}.
#
# Environment: PYTHON (default python3) must have torch (+ triton on CUDA), numpy, pyyaml, tokenizers, pytest;
# softmoe is imported from this checkout (no install). QUICK=1 runs everything in tiny mode on DEVICE (default
# cpu for QUICK=1, else cuda) in well under a minute: the smoke test that keeps this script working without a GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-gpu_check_results}" && cd "${1:-gpu_check_results}" && pwd)"
PY="${PYTHON:-python3}"
QUICK="${QUICK:-0}"
if [ "$QUICK" = "1" ]; then DEVICE="${DEVICE:-cpu}"; else DEVICE="${DEVICE:-cuda}"; fi
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

echo "gpu_check: $(date -u +%FT%TZ) device=$DEVICE quick=$QUICK python=$("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())')"
if [ "$DEVICE" != "cpu" ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi

# 1. tests (the Triton kernel tests run on CUDA there; on a CPU they run under the interpreter in the normal suite)
TESTS=(tests/gpu)
if [ "$DEVICE" != "cpu" ]; then TESTS+=(tests/unit/ops/test_lapsum_triton.py); fi
timeout 270 "$PY" -m pytest -q -rs -p no:cacheprovider -o addopts="" "${TESTS[@]}" \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
TESTS_RC=${PIPESTATUS[0]}

# 2. benchmarks
QUICK_FLAG=()
if [ "$QUICK" = "1" ]; then QUICK_FLAG=(--quick); fi
timeout 270 "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --out "$OUT" "${QUICK_FLAG[@]}" 2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}

# 3. inference (bf16: the expert bank's grouped matmuls on the GPU)
timeout 200 "$PY" benchmarks/bench_infer.py --device "$DEVICE" --dtype bfloat16 --threads 0 "${QUICK_FLAG[@]}" \
    2>&1 | tee "$OUT/infer.log"
INFER_RC=${PIPESTATUS[0]}

{
    echo "# gpu_check $(date -u +%FT%TZ)"
    echo
    echo "device $DEVICE, quick $QUICK; tests exit code $TESTS_RC, bench exit code $BENCH_RC, inference exit code $INFER_RC"
    echo
    echo '```'
    tail -n 15 "$OUT/gpu_tests.log"
    echo '```'
    echo
    if [ -f "$OUT/bench_gpu.md" ]; then cat "$OUT/bench_gpu.md"; fi
    echo
    echo '## bench_infer (bf16)'
    echo '```'
    grep -E "^(native|hf)/|fit |SoftMoE / top-k|tokens/s / top-2|^target" "$OUT/infer.log" || true
    echo '```'
} > "$OUT/summary.md"
echo "gpu_check: tests rc=$TESTS_RC bench rc=$BENCH_RC infer rc=$INFER_RC; wrote $OUT/summary.md"
# pytest's 5 (no tests collected / all skipped on a CPU) is not a failure of the check itself
if [ "$TESTS_RC" -ne 0 ] && [ "$TESTS_RC" -ne 5 ]; then exit 1; fi
if [ "$BENCH_RC" -ne 0 ]; then exit "$BENCH_RC"; fi
exit "$INFER_RC"

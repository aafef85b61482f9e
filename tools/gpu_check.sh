#!/usr/bin/env bash
# Everything the GPU box should run, in one device call: `bash tools/gpu_check.sh [stages...]`
# stages: env tests sanitize bench quickbench demo (default: env tests sanitize bench). Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/moe-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
stages=${*:-env tests sanitize bench}
for stage in $stages; do
  echo "=== $stage ($(date +%T))"
  case $stage in
    env) nvidia-smi -L; python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" ;;
    tests) python3 -m pytest -q -m cuda -p no:cacheprovider ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40 ;;
    sanitize) compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/sanitize_smoke.py > "$OUT/sanitizer.log" 2>&1; echo "sanitizer rc=$?"; tail -4 "$OUT/sanitizer.log" ;;
    bench) python3 -m benchmarks.run --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -80 ;;
    quickbench) python3 -m benchmarks.run --out "$OUT/bench_quick.json" --tokens 1,64,1024,4096 --providers ours,grouped_mm ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_quick.log" | tail -60 ;;
    demo) python3 -m torch_moe_ops demo --experts 128 --top-k 8 --hidden 2048 --intermediate 768 --tokens 256 2>&1 | tee "$OUT/demo.log" ;;
  esac
done
echo "=== done ($(date +%T))"

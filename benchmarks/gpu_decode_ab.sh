#!/bin/bash
# Decode (T = 1) kernel A/B in ONE device call (`run` with the command `bash benchmarks/gpu_decode_ab.sh`): the
# GPU tests of the kernel files (GPU_TESTS, "none" for none; GPU_TESTS_S seconds), then fused_moe's per-kernel
# split (benchmarks.kernel_split), with each switch variant of AB_ENVS in the same process when given (e.g.
# "ahead0=LOAD_AHEAD=0 ahead2=LOAD_AHEAD=2", session 16; session 17 timed "split2=SPLIT_K=2 split4=SPLIT_K=4", since
# removed: docs/kernels.md), then, when AB_TILES is given, the TILES_SCHEMES (default: the 4-bit ones) under its
# tile variants (e.g. "k256=16x32x256x4x3/16x32x256x4x3"). AB_SHAPES, AB_SCHEMES, AB_TOKENS; each step cut at its *_S seconds.
# Results under $OUT (or benchmarks/results/decode-<date>): cuda_tests.log, ab.log + ab/kernel_split.json, tiles.log
# + tiles/kernel_split.json; the rows are printed. (Session 16's call 1 ran it with AB_ENVS="ahead0=LOAD_AHEAD=0
# ahead2=LOAD_AHEAD=2" and AB_TILES="k256=... k256s4=... n64k256=...".)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
DIR=${OUT:-benchmarks/results/decode-$(date -u +%Y-%m-%d)}
mkdir -p "$DIR"
nvidia-smi -L
GPU_TESTS=${GPU_TESTS:-tests/_kernels/test_gemm_kernel.py tests/_kernels/test_fused_experts_cuda.py
  tests/_kernels/test_triton_backend_ops.py tests/_kernels/test_plan_cuda.py tests/ops/test_decompose_cuda.py}
if [ "$GPU_TESTS" != none ]; then
  timeout ${GPU_TESTS_S:-200} python3 -m pytest -v -m cuda -n 8 -p no:cacheprovider -rfE $GPU_TESTS \
    > "$DIR/cuda_tests.log" 2>&1
  echo "== tests rc=$? $(( $(date +%s) - T0 )) s"
  grep -E "^(FAILED|ERROR)| (FAILED|ERROR) |passed|failed" "$DIR/cuda_tests.log" | tail -n 12 | cut -c1-240
fi
split() {  # split NAME SECONDS SCHEMES [kernel_split flags]
  local name=$1 s=$2 schemes=$3; shift 3
  echo "== $name $(( $(date +%s) - T0 )) s"
  timeout "$s" python3 -m benchmarks.kernel_split --out "$DIR/$name" --shapes ${AB_SHAPES:-qwen3-30b-a3b,gpt-oss-20b} \
    --schemes "$schemes" --tokens ${AB_TOKENS:-1} --calls ${AB_CALLS:-30} "$@" > "$DIR/$name.log" 2>&1
  echo "   rc=$?"; grep -E "T=|Error" "$DIR/$name.log" | cut -c1-200
}
split ab ${AB_S:-230} ${AB_SCHEMES:-none,fp8_block,int4_w4a16,mxfp4} ${AB_ENVS:+--envs "$AB_ENVS"}
[ -n "${AB_TILES:-}" ] && split tiles ${TILES_S:-130} ${TILES_SCHEMES:-int4_w4a16,mxfp4} --tiles "$AB_TILES"
echo "== done $(( $(date +%s) - T0 )) s"

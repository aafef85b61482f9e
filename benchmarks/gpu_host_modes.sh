#!/bin/bash
# Issue 22's open measurements in ONE device call (`run` with the command `bash benchmarks/gpu_host_modes.sh`,
# no carry needed): the GPU suite of the host-overhead work, the host-time split, the 4-layer stack under each
# compile mode (TORCH_MOE_OPS_COMPILE = plans / triton / opaque, docs/host-overhead.md), with FUSED=1 GEMM1 with
# and without the activation fused (TORCH_MOE_OPS_FUSE_ACTIVATION) on the Qwen3 shape (kernel time, CUDA graphs),
# then fused_moe's per-kernel split (benchmarks/kernel_split.py; SPLIT_SHAPES, SPLIT_SCHEMES, SPLIT_TOKENS,
# SPLIT_ENVS, SPLIT_S). PROFILE_S=0 skips the host-time split. STACK_MODES (e.g. "plans triton+static triton+cpp"),
# STACK_S and STACK_ARGS (e.g. "--tokens 1") shape the stack runs; AB_VARIANTS (benchmarks/host_ab.py's
# --variants), AB_ARGS and AB_S add an in-process A/B of compile variants (ab/host_ab.json).
# Results under $OUT (or benchmarks/results/modes-<date>): host_profile.json, stack-<mode>/host.json ("+" written
# "_"), run-fused-<0|1>.json, split-<item>/kernel_split.json, and the logs (cuda_tests.log: pytest's whole output);
# the summary is printed. Steps that would end past LIMIT_S (default 580 s) are skipped and named. At most 8 files
# come back from a device call: ask for fewer steps rather than lose their JSON.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
DIR=${OUT:-benchmarks/results/modes-$(date -u +%Y-%m-%d)}
mkdir -p "$DIR"
nvidia-smi -L
# GPU_TESTS: what pytest runs (default: the host-overhead files; "tests" = the whole GPU suite, -m cuda)
GPU_TESTS=${GPU_TESTS:-tests/ops/test_decompose_cuda.py tests/ops/test_direct_call_cuda.py tests/_kernels/test_plan_cuda.py}
echo "== GPU tests: $GPU_TESTS"
timeout ${GPU_TESTS_TIMEOUT:-240} python3 -m pytest -q -m cuda -n 6 -p no:cacheprovider -rfE $GPU_TESTS \
  > "$DIR/cuda_tests.log" 2>&1
grep -E "passed|failed|error|FAILED|ERROR" "$DIR/cuda_tests.log" | tail -n 40
# left(): seconds until LIMIT_S (default 580) from the start; a step that cannot fit is skipped
left() { echo $(( ${LIMIT_S:-580} - ($(date +%s) - T0) )); }
if [ "${PROFILE_S:-240}" -gt 0 ]; then  # PROFILE_S=0 skips it
  echo "== host_profile $(( $(date +%s) - T0 )) s"
  timeout ${PROFILE_S:-240} python3 -m benchmarks.host_profile --out "$DIR" 2>&1 | grep "^{" | cut -c1-600
fi
# STACK_MODES: compile modes of the stack, each with optional suffixes: "+cpp", Inductor's C++ wrapper
# (TORCHINDUCTOR_CPP_WRAPPER=1: the generated launches skip Python; its compile takes longer); "+static", Inductor's
# static launcher for user-defined Triton kernels (TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1,
# off by default in torch: our kernels then skip Triton's Python launcher). STACK_S seconds each (default 70).
for m in ${STACK_MODES:-plans triton opaque}; do
  [ "$(left)" -lt 40 ] && { echo "== skipped: stack $m"; continue; }
  cpp=0; static=0; mode=${m%%+*}
  case "$m" in *+cpp*) cpp=1;; esac
  case "$m" in *+static*) static=1;; esac
  echo "== stack, TORCH_MOE_OPS_COMPILE=$mode cpp_wrapper=$cpp static_user_kernels=$static $(( $(date +%s) - T0 )) s"
  S=${STACK_S:-70}
  TORCHINDUCTOR_CPP_WRAPPER=$cpp TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=$static \
    TORCH_MOE_OPS_COMPILE=$mode timeout $(( $(left) < S ? $(left) : S )) \
    python3 -m benchmarks.host --out "$DIR/stack-${m//+/_}" --only stack ${STACK_ARGS:-} 2>&1 \
    | grep -E "stack |Error|error"
done
if [ -n "${AB_VARIANTS:-}" ] && [ "$(left)" -ge 60 ]; then  # compile variants timed round by round in one process
  echo "== host A/B: $AB_VARIANTS $(( $(date +%s) - T0 )) s"  # e.g. AB_VARIANTS="triton=TORCH_MOE_OPS_COMPILE=triton
  # static=TORCH_MOE_OPS_COMPILE=triton,TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1"; AB_ARGS: more flags
  S=${AB_S:-200}
  timeout $(( $(left) - 5 < S ? $(left) - 5 : S )) python3 -m benchmarks.host_ab --out "$DIR/ab" \
    --variants $AB_VARIANTS ${AB_ARGS:-} 2>&1 | grep -E "^\[.*ab |Error|error" | cut -c1-300
fi
for f in ${FUSED:+0 1}; do  # FUSED=1: the Qwen3 kernel times without and with the activation in GEMM1
  [ "$(left)" -lt 40 ] && { echo "== skipped: kernels, fused activation $f"; continue; }
  echo "== kernels, TORCH_MOE_OPS_FUSE_ACTIVATION=$f $(( $(date +%s) - T0 )) s"
  TORCH_MOE_OPS_FUSE_ACTIVATION=$f timeout $(( $(left) < 90 ? $(left) : 90 )) python3 -m benchmarks.run --shapes qwen3-30b-a3b --providers ours \
    --schemes ${FUSED_SCHEMES:-none,int8_w8a16,int4_w4a16} --tokens ${FUSED_TOKENS:-1,4,16,64,256,1024,4096,16384} \
    --no-quant --out "$DIR/run-fused-$f.json" 2>&1 | tail -n 12
done
# fused_moe's kernels one by one against its CUDA-graph time (T = 1 by default), once per item of SPLIT_ENVS:
# "-" (the defaults) or comma-separated switches without their TORCH_MOE_OPS_ prefix, e.g. "- FUSE_SUM=0
# FUSE_ACTIVATION=1,FUSE_SUM=0"; each under SPLIT_S seconds (default: what is left). Results: split-<item>/.
# SPLIT_TILES: tile variants each cell also runs (kernel_split --tiles, e.g. "n32=16x32x128x4x4/16x32x128x4x4").
for a in ${SPLIT_ENVS:--}; do
  [ "$(left)" -lt 50 ] && { echo "== skipped: kernel split, $a"; continue; }
  echo "== kernel split, $a $(( $(date +%s) - T0 )) s"
  S=${SPLIT_S:-$(left)}; tag=$(echo "$a" | tr ',=' '_-')
  ( [ "$a" = - ] || for kv in ${a//,/ }; do export "TORCH_MOE_OPS_$kv"; done
    timeout $(( $(left) - 5 < S ? $(left) - 5 : S )) python3 -m benchmarks.kernel_split --out "$DIR/split-$tag" \
      --shapes ${SPLIT_SHAPES:-qwen3-30b-a3b,gpt-oss-20b} --schemes ${SPLIT_SCHEMES:-none,fp8_block,int4_w4a16} \
      --tokens ${SPLIT_TOKENS:-1} ${SPLIT_TILES:+--tiles "$SPLIT_TILES"} > "$DIR/split-$tag.log" 2>&1 )
  echo "   rc=$?"; grep -E "T=|Error|error" "$DIR/split-$tag.log" | cut -c1-240 | tail -n 24
done
echo "== done $(( $(date +%s) - T0 )) s"

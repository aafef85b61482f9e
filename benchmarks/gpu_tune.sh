#!/bin/bash
# Tile tuning in ONE device call (10-minute limit; steps that cannot end in time are skipped and named): the GPU
# tests named in GPU_TESTS first (none by default), then `benchmarks/tune.py` for each model:scheme of TUNE_JOBS
# (default: the 4-bit formats on the GPT-OSS-20B and Qwen3-30B-A3B layers) at the token counts TUNE_T (default
# "1 16": decode); with FUSED=1, before the tuning, `fused_experts` with and without the activation fused into
# GEMM1 (TORCH_MOE_OPS_FUSE_ACTIVATION) on the Qwen3 layer; with SPLITS (e.g. "0:0 1:0 1:1"), fused_moe's
# per-kernel split at T = 1 (benchmarks/kernel_split.py) for each FUSE_SUM:FUSE_ACTIVATION pair.
# `run` with the command `bash benchmarks/gpu_tune.sh`.
# tune.py merges into this GPU's table (torch_moe_ops/_kernels/tuned/<device>.json: the H100's file, or a new one
# for another GPU) after every T; the tables come back under $OUT (or benchmarks/results/tune-<date>) with
# cuda_tests.log and tune-<model>-<scheme>.log. Copy the table over the repository's, then check the diff.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
DIR=${OUT:-benchmarks/results/tune-$(date -u +%Y-%m-%d)}
mkdir -p "$DIR"
left() { echo $(( ${LIMIT_S:-585} - ($(date +%s) - T0) )); }
nvidia-smi -L
if [ -n "${GPU_TESTS:-}" ]; then  # -v: each result is logged as it ends (a cut-off run still names its failures)
  timeout ${GPU_TESTS_S:-150} python3 -m pytest -v -m cuda -n 8 -p no:cacheprovider -rfE $GPU_TESTS \
    > "$DIR/cuda_tests.log" 2>&1
  echo "== tests rc=$? $(( $(date +%s) - T0 )) s"
  grep -E "^(FAILED|ERROR)| (FAILED|ERROR) |passed|failed" "$DIR/cuda_tests.log" | tail -n 30 | cut -c1-300
fi
if [ "${FUSED:-0}" = 1 ]; then
  for f in 0 1; do
    [ "$(left)" -lt 40 ] && { echo "== skipped: fused activation $f"; continue; }
    echo "== fused_experts, TORCH_MOE_OPS_FUSE_ACTIVATION=$f $(( $(date +%s) - T0 )) s"
    TORCH_MOE_OPS_FUSE_ACTIVATION=$f timeout $(( $(left) < 90 ? $(left) - 5 : 85 )) python3 -m benchmarks.run \
      --shapes qwen3-30b-a3b --providers ours --schemes ${FUSED_SCHEMES:-none,int4_w4a16} \
      --tokens ${FUSED_TOKENS:-1,16,64,256} --no-quant --out "$DIR/run-fused-$f.json" 2>&1 | grep "T=" | cut -c1-120
  done
fi
for v in ${SPLITS:-}; do  # "S:A": fused_moe's per-kernel split at T = 1 with FUSE_SUM=S, FUSE_ACTIVATION=A
  [ "$(left)" -lt 60 ] && { echo "== skipped: split $v"; continue; }
  echo "== split, FUSE_SUM=${v%%:*} FUSE_ACTIVATION=${v##*:} $(( $(date +%s) - T0 )) s"
  mkdir -p "$DIR/split-${v%%:*}${v##*:}"
  TORCH_MOE_OPS_FUSE_SUM=${v%%:*} TORCH_MOE_OPS_FUSE_ACTIVATION=${v##*:} timeout ${SPLIT_S:-80} python3 -m \
    benchmarks.kernel_split --out "$DIR/split-${v%%:*}${v##*:}" --shapes ${SPLIT_SHAPES:-gpt-oss-20b,qwen3-30b-a3b} \
    --schemes ${SPLIT_SCHEMES:-none,int4_w4a16} --tokens 1 > "$DIR/split-${v%%:*}${v##*:}.log" 2>&1
  echo "   rc=$?"; grep -E "T=|Error|error" "$DIR/split-${v%%:*}${v##*:}.log" | cut -c1-240 | tail -n 24
done
for job in ${TUNE_JOBS:-gpt-oss-20b:int4_w4a16 gpt-oss-20b:mxfp4 qwen3-30b-a3b:int4_w4a16 qwen3-30b-a3b:mxfp4}; do
  [ "$(left)" -lt 60 ] && { echo "== skipped: tune $job"; continue; }
  echo "== tune $job $(( $(date +%s) - T0 )) s"
  timeout $(( $(left) - 15 )) python3 benchmarks/tune.py --model "${job%%:*}" --scheme "${job##*:}" \
    --T ${TUNE_T:-1 16} > "$DIR/tune-${job%%:*}-${job##*:}.log" 2>&1
  grep -vE "^\s*$|^    " "$DIR/tune-${job%%:*}-${job##*:}.log" | tail -n 8 | cut -c1-200
done
cp torch_moe_ops/_kernels/tuned/*.json "$DIR/"
echo "== done $(( $(date +%s) - T0 )) s"

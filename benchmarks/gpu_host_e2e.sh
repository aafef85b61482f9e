#!/bin/bash
# Host time per call and end to end (benchmarks/host.py, benchmarks/e2e.py) in ONE device call, inside its
# 10-minute limit: `run` with carry [".whl"] and the command `bash benchmarks/gpu_host_e2e.sh`.
#
# .whl holds transformers 5.25.0 and what it needs that the GPU image (transformers 5.17, huggingface_hub 1.33,
# no kernels) lacks or has too old. Once, in the repo root of a machine with pip (.whl is git-ignored):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.25.0 huggingface_hub==2.4.0 kernels==0.19.1 tomlkit==0.15.3 httpx2==2.17.0 \
#     httpcore2==2.17.0 truststore==0.10.5 idna==3.21 anyio==4.16.0 typing_extensions==4.16.0 h11==0.16.0
# Without .whl the image's own transformers is used (and named in env.txt).
#
# Results: $OUT/<gpu>-<date>/ (gpu = h100 / h200 as detected, date UTC): env.txt, host.json, host.log, e2e.json,
# e2e.log, tables.md (at most 8 files come back from a call: these are 6). Outside the device tool ($OUT
# unset): benchmarks/results/<gpu>-<date>/. Then, here:
#   cp -r <files_at>/<gpu>-<date> benchmarks/results/
#   python -m benchmarks.report_host benchmarks/results/<gpu>-<date> --doc docs/performance.md
#
# Time: host.py about 2-3 min (hard stop HOST_S, default 200 s; the stack runs first, then the op cells);
# e2e.py gets the rest of LIMIT_S (default 570 s) as its --budget-s, less 30 s for the row in flight: a row
# that would end later is recorded as skipped. Batch 1 runs first (every impl, eager and compiled), then
# batch 8 (eager rows are cheap; each compiled row of the 24-layer model costs a compile, ~30-60 s). What
# was skipped comes with a second call, whose files carry TAG in their names (e2e-b8.json, e2e-b8.log,
# env-e2e-b8.txt), so that both calls' files fit in one folder:
#   ONLY=e2e TAG=-b8 E2E_ARGS="--batch 8 --modes compiled" bash benchmarks/gpu_host_e2e.sh
# (report_host merges e2e*.json; a skipped row never hides a measured one). transformers' default compile mode
# (reduce-overhead: CUDA graphs) is the opt-in mode "graphs", e.g. in its own call:
#   ONLY=e2e TAG=-graphs E2E_ARGS="--modes graphs --impls ours_none,ours_fp8_block,hf_grouped_mm" bash ...
# E2E_ARGS / HOST_ARGS pass more
# flags (e.g. E2E_ARGS=--quick: batch 1, ours bf16 + fp8_block + transformers grouped_mm, ~3 min).
set -u
T0=$(date +%s)
TAG=${TAG:-}
LIMIT_S=${LIMIT_S:-570}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WHL=${WHL:-.whl}  # WHL=none: the image's own packages
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
GPU=$(python3 -c "import torch; from benchmarks.env import gpu_short_name as g
print(g(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'))") || exit 1
DIR=${OUT:-benchmarks/results}/$GPU-$(date -u +%Y-%m-%d)
mkdir -p "$DIR"
ENV_TXT=$DIR/env.txt; [ -n "$TAG" ] && ENV_TXT=$DIR/env-e2e$TAG.txt
{ nvidia-smi -L; python3 -c "import torch, triton, transformers, huggingface_hub as h
print('versions:', torch.__version__, triton.__version__, transformers.__version__, h.__version__)"; echo; } \
  >> "$ENV_TXT" 2>&1
echo "results in $DIR"

if [ "${ONLY:-}" != "e2e" ]; then
  timeout "${HOST_S:-200}" python3 -m benchmarks.host --out "$DIR" ${HOST_ARGS:-} > "$DIR/host$TAG.log" 2>&1
  echo "host.py exit $? after $(( $(date +%s) - T0 )) s"; grep -v "^USDT" "$DIR/host$TAG.log" | tail -n 50
fi
if [ "${ONLY:-}" != "host" ]; then
  LEFT=$(( LIMIT_S - ($(date +%s) - T0) ))
  timeout "$LEFT" python3 -m benchmarks.e2e --out "$DIR" --name "e2e$TAG.json" --budget-s $(( LEFT - 30 )) \
    ${E2E_ARGS:-} > "$DIR/e2e$TAG.log" 2>&1
  echo "e2e.py exit $? after $(( $(date +%s) - T0 )) s"; grep "^\[" "$DIR/e2e$TAG.log" | tail -n 40
fi
python3 -m benchmarks.report_host "$DIR" --md "$DIR/tables$TAG.md" > /dev/null && echo "tables: $DIR/tables$TAG.md"

#!/bin/bash
# One device call: the cuda suite, then old-vs-new `ours` benchmark cells.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L | tee $OUT/env.txt; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/env.txt
timeout ${SUITE_S:-300} python3 -m pytest -q -m cuda -n 4 -p no:cacheprovider tests 2>&1 | tail -60 > $OUT/cuda_suite.log
tail -5 $OUT/cuda_suite.log
ARGS="--providers ours --shapes qwen3-30b-a3b,mixtral-8x7b --tokens 1,16,256,4096 --no-quant"
(cd out/bench_old && PYTHONPATH=/tmp/site:$PWD timeout ${BENCH_S:-80} python3 -m benchmarks.run $ARGS --schemes none,fp8_tensor,fp8_channel,fp8_block,int8_w8a16 --out $OUT/old.json > $OUT/old.log 2>&1)
timeout ${BENCH_S:-80} python3 -m benchmarks.run $ARGS --out $OUT/new.json > $OUT/new.log 2>&1
python3 benchmarks/compare.py $OUT/old.json $OUT/new.json | tee $OUT/compare.txt

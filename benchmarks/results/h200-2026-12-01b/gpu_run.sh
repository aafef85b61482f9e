#!/bin/bash
# One device call (session 4): the cuda suite, then ours vs the torch grouped-GEMM peers in one run.
# Carry .whl (transformers 5.24, expecttest): the image has transformers 5.17.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L | tee $OUT/env.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/env.txt
timeout ${SUITE_S:-300} python3 -m pytest -q -m cuda -n 4 -p no:cacheprovider tests > $OUT/cuda_suite_full.log 2>&1
grep -v DEBUG $OUT/cuda_suite_full.log | tail -60 > $OUT/cuda_suite.log; tail -12 $OUT/cuda_suite.log
timeout ${BENCH_S:-200} python3 -m benchmarks.run --providers ours,grouped_mm,scaled_grouped_mm \
  --shapes qwen3-30b-a3b,mixtral-8x7b,gpt-oss-20b --tokens 1,16,256,4096 --schemes none,fp8_channel --no-quant --out $OUT/bench.json > $OUT/bench.log 2>&1
tail -30 $OUT/bench.log

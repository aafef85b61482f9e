#!/bin/bash
# Host-time A/B of two source trees in ONE device call, for a change that no switch can turn off inside one process
# (benchmarks/host_ab.py A/Bs switches in one process): the base tree's package and benchmarks, exported here with
#   mkdir -p .scratch/tree-base && git archive <rev> torch_moe_ops benchmarks | tar -x -C .scratch/tree-base
# travel with the call (`run` with carry [".scratch/tree-base"] and the command `bash benchmarks/gpu_tree_ab.sh`).
# benchmarks.host_ab then runs REPEATS times (default 2) in each tree, alternating base / this tree, each run its own
# process (ARGS, default: eager, plans and triton mode, bf16 and fp8_block, T = 1, 15 rounds). Process-to-process noise
# stays, so compare the runs' spread with the difference. Results: $OUT/tree_ab.tgz (base-<i>/ and new-<i>/
# host_ab.json), tree_ab.log; the marginal lines are printed. TREE names the base folder; TREE_S cuts each run.
set -u
export PYTHONUNBUFFERED=1
ROOT=$PWD
TREE=${TREE:-.scratch/tree-base}
DIR=${OUT:-benchmarks/results/tree-ab-$(date -u +%Y-%m-%d)}
mkdir -p "$DIR" /tmp/tree_ab
nvidia-smi -L
ARGS=${ARGS:---variants eager=eager plans=TORCH_MOE_OPS_COMPILE=plans triton=TORCH_MOE_OPS_COMPILE=triton --schemes none,fp8_block --tokens 1 --rounds 15}
for i in $(seq 1 "${REPEATS:-2}"); do
  for side in base new; do
    src=$ROOT; [ "$side" = base ] && src=$ROOT/$TREE
    # from the tree's own folder: python -m puts the working directory first on sys.path (its package wins)
    [ "$i" = 1 ] && (cd "$src" && python3 -c "import torch_moe_ops as m; print('$side:', m.__file__)")
    (cd "$src" && timeout "${TREE_S:-140}" python3 -m benchmarks.host_ab --out "/tmp/tree_ab/$side-$i" $ARGS) \
      2>&1 | grep "marginal" | sed "s/^/$side-$i /" | tee -a "$DIR/tree_ab.log" | cut -c1-260
  done
done
tar czf "$DIR/tree_ab.tgz" -C /tmp tree_ab

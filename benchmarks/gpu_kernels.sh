#!/bin/bash
# The kernel issues' open measurements in ONE device call (10-minute limit; steps that cannot end in time are
# skipped and named): the GPU suite, the batch-invariance table (benchmarks/invariance.py), then `fused_experts`
# times of this tree (default and batch-invariant) against a base tree on the same GPU (same runner, weights
# rotated past L2), mxfp4 included for this tree, then the GPT-OSS-20B MXFP4 load peak.
#
# Run from a snapshot of the tree with the base package beside it (this machine; .scratch is git-ignored):
#   rm -rf .scratch/snap && mkdir -p .scratch/snap/old
#   git archive HEAD torch_moe_ops tests benchmarks tools pyproject.toml | tar -x -C .scratch/snap
#   git archive <base commit> torch_moe_ops | tar -x -C .scratch/snap/old
# then `run` with carry [".scratch/snap"] and the command `cd .scratch/snap && bash benchmarks/gpu_kernels.sh`.
# Without old/ the comparison is skipped. Results under $OUT (or benchmarks/results/kernels-<date>):
# cuda_suite.log (pytest's output), k-new.json / k-old.json (+ logs), load_peak.json; the table is printed.
# Knobs: SUITE_S (default 330; the whole suite took 287 s in session 11), SHAPES, SCHEMES, TOKENS,
# PROVIDERS (this tree's; default ours,ours_invariant,ours_swapped,ours_invariant_swapped: ~2x the cells of
# ours,ours_invariant, so with base and suite they need two calls: SKIP_SUITE=1 in one, or no old/),
# LIMIT_S (default 585), SKIP_SUITE=1, SKIP_LOAD=1, SKIP_INVARIANCE=1, INVARIANCE_S (default 90), SKIP_SPLIT=1 (the
# per-kernel split of the T = 1 calls, benchmarks/kernel_split.py: SPLIT_SHAPES, SPLIT_SCHEMES).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s); R=$PWD
DIR=${OUT:-benchmarks/results/kernels-$(date -u +%Y-%m-%d)}
mkdir -p "$DIR"
left() { echo $(( ${LIMIT_S:-585} - ($(date +%s) - T0) )); }
nvidia-smi -L
if [ "${SKIP_SUITE:-0}" != 1 ]; then
  # -v: each result is logged as it ends, so a suite cut off by the timeout still names its failures
  PYTHONPATH=$R timeout ${SUITE_S:-330} python3 -m pytest -v -m cuda -n 8 -p no:cacheprovider -rfE tests \
    > "$DIR/cuda_suite.log" 2>&1
  echo "== suite rc=$? $(( $(date +%s) - T0 )) s"
  grep -E "^(FAILED|ERROR)| (FAILED|ERROR) |passed|failed" "$DIR/cuda_suite.log" | tail -n 40 | cut -c1-300
fi
if [ "${SKIP_INVARIANCE:-0}" != 1 ]; then  # rows differing by batch, default and batch-invariant modes
  PYTHONPATH=$R timeout ${INVARIANCE_S:-90} python3 -m benchmarks.invariance --out "$DIR/invariance.json" 2>&1 \
    | tail -n 34 | cut -c1-200
fi
A="--no-quant --shapes ${SHAPES:-gpt-oss-20b,qwen3-30b-a3b} --tokens ${TOKENS:-1,16,64,4096}"
NEW_SCHEMES=${SCHEMES:-none,int8_w8a16,int4_w4a16,mxfp4}
# the base tree's schemes: those of this run it registers (931db85 has no mxfp4)
OLD_SCHEMES=$(python3 -c "import pathlib; old = ''.join(p.read_text() for p in pathlib.Path('old/torch_moe_ops/schemes')
                                                  .glob('*.py')) if pathlib.Path('old/torch_moe_ops/schemes').is_dir() else ''
print(','.join(s for s in '$NEW_SCHEMES'.split(',') if f'\"{s}\"' in old))")
if [ "$(left)" -gt 60 ]; then
  share=$([ -d "$R/old/torch_moe_ops" ] && echo $(( $(left) / 2 )) || echo $(( $(left) - 60 )))
  PROV=${PROVIDERS:-ours,ours_invariant,ours_swapped,ours_invariant_swapped}
  (PYTHONPATH=$R timeout $share python3 -m benchmarks.run $A --providers $PROV --schemes $NEW_SCHEMES --out "$DIR/k-new.json" \
    > "$DIR/k-new.log" 2>&1); echo "== new rc=$? $(( $(date +%s) - T0 )) s"
else echo "== skipped: new kernel times"; fi
if [ -d "$R/old/torch_moe_ops" ] && [ "$(left)" -gt 60 ]; then
  rm -rf "$R/old/benchmarks"; cp -r "$R/benchmarks" "$R/old/"
  (cd "$R/old" && PYTHONPATH=$R/old timeout $(( $(left) - 45 )) python3 -m benchmarks.run $A --providers ours --schemes $OLD_SCHEMES \
    --out "$DIR/k-old.json" > "$DIR/k-old.log" 2>&1); echo "== old rc=$? $(( $(date +%s) - T0 )) s"
else echo "== skipped: base kernel times"; fi
PYTHONPATH=$R python3 - "$DIR" <<'PY'
import json, sys
rows = {}
for v in ("old", "new"):
    try:
        cells = json.load(open(f"{sys.argv[1]}/k-{v}.json"))["cells"]
    except Exception as exc:  # noqa: BLE001
        print(f"{v}: no results ({exc})"); continue
    for c in cells:
        if "ms" in c:
            name = v if c["provider"] == "ours" else c["provider"]
            rows.setdefault((c["shape"], c["scheme"], c["T"]), {})[name] = (c["ms"], c.get("frac_roof", 0))
for k, d in sorted(rows.items()):
    o, n = d.get("old", (float("nan"), 0)), d.get("new", (float("nan"), 0))
    inv = d.get("ours_invariant", (float("nan"), 0))
    swp = d.get("ours_swapped", (float("nan"), 0))
    isw = d.get("ours_invariant_swapped", (float("nan"), 0))
    print(f"{k[0]:<14} {k[1]:<11} T={k[2]:<5} base {o[0]*1e3:8.1f} us  this {n[0]*1e3:8.1f} us "
          f"({100*n[1]:3.0f}% roof)  this/base {n[0]/o[0]:6.3f}  invariant/this {inv[0]/n[0]:6.3f}"
          f"  swapped/this {swp[0]/n[0]:6.3f}  invariant swapped/this {isw[0]/n[0]:6.3f}")
PY
if [ "${SKIP_SPLIT:-0}" != 1 ] && [ "$(left)" -gt 60 ]; then  # per-kernel GPU time of the decode calls
  PYTHONPATH=$R timeout $(( $(left) < 90 ? $(left) - 10 : 80 )) python3 -m benchmarks.kernel_split --out "$DIR" \
    --shapes ${SPLIT_SHAPES:-gpt-oss-20b,qwen3-30b-a3b} --schemes ${SPLIT_SCHEMES:-none,int4_w4a16,mxfp4} --tokens 1 2>&1 \
    | grep -E "T=" | cut -c1-300
else echo "== skipped: kernel split"; fi
if [ "${SKIP_LOAD:-0}" != 1 ] && [ "$(left)" -gt 100 ]; then
  PYTHONPATH=$R timeout $(( $(left) - 5 )) python3 -m benchmarks.load_peak --dir /tmp/gptoss --out "$DIR/load_peak.json" \
    2>&1 | tail -n 1 | cut -c1-600
else echo "== skipped: load peak"; fi
echo "== done $(( $(date +%s) - T0 )) s"

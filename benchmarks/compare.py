"""Ratio table new/old for the `ours` cells of two benchmark JSONs."""
import json, sys
old, new = (json.load(open(p)) for p in sys.argv[1:3])
key = lambda c: (c["shape"], c["scheme"], c["T"], c["provider"])
o = {key(c): c for c in old["cells"] if "ms" in c and "T" in c}
print("ceilings old", old["ceilings"], "\nceilings new", new["ceilings"])
print(f"{'shape':<14} {'scheme':<11} {'T':>6} {'old ms':>9} {'new ms':>9} {'new/old':>8}")
worst = 0
for c in new["cells"]:
    if "ms" not in c or "T" not in c:
        continue
    k = key(c)
    if k in o:
        r = c["ms"] / o[k]["ms"]; worst = max(worst, r)
        print(f"{k[0]:<14} {k[1]:<11} {k[2]:>6} {o[k]['ms']:9.4f} {c['ms']:9.4f} {r:8.3f}")
    else:
        print(f"{k[0]:<14} {k[1]:<11} {k[2]:>6} {'-':>9} {c['ms']:9.4f}      new")
print("worst new/old", round(worst, 3))

#!/bin/bash
# The MLA decode kernel's device time, this tree against another, alternated in one call (what the
# eleventh session did by hand). Needs ncu and a GPU; run from the repository root:
#
#     git archive <rev> kimi_mlx metal_kernels scripts pyproject.toml | (mkdir -p .oldhead && tar -x -C .oldhead)
#     bash scripts/mla_decode_ab.sh .oldhead [rounds] [launches] [depth]
#
# Prints, per round and tree, the sorted partials durations (us) of `launches` launches after a
# warm-up round, then both trees' medians over all rounds. Extra settings go in the environment
# (they apply to both trees).
set -euo pipefail
OTHER=${1:?the other tree\'s directory}; ROUNDS=${2:-2}; LAUNCHES=${3:-10}; DEPTH=${4:-128K}
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
OUT_DIR=${OUT:-$(mktemp -d)}
for r in $(seq "$ROUNDS"); do
  for t in "$OTHER" .; do
    f="$OUT_DIR/ab_$(basename "$(cd "$t" && pwd)")_$r.txt"
    (cd "$t" && "$NCU" --clock-control none --metrics gpu__time_duration.sum -k regex:mla_decode \
       python3 scripts/mla_decode_parts.py --depths "$DEPTH" --launches "$LAUNCHES" > "$f" 2>&1)
    echo "$t round $r: $(grep gpu__time_duration "$f" | awk '{print $NF}' | tail -"$LAUNCHES" | sort -n | paste -sd' ')"
  done
done | tee "$OUT_DIR/ab.txt"
python3 - "$OUT_DIR/ab.txt" <<'PY'
import statistics, sys
by = {}
for line in open(sys.argv[1]):
    tree, _, rest = line.partition(" round ")
    by.setdefault(tree, []).extend(float(x.replace(",", "")) for x in rest.split(":", 1)[1].split())
for tree, v in by.items():
    print(f"{tree}: median {statistics.median(v):.2f} us over {len(v)} launches ({min(v):.2f}-{max(v):.2f})")
PY

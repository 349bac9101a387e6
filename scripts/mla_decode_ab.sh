#!/bin/bash
# The MLA decode kernels' device time (split-K partials and combine), several builds alternated in
# one call. Needs ncu and a GPU; run from the repository root:
#
#     git archive <rev> kimi_mlx metal_kernels scripts pyproject.toml | (mkdir -p .oldhead && tar -x -C .oldhead)
#     bash scripts/mla_decode_ab.sh [-r rounds] [-n launches] [-d depth] SPEC...
#
# SPEC is a tree, optionally with settings: `.oldhead`, `.`, `.:KIMI_MLX_MLA_DECODE_PF=2` or
# `.:A=1,B=2`. Each round runs every SPEC once (`launches` launches of each kernel after a warm-up
# round, scripts/mla_decode_parts.py --launches) and prints the sorted durations (us); the end gives
# each SPEC's medians over all rounds. Settings in the environment apply to every SPEC.
set -euo pipefail
ROUNDS=2; LAUNCHES=10; DEPTH=128K
while getopts "r:n:d:" o; do
  case $o in r) ROUNDS=$OPTARG ;; n) LAUNCHES=$OPTARG ;; d) DEPTH=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-r rounds] [-n launches] [-d depth] SPEC..." >&2; exit 2; }
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
OUT_DIR=${OUT:-$(mktemp -d)}
i=0
for r in $(seq "$ROUNDS"); do
  for spec in "$@"; do
    i=$((i + 1))
    tree=${spec%%:*}; sets=""; [ "$spec" != "$tree" ] && sets=${spec#*:}
    f="$OUT_DIR/ab_${i}.txt"
    echo "# $spec round $r" > "$f"
    (cd "$tree" && env ${sets//,/ } "$NCU" --clock-control none --print-units base --metrics gpu__time_duration.sum \
       -k regex:mla_ python3 scripts/mla_decode_parts.py --depths "$DEPTH" --launches "$LAUNCHES" >> "$f" 2>&1)
  done
done
python3 - "$LAUNCHES" "$OUT_DIR"/ab_*.txt <<'PY' | tee "$OUT_DIR/ab.txt"
import re, statistics, sys
n = int(sys.argv[1])
pooled = {}
for path in sorted(sys.argv[2:], key=lambda p: int(re.search(r"ab_(\d+)", p).group(1))):
    lines = open(path).read().splitlines()
    spec = lines[0][2:].rsplit(" round ", 1)[0]
    kernel, got = None, {}
    for line in lines[1:]:
        m = re.search(r"(mla_(?:decode|combine))_[0-9a-f]{10}", line)
        if m:
            kernel = m.group(1)
        elif "gpu__time_duration.sum" in line and kernel:
            got.setdefault(kernel, []).append(float(line.split()[-1].replace(",", "")) / 1e3)  # ns -> us
    for k, v in sorted(got.items()):
        v = v[-n:]  # after the warm-up launch
        pooled.setdefault((spec, k), []).extend(v)
        print(f"{lines[0][2:]} {k}: " + " ".join(f"{x:.1f}" for x in sorted(v)))
for (spec, k), v in pooled.items():
    print(f"{spec} {k}: median {statistics.median(v):.2f} us over {len(v)} launches ({min(v):.2f}-{max(v):.2f})")
PY

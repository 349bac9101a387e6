#!/bin/bash
# The MLA decode kernels' device time (split-K partials and combine), several builds alternated in
# one call. Needs ncu and a GPU; run from the repository root:
#
#     git archive <rev> kimi_mlx metal_kernels scripts pyproject.toml | (mkdir -p .oldhead && tar -x -C .oldhead)
#     bash scripts/mla_decode_ab.sh [-r rounds] [-n launches] [-d depth] SPEC...
#
# SPEC is a tree, optionally with settings: `.oldhead`, `.`, `.:KIMI_MLX_MLA_DECODE_BK=32` or
# `.:A=1,B=2`. Each round runs every SPEC once (`launches` launches of each kernel after a warm-up
# round, scripts/mla_decode_parts.py --launches) and prints the sorted durations (us); the end gives
# each SPEC's medians over all rounds and the cache read rate as a share of the copy's (x + 1 over
# 2 GiB, timed in the same processes). Settings in the environment apply to every SPEC.
set -euo pipefail
ROUNDS=2; LAUNCHES=10; DEPTH=128K
while getopts "r:n:d:" o; do
  case $o in r) ROUNDS=$OPTARG ;; n) LAUNCHES=$OPTARG ;; d) DEPTH=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-r rounds] [-n launches] [-d depth] SPEC..." >&2; exit 2; }
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
OUT_DIR=${OUT:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
i=0
for r in $(seq "$ROUNDS"); do
  for spec in "$@"; do
    i=$((i + 1))
    tree=${spec%%:*}; sets=""; [ "$spec" != "$tree" ] && sets=${spec#*:}
    f="$OUT_DIR/ab_${i}.txt"
    echo "# $spec round $r" > "$f"
    (cd "$tree" && env ${sets//,/ } "$NCU" --clock-control none --print-units base --metrics gpu__time_duration.sum \
       -k regex:"mla_|binary" python3 scripts/mla_decode_parts.py --depths "$DEPTH" --launches "$LAUNCHES" >> "$f" 2>&1)
  done
done
python3 - "$LAUNCHES" "$DEPTH" "$OUT_DIR"/ab_*.txt <<'PY' | tee "$OUT_DIR/ab.txt"
import re, statistics, sys
sys.path.insert(0, ".")
from kimi_mlx.bench.common import parse_lengths  # the harness reads --depths with it too
n = int(sys.argv[1])
depth = parse_lengths(sys.argv[2])[0]
pooled = {}
for path in sorted(sys.argv[3:], key=lambda p: int(re.search(r"ab_(\d+)", p).group(1))):
    lines = open(path).read().splitlines()
    spec = lines[0][2:].rsplit(" round ", 1)[0]
    kernel, got = None, {}
    for line in lines[1:]:
        m = re.search(r"(mla_(?:decode|combine))_[0-9a-f]{10}|(binary)", line)
        if m:
            kernel = m.group(1) or m.group(2)
        elif "gpu__time_duration.sum" in line and kernel:
            us = float(line.split()[-1].replace(",", "")) / 1e3  # ns -> us
            if kernel != "binary" or us > 500:  # the copy: x + 1 over 2 GiB (not the set-up's small ops)
                got.setdefault("copy" if kernel == "binary" else kernel, []).append(us)
    for k, v in sorted(got.items()):
        v = v[-n:]  # after the warm-up launch
        pooled.setdefault((spec, k), []).extend(v)
        print(f"{lines[0][2:]} {k}: " + " ".join(f"{x:.1f}" for x in sorted(v)))
med = {}
for (spec, k), v in pooled.items():
    med[spec, k] = statistics.median(v)
    print(f"{spec} {k}: median {med[spec, k]:.2f} us over {len(v)} launches ({min(v):.2f}-{max(v):.2f})")
cache = depth * 576 * 2  # bytes of the cached rows (bf16, 576 wide)
for spec in dict.fromkeys(s for s, _ in med):
    if (spec, "copy") in med and (spec, "mla_decode") in med:
        copy_bw = 2 * 2**31 / med[spec, "copy"]  # read + write bytes a us
        both = med[spec, "mla_decode"] + med.get((spec, "mla_combine"), 0.0)
        print(f"{spec}: copy {copy_bw / 1e6:.2f} TB/s; cache read at {100 * cache / med[spec, 'mla_decode'] / copy_bw:.1f} % "
              f"of copy (partials), {100 * cache / both / copy_bw:.1f} % (both launches)")
PY

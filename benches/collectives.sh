#!/usr/bin/env bash
# Every collective of `concord bench --coll` against all-reduce and against torch's gloo for the
# same collective and size, in the same run: PEERS peer processes on loopback, SIZE bytes (the
# whole buffer, as nccl-tests counts it), f32 sum, default flags, ROUNDS interleaved rounds.
# Prints each figure's median busbw (GB/s, nccl-tests' factors) and the ratios
# (collective / all-reduce, Concord / gloo).
# Usage: benches/collectives.sh [ROUNDS] [PEERS] [SIZE]   (gloo: pip install torch)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PEERS=${2:-4}
SIZE=${3:-64M}
cargo build --release -p concord >/dev/null 2>&1
C=./target/release/concord
COLLS="all_reduce broadcast reduce all_gather reduce_scatter"
out=$(mktemp)
med() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
gloo=0
python3 -c 'import torch' 2>/dev/null && gloo=1
for r in $(seq "$ROUNDS"); do
  for c in $COLLS; do
    $C bench --local "$PEERS" --coll "$c" -b "$SIZE" -e "$SIZE" -n 8 -w 2 -c 0 |
      awk -v c="$c" '/^ +[0-9]/ {print "concord_" c, $7}' >>"$out"
    if [ $gloo = 1 ]; then
      python3 benches/gloo_ring.py --peers "$PEERS" --bytes "$SIZE" --coll "$c" --iters 8 --warmup 2 2>/dev/null |
        awk -v c="$c" '{print "gloo_" c, $4}' >>"$out"
    fi
  done
done
v() { awk -v k="$1" '$1==k {print $2}' "$out" | med; }
echo "# $PEERS peers, $SIZE f32 sum, median busbw (GB/s) of $ROUNDS interleaved rounds"
for c in $COLLS; do
  line="$c concord $(v concord_$c)"
  [ $gloo = 1 ] && line="$line gloo $(v gloo_$c)"
  echo "$line"
done
echo "# ratios: collective / all_reduce (Concord), Concord / gloo (same collective)"
ar=$(v concord_all_reduce)
for c in $COLLS; do
  x=$(v concord_$c)
  line="$c vs_all_reduce $(awk -v a="$x" -v b="$ar" 'BEGIN {printf "%.2f", a / b}')"
  if [ $gloo = 1 ]; then
    g=$(v gloo_$c)
    line="$line vs_gloo $(awk -v a="$x" -v b="$g" 'BEGIN {printf "%.2f", a / b}')"
  fi
  echo "$line"
done
rm -f "$out"

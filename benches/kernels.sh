#!/usr/bin/env bash
# Concord's reduction kernels against the plain C loop (benches/c/reduce_ref.c) on this machine:
# every dtype, f32-style `dst = a + b`, in L2 (3 x 128 KiB) and from memory (3 x 64 MiB). The C
# loop is built twice as a shared library (gcc -O3 -march=native, with 256- and 512-bit vectors
# preferred) and `reduce-bw` times both sample by sample in turn with Concord's, on the same
# buffers, over ROUNDS runs; the better of the two C builds is the reference. Concord's figure
# is the stores the engine uses at that size (cached below 16 MiB, streaming from there).
# Prints each row's median over the rounds and the ratio Concord / best C.
# Usage: benches/kernels.sh [ROUNDS]   (needs gcc)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
command -v gcc >/dev/null || { echo "benches/kernels.sh needs gcc for the C reference" >&2; exit 2; }
cargo build --release -p concord-benches --bin reduce-bw >/dev/null 2>&1
bin=$(mktemp -d)
out=$(mktemp)
trap 'rm -rf "$bin" "$out"' EXIT
lib="-shared -fPIC -DREDUCE_REF_LIBRARY"
gcc -O3 -march=native $lib -o "$bin/ref256.so" benches/c/reduce_ref.c
gcc -O3 -march=native -mprefer-vector-width=512 $lib -o "$bin/ref512.so" benches/c/reduce_ref.c
med() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for r in $(seq "$ROUNDS"); do
  ./target/release/reduce-bw --ref ref256="$bin/ref256.so" --ref ref512="$bin/ref512.so" 2>"$bin/path" |
    awk '$1=="concord" && $6=="engine" {print "concord", $2, $3, $4}
         $1=="ref" {print $2, $3, $4, $5}' >>"$out"
done
echo "# $ROUNDS runs of interleaved samples, medians, GB/s = 3 x bytes / time; CPU: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
echo "# Concord's CPU path: $(sed 's/.*CPU path //' "$bin/path")"
printf '%-9s %9s %8s %8s %8s %6s\n' dtype bytes concord c256 c512 ratio
for key in $(awk '$1=="concord" {print $2 ":" $3}' "$out" | sort -u -t: -k2,2n -k1,1); do
  d=${key%%:*} b=${key##*:}
  pick() { awk -v w="$1" -v d="$d" -v b="$b" '$1==w && $2==d && $3==b {print $4}' "$out" | med; }
  c=$(pick concord) r1=$(pick ref256) r2=$(pick ref512)
  printf '%-9s %9s %8s %8s %8s %6.3f\n' "$d" "$b" "$c" "$r1" "$r2" \
    "$(awk -v c="$c" -v a="$r1" -v b="$r2" 'BEGIN {print c / (a > b ? a : b)}')"
done

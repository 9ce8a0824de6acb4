#!/usr/bin/env bash
# The figures of README.md's results table, measured in one run on this machine: iperf3 over
# loopback, the naive blocking-socket ring (benches/src/bin/naive_ring.rs), torch's gloo
# (benches/gloo_ring.py, where torch is installed) and `concord bench --local` on both
# backends (2, 3 and 4 peers), interleaved over ROUNDS rounds; prints each figure's median,
# the ratios of Concord's defaults to the naive ring and to gloo, then the reduction kernels
# against the C loop (benches/kernels.sh) and, as root, the shaped-link rows (benches/links.sh).
# Usage: benches/measure.sh [ROUNDS]   (needs iperf3: apt-get install iperf3; gloo: pip install torch)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
cargo build --release -p concord -p concord-benches --bins >/dev/null 2>&1
C=./target/release/concord
N=./target/release/naive-ring
out=$(mktemp)
med() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
gloo=0
python3 -c 'import torch' 2>/dev/null && gloo=1
for r in $(seq "$ROUNDS"); do
  if command -v iperf3 >/dev/null; then
    iperf3 -s -1 -p 5299 >/dev/null 2>&1 & sleep 0.3
    iperf3 -c 127.0.0.1 -p 5299 -t 3 -f g 2>/dev/null | awk '/receiver/ {print "iperf3_gbit", $7}' >>"$out"
    wait || true
  fi
  for p in 2 3 4; do
    for s in 64M 256M; do
      $N --peers $p --bytes $s --iters 5 --warmup 2 | awk -v p=$p -v s=$s '{print "naive_" p "_" s, $11}' >>"$out"
      if [ $gloo = 1 ]; then
        python3 benches/gloo_ring.py --peers $p --bytes $s --iters 5 --warmup 2 2>/dev/null | awk -v p=$p -v s=$s '{print "gloo_" p "_" s, $4}' >>"$out"
      fi
      # The defaults, as a user runs it:
      $C bench --local $p -b $s -e $s -n 8 -w 2 -c 0 | awk -v p=$p -v s=$s '/^ +[0-9]/ {print "default_" p "_" s, $7, $11}' >>"$out"
      for t in uring socket; do
        $C bench --local $p -b $s -e $s -n 8 -w 2 -c 0 --transport $t | awk -v p=$p -v s=$s -v t=$t '/^ +[0-9]/ {print t "_" p "_" s, $7, $11}' >>"$out"
      done
      # In place (what a trainer's gradients use): the backup of the originals included.
      $C bench --local $p -b $s -e $s -n 8 -w 2 -c 0 --in-place --transport uring | awk -v p=$p -v s=$s '/^ +[0-9]/ {print "uring_" p "_" s "_inplace", $7, $11}' >>"$out"
    done
    for t in uring socket; do
      $C bench --local $p -b 4M -e 4M -n 8 -w 2 -c 0 -m 16 --transport $t | awk -v p=$p -v t=$t '/^ +[0-9]/ {print t "_" p "_16x4M", $7, $11}' >>"$out"
      $C bench --local $p -b 64M -e 64M -n 8 -w 2 -c 0 -m 1 --transport $t | awk -v p=$p -v t=$t '/^ +[0-9]/ {print t "_" p "_1x64M", $7, $11}' >>"$out"
    done
  done
  for t in uring socket; do
    $C bench --local 2 -b 4K -e 1M -f 256 -n 200 -w 20 -c 0 --transport $t | awk -v t=$t '/^ +[0-9]/ {print t "_2_lat_" $1, $5}' >>"$out"
  done
  # `--local` binds each peer to a CPU of its own where it can; the same row left to the scheduler:
  $C bench --local 2 -b 1M -e 1M -n 200 -w 20 -c 0 --transport uring --cpu-bind none | awk '/^ +[0-9]/ {print "uring_2_lat_1048576_unbound", $5}' >>"$out"
  # The yardstick for the 1 MiB row: the naive ring (no master, no votes) at the same size.
  $N --peers 2 --bytes 1M --iters 200 --warmup 20 | awk '{print "naive_2_lat_1048576", $7}' >>"$out"
done
echo "# median of $ROUNDS rounds; busbw GB/s (and CPU s/GB where given) or time in us (lat rows)"
for key in $(awk '{print $1}' "$out" | sort -u); do
  v=$(awk -v k="$key" '$1==k {print $2}' "$out" | med)
  cpu=$(awk -v k="$key" '$1==k && NF>2 {print $3}' "$out" | med)
  echo "$key $v ${cpu:-}"
done
echo "# Concord's defaults against the naive ring and gloo (busbw ratios of the medians)"
for p in 2 3 4; do
  for s in 64M 256M; do
    awk -v p=$p -v s=$s -v k="_${p}_${s}" '
      $1=="default" k {d[++nd]=$2} $1=="naive" k {n[++nn]=$2} $1=="gloo" k {g[++ng]=$2}
      function m(a, c,   i, j, t) { for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }; return a[int((c + 1) / 2)] }
      END {
        printf "%s peers %s: default %.3f  vs naive %.2fx", p, s, m(d, nd), m(d, nd) / m(n, nn)
        if (ng) printf "  vs gloo %.2fx", m(d, nd) / m(g, ng)
        printf "\n"
      }' "$out"
  done
done
rm -f "$out"
# The reduction kernels against the plain C loop, same run (where gcc is installed).
if command -v gcc >/dev/null; then
  bash benches/kernels.sh "$ROUNDS"
fi
# Shaped links between network namespaces (where the user is root and iperf3 is installed).
if [ "$(id -u)" = 0 ] && command -v tc >/dev/null && command -v iperf3 >/dev/null; then
  bash benches/links.sh "$ROUNDS" || echo "# shaped-link rows failed: see the messages above"
else
  echo "# shaped-link rows skipped: benches/links.sh needs root, iproute2 (tc) and iperf3"
fi

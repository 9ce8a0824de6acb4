#!/usr/bin/env bash
# Two builds of `concord` side by side, interleaved A B A B ... over ROUNDS rounds, so that a
# change is judged against the machine's own drift: busbw at 64 and 256 MiB with 2 and 4 peers,
# and the 4 KiB and 1 MiB latencies with 2 peers (f32 sum, io_uring, defaults otherwise).
# Prints each row's median for A and B and the ratio B/A, with iperf3's loopback rate of the
# same run where iperf3 is installed.
# Usage: benches/compare.sh A_BINARY B_BINARY [ROUNDS]
#   e.g. build the baseline in a worktree (`git worktree add /tmp/base main`, then
#   `cargo build --release -p concord` there) and compare it with ./target/release/concord.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 A_BINARY B_BINARY [ROUNDS]" >&2; exit 2; }
A=$1 B=$2 ROUNDS=${3:-5}
for bin in "$A" "$B"; do
  [ -x "$bin" ] || { echo "$bin is not an executable concord binary" >&2; exit 2; }
done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
med() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
row() { # row NAME BIN ARGS...: appends "NAME value" (busbw for bandwidth rows, time for latency)
  local name=$1 bin=$2; shift 2
  "$bin" bench "$@" -c 0 --transport uring | awk -v n="$name" '/^ +[0-9]/ {print n "_" $1, ($1 <= 1048576 ? $5 : $7)}' >>"$out"
}
for r in $(seq "$ROUNDS"); do
  if command -v iperf3 >/dev/null; then
    iperf3 -s -1 -p 5299 >/dev/null 2>&1 & sleep 0.3
    iperf3 -c 127.0.0.1 -p 5299 -t 2 -f g 2>/dev/null | awk '/receiver/ {print "iperf3_gbit", $7}' >>"$out"
    wait || true
  fi
  for side in A B; do
    bin=$A; [ "$side" = B ] && bin=$B
    for p in 2 4; do
      row "${side}_busbw_${p}peers" "$bin" --local $p -b 64M -e 256M -f 4 -n 8 -w 2
    done
    row "${side}_time_us_2peers" "$bin" --local 2 -b 4K -e 1M -f 256 -n 300 -w 30
  done
done
echo "# $ROUNDS interleaved rounds, medians; A=$A B=$B"
awk '$1=="iperf3_gbit" {print $2}' "$out" | med | sed 's/^/iperf3 Gbit\/s: /'
printf '%-28s %10s %10s %7s\n' row A B B/A
for key in $(awk '$1 ~ /^A_/ {sub(/^A_/, "", $1); print $1}' "$out" | sort -u); do
  a=$(awk -v k="A_$key" '$1==k {print $2}' "$out" | med)
  b=$(awk -v k="B_$key" '$1==k {print $2}' "$out" | med)
  printf '%-28s %10s %10s %7.3f\n' "$key" "$a" "$b" "$(echo "$b / $a" | bc -l)"
done

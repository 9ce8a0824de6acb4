#!/usr/bin/env bash
# All-reduce over shaped links: 4 network namespaces on one bridge ("hosts" 10.79.0.1-4), each
# uplink limited to RATE with an htb qdisc. Host 1 runs the master; hosts 2-4 run one peer each.
# Per RATE and round: iperf3 between two hosts (the link's ceiling as TCP sees it), then
# `concord bench` (defaults) and torch's gloo (benches/gloo_ring.py, where torch is installed)
# at 64 and 256 MiB. Prints the medians and, per row, busbw as a share of the link rate and of
# iperf3's figure (a ring all-reduce moves busbw bytes per second over every uplink).
# Usage: benches/links.sh [ROUNDS] [RATE...]   (default: 1 round, 1gbit 10gbit; needs root,
# iproute2 and iperf3). The namespaces are removed on exit. CONCORD_LINKS_FLAGS adds flags to
# every `concord bench` (e.g. `--conns 1`); CONCORD_LINKS_PORT moves the master's port;
# CONCORD_LINKS_COLL times another collective than all_reduce (broadcast, reduce, all_gather,
# reduce_scatter; both Concord and gloo, busbw with nccl-tests' factors).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
shift || true
RATES=${*:-1gbit 10gbit}
[ "$(id -u)" = 0 ] || { echo "benches/links.sh: needs root (network namespaces); skipped" >&2; exit 77; }
for t in ip tc iperf3; do
  command -v $t >/dev/null || { echo "benches/links.sh: needs $t" >&2; exit 2; }
done
cargo build --release -p concord >/dev/null 2>&1
C=$PWD/target/release/concord
P=cclk
PORT=${CONCORD_LINKS_PORT:-48200}
COLL=${CONCORD_LINKS_COLL:-all_reduce}
out=$(mktemp)
down() {
  for i in 1 2 3 4; do
    ip netns del $P$i 2>/dev/null || true
    ip link del ${P}v$i 2>/dev/null || true
  done
  ip link del ${P}br 2>/dev/null || true
}
trap 'down; rm -f "$out"' EXIT
up() { # RATE
  down
  ip link add ${P}br type bridge && ip link set ${P}br up
  for i in 1 2 3 4; do
    ip netns add $P$i
    ip link add ${P}v$i type veth peer name ${P}e$i
    ip link set ${P}e$i netns $P$i
    ip link set ${P}v$i master ${P}br && ip link set ${P}v$i up
    ip -n $P$i addr add 10.79.0.$i/24 dev ${P}e$i
    ip -n $P$i link set ${P}e$i up && ip -n $P$i link set lo up
    ip netns exec $P$i tc qdisc add dev ${P}e$i root handle 1: htb default 10
    ip netns exec $P$i tc class add dev ${P}e$i parent 1: classid 1:10 htb rate "$1" ceil "$1" \
      burst 512kb cburst 512kb quantum 60000
  done
}
# Each namespace is a host of its own: distinct host ids keep Concord off shared memory.
on() { local i=$1; shift; ip netns exec $P$i env CONCORD_HOST_ID=$P$i "$@"; }
med() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
gloo=0
python3 -c 'import torch' 2>/dev/null && gloo=1
for rate in $RATES; do
  up "$rate"
  for r in $(seq "$ROUNDS"); do
    on 3 iperf3 -s -1 -p 5299 >/dev/null 2>&1 & sleep 0.5
    on 2 iperf3 -c 10.79.0.3 -p 5299 -t 5 -f g 2>/dev/null |
      awk -v k="$rate" '/receiver/ {print k "_iperf3_gbit", $7}' >>"$out"
    wait || true
    for s in ${CONCORD_LINKS_SIZES:-64M 256M}; do
      on 1 "$C" master --listen 10.79.0.1:$PORT --insecure >/dev/null 2>&1 &
      m=$!
      sleep 0.5
      pids=()
      for i in 2 3 4; do
        on $i "$C" bench --master 10.79.0.1:$PORT --world 3 --coll "$COLL" -b $s -e $s -n 5 -w 2 -c 0 \
          ${CONCORD_LINKS_FLAGS:-} >"$out.$i" 2>&1 &
        pids+=($!)
      done
      rcs=""
      for p in "${pids[@]}"; do wait "$p" && rcs="$rcs 0" || rcs="$rcs $?"; done
      kill $m 2>/dev/null || true
      wait $m 2>/dev/null || true
      # The peer that holds rank 0 prints the table.
      row=$(cat "$out".[234] | awk -v k="${rate}_concord_$s" '/^ +[0-9]/ {print k, $7}')
      [ -n "$row" ] && echo "$row" >>"$out" ||
        { echo "links.sh: concord at $rate, $s gave no row (exit statuses$rcs):" >&2; for f in "$out".[234]; do tail -n 3 "$f" >&2; done; }
      if [ $gloo = 1 ]; then
        pids=()
        for i in 2 3 4; do
          on $i python3 benches/gloo_ring.py --peers 3 --bytes $s --coll "$COLL" --iters 5 --warmup 2 \
            --rank $((i - 2)) --store 10.79.0.2:$((PORT + 1)) --ifname ${P}e$i >"$out.g$i" 2>/dev/null &
          pids+=($!)
        done
        wait "${pids[@]}" || true
        awk -v k="${rate}_gloo_$s" '{print k, $4}' "$out.g2" >>"$out"
      fi
      rm -f "$out".*
    done
  done
  down
done
echo "# $COLL, median of $ROUNDS rounds; 3 peers, one per host, uplinks shaped; busbw GB/s"
for rate in $RATES; do
  bits=$(echo "$rate" | awk '{n = $1 + 0; u = tolower(substr($1, length(n) + 1)); print n * (u ~ /^g/ ? 1e9 : u ~ /^m/ ? 1e6 : 1e3)}')
  ip=$(awk -v k="${rate}_iperf3_gbit" '$1==k {print $2}' "$out" | med)
  echo "$rate: link $(awk -v b="$bits" 'BEGIN {printf "%.3f", b / 8e9}') GB/s, iperf3 ${ip:-?} Gbit/s"
  for key in $(awk -v r="$rate" 'index($1, r "_") == 1 && $1 !~ /iperf3/ {print $1}' "$out" | sort -u); do
    v=$(awk -v k="$key" '$1==k {print $2}' "$out" | med)
    awk -v k="$key" -v v="$v" -v b="$bits" -v ip="${ip:-0}" 'BEGIN {
      printf "  %-22s %.3f  %5.1f%% of the link", k, v, 100 * v * 8e9 / b
      if (ip > 0) printf "  %5.1f%% of iperf3", 100 * v * 8 / ip
      printf "\n" }'
  done
done

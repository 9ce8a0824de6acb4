#!/usr/bin/env bash
# The shared-memory transport against TCP and Open MPI in the same run: `concord bench --local`
# with --transport shm and with TCP (io_uring where allowed, else socket), and MPI_Allreduce over
# Open MPI's shared-memory BTL (vader) and its TCP BTL, for 2 and 4 processes on this host, f32
# sum, SIZE bytes; then the latency of 4 KiB and 1 MiB over shm and TCP with 2 peers. ROUNDS
# interleaved rounds; prints medians (busbw GB/s; latency in us) and the ratios shm / TCP and
# shm / vader. Open MPI is skipped, saying so, where mpicc or mpirun is missing.
# Usage: benches/shm.sh [ROUNDS] [SIZE]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SIZE=${2:-256M}
cargo build --release -p concord >/dev/null 2>&1
C=./target/release/concord
tcp=uring
$C info 2>/dev/null | grep -q "io_uring: not available" && tcp=socket
bytes=$(numfmt --from=iec "$SIZE")
mpi=0
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
  mkdir -p target/bench-c
  mpicc -O3 -o target/bench-c/mpi_allreduce benches/c/mpi_allreduce.c && mpi=1
else
  echo "# Open MPI not found (mpicc, mpirun): its figures are left out"
fi
MPIRUN=(mpirun --oversubscribe --allow-run-as-root --bind-to none --mca pml ob1 --mca oob_tcp_if_include lo)
out=$(mktemp)
med() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
bench() { # label peers transport size -> busbw and median time
  $C bench --local "$2" --transport "$3" -b "$4" -e "$4" -n "$5" -w 2 -c 0 |
    awk -v l="$1" '/^ +[0-9]/ {print l "_bw", $7; print l "_us", $5}' >>"$out"
}
for r in $(seq "$ROUNDS"); do
  for n in 2 4; do
    bench "shm_$n" "$n" shm "$SIZE" 8
    bench "tcp_$n" "$n" "$tcp" "$SIZE" 8
    if [ $mpi = 1 ]; then
      timeout 300 "${MPIRUN[@]}" --mca btl self,vader -np "$n" target/bench-c/mpi_allreduce "$bytes" 8 2 |
        awk -v l="vader_$n" '$1=="mpi" {print l "_bw", $6}' >>"$out"
      timeout 300 "${MPIRUN[@]}" --mca btl self,tcp --mca btl_tcp_if_include lo -np "$n" \
        target/bench-c/mpi_allreduce "$bytes" 8 2 |
        awk -v l="mpitcp_$n" '$1=="mpi" {print l "_bw", $6}' >>"$out"
    fi
  done
  for s in 4K 1M; do
    bench "shm_lat_$s" 2 shm "$s" 300
    bench "tcp_lat_$s" 2 "$tcp" "$s" 300
  done
done
v() { awk -v k="$1" '$1==k {print $2}' "$out" | med; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}'; }
echo "# $SIZE f32 sum all-reduce, median busbw (GB/s) of $ROUNDS interleaved rounds; TCP = $tcp"
for n in 2 4; do
  line="peers $n shm $(v shm_${n}_bw) tcp $(v tcp_${n}_bw)"
  [ $mpi = 1 ] && line="$line mpi_vader $(v vader_${n}_bw) mpi_tcp $(v mpitcp_${n}_bw)"
  line="$line shm/tcp $(ratio "$(v shm_${n}_bw)" "$(v tcp_${n}_bw)")"
  [ $mpi = 1 ] && line="$line shm/vader $(ratio "$(v shm_${n}_bw)" "$(v vader_${n}_bw)")"
  echo "$line"
done
echo "# latency, 2 peers, median us (master votes included)"
for s in 4K 1M; do
  echo "$s shm $(v shm_lat_${s}_us) tcp $(v tcp_lat_${s}_us)"
done
rm -f "$out"

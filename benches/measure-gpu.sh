#!/usr/bin/env bash
# The GPU figures in one run on a machine with a GPU:
# the CUDA reduction against a device-to-device copy (gpu-reduce-bw), and `concord bench --local`
# busbw with buffers in device memory against host memory, 2 and 4 peers on the one GPU, f32 and
# bf16 at 256 MiB, with the device runs' per-stage timings.
# Usage: benches/measure-gpu.sh [BIN_DIR]   (default: build and use target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
if [ -z "$bin" ]; then
    cargo build --release -p concord -p concord-benches --bins >/dev/null
    bin=target/release
fi
rc=0
"$bin/gpu-reduce-bw" --bytes 256M --iters 50 || rc=$?
if [ "$rc" = 2 ]; then
    echo "SKIPPED measure-gpu: no usable CUDA here (see above)"
    exit 0
fi
[ "$rc" = 0 ] || exit "$rc"
echo "# concord bench --local P -b 256M -e 256M -n 8 -w 2 -c 1, busbw GB/s: host buffers, device buffers, device/host"
for p in 2 4; do
    for d in float bfloat16; do
        host=$("$bin/concord" bench --local $p -b 256M -e 256M -n 8 -w 2 -c 1 -d $d | awk '/^ +[0-9]/ {print $7, $8}')
        dev_out=$("$bin/concord" bench --local $p -b 256M -e 256M -n 8 -w 2 -c 1 -d $d --device cuda)
        dev=$(echo "$dev_out" | awk '/^ +[0-9]/ {print $7, $8}')
        echo "$dev_out" | grep -i "stage" || true
        echo "$p $d host ${host% *} device ${dev% *} wrong ${host#* }/${dev#*}" |
            awk '{printf "peers %s %-9s host %s device %s (%.0f %%) #wrong %s\n", $1, $2, $4, $6, 100*$6/$4, $8}'
    done
done

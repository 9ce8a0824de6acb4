#!/usr/bin/env bash
# The kernel suite and the process matrix (over shared memory) once per CPU kernel path this CPU runs, forced with
# CONCORD_KERNELS, so that a path the machine does not choose by default is still exercised end
# to end. A path the CPU lacks is skipped, naming the features it misses.
set -euo pipefail
cd "$(dirname "$0")/.."

paths=$(cargo run --quiet -p concord-kernels --example cpu-paths)
ran=0
while read -r name state missing; do
    if [ "$state" != ok ]; then
        echo "SKIP: kernel path $name: this CPU lacks $missing"
        continue
    fi
    echo "== kernel path $name: kernels suite and process matrix"
    CONCORD_KERNELS=$name cargo test --quiet -p concord-kernels
    # The process matrix over shared memory (the default between peers of one host): the
    # kernels see every dtype, op and size end to end; the transports are covered once by the
    # workspace's run.
    CONCORD_KERNELS=$name cargo test --quiet -p concord --test allreduce_processes -- _shm
    ran=$((ran + 1))
done <<<"$paths"
[ "$ran" -gt 0 ] || { echo "FAIL: no kernel path ran (scalar always should)"; exit 1; }
echo "kernel paths: $ran ran"

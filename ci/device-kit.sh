#!/usr/bin/env bash
# Builds everything the GPU checks need into device-bin/ (git-ignored), for a GPU machine that has
# CUDA but no Rust toolchain: the release `concord` and `gpu-reduce-bw`, and the two test
# binaries with GPU tests (engine/tests/gpu.rs, the kernels' GPU parity in kernels/tests/cuda.rs).
# Then, on the GPU machine, from the repository root:
#   ci/device-kit.sh --run      # GPU tests, then benches/measure-gpu.sh device-bin
set -euo pipefail
cd "$(dirname "$0")/.."
kit=device-bin

run_kit() {
    [ -x "$kit/concord" ] || { echo "no $kit/concord: build the kit first (ci/device-kit.sh)" >&2; exit 1; }
    command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "(nvidia-smi not found)"
    "$kit/concord" info
    echo "== engine GPU tests (2-4 peer processes on this GPU)"
    CONCORD_TEST_BIN="$kit/concord" "$kit/gpu-tests" --test-threads=1
    echo "== kernels: every CUDA kernel against the CPU path, bit for bit"
    "$kit/kernels-cuda-tests" gpu --test-threads=1
    benches/measure-gpu.sh "$kit"
}

if [ "${1:-}" = "--run" ]; then
    run_kit
    exit
fi

exe() { # cargo args... -> path of the one test executable built
    cargo test --release "$@" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])'
}
cargo build --release -p concord -p concord-benches --bins
mkdir -p "$kit"
cp target/release/concord target/release/gpu-reduce-bw "$kit/"
cp "$(exe -p concord --test gpu)" "$kit/gpu-tests"
cp "$(exe -p concord-kernels --features cuda --test cuda)" "$kit/kernels-cuda-tests"
# Debug info off: the device tool carries at most 64 MiB with the working tree.
command -v strip >/dev/null && strip --strip-debug "$kit"/*
ls -la "$kit"
echo "kit ready: on the GPU machine run 'ci/device-kit.sh --run' from the repository root"

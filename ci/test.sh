#!/usr/bin/env bash
# The test command of README.md (and of CI, through .ci/run): every test of the workspace (the
# fuzz targets among them); the kernel suite and the process matrix once more per CPU kernel
# path this CPU runs; the two examples as smoke tests; then the churn soak for two minutes (80 s of 2 MB all-reduces, 40 s
# of 16 KB ones, which take the small-collective path: inline sends, callers driving their
# connections). Needs only a Rust toolchain; the CUDA compile check installs the NVIDIA wheels
# from PyPI itself (or skips loudly), and the network-namespace test runs where the user is
# root (else it skips loudly).
set -euo pipefail
cd "$(dirname "$0")/.."
# Each fuzz target (engine/tests/fuzz.rs) runs this long: millions of inputs in all.
export CONCORD_FUZZ_SECS="${CONCORD_FUZZ_SECS:-8}"
cargo test --workspace
./ci/kernel-paths.sh
./ci/examples.sh
CONCORD_SOAK_SECS="${CONCORD_SOAK_SECS:-80}" CONCORD_SOAK_BYTES=2M \
  cargo test -p concord --test soak -- --ignored
CONCORD_SOAK_SECS="${CONCORD_SOAK_SMALL_SECS:-40}" CONCORD_SOAK_BYTES=16K \
  cargo test -p concord --test soak -- --ignored

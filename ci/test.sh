#!/usr/bin/env bash
# The test command of README.md (and of CI, through .ci/run): every test of the workspace, then
# the churn soak for two minutes. Needs only a Rust toolchain; the CUDA compile check installs the
# NVIDIA wheels from PyPI itself (or skips loudly), and the network-namespace test runs where the
# user is root (else it skips loudly).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
CONCORD_SOAK_SECS="${CONCORD_SOAK_SECS:-120}" cargo test -p concord --test soak -- --ignored

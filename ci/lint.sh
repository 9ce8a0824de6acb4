#!/usr/bin/env bash
# Formatting, clippy and the API docs (missing docs, broken links), warnings denied. Installs
# rustfmt and clippy where rustup can.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in rustfmt clippy; do
    if ! cargo "${tool/rustfmt/fmt}" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null || { echo "FAIL: cargo $tool is missing and there is no rustup to add it"; exit 1; }
        rustup component add "$tool"
    fi
done
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

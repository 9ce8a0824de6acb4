#!/usr/bin/env bash
# The examples as smoke tests of what a user runs first: data-parallel training with 3 peers,
# and DiLoCo with 3 peers and a late joiner that syncs the shared state. Each launcher exits
# non-zero unless every peer printed the same parameters (hashes) and the loss fell; this checks
# their closing lines too.
set -euo pipefail
cd "$(dirname "$0")/.."

expect() { # expect LOG PATTERN
    grep -q -- "$2" "$1" || { echo "FAIL: $1 lacks \"$2\""; cat "$1"; exit 1; }
}
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

timeout 300 cargo run --quiet --example ddp -- --local 3 | tee "$log/ddp"
expect "$log/ddp" "all 3 peers printed the same loss curve and parameters"
expect "$log/ddp" "loss fell from"

timeout 300 cargo run --quiet --example diloco -- --local 3 --late-joiner | tee "$log/diloco"
expect "$log/diloco" "all peers hold identical parameters after every outer step"
expect "$log/diloco" "loss fell from"
echo "examples: ddp and diloco passed"

#!/usr/bin/env bash
# The README's test command, as CI runs it.
set -euo pipefail
exec "$(dirname "$0")/../.ci/run"

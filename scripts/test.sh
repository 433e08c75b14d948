#!/usr/bin/env bash
# Installs what the test suite needs (idempotently) and runs all of it:
# formatting, clippy, and every crate's unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
setup_host

# The agent's eval tests use an interpreter with numpy when the system one has it.
if [ -z "${FORKD_TEST_PYTHON:-}" ] && /usr/bin/python3 -c 'import numpy' >/dev/null 2>&1; then
    export FORKD_TEST_PYTHON=/usr/bin/python3
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

log "cargo test --workspace"
logfile="$(mktemp)"
trap 'rm -f "$logfile"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$logfile"
status=${PIPESTATUS[0]}
set -e

# One closing line for the whole run, summed over every test binary.
totals=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
              END { printf "%d %d", p, f }' "$logfile")
echo
# Tests that cannot run on this host print one "SKIP: what and why" line each.
grep -E '^SKIP: ' "$logfile" | sort | uniq -c | sed 's/^/    /' || true
echo "tests: ${totals% *} passed, ${totals#* } failed"
exit "$status"

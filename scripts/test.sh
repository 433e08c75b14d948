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

started=$SECONDS

# Linux guests need hardware virtualization: run their tests directly where the host has it,
# else inside the Linux lab (a QEMU-TCG VM with emulated AMD-V), else they skip.
linux_mode=lab
if has_hardware_kvm; then
    linux_mode=direct
elif ! lab_why="$(scripts/lab.sh --prepare 2>&1)"; then
    linux_mode=none
    log "the Linux lab cannot start here: ${lab_why##*$'\n'}"
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

# The Python SDK's test environment (also used by the Linux lab's SDK tests: FORKD_TEST_VENV).
ensure_python_sdk_env
# E2B's official SDKs, for the E2B compatibility tests (FORKD_E2B_VENV).
ensure_e2b_env

log "cargo test --workspace"
logfile="$(mktemp)"
trap 'rm -f "$logfile"' EXIT
host_filter=()
[ "$linux_mode" = lab ] && host_filter=(-- --skip linux_guest::)
set +e
cargo test --workspace --no-fail-fast "${host_filter[@]}" 2>&1 | tee "$logfile"
status=${PIPESTATUS[0]}
set -e

log "TypeScript SDK tests (sdk/typescript)"
ts_status=0
run_typescript_sdk_tests "$logfile" || ts_status=$?
[ "$status" -ne 0 ] || status=$ts_status

# `pip install forkd`: the wheel the Python tests install into a fresh virtualenv, here and in
# the lab (a release build; cached by its inputs under ~/.cache/forkd/wheels).
log "the wheel (scripts/build-wheel.sh)"
if ! scripts/build-wheel.sh; then
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored (scripts/build-wheel.sh)" | tee -a "$logfile"
    status=1
fi

log "Python SDK tests (pytest sdk/python/tests)"
py_status=0
run_python_sdk_tests "$logfile" || py_status=$?
[ "$status" -ne 0 ] || status=$py_status

if [ "$linux_mode" = lab ]; then
    log "Linux guest tests in the lab"
    lab_status=0
    run_linux_tests_in_lab "$logfile" || lab_status=$?
    [ "$status" -ne 0 ] || status=$lab_status
elif [ "$linux_mode" = none ]; then
    echo "SKIP: Linux guest tests in the lab: ${lab_why##*$'\n'}" | tee -a "$logfile"
fi

# One closing line for the whole run, summed over every test binary.
totals=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
              END { printf "%d %d", p, f }' "$logfile")
echo
# Tests that cannot run on this host print one "SKIP: what and why" line each.
grep -E '^SKIP: ' "$logfile" | sort | uniq -c | sed 's/^/    /' || true
echo "tests: ${totals% *} passed, ${totals#* } failed"
log "scripts/test.sh took $((SECONDS - started)) s"
exit "$status"

# Shared by scripts/demo.sh and scripts/test.sh: idempotent host setup.
# shellcheck shell=bash

FORKD_CACHE="${FORKD_CACHE:-$HOME/.cache/forkd}"
# A linked git worktree gets a target directory of its own: cargo names a workspace's crates
# by their path relative to the workspace root, so two checkouts sharing one would overwrite
# each other's artifacts and each take the other's as up to date.
_forkd_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -f "$_forkd_root/.git" ]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FORKD_CACHE/target-$(basename "$_forkd_root")}"
else
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FORKD_CACHE/target}"
fi
unset _forkd_root

# Debian packages forkd's build, tests and demo use:
#   gcc, binutils: compile the freestanding test and demo guests
#   nginx, curl, zstd, minisign: hub tests against a real static server, baselines, signatures
#   acpica-tools: iasl -d checks our ACPI tables; e2fsprogs: mkfs.ext4 -d / debugfs for images
#   busybox-static, cpio: initramfs and minimal rootfs builds
#   python3, python3-numpy, util-linux, file: the agent's eval / exec tests and static-binary check
#   nodejs: the agent's JavaScript eval tests (crates/forkd-agent/tests/eval_node.rs)
#   debootstrap: Debian-based rootfs recipes (forkd image build python-numpy)
#   iproute2: network namespaces and taps for the virtio-net tests
#   nftables: each child's network policy and the host's forkd table (forkd fork --net)
FORKD_APT_PACKAGES=(gcc binutils make nginx curl zstd minisign acpica-tools e2fsprogs busybox-static cpio
    python3 python3-numpy python3-venv nodejs util-linux file debootstrap openssl iproute2 nftables)

log() { printf '==> %s\n' "$*" >&2; }

ensure_apt_packages() {
    local missing=()
    for p in "${FORKD_APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages: ${missing[*]} (run as root or install them)"
        return 1
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The package starts a system nginx on port 80; forkd's tests start their own.
    if [[ " ${missing[*]} " == *" nginx "* ]]; then
        (systemctl disable --now nginx || service nginx stop || nginx -s stop) >/dev/null 2>&1 || true
    fi
}

ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        # shellcheck disable=SC1091
        [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || { log "cargo not found: install the Rust toolchain (rustup)"; return 1; }
    rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true
}

setup_host() {
    mkdir -p "$FORKD_CACHE"
    ensure_apt_packages
    ensure_rust
}

# True when /dev/kvm is hardware virtualization (VT-x / AMD-V), not PVM or absent.
has_hardware_kvm() {
    [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo
}

# The test binaries cargo built (the JSON of `cargo test --no-run`), one path a line.
test_binaries() {
    cargo test --workspace --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
        print(msg["executable"])'
}

# Runs every `linux_guest::` test inside the lab, in one L1 boot; the kernel and images they
# need are fetched and built on the host first (the lab has no network). Appends the run's
# output to $1 (the suite's log).
run_linux_tests_in_lab() {
    local log_file="$1" bin bins=()
    local listed
    while read -r bin; do
        # Listed in full first: grep -q would close the pipe early, and pipefail would count that.
        listed="$("$bin" --list linux_guest:: 2>/dev/null || true)"
        grep -q ': test$' <<<"$listed" && bins+=("$bin")
    done < <(test_binaries)
    [ ${#bins[@]} -gt 0 ] || { log "no linux_guest:: tests found"; return 1; }
    # Host and lab build their images with the same agent, so the lab finds them cached.
    FORKD_AGENT_BIN="$(sh crates/forkd-agent/build-static.sh | tail -1)"
    case "$FORKD_AGENT_BIN" in /*) ;; *) FORKD_AGENT_BIN="$PWD/$FORKD_AGENT_BIN" ;; esac
    [ -f "$FORKD_AGENT_BIN" ] || FORKD_AGENT_BIN="$CARGO_TARGET_DIR/${FORKD_AGENT_BIN#*/target/}"
    export FORKD_AGENT_BIN
    local prep
    prep="$(mktemp)"
    for bin in "${bins[@]}"; do
        if ! FORKD_LINUX_PREPARE=1 "$bin" linux_guest:: --test-threads=1 >"$prep" 2>&1; then
            cat "$prep" >&2
            rm -f "$prep"
            log "preparing the Linux guest tests of $(basename "$bin") failed"
            return 1
        fi
        grep -E '^(SKIP|linux_e2e): ' "$prep" >&2 || true
    done
    rm -f "$prep"
    local status
    set +e
    scripts/lab.sh --timeout "${FORKD_LAB_TEST_TIMEOUT:-2700}" -- scripts/lab/run-tests.sh "${bins[@]}" 2>&1 \
        | tee -a "$log_file"
    status=${PIPESTATUS[0]}
    set -e
    return "$status"
}

# Node.js >= 18 and npm for the TypeScript SDK's tests (Debian bookworm's nodejs is 18.x).
ensure_node() {
    local major=0
    command -v node >/dev/null 2>&1 && major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
    if [ "$major" -ge 18 ] && command -v npm >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        log "Node.js >= 18 and npm are needed for the TypeScript SDK's tests (run as root or install nodejs and npm)"
        return 1
    fi
    log "installing Debian packages: nodejs npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    major="$(node -p 'process.versions.node.split(".")[0]')"
    [ "$major" -ge 18 ] || { log "node $(node --version) is older than 18"; return 1; }
}

# The TypeScript SDK's tests (sdk/typescript, Node's test runner) against $CARGO_TARGET_DIR's
# debug forkd: dependencies from package-lock.json (npm's cache under $FORKD_CACHE/npm, so
# later runs work offline), a build, then every test file. Appends the output to $1 with a
# cargo-style "test result:" line (so the closing total counts them) and SKIP lines bare.
run_typescript_sdk_tests() {
    local logfile="$1" out status=0
    out="$(mktemp)"
    # One && chain: `set -e` does not apply inside a subshell on the left of ||.
    (
        ensure_node &&
            cd sdk/typescript &&
            npm ci --cache "$FORKD_CACHE/npm" --prefer-offline --no-audit --no-fund --loglevel=error &&
            npm run --silent build &&
            npm run --silent build:test &&
            FORKD_BIN="$CARGO_TARGET_DIR/debug/forkd" node --test --test-reporter=tap build/test/*.test.js
    ) >"$out" 2>&1 || status=$?
    local passed failed
    passed="$(awk '/^# pass / { print $3 }' "$out" | tail -n 1)"
    failed="$(awk '/^# fail / { print $3 }' "$out" | tail -n 1)"
    # A run that broke before the tests counts as one failure.
    [ -n "$passed" ] || passed=0
    [ -n "$failed" ] || failed=0
    [ "$status" -eq 0 ] || [ "$failed" -gt 0 ] || failed=1
    {
        sed 's/^# SKIP: /SKIP: /' "$out"
        if [ "$status" -eq 0 ]; then
            echo "test result: ok. $passed passed; $failed failed; 0 ignored; 0 measured; 0 filtered out (TypeScript SDK)"
        else
            echo "test result: FAILED. $passed passed; $failed failed; 0 ignored; 0 measured; 0 filtered out (TypeScript SDK)"
        fi
    } | tee -a "$logfile"
    rm -f "$out"
    return "$status"
}

# A virtualenv with the Python SDK's pinned test requirements, under $FORKD_CACHE keyed by the
# requirements file's hash (made once, offline afterwards); exported as FORKD_TEST_VENV. The
# SDK itself is not installed into it (an editable install of the wheel's project would build
# the Rust binary): the tests import it from sdk/python.
# A cached virtualenv holding the pinned requirements file $1, exported as the variable $2.
ensure_pinned_venv() {
    local req="$1" var="$2" hash venv
    hash="$(sha256sum "$req" | cut -c1-16)"
    venv="$FORKD_CACHE/venv-$hash"
    if [ ! -f "$venv/.complete" ]; then
        log "installing $req into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
        touch "$venv/.complete"
    fi
    export "$var=$venv"
}

ensure_python_sdk_env() { ensure_pinned_venv sdk/python/requirements-test.txt FORKD_TEST_VENV; }

# E2B's official SDKs for the E2B wire-compatibility tests (crates/forkd-cli/tests/cli_e2b.rs).
ensure_e2b_env() { ensure_pinned_venv crates/forkd-cli/tests/e2b/requirements.txt FORKD_E2B_VENV; }

# Runs the Python SDK's tests (sdk/python/tests) against the debug forkd binary cargo built,
# appending their output to $1 with pytest's summary as a `test result:` line and each skip
# reason as a `SKIP:` line, so the suite's totals count them. Returns pytest's status.
run_python_sdk_tests() {
    local log_file="$1" out status summary passed failed skipped
    out="$(mktemp)"
    set +e
    FORKD_BIN="$CARGO_TARGET_DIR/debug/forkd" PYTHONDONTWRITEBYTECODE=1 \
        "$FORKD_TEST_VENV/bin/python" -m pytest sdk/python/tests -q -rs -p no:cacheprovider \
        2>&1 | tee "$out"
    status=${PIPESTATUS[0]}
    set -e
    summary="$(tail -1 "$out")"
    # pytest's last line: "3 failed, 30 passed, 9 skipped, 1 error in 8.80s".
    count() { awk -v word="$1" '{ for (i = 2; i <= NF; i++) if ($i ~ "^" word) n += $(i-1) } END { print n + 0 }' <<<"$summary"; }
    passed="$(count passed)"
    failed="$(($(count failed) + $(count error)))"
    skipped="$(count skipped)"
    {
        cat "$out"
        sed -nE 's/^SKIPPED \[[0-9]+\] ([^:]+)(:[0-9]+)?: (.*)$/SKIP: python sdk \1: \3/p' "$out" | sort -u
        if [ "$status" -eq 0 ]; then
            echo "test result: ok. ${passed:-0} passed; ${failed:-0} failed; ${skipped:-0} ignored (python sdk)"
        else
            echo "test result: FAILED. ${passed:-0} passed; ${failed:-0} failed; ${skipped:-0} ignored (python sdk, pytest status $status)"
        fi
    } >>"$log_file"
    rm -f "$out"
    return "$status"
}

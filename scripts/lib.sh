# Shared by scripts/demo.sh and scripts/test.sh: idempotent host setup.
# shellcheck shell=bash

FORKD_CACHE="${FORKD_CACHE:-$HOME/.cache/forkd}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FORKD_CACHE/target}"

# Debian packages forkd's build, tests and demo use:
#   gcc, binutils: compile the freestanding test and demo guests
#   nginx, curl, zstd, minisign: hub tests against a real static server, baselines, signatures
#   acpica-tools: iasl -d checks our ACPI tables; e2fsprogs: mkfs.ext4 -d / debugfs for images
#   busybox-static, cpio: initramfs and minimal rootfs builds
#   python3, python3-numpy, util-linux, file: the agent's eval / exec tests and static-binary check
#   debootstrap: Debian-based rootfs recipes (forkd image build python-numpy)
FORKD_APT_PACKAGES=(gcc binutils make nginx curl zstd minisign acpica-tools e2fsprogs busybox-static cpio
    python3 python3-numpy util-linux file debootstrap)

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

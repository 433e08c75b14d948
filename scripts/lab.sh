#!/usr/bin/env bash
# The Linux lab: runs a command inside an L1 Linux VM that QEMU emulates in pure TCG mode with
# AMD-V (SVM + nested paging), so /dev/kvm there is hardware virtualization and forkd boots
# stock Linux guests, even on a host whose own KVM is PVM.
#
#   scripts/lab.sh [--mem-mib N] [--cpus N] [--timeout SECS] [--share DIR] -- CMD [ARGS...]
#   scripts/lab.sh --prepare      install and build what the lab needs; start nothing
#
# L1 sees the host's root read-only (9p) under a writable tmpfs overlay, a fresh scratch disk
# as TMPDIR (/var/tmp/forkd-lab: test data stays out of L1's RAM), and DIR (default: a fresh directory, removed
# afterwards) writable at its host path. CMD runs in the current directory with the host's
# PATH, HOME, FORKD_*, CARGO_*, RUST_* and a few more; its stdout and stderr stream to ours.
#
# L1 touches DIR/heartbeat every few seconds. Nested SVM under TCG now and then wedges L1
# (QEMU idle, the console silent); a heartbeat older than FORKD_LAB_WEDGE_SECS (180) counts as
# that, QEMU is stopped and the session runs again (FORKD_LAB_WEDGE_RETRIES times, default 1)
# in what is left of --timeout, with the same DIR, so CMD may skip work it finished before.
#
# Exit status: CMD's own; 124 when CMD outlived --timeout; 125 when the lab itself failed
# (QEMU crashed, L1 panicked, wedged every time or could not set up); 3 when the lab cannot
# be set up here.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib.sh
. "$repo/scripts/lib.sh"

LAB_DIR="$FORKD_CACHE/lab"
# Where L1 mounts its scratch disk; CMD's TMPDIR.
LAB_SCRATCH=/var/tmp/forkd-lab
# What L1 loads, with their modules.dep closure: KVM for AMD-V, the 9p root, the scratch disk,
# and what forkd's devices and networking use (nftables: each child's policy and the host's table).
LAB_MODULES=(kvm_amd virtio_pci 9pnet_virtio 9p overlay virtio_blk crc32c_generic ext4 tun vhost_vsock
    virtio_net veth nf_tables nft_chain_nat nft_nat nft_masq nft_ct nft_reject_inet nft_fib_inet)
# Measured in LINUX-LAB.md: one L1 vCPU had no child deaths in 100; 12 GiB never panicked.
mem_mib="${FORKD_LAB_MEM_MIB:-12288}"
cpus="${FORKD_LAB_CPUS:-1}"
timeout_s="${FORKD_LAB_TIMEOUT:-3600}"
cpu_model="${FORKD_LAB_CPU:-max}"
wedge_s="${FORKD_LAB_WEDGE_SECS:-180}"
wedge_retries="${FORKD_LAB_WEDGE_RETRIES:-1}"
# run_lab's status for a session stopped because L1 wedged; never CMD's (those come from L1).
WEDGED=75
share=""
prepare_only=0

usage() {
    sed -n '2,/^set -e/p' "$0" | sed -e '/^set -e/d' -e 's/^# \{0,1\}//' >&2
    exit 2
}
die_setup() { echo "lab: cannot set up the lab: $*" >&2; exit 3; }
die_lab() { echo "lab: $*" >&2; exit 125; }
need_number() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "lab: $1 wants a positive number, got '$2'" >&2; exit 2; }; }

while [ $# -gt 0 ]; do
    case "$1" in
        --mem-mib) need_number "$1" "${2:-}"; mem_mib="$2"; shift 2 ;;
        --cpus) need_number "$1" "${2:-}"; cpus="$2"; shift 2 ;;
        --timeout) need_number "$1" "${2:-}"; timeout_s="$2"; shift 2 ;;
        --share) [ -d "${2:-}" ] || { echo "lab: --share ${2:-}: not a directory" >&2; exit 2; }
            share="$(cd "$2" && pwd)"; shift 2 ;;
        --prepare) prepare_only=1; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        *) echo "lab: unexpected argument '$1' (the command goes after --)" >&2; exit 2 ;;
    esac
done
[ "$prepare_only" = 1 ] || [ $# -gt 0 ] || usage

# --- QEMU -----------------------------------------------------------------------------------

# apt with a private source list: the host's sources plus their backports suite, in a lists
# directory of our own, so the host's apt configuration is never touched.
lab_apt() {
    local dir="$LAB_DIR/apt"
    apt-get -o APT::Sandbox::User=root -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$dir/sources.list.d" \
        -o Dir::State::Lists="$dir/lists" "$@"
}

# Derives "<suite>-backports" entries from the host's Debian sources (deb822 or one-line).
write_backports_sources() {
    local dir="$1" codename
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [ -n "$codename" ] || return 1
    mkdir -p "$dir/sources.list.d" "$dir/lists/partial"
    chown -R _apt "$dir/lists" 2>/dev/null || true
    rm -f "$dir/sources.list.d/"*
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        case "$f" in
            */sources.list) cp "$f" "$dir/sources.list.d/host.list" ;;
            *) cp "$f" "$dir/sources.list.d/" ;;
        esac
    done
    # A deb822 stanza whose Suites has the bare codename becomes one with only its backports.
    awk -v c="$codename" '
        function flush() { if (has) printf "%s\n", out; out = ""; has = 0 }
        /^[[:space:]]*$/ { flush(); next }
        /^Suites:/ { n = split($0, s, /[[:space:]]+/); for (i = 2; i <= n; i++) if (s[i] == c) has = 1
                     out = out "Suites: " c "-backports\n"; next }
        { out = out $0 "\n" }
        END { flush() }' /etc/apt/sources.list.d/*.sources 2>/dev/null >"$dir/sources.list.d/lab-backports.sources" || true
    # One-line entries: "deb [opts] URI <codename> components".
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk -v c="$codename" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i == c) { $i = c "-backports"; print; break } }' \
        >"$dir/sources.list.d/lab-backports.list" || true
    grep -q backports "$dir/sources.list.d/lab-backports.sources" "$dir/sources.list.d/lab-backports.list" 2>/dev/null
}

# QEMU whose version matches the preinstalled qemu-utils: mixing a bookworm qemu-system with
# backports' qemu-utils makes apt remove one of them.
ensure_qemu() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 && return 0
    [ "$(id -u)" -eq 0 ] || die_setup "qemu-system-x86_64 is missing (install qemu-system-x86 as root)"
    export DEBIAN_FRONTEND=noninteractive
    local utils
    utils="$(dpkg-query -W -f='${Status} ${Version}' qemu-utils 2>/dev/null | awk '/install ok installed/ { print $4 }')"
    if [[ "$utils" == *bpo* ]]; then
        log "lab: installing qemu-system-x86 $utils from backports (matching qemu-utils)"
        write_backports_sources "$LAB_DIR/apt" || die_setup "no Debian source in /etc/apt to derive backports from"
        lab_apt update -qq >/dev/null || die_setup "apt-get update with backports failed"
        # Backports first (its seabios, too), pinned to qemu-utils' version.
        lab_apt install -y -qq --no-install-recommends -t "$(. /etc/os-release && echo "$VERSION_CODENAME")-backports" \
            "qemu-system-x86=$utils" "qemu-utils=$utils" \
            >/dev/null || die_setup "apt-get install qemu-system-x86=$utils failed"
    else
        log "lab: installing qemu-system-x86"
        apt-get update -qq >/dev/null || true
        apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null \
            || die_setup "apt-get install qemu-system-x86 failed"
    fi
    command -v qemu-system-x86_64 >/dev/null 2>&1 || die_setup "qemu-system-x86_64 still missing after install"
}

# --- L1 kernel and initramfs ----------------------------------------------------------------

# The generic kernel (the cloud flavour has no 9p), as "<package> <version>".
l1_kernel_package() {
    local pkg
    pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
    if [ -z "$pkg" ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
    fi
    [ -n "$pkg" ] || return 1
    echo "$pkg $(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2 }')"
}

# Sets L1_DIR to a cache directory holding vmlinuz and initrd.img, keyed by every input.
ensure_l1() {
    local pkg version key
    read -r pkg version < <(l1_kernel_package) || die_setup "apt cannot resolve linux-image-amd64 (no Debian sources?)"
    key="$( { echo "$pkg=$version"; echo "${LAB_MODULES[*]}"; busybox 2>&1 | head -1
              cat "$repo/scripts/lab/init.sh"; } | sha256sum | cut -c1-16)"
    L1_DIR="$LAB_DIR/l1-$key"
    [ -f "$L1_DIR/initrd.img" ] && return 0
    log "lab: building the L1 kernel and initramfs ($pkg $version)"
    local debs="$LAB_DIR/debs" stage tmp
    mkdir -p "$debs"
    local deb
    deb="$(ls "$debs/${pkg}_"*.deb 2>/dev/null | grep -F "_${version//:/%3a}_" | head -1 || true)"
    if [ -z "$deb" ]; then
        (cd "$debs" && apt-get download -qq "$pkg=$version" >/dev/null 2>&1) \
            || die_setup "apt-get download $pkg=$version failed"
        deb="$(ls "$debs/${pkg}_"*.deb | head -1)"
    fi
    tmp="$(mktemp -d "$LAB_DIR/build.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    dpkg-deb -x "$deb" "$tmp/kernel"
    local kver
    kver="$(ls "$tmp/kernel/lib/modules" | head -1)"
    [ -n "$kver" ] && [ -f "$tmp/kernel/boot/vmlinuz-$kver" ] || die_setup "$deb holds no kernel"
    busybox depmod -b "$tmp/kernel" "$kver"
    stage="$tmp/initramfs"
    mkdir -p "$stage/bin" "$stage/etc" "$stage/lib/modules/$kver"
    cp /bin/busybox "$stage/bin/busybox"
    install -m 0755 "$repo/scripts/lab/init.sh" "$stage/init"
    local mods="$tmp/kernel/lib/modules/$kver"
    # Every wanted module and what it depends on (modules.dep paths are relative to $mods).
    local wanted=() m line
    for m in "${LAB_MODULES[@]}"; do
        line="$(awk -v want="$m" '{ f = $1; sub(":$", "", f); n = split(f, p, "/"); b = p[n]; sub(/\.ko.*$/, "", b);
                gsub("-", "_", b); if (b == want) { print; exit } }' "$mods/modules.dep")"
        if [ -z "$line" ]; then
            grep -q "/${m//_/[-_]}.ko" "$mods/modules.builtin" 2>/dev/null && continue
            die_setup "kernel $kver has no module $m"
        fi
        wanted+=(${line/:/})
    done
    printf '%s\n' "${wanted[@]}" | sort -u | while read -r m; do
        mkdir -p "$stage/lib/modules/$kver/$(dirname "$m")"
        cp "$mods/$m" "$stage/lib/modules/$kver/$m"
    done
    cp "$mods/modules.builtin" "$mods/modules.order" "$stage/lib/modules/$kver/" 2>/dev/null || true
    busybox depmod -b "$stage" "$kver"
    echo "${LAB_MODULES[*]}" >"$stage/etc/lab-modules"
    mkdir -p "$tmp/out"
    cp "$tmp/kernel/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
    (cd "$stage" && find . | cpio -o -H newc --quiet) >"$tmp/out/initrd.img"
    echo "$pkg=$version $kver" >"$tmp/out/info"
    rm -rf "$L1_DIR"
    mv "$tmp/out" "$L1_DIR"
    rm -rf "$tmp"
    trap - EXIT
}

# --- the run --------------------------------------------------------------------------------

# The environment CMD gets, as bash `export` lines: the host's essentials only.
exported_env() {
    local name
    while IFS= read -r name; do
        case "$name" in
            PATH|HOME|USER|LOGNAME|SHELL|LANG|LC_*|TZ|CI|FORKD_*|CARGO_*|RUSTUP_*|RUST_*|RUSTFLAGS|OPENBLAS_*|PYTHON*|NO_COLOR)
                printf 'export %s=%q\n' "$name" "${!name}" ;;
        esac
    done < <(compgen -e)
    echo "export FORKD_IN_LAB=1"
}

# Why L1 stopped without CMD's status, from what it left behind.
report_failure() {
    local run="$1" qemu_rc="$2" reason
    if [ -s "$run/share/init-error" ]; then
        reason="L1 setup failed: $(head -1 "$run/share/init-error")"
    elif grep -q "Kernel panic" "$run/console.log" 2>/dev/null; then
        reason="L1 kernel panic: $(grep -m1 "Kernel panic" "$run/console.log" | sed 's/^\[[^]]*\] //')"
    elif [ "$qemu_rc" -ne 0 ]; then
        reason="QEMU exited with status $qemu_rc: $(tail -1 "$run/qemu.err" 2>/dev/null)"
    else
        reason="L1 stopped without reporting the command's exit status"
    fi
    if [ -s "$run/console.log" ]; then
        # The whole console outlives the run directory, for the lines before these.
        cp "$run/console.log" "$LAB_DIR/last-failure-console.log"
        echo "lab: last lines of L1's console (all of it: $LAB_DIR/last-failure-console.log):" >&2
        tail -n 25 "$run/console.log" | sed 's/^/    /' >&2
    fi
    echo "lab: $reason" >&2
}

# Waits for QEMU (pid $1) while L1's heartbeat file $2 is fresh; stops QEMU and returns 1 when
# it is wedge_s seconds old (counting from now until L1's first beat).
watch_heartbeat() {
    local qemu="$1" beat="$2" started last
    started="$(date +%s)"
    while kill -0 "$qemu" 2>/dev/null; do
        sleep 5
        last="$(stat -c %Y "$beat" 2>/dev/null || echo "$started")"
        if [ $(( $(date +%s) - last )) -ge "$wedge_s" ]; then
            kill -TERM "$qemu" 2>/dev/null || true
            return 1
        fi
    done
    return 0
}

# One L1 session with $1 seconds to run CMD ($2...); exits with CMD's status or the lab's.
run_lab() {
    local limit="$1" run
    shift
    mkdir -p "$LAB_DIR/runs"
    run="$(mktemp -d "$LAB_DIR/runs/run.XXXXXX")"
    # shellcheck disable=SC2064
    trap "kill \$(jobs -p) 2>/dev/null || true; rm -rf '$run'" EXIT
    ln -s "$share" "$run/share"
    rm -f "$share/status" "$share/init-error" "$share/heartbeat"
    printf 'LAB_SHARE=%q\nLAB_SCRATCH=%q\n' "$share" "$LAB_SCRATCH" >"$share/lab.env"
    {
        echo "#!/bin/bash"
        exported_env
        printf 'export TMPDIR=%q LAB_SHARE=%q\n' "$LAB_SCRATCH" "$share"
        printf 'cd %q 2>/dev/null || cd /\n' "$PWD"
        printf 'exec'; printf ' %q' "$@"; echo
    } >"$share/cmd.sh"
    # A sparse scratch disk, fresh each run, for L1's TMPDIR.
    truncate -s 64G "$run/scratch.img"
    mkfs.ext4 -q -F -m 0 -O ^has_journal -E nodiscard,lazy_itable_init=1 "$run/scratch.img" \
        || die_lab "mkfs.ext4 of the scratch disk failed"
    mkfifo "$run/out" "$run/err"
    cat "$run/out" &
    cat "$run/err" >&2 &
    log "lab: booting L1 ($cpus vCPU, $mem_mib MiB, timeout ${limit} s): $*"
    local started=$SECONDS qemu_rc=0 qemu wedged=0
    timeout --kill-after=15 "$limit" qemu-system-x86_64 \
        -accel tcg,thread=multi -M q35 -cpu "$cpu_model" -smp "$cpus" -m "$mem_mib" \
        -display none -monitor none -nodefaults -no-reboot \
        -kernel "$L1_DIR/vmlinuz" -initrd "$L1_DIR/initrd.img" \
        -append "console=ttyS0 panic=-1 oops=panic mitigations=off nokaslr" \
        -serial "file:$run/console.log" \
        -chardev "file,id=cmdout,path=$run/out" -serial chardev:cmdout \
        -chardev "file,id=cmderr,path=$run/err" -serial chardev:cmderr \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
        -virtfs "local,path=$share,mount_tag=labshare,security_model=none,multidevs=remap" \
        -drive "file=$run/scratch.img,format=raw,if=virtio,cache=unsafe" \
        </dev/null 2>"$run/qemu.err" &
    qemu=$!
    watch_heartbeat "$qemu" "$share/heartbeat" || wedged=1
    wait "$qemu" || qemu_rc=$?
    wait  # the output streams end when QEMU closes them
    local took=$((SECONDS - started))
    if [ "$wedged" = 1 ] && [ ! -s "$share/status" ]; then
        cp "$run/console.log" "$LAB_DIR/last-wedge-console.log" 2>/dev/null || true
        echo "lab: L1 wedged: no heartbeat for ${wedge_s} s; QEMU stopped (session ${took} s; console: $LAB_DIR/last-wedge-console.log)" >&2
        exit "$WEDGED"
    fi
    if [ "$qemu_rc" -eq 124 ] || [ "$qemu_rc" -eq 137 ]; then
        echo "lab: the command timed out after ${limit} s; L1 stopped (session ${took} s)" >&2
        exit 124
    fi
    if [ -s "$share/status" ]; then
        local status
        status="$(cat "$share/status")"
        log "lab: L1 session ${took} s; the command exited with $status"
        exit "$status"
    fi
    report_failure "$run" "$qemu_rc"
    exit 125
}

# Sessions until one is not wedged, all within --timeout; exits with the last one's status.
run_sessions() {
    local deadline=$((SECONDS + timeout_s)) attempt=0 rc
    if [ -z "$share" ]; then
        share="$(mktemp -d "$LAB_DIR/runs/share.XXXXXX")"
        # shellcheck disable=SC2064
        trap "rm -rf '$share'" EXIT
    fi
    while :; do
        rc=0
        ( run_lab "$((deadline - SECONDS))" "$@" ) || rc=$?
        if [ "$rc" -ne "$WEDGED" ]; then
            break
        fi
        if [ "$attempt" -ge "$wedge_retries" ] || [ $((deadline - SECONDS)) -lt 60 ]; then
            echo "lab: L1 wedged $((attempt + 1)) time(s); giving up" >&2
            rc=125
            break
        fi
        attempt=$((attempt + 1))
        echo "lab: running the session again ($attempt of $wedge_retries) in the $((deadline - SECONDS)) s left" >&2
    done
    exit "$rc"
}

mkdir -p "$LAB_DIR"
for tool in dpkg-deb cpio busybox mkfs.ext4 timeout; do
    command -v "$tool" >/dev/null 2>&1 || die_setup "$tool is missing (scripts/lib.sh's setup installs it)"
done
ensure_qemu
ensure_l1
if [ "$prepare_only" = 1 ]; then
    log "lab: ready ($(cat "$L1_DIR/info"), $(qemu-system-x86_64 --version | head -1))"
    exit 0
fi
mkdir -p "$LAB_DIR/runs"
run_sessions "$@"

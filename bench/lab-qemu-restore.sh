#!/usr/bin/env bash
# Control experiment for the children that die in a two-vCPU lab: the same kind of workload
# with no forkd in it. QEMU (with the L1 kernel's KVM, as forkd uses it) boots Debian's kernel
# with a one-file initramfs that prints a tick five times a second, saves it with its own
# migration to a file, then restores that state round after round, K VMs at once, and checks
# that each restored VM keeps ticking (and neither panicked nor triple-faulted). Runs inside
# the lab, the kernel already fetched on the host:
#
#   scripts/lab.sh --cpus 2 -- bench/lab-qemu-restore.sh [--rounds R] [--parallel K]
set -euo pipefail
rounds=10 parallel=10 run_s=20
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --parallel) parallel="$2"; shift 2 ;;
        *) echo "lab-qemu-restore: unexpected argument '$1'" >&2; exit 2 ;;
    esac
done
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
vmlinuz="$("$forkd" kernel fetch --json | json 'v["kernel"]["vmlinuz"]')"

mkdir -p "$work/initramfs/bin" "$work/initramfs/proc"
cp /bin/busybox "$work/initramfs/bin/"
cat >"$work/initramfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
i=0
while :; do i=$((i + 1)); /bin/busybox echo "tick $i"; /bin/busybox sleep 0.2; done
INIT
chmod +x "$work/initramfs/init"
(cd "$work/initramfs" && find . | cpio -o -H newc --quiet) >"$work/initrd"

vm() {  # vm NAME [QEMU ARGS...]: one VM in the background, its serial in NAME.log
    local name="$1"; shift
    qemu-system-x86_64 -accel kvm -cpu host -m 256 -smp 1 -nodefaults -no-reboot -display none \
        -kernel "$vmlinuz" -initrd "$work/initrd" -append "console=ttyS0 panic=-1" \
        -serial "file:$work/$name.log" -monitor "unix:$work/$name.mon,server,nowait" "$@" \
        >"$work/$name.out" 2>&1 &
}
monitor() {  # monitor NAME COMMAND...: HMP commands, answers printed
    python3 - "$work/$1.mon" "${@:2}" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(2)
def drain():
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except socket.timeout:
        pass
    return out.decode(errors="replace")
drain()
for cmd in sys.argv[2:]:
    s.sendall(cmd.encode() + b"\n")
    print(drain())
PY
}
# The highest tick in a serial log (its last line may be half written when read).
last_tick() { { grep -ao 'tick [0-9]*' "$1" 2>/dev/null || true; } | cut -d' ' -f2 | sort -n | tail -1; }

# The parent: boot, tick a while, stop, save.
vm parent
for _ in $(seq 600); do [ "$(last_tick "$work/parent.log")" -ge 20 ] 2>/dev/null && break; sleep 0.5; done
[ "$(last_tick "$work/parent.log")" -ge 20 ] || { echo "lab-qemu-restore: the parent never ticked" >&2; exit 1; }
monitor parent stop "migrate \"exec:cat > $work/state\"" >/dev/null
for _ in $(seq 600); do monitor parent "info migrate" | grep -q "completed" && break; sleep 0.5; done
saved="$(last_tick "$work/parent.log")"
monitor parent quit >/dev/null 2>&1 || true
echo "lab-qemu-restore: parent saved at tick $saved ($(du -h "$work/state" | cut -f1)); $rounds rounds of $parallel restores, $(nproc) CPUs" >&2

ok=0 dead=0
for round in $(seq "$rounds"); do
    pids=()
    for k in $(seq "$parallel"); do
        vm "r$round-$k" -incoming "exec:cat $work/state"
        pids+=($!)
    done
    # The source was stopped when saved, so each restored VM waits paused once its state is
    # in: resume it then.
    for k in $(seq "$parallel"); do
        for _ in $(seq 240); do
            status="$(monitor "r$round-$k" "info status" 2>/dev/null | grep -a -m1 "VM status" || true)"
            case "$status" in *paused*) monitor "r$round-$k" cont >/dev/null; break ;; *running*) break ;; esac
            sleep 0.5
        done
    done
    sleep "$run_s"
    for k in $(seq "$parallel"); do
        name="r$round-$k" pid="${pids[$((k - 1))]}"
        tick="$(last_tick "$work/$name.log")"
        if ! kill -0 "$pid" 2>/dev/null; then
            dead=$((dead + 1)); echo "died: $name: QEMU exited: $(tail -2 "$work/$name.out" | tr '\n' ' ') $(tail -2 "$work/$name.log" | tr '\n' ' ')" >&2
        elif grep -aq "Kernel panic\|BUG:\|Oops" "$work/$name.log"; then
            dead=$((dead + 1)); echo "died: $name: $(grep -a -m1 "Kernel panic\|BUG:\|Oops" "$work/$name.log")" >&2
        elif [ -z "$tick" ] || [ "$tick" -le $((saved + 5)) ]; then
            dead=$((dead + 1)); echo "died: $name: stopped ticking (last tick ${tick:-none}, saved at $saved; $(monitor "$name" "info status" | grep -a -m1 "VM status" | tr -d '\r'))" >&2
        else
            ok=$((ok + 1))
        fi
        kill "$pid" 2>/dev/null || true
    done
    wait "${pids[@]}" 2>/dev/null || true
    echo "lab-qemu-restore: round $round: $ok ok, $dead died so far" >&2
done
echo "lab-qemu-restore: QEMU's own restore, $(nproc) CPUs: $ok of $((rounds * parallel)) restored VMs kept running, $dead died"
[ "$dead" -eq 0 ]

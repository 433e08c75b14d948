#!/usr/bin/env bash
# What networking costs a Linux child, measured like against like in one run (inside the Linux
# lab, or on a VT-x/AMD-V host; kernel and minimal image cached on the host first):
#
#   scripts/lab.sh --mem-mib 6144 -- bench/lab-net.sh [--children N] [--rounds R] [--runs K] [--mib M]
#
# 1. Restore: the minimal image snapshotted twice from the same kernel and rootfs, once with
#    `--net` and once without; R rounds of `forkd fork -n N` of each, interleaved; restore
#    p50/p99 of all children of each kind and their ratio.
# 2. TCP throughput: one child of the --net snapshot (tap + its namespace's forwarding and NAT +
#    veth + the host's forwarding and masquerade) sends M MiB to a server in a namespace on the
#    host (upload) and receives M MiB from it (download), K times each; the same transfers,
#    with the same tools (busybox dd and nc), between a namespace and the server over a bare
#    veth pair are the baseline. Upload time is taken by the receiver (accept to EOF), download
#    time by the client (/proc/uptime around nc). MiB/s at the median and p99 transfer time,
#    and the ratio to the baseline's median.
#
# Everything it creates (namespaces, veths, snapshots) is removed on exit.
set -euo pipefail
children=10 rounds=3 runs=8 mib=32
while [ $# -gt 0 ]; do
    case "$1" in
        --children) children="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --mib) mib="$2"; shift 2 ;;
        *) echo "lab-net: unexpected argument '$1'" >&2; exit 2 ;;
    esac
done
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
say() { echo "lab-net: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { say "needs root (network namespaces)"; exit 3; }

server="forkdtb-$$-s" client="forkdtb-$$-c" server_veth="forkdtb$$"
cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    ip link del "$server_veth" 2>/dev/null || true
    ip netns del "$server" 2>/dev/null || true
    ip netns del "$client" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
export FORKD_HOME="$work/home"

# The server's namespace: 10.201.0.2 behind the host's 10.201.0.1 (as linux_net's test), and
# a bare veth pair to the baseline client's namespace (10.203.0.1 -> 10.203.0.2).
ip netns add "$server"
ip netns add "$client"
ip link add "$server_veth" type veth peer name eth0 netns "$server"
ip addr add 10.201.0.1/30 dev "$server_veth"
ip link set "$server_veth" up
ip -n "$server" addr add 10.201.0.2/30 dev eth0
ip -n "$server" link set eth0 up
ip -n "$server" link set lo up
ip -n "$server" route add default via 10.201.0.1
ip -n "$server" link add eth1 type veth peer name eth0 netns "$client"
ip -n "$server" addr add 10.203.0.2/30 dev eth1
ip -n "$server" link set eth1 up
ip -n "$client" addr add 10.203.0.1/30 dev eth0
ip -n "$client" link set eth0 up
ip -n "$client" link set lo up

# Port 9000 takes a stream to EOF and records (peer, bytes, seconds); port 9001 sends M MiB.
ip netns exec "$server" python3 - "$mib" "$work/uploads" <<'PY' &
import socket, sys, threading, time
mib, log = int(sys.argv[1]), sys.argv[2]
def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(8)
    return s
def sink(s):
    while True:
        c, peer = s.accept()
        t, n = time.monotonic(), 0
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            n += len(b)
        took = time.monotonic() - t
        c.close()
        with open(log, "a") as f:
            f.write(f"{peer[0]} {n} {took:.6f}\n")
def source(s):
    chunk = b"\0" * (1 << 20)
    while True:
        c, _ = s.accept()
        try:
            for _ in range(mib):
                c.sendall(chunk)
        finally:
            c.close()
up, down = listener(9000), listener(9001)
threading.Thread(target=source, args=(down,), daemon=True).start()
open(log + ".ready", "w").close()
sink(up)
PY
for _ in $(seq 100); do [ -f "$work/uploads.ready" ] && break; sleep 0.1; done
[ -f "$work/uploads.ready" ] || { say "the server did not start"; exit 1; }

# The transfers, run by a child (busybox sh) and by the baseline's namespace (same busybox).
transfers() {
    cat <<SH
for d in /sys/bus/virtio/devices/*; do
    [ "\$(cat \$d/device 2>/dev/null)" = 0x0001 ] && echo "features \$(cat \$d/features)"
done
st=/sys/class/net/eth0/statistics
[ -d \$st ] && echo "stats before tx_packets tx_bytes rx_packets rx_bytes" \$(cat \$st/tx_packets \$st/tx_bytes \$st/rx_packets \$st/rx_bytes)
i=0
while [ \$i -lt $runs ]; do
    busybox dd if=/dev/zero bs=64k count=$((mib * 16)) 2>/dev/null | busybox nc $1 9000
    t0=\$(cut -d' ' -f1 /proc/uptime)
    busybox nc $1 9001 </dev/null | busybox wc -c >/tmp/forkd-bench-down
    t1=\$(cut -d' ' -f1 /proc/uptime)
    echo "down \$(cat /tmp/forkd-bench-down) \$t0 \$t1"
    i=\$((i + 1))
done
[ -d \$st ] && echo "stats after tx_packets tx_bytes rx_packets rx_bytes" \$(cat \$st/tx_packets \$st/tx_bytes \$st/rx_packets \$st/rx_bytes)
SH
}

kernel="$("$forkd" kernel fetch --json)"
image="$("$forkd" image build minimal --json)"
snap() {
    "$forkd" snapshot --tag "$1" "${@:2}" --json --ready-timeout 300 \
        --kernel "$(json 'v["kernel"]["vmlinuz"]' <<<"$kernel")" \
        --initrd "$(json 'v["kernel"]["initramfs"]' <<<"$kernel")" \
        --rootfs "$(json 'v["image"]' <<<"$image")" \
        --mem-mib "$(json 'v["info"]["recipe"]["memory_mib"]' <<<"$image")" >/dev/null
}
snap plain
snap net --net
say "snapshots taken"

# 1. Restore, with and without networking, rounds interleaved.
: >"$work/restores"
for r in $(seq "$rounds"); do
    for kind in plain net; do
        extra=()
        [ "$kind" = net ] && extra=(--net)
        "$forkd" fork --tag "$kind" -n "$children" "${extra[@]}" --timeout 600 --json >"$work/fork.json"
        python3 - "$kind" "$work/fork.json" >>"$work/restores" <<'PY'
import json, sys
v = json.load(open(sys.argv[2]))
for c in v["children"]:
    if c.get("restore_ms") is not None:
        print(sys.argv[1], c["restore_ms"])
print("wall-" + sys.argv[1], v["wall_ms"])
PY
        say "round $r: $kind done"
    done
done

# 2. Throughput: a child of the net snapshot, then the bare veth pair.
"$forkd" fork --tag net -n 1 --net --allow 10.201.0.2/32 --timeout 600 --exec-timeout 1800 --json \
    --exec -- sh -c "$(transfers 10.201.0.2)" >"$work/child.json"
python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); c=v["children"][0]; print(c["exec"]["stdout"]); sys.stderr.write(c["exec"].get("stderr") or "")' \
    "$work/child.json" | sed 's/^/guest /' >"$work/downloads"
ip netns exec "$client" sh -c "$(transfers 10.203.0.2)" | sed 's/^/veth /' >>"$work/downloads"
say "transfers done"
# The virtio feature bits the child's driver negotiated (character i is bit i).
grep -E '^guest (features|stats) ' "$work/downloads" | sed 's/^guest /child virtio-net /' || true

python3 - "$work/restores" "$work/uploads" "$work/downloads" "$mib" "$children" "$rounds" <<'PY'
import sys
restores, uploads, downloads, mib, children, rounds = sys.argv[1:]
mib = int(mib)

def pct(xs, p):
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, -(-len(xs) * p // 100) - 1))]

r = {"plain": [], "net": [], "wall-plain": [], "wall-net": []}
for line in open(restores):
    kind, ms = line.split()
    r[kind].append(float(ms))
print(f"== restore: {children} children x {rounds} rounds of the minimal image, same kernel and rootfs")
print(f"{'':28} {'n':>4} {'p50':>9} {'p99':>9}")
for kind, name in (("plain", "without networking"), ("net", "with --net")):
    xs = r[kind]
    print(f"{name:28} {len(xs):>4} {pct(xs, 50):>6.2f} ms {pct(xs, 99):>6.2f} ms")
if r["plain"] and r["net"]:
    print(f"{'with / without':28} {'':>4} {pct(r['net'], 50) / pct(r['plain'], 50):>8.2f}x"
          f" {pct(r['net'], 99) / pct(r['plain'], 99):>8.2f}x")
print(f"== fork wall-clock of {children} children (go to all started), {rounds} rounds")
for kind, name in (("wall-plain", "without networking"), ("wall-net", "with --net")):
    xs = r[kind]
    print(f"{name:28} {len(xs):>4} {pct(xs, 50):>6.1f} ms {pct(xs, 99):>6.1f} ms")
if r["wall-plain"] and r["wall-net"]:
    print(f"{'with / without':28} {'':>4} {pct(r['wall-net'], 50) / pct(r['wall-plain'], 50):>8.2f}x")

times = {"upload guest": [], "upload veth": [], "download guest": [], "download veth": []}
expected = mib << 20
for line in open(uploads):
    peer, n, s = line.split()
    if int(n) != expected:
        print(f"an upload from {peer} carried {n} bytes, not {expected}")
        continue
    times["upload " + ("veth" if peer == "10.203.0.1" else "guest")].append(float(s))
for line in open(downloads):
    parts = line.split()
    if len(parts) == 5 and parts[1] == "down":
        who, _, n, t0, t1 = parts
        if int(n) != expected:
            print(f"a {who} download carried {n} bytes, not {expected}")
            continue
        times["download " + who].append(float(t1) - float(t0))
print(f"== TCP throughput, {mib} MiB per transfer (MiB/s at the median and p99 transfer time)")
print(f"{'':28} {'n':>4} {'p50':>12} {'p99':>12} {'p50 / veth':>11}")
for d in ("upload", "download"):
    base = times[f"{d} veth"]
    for who, name in (("guest", f"{d}, child (tap+NAT)"), ("veth", f"{d}, bare veth pair")):
        xs = times[f"{d} {who}"]
        if not xs:
            print(f"{name:28} no transfers")
            continue
        p50, p99 = mib / max(pct(xs, 50), 1e-9), mib / max(pct(xs, 99), 1e-9)
        ratio = (mib / max(pct(base, 50), 1e-9)) if base else float("nan")
        print(f"{name:28} {len(xs):>4} {p50:>7.1f} MiB/s {p99:>7.1f} MiB/s {p50 / ratio:>10.3f}")
PY

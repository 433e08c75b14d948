# Shared by the lab benchmarks: a work directory removed on exit (with any background jobs),
# a JSON field reader, and a snapshot of a recipe's image booted on the cached kernel.
# shellcheck shell=bash

forkd="${FORKD_BIN:-forkd}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/runtime"
export XDG_RUNTIME_DIR="$work/runtime"

# json EXPR: EXPR evaluated on the JSON document on stdin (bound to v).
json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }

# snapshot_recipe TAG RECIPE: boots RECIPE's image to agent-ready and snapshots it as TAG in
# $FORKD_HOME (kernel and image come from the cache the host filled).
snapshot_recipe() {
    local kernel image
    kernel="$("$forkd" kernel fetch --json)"
    image="$("$forkd" image build "$2" --json)"
    "$forkd" snapshot --tag "$1" --json \
        --kernel "$(json 'v["kernel"]["vmlinuz"]' <<<"$kernel")" \
        --initrd "$(json 'v["kernel"]["initramfs"]' <<<"$kernel")" \
        --rootfs "$(json 'v["image"]' <<<"$image")" \
        --mem-mib "$(json 'v["info"]["recipe"]["memory_mib"]' <<<"$image")" >/dev/null
}

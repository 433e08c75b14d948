#!/usr/bin/env bash
# Builds the Hub's packs from recipes/ and publishes them into a hub directory:
#
#   scripts/hub-build.sh DIR [NAME...]        (default: every recipe but `minimal`, and every
#                                              branch in recipes/branches/)
#
# For an image recipe: its image (built on this host: debootstrap, pip, npm), then a warmed
# snapshot under the recipe's tag (where stock Linux guests boot: inside the Linux lab on a PVM
# host, directly on VT-x/AMD-V), then `forkd hub publish` into DIR with every field of the
# seeds' registry schema. A branch (recipes/branches/NAME.toml) is a BRANCH of its parent's
# warmed snapshot after its `setup` commands, published as a chain pack over the parent's pack.
# Ends with a table: build time, image size, snapshot time, pack size, memory.
#
# Env: FORKD_HUB_NAMESPACE (forkd), FORKD_HUB_VERSION (v1), FORKD_HUB_URL_BASE (absolute URL
# DIR will be served at; default: URLs relative to registry.json), FORKD_BIN (a forkd binary to
# use instead of building the release one).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

ns="${FORKD_HUB_NAMESPACE:-forkd}"
version="${FORKD_HUB_VERSION:-v1}"
inside=0
if [ "${1:-}" = "--inside" ]; then inside=1; shift; fi
[ $# -ge 1 ] || { echo "usage: scripts/hub-build.sh DIR [NAME...]" >&2; exit 2; }
dir="$1"; shift
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

# recipe_field NAME EXPR: EXPR of the recipe (image recipe or branch) bound to r.
recipe_field() {
    python3 - "$1" "$2" <<'PY'
import sys, tomllib, pathlib
name, expr = sys.argv[1], sys.argv[2]
path = pathlib.Path("recipes") / f"{name}.toml"
if not path.exists():
    path = pathlib.Path("recipes/branches") / f"{name}.toml"
r = tomllib.loads(path.read_text())
r["_path"] = str(path)
r["_branch"] = path.parent.name == "branches"
v = eval(expr, {"r": r})
print("\n".join(v) if isinstance(v, list) else v)
PY
}

all_names() {
    local f
    for f in recipes/*.toml; do
        f="$(basename "$f" .toml)"
        [ "$f" = minimal ] || echo "$f"
    done
    for f in recipes/branches/*.toml; do basename "$f" .toml; done
}

names=("$@")
[ ${#names[@]} -gt 0 ] || mapfile -t names < <(all_names)
for name in "${names[@]}"; do
    [ -f "recipes/$name.toml" ] || [ -f "recipes/branches/$name.toml" ] \
        || { echo "hub-build: no recipe named '$name' in recipes/ or recipes/branches/" >&2; exit 2; }
done
# Parents before their branches.
ordered=()
for name in "${names[@]}"; do
    [ "$(recipe_field "$name" 'r["_branch"]')" = True ] || ordered+=("$name")
done
for name in "${names[@]}"; do
    [ "$(recipe_field "$name" 'r["_branch"]')" = True ] || continue
    parent="$(recipe_field "$name" 'r["parent"]')"
    printf '%s\n' "${ordered[@]}" | grep -qx "$parent" \
        || [ -n "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["packages"].get(sys.argv[2], ""))' \
            "$dir/registry.json" "$ns/$parent" 2>/dev/null)" ] \
        || { echo "hub-build: $name is a branch of $parent: build $parent too (or publish it into $dir first)" >&2; exit 2; }
    ordered+=("$name")
done
stats="$dir/.hub-build-stats"
forkd="${FORKD_BIN:-$CARGO_TARGET_DIR/release/forkd}"

json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

# ---- outside: everything that needs the network, then the snapshots where Linux boots ----
if [ "$inside" = 0 ]; then
    setup_host
    if [ -z "${FORKD_BIN:-}" ]; then
        log "cargo build --release (forkd)"
        cargo build --release --quiet -p forkd-cli
    fi
    FORKD_AGENT_BIN="$(sh crates/forkd-agent/build-static.sh | tail -1)"
    case "$FORKD_AGENT_BIN" in /*) ;; *) FORKD_AGENT_BIN="$PWD/$FORKD_AGENT_BIN" ;; esac
    export FORKD_AGENT_BIN
    "$forkd" kernel fetch >/dev/null
    : >"$stats"
    for name in "${ordered[@]}"; do
        [ "$(recipe_field "$name" 'r["_branch"]')" = True ] && continue
        log "image $name"
        start="$(now)"
        image="$("$forkd" image build "$name" --json)"
        bytes="$(du -B1 --apparent-size "$(json 'v["image"]' <<<"$image")" | cut -f1)"
        used="$(du -B1 "$(json 'v["image"]' <<<"$image")" | cut -f1)"
        echo "$name build_s=$(since "$start") image_bytes=$bytes image_used=$used" >>"$stats"
    done
    if has_hardware_kvm; then
        "$0" --inside "$dir" "${ordered[@]}"
    else
        log "snapshots in the Linux lab (this host's KVM is PVM)"
        status=0
        scripts/lab.sh --mem-mib "${FORKD_HUB_LAB_MEM_MIB:-8192}" --timeout "${FORKD_HUB_LAB_TIMEOUT:-10800}" \
            --share "$dir" -- "$0" --inside "$dir" "${ordered[@]}" || status=$?
        # The lab's own files in the shared directory are not the hub's.
        rm -f "$dir/cmd.sh" "$dir/lab.env" "$dir/heartbeat" "$dir/status" "$dir/init-error"
        [ "$status" = 0 ] || exit "$status"
    fi
    python3 - "$dir" "$stats" "$ns" <<'PY'
import json, sys
d, stats, ns = sys.argv[1:]
rows = {}
for line in open(stats):
    name, *kv = line.split()
    rows.setdefault(name, {}).update(dict(x.split("=", 1) for x in kv))
reg = json.load(open(f"{d}/registry.json"))
mib = lambda b: f"{int(b) / 2**20:.1f}" if b not in (None, "") else "-"
print(f"{'pack':22} {'build s':>8} {'image MiB':>10} {'used MiB':>9} {'snap s':>7} {'pack MiB':>9} {'memory':>7}")
for name, r in rows.items():
    e = reg["packages"].get(f"{ns}/{name}", {}).get("versions", {}).get("latest", {})
    print(f"{name:22} {r.get('build_s', '-'):>8} {mib(r.get('image_bytes')):>10} {mib(r.get('image_used')):>9} "
          f"{r.get('snapshot_s', '-'):>7} {mib(e.get('size_bytes')):>9} {e.get('memory_mib', '-'):>7}")
PY
    exit 0
fi

# ---- inside: snapshot, branch and publish (no network needed) ----
export FORKD_HOME="${TMPDIR:-/var/tmp}/forkd-hub-build"
rm -rf "$FORKD_HOME"
mkdir -p "$FORKD_HOME/runtime"
export XDG_RUNTIME_DIR="$FORKD_HOME/runtime"
kernel="$("$forkd" kernel fetch --json)"
socket="$FORKD_HOME/forkd.sock"
daemon=""
trap '[ -z "$daemon" ] || kill "$daemon" 2>/dev/null || true' EXIT

publish() { # TAG NAME [ARGS...]
    local tag="$1" name="$2"; shift 2
    local url_args=()
    [ -z "${FORKD_HUB_URL_BASE:-}" ] || url_args=(--url-base "$FORKD_HUB_URL_BASE")
    "$forkd" hub publish --tag "$tag" --dir "$dir" --name "$ns/$name" --version "$version" \
        --description "$(recipe_field "$name" 'r.get("description", "")')" \
        --recipe-path "$(recipe_field "$name" 'r["_path"]')" \
        --release-tag "hub-$name-$version" "${url_args[@]}" "$@" >/dev/null
}

for name in "${ordered[@]}"; do
    if [ "$(recipe_field "$name" 'r["_branch"]')" = True ]; then
        parent="$(recipe_field "$name" 'r["parent"]')"
        ptag="$(recipe_field "$parent" 'r.get("snapshot", {}).get("tag", r["name"])')"
        tag="$(recipe_field "$name" 'r.get("tag", r["name"])')"
        if [ -z "$daemon" ]; then
            "$forkd" serve --socket "$socket" >"$FORKD_HOME/daemon.log" 2>&1 &
            daemon=$!
            for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.2; done
        fi
        export FORKD_HOST="$socket"
        # A parent published by an earlier run comes back from the hub directory itself.
        "$forkd" inspect "$ptag" >/dev/null 2>&1 || "$forkd" pull "$ns/$parent@$version" --hub "$dir"
        log "branch $name of $ptag"
        start="$(now)"
        id="$("$forkd" spawn --tag "$ptag")"
        while read -r cmd; do
            [ -n "$cmd" ] && "$forkd" exec "$id" -- sh -c "$cmd"
        done < <(recipe_field "$name" 'r.get("setup", [])')
        "$forkd" branch "$id" --tag "$tag" >/dev/null
        "$forkd" kill "$id" >/dev/null
        echo "$name snapshot_s=$(since "$start")" >>"$stats"
        publish "$tag" "$name" --parent "$ns/$parent@$version" \
            --base-image "$(recipe_field "$parent" '"debian:" + r.get("debian", {}).get("suite", "bookworm")')"
        continue
    fi
    tag="$(recipe_field "$name" 'r.get("snapshot", {}).get("tag", r["name"])')"
    image="$("$forkd" image build "$name" --json)"
    warmups=()
    while read -r cmd; do
        [ -n "$cmd" ] && warmups+=(--warmup "$cmd")
    done < <(recipe_field "$name" 'r.get("snapshot", {}).get("warmup", [])')
    log "snapshot $name as $tag"
    start="$(now)"
    "$forkd" snapshot --tag "$tag" --json \
        --kernel "$(json 'v["kernel"]["vmlinuz"]' <<<"$kernel")" \
        --initrd "$(json 'v["kernel"]["initramfs"]' <<<"$kernel")" \
        --rootfs "$(json 'v["image"]' <<<"$image")" \
        --mem-mib "$(json 'v["info"]["recipe"]["memory_mib"]' <<<"$image")" \
        --ready-timeout 1800 --warmup-timeout 1800 "${warmups[@]}" >/dev/null
    echo "$name snapshot_s=$(since "$start")" >>"$stats"
    log "publish $ns/$name@$version"
    publish "$tag" "$name" --base-image "$(recipe_field "$name" '"debian:" + r.get("debian", {}).get("suite", "bookworm") if r["base"] == "debian" else "debian:busybox-static"')"
done
log "published into $dir: $(du -sh "$dir" | cut -f1)"

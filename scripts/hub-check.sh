#!/usr/bin/env bash
# Checks a hub directory the way a new host uses it: for each pack, a fresh data directory,
# `forkd pull NS/NAME` from a static server on loopback, then `forkd fork -n N` with every
# child answering its recipe's [snapshot.check] (an eval in the warm interpreter or a shell
# command). For a chain pack it also measures what the chain saves: its link against a
# self-contained pack of the same snapshot (`forkd compact`, then `forkd pack`). With
# FORKD_HUB_CHECK_CHILDREN=100 and python-numpy it is the seeds' done criterion: pull, then
# `fork -n 100` with every child answering an eval, timed from a fresh data directory.
#
#   scripts/hub-check.sh DIR [NAME...]        (default: every package of DIR/registry.json)
#
# Linux children boot where stock kernels do: inside the Linux lab on a PVM host, directly
# on VT-x/AMD-V. Env: FORKD_HUB_NAMESPACE (forkd), FORKD_HUB_CHECK_CHILDREN (3), FORKD_BIN.
# Ends with a table (pull time and bytes, fork time, children answering) and exits non-zero
# when any pack fails.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

ns="${FORKD_HUB_NAMESPACE:-forkd}"
children="${FORKD_HUB_CHECK_CHILDREN:-3}"
inside=0
if [ "${1:-}" = "--inside" ]; then inside=1; shift; fi
[ $# -ge 1 ] || { echo "usage: scripts/hub-check.sh DIR [NAME...]" >&2; exit 2; }
[ -f "$1/registry.json" ] || { echo "hub-check: $1/registry.json: no such file (publish with scripts/hub-build.sh first)" >&2; exit 2; }
dir="$(cd "$1" && pwd)"; shift
forkd="${FORKD_BIN:-$CARGO_TARGET_DIR/release/forkd}"

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    mapfile -t names < <(python3 - "$dir/registry.json" "$ns" <<'PY'
import json, sys
reg, ns = json.load(open(sys.argv[1])), sys.argv[2]
for key in sorted(reg["packages"]):
    if key.startswith(ns + "/"):
        print(key.split("/", 1)[1])
PY
)
fi

if [ "$inside" = 0 ]; then
    if [ -z "${FORKD_BIN:-}" ]; then
        setup_host
        log "cargo build --release (forkd)"
        cargo build --release --quiet -p forkd-cli
    fi
    if has_hardware_kvm; then
        exec "$0" --inside "$dir" "${names[@]}"
    fi
    log "pulls and forks in the Linux lab (this host's KVM is PVM)"
    status=0
    scripts/lab.sh --mem-mib "${FORKD_HUB_LAB_MEM_MIB:-8192}" --timeout "${FORKD_HUB_LAB_TIMEOUT:-5400}" \
        --share "$dir" -- env FORKD_BIN="$forkd" "$0" --inside "$dir" "${names[@]}" || status=$?
    rm -f "$dir/cmd.sh" "$dir/lab.env" "$dir/heartbeat" "$dir/status" "$dir/init-error"
    exit "$status"
fi

# ---- inside: a static server, then a fresh data directory per pack ----
work="${TMPDIR:-/var/tmp}/forkd-hub-check"
rm -rf "$work"
mkdir -p "$work"
port=8805
python3 -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >"$work/http.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    curl -fs -o /dev/null "http://127.0.0.1:$port/registry.json" && break
    sleep 0.2
done
hub="http://127.0.0.1:$port/registry.json"
now() { date +%s.%N; }
json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }
results="$work/results"
: >"$results"

# check_of NAME: the recipe's check as JSON ({"eval"|"exec": ..., "expect": ...}).
check_of() {
    python3 - "$dir/registry.json" "$ns/$1" <<'PY'
import json, sys, tomllib
reg, key = json.load(open(sys.argv[1])), sys.argv[2]
path = reg["packages"][key]["versions"]["latest"].get("recipe_path") or sys.exit(f"{key}: no recipe_path")
r = tomllib.load(open(path, "rb"))
check = r.get("snapshot", {}).get("check") or r.get("check") or sys.exit(f"{path}: no check")
print(json.dumps(check))
PY
}

for name in "${names[@]}"; do
    export FORKD_HOME="$work/$name"
    mkdir -p "$FORKD_HOME/runtime"
    export XDG_RUNTIME_DIR="$FORKD_HOME/runtime"
    log "pull $ns/$name into a fresh data directory"
    start="$(now)"
    if ! "$forkd" pull "$ns/$name" --hub "$hub" --json >"$work/$name.pull" 2>"$work/$name.pull.err"; then
        echo "$name FAIL pull: $(tail -1 "$work/$name.pull.err")" >>"$results"
        continue
    fi
    pulled="$(now)"
    tag="$(json 'v["tag"]' <"$work/$name.pull")"
    check="$(check_of "$name")"
    code="$(json 'v.get("eval") or v["exec"]' <<<"$check")"
    expect="$(json 'v["expect"]' <<<"$check")"
    if [ "$(json '"eval" in v' <<<"$check")" = True ]; then
        work_args=(--eval "$code")
    else
        work_args=(--exec -- sh -c "$code")
    fi
    log "fork --tag $tag -n $children, each answering its check"
    "$forkd" fork --tag "$tag" -n "$children" --timeout 600 --json "${work_args[@]}" \
        >"$work/$name.fork" 2>"$work/$name.fork.err" || true
    forked="$(now)"
    python3 - "$name" "$work" "$expect" "$children" "$start" "$pulled" "$forked" \
        "$dir/registry.json" >>"$results" <<'PY'
import json, sys
name, work, expect, n, start, pulled, forked, registry = sys.argv[1:]
start, pulled, forked, n = float(start), float(pulled), float(forked), int(n)
reg = json.load(open(registry))["packages"]
pull = json.load(open(f"{work}/{name}.pull"))
# What the pull downloaded: this pack, and the parents a chain pack brought first.
def size(ref):
    pkg, _, ver = ref.partition("@")
    return reg[pkg]["versions"][ver or "latest"]["size_bytes"]
got = pull.get("fetched_bytes", 0) + sum(size(p) for p in pull.get("parents", []))
try:
    r = json.load(open(f"{work}/{name}.fork"))
except Exception:
    last = (open(f"{work}/{name}.fork.err").read().strip().splitlines() or ["no output"])[-1]
    print(f"{name} FAIL fork: {last}")
    sys.exit()
def answers(c):
    e = c.get("exec") or {}
    return not c.get("error") and e.get("exit_code") == 0 and expect in e.get("stdout", "").strip()
answered = sum(1 for c in r["children"] if answers(c))
bad = next((c for c in r["children"] if not answers(c)), None)
why = ""
if bad:
    e = bad.get("exec") or {}
    why = bad.get("error") or f"stdout {e.get('stdout', '')[:80]!r} stderr {e.get('stderr', '')[:120]!r}"
first = r.get("first_exec") or {}
restore = r.get("restore") or {}
status = "ok" if answered == n and len(r["children"]) == n else "FAIL"
parents = ",".join(pull.get("parents", [])) or "-"
# The fork's time, split: restores (all children, wall-clock), then the guests answering.
print(f"{name} {status} pull_s={pulled - start:.1f} pulled_mib={got / 2**20:.1f} parents={parents} "
      f"fork_s={forked - pulled:.1f} restore_p50_ms={restore.get('p50_ms', 0):.1f} "
      f"restore_p99_ms={restore.get('p99_ms', 0):.1f} restores_wall_ms={r.get('wall_ms', 0):.0f} "
      f"first_answer_p50_ms={first.get('p50_ms', 0):.0f} last_answer_ms={first.get('max_ms', 0):.0f} "
      f"total_s={forked - start:.1f} answered={answered}/{n}"
      + (f" why={why!r}" if why else ""))
PY
    # A chain pack: what a self-contained pack of the same snapshot would weigh.
    if [ "$("$forkd" inspect "$tag" --json | json 'v["depth"]')" != 0 ]; then
        "$forkd" compact --from "$tag" --to "$tag-whole" >/dev/null
        "$forkd" pack --tag "$tag-whole" --out "$work/$name-whole.tar.zst" >/dev/null
        python3 - "$name" "$dir/registry.json" "$ns/$name" "$(stat -c %s "$work/$name-whole.tar.zst")" >>"$results" <<'PY'
import json, sys
name, registry, key, whole = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
link = json.load(open(registry))["packages"][key]["versions"]["latest"]["size_bytes"]
mib = lambda b: f"{b / 2**20:.1f}"
print(f"{name} chain link_mib={mib(link)} self_contained_mib={mib(whole)} saved_mib={mib(whole - link)}")
PY
        rm -f "$work/$name-whole.tar.zst"
    fi
    rm -rf "$FORKD_HOME"
done
cat "$results"
! grep -q ' FAIL ' "$results"

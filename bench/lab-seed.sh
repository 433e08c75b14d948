#!/usr/bin/env bash
# The seed's done criterion, measured: from a fresh data directory, `forkd pull` of a warmed
# python-numpy pack from a hub on a local static server, then `forkd fork -n 100` with every
# child answering an eval of its warm interpreter — total wall-clock. Also `forkd bench fork` of the minimal and python-numpy
# snapshots against the KVM floor of the same run. Meant to run inside the Linux lab (or on a
# VT-x/AMD-V host) with the kernel and images already cached:
#
#   scripts/lab.sh -- bench/lab-seed.sh [--children N] [--skip-bench]
set -euo pipefail
children=100 bench=1
while [ $# -gt 0 ]; do
    case "$1" in
        --children) children="$2"; shift 2 ;;
        --skip-bench) bench=0; shift ;;
        *) echo "lab-seed: unexpected argument '$1'" >&2; exit 2 ;;
    esac
done
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
say() { echo "lab-seed: $*" >&2; }

# The publisher: boots each image, warms it, snapshots it.
export FORKD_HOME="$work/publisher"
for recipe in minimal python-numpy; do
    snapshot_recipe "$recipe" "$recipe"
    say "$recipe snapshot taken"
done
if [ "$bench" = 1 ]; then
    for recipe in minimal python-numpy; do
        say "forkd bench fork --tag $recipe"
        "$forkd" bench fork --tag "$recipe" -n "$children"
        # Fork to first exec (restored, then a command through the agent), 10 children.
        "$forkd" fork --tag "$recipe" -n 10 --json --exec -- true >"$work/exec.json"
        python3 - "$work/exec.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
f = r["first_exec"]
print(f"fork -n 10 --exec -- true: alive {r['alive']}, fork to first exec p50 {f['p50_ms']:.0f} ms p99 {f['p99_ms']:.0f} ms")
PY
    done
fi
hub="$work/hub"
mkdir -p "$hub"
"$forkd" hub publish --tag python-numpy --dir "$hub" --name deeplethe/python-numpy --version 1 \
    --description "Python 3 with numpy imported" >/dev/null
say "published: $(du -sh "$hub" | cut -f1) in $hub"
port=8804
python3 -m http.server --bind 127.0.0.1 --directory "$hub" "$port" >/dev/null 2>&1 &
for _ in $(seq 100); do
    curl -fs -o /dev/null "http://127.0.0.1:$port/registry.json" && break
    sleep 0.2
done

# The new host: a fresh data directory, nothing built.
export FORKD_HOME="$work/fresh"
start=$(date +%s.%N)
"$forkd" pull deeplethe/python-numpy --hub "http://127.0.0.1:$port/registry.json"
pulled=$(date +%s.%N)
# Every child answers an eval of its warm interpreter (numpy imported before the snapshot).
"$forkd" fork --tag python-numpy -n "$children" --json --eval "int(numpy.arange(4).sum())" \
    >"$work/fork.json" || true
done_at=$(date +%s.%N)
alive="$(json 'v["alive"]' <"$work/fork.json")"
errors="$(json 'sum(1 for c in v["children"] if c.get("error") or (c.get("exec") or {}).get("stdout") != "6")' <"$work/fork.json")"
python3 -c 'import sys; s, p, d, n, a, e = sys.argv[1:]; s, p, d = float(s), float(p), float(d)
print(f"lab-seed: pull {p - s:.1f} s + fork -n {n} {d - p:.1f} s = {d - s:.1f} s total; {a} alive, {e} with errors")' \
    "$start" "$pulled" "$done_at" "$children" "$alive" "$errors"
[ "$alive" = "$children" ] && [ "$errors" = 0 ]

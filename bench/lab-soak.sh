#!/usr/bin/env bash
# Soak: forks Linux children from one snapshot round after round and counts the ones that die.
# Meant to run inside the Linux lab (or on a VT-x/AMD-V host), with the kernel and image already
# in the cache (the host prepares them; the lab has no network):
#
#   scripts/lab.sh [--cpus 2] -- bench/lab-soak.sh [--rounds R] [--children N] [--recipe NAME]
#                                                  [--placement free|split|one]
#
# placement: free  one `forkd fork` of N children, scheduled anywhere (the default)
#            split two concurrent `forkd fork`s of N/2 each, one pinned to CPU 0, one to CPU 1:
#                  every child's threads share one CPU, but KVM runs on both CPUs at once
#            one   one `forkd fork` pinned to CPU 0 while CPU 1 (if any) spins outside KVM
# Every child runs `--exec -- sh -c 'echo ok'`; a child dies if its fork report has an error
# or it did not print ok. Prints each death's error and one summary line; exits 1 if any died.
set -euo pipefail
rounds=5 children=100 recipe=minimal placement=free
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --children) children="$2"; shift 2 ;;
        --recipe) recipe="$2"; shift 2 ;;
        --placement) placement="$2"; shift 2 ;;
        *) echo "lab-soak: unexpected argument '$1'" >&2; exit 2 ;;
    esac
done
case "$placement" in
    free|split|one) ;;
    *) echo "lab-soak: --placement $placement: not one of free, split, one" >&2; exit 2 ;;
esac
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
export FORKD_HOME="$work/home"
snapshot_recipe soak "$recipe"
echo "lab-soak: $recipe snapshot taken; $rounds rounds of $children children, placement $placement, $(nproc) CPUs" >&2

fork() {  # fork CPU N OUT
    local cpu="$1" n="$2" out="$3" pin=()
    [ "$cpu" = any ] || pin=(taskset -c "$cpu")
    "${pin[@]}" "$forkd" fork --tag soak -n "$n" --json --exec -- sh -c 'echo ok' >"$out" 2>"$out.err" || true
}

# Deaths in one fork report: children with an error, or whose command did not print ok.
count() {
    python3 - "$1" <<'PY'
import json, sys
path = sys.argv[1]
try:
    report = json.load(open(path))
except Exception as e:
    print(f"0 0 whole fork failed: {open(path + '.err').read().strip()[:300]}")
    sys.exit()
# forkd fork's own lines about children that stopped uncleanly (their stop reasons).
for line in open(path + ".err"):
    if line.startswith("forkd fork: child"):
        print(line.rstrip(), file=sys.stderr)
ok = dead = 0
for c in report["children"]:
    exec_ = c.get("exec") or {}
    if c.get("error") is None and exec_.get("exit_code") == 0 and exec_.get("stdout", "").strip() == "ok":
        ok += 1
    else:
        dead += 1
        print(f"died: child {c.get('index')}: {c.get('error') or exec_}", file=sys.stderr)
print(ok, dead)
PY
}

total_ok=0 total_dead=0
spinner=""
if [ "$placement" = one ] && [ "$(nproc)" -gt 1 ]; then
    taskset -c 1 sh -c 'while :; do :; done' &
    spinner=$!
fi
for round in $(seq 1 "$rounds"); do
    reports=()
    case "$placement" in
        free) fork any "$children" "$work/r$round" ; reports=("$work/r$round") ;;
        one) fork 0 "$children" "$work/r$round" ; reports=("$work/r$round") ;;
        split)
            fork 0 $((children / 2)) "$work/r$round.a" & a=$!
            fork 1 $((children - children / 2)) "$work/r$round.b" & b=$!
            wait "$a" "$b"
            reports=("$work/r$round.a" "$work/r$round.b") ;;
    esac
    for r in "${reports[@]}"; do
        read -r ok dead rest < <(count "$r")
        [ -z "${rest:-}" ] || echo "lab-soak: round $round: $rest" >&2
        total_ok=$((total_ok + ok)); total_dead=$((total_dead + dead))
    done
    echo "lab-soak: round $round: $total_ok ok, $total_dead died so far" >&2
done
echo "lab-soak: $recipe, placement $placement, $(nproc) CPUs: $total_ok of $((rounds * children)) children ok, $total_dead died"
[ "$total_dead" -eq 0 ] && [ "$total_ok" -eq $((rounds * children)) ]

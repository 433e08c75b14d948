#!/usr/bin/env bash
# Inside the lab: runs the Linux guest tests (`linux_guest::`) of each test binary given, one
# binary and one test at a time; exits non-zero when any failed. scripts/test.sh calls it.
# A binary that finished in an earlier session of the same lab run (scripts/lab.sh runs the
# session again when L1 wedges) is not run again; its status counts.
status=0
for bin in "$@"; do
    done_file="${LAB_SHARE:-/nonexistent}/done-$(basename "$bin")"
    if [ -f "$done_file" ]; then
        echo "==> lab: $(basename "$bin") linux_guest:: finished in an earlier session (status $(cat "$done_file"))" >&2
        [ "$(cat "$done_file")" = 0 ] || status=1
        continue
    fi
    echo "==> lab: $(basename "$bin") linux_guest::" >&2
    rc=0
    "$bin" linux_guest:: --test-threads=1 --color never || rc=$?
    [ -z "${LAB_SHARE:-}" ] || echo "$rc" >"$done_file"
    [ "$rc" = 0 ] || status=1
done
exit "$status"

#!/usr/bin/env bash
# Inside the lab: runs the Linux guest tests (`linux_guest::`) of each test binary given, one
# binary and one test at a time; exits non-zero when any failed. scripts/test.sh calls it.
status=0
for bin in "$@"; do
    echo "==> lab: $(basename "$bin") linux_guest::" >&2
    "$bin" linux_guest:: --test-threads=1 --color never || status=1
done
exit "$status"

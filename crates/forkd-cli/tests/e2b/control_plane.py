"""E2B's official `e2b` SDK, unmodified, on forkd's E2B control plane: only E2B_API_URL,
E2B_SANDBOX_URL and E2B_API_KEY are set (by crates/forkd-cli/tests/cli_e2b.rs), and the
template is a forkd snapshot tag (FORKD_E2B_TEMPLATE). Exits non-zero on the first mismatch."""

import os
import sys
from datetime import datetime, timezone

from e2b import (
    AuthenticationException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)

TEMPLATE = os.environ["FORKD_E2B_TEMPLATE"]


def check(condition, what):
    if not condition:
        sys.exit(f"e2b control plane: {what}")


def listed(**query):
    paginator = Sandbox.list(query=SandboxQuery(**query))
    found = []
    while paginator.has_next:
        found += paginator.next_items()
    return found


sandbox = Sandbox.create(TEMPLATE, timeout=120, metadata={"suite": "e2b", "user": "alice bob"},
                         envs={"A": "1"})
info = sandbox.get_info()
check(info.sandbox_id == sandbox.sandbox_id and info.template_id == TEMPLATE, f"get_info {info}")
check(info.state == SandboxState.RUNNING and info.metadata.get("user") == "alice bob", info)
left = (info.end_at - datetime.now(timezone.utc)).total_seconds()
check(100 < left <= 121, f"end_at {info.end_at} is not about 120 s away")

other = Sandbox.create(TEMPLATE, metadata={"suite": "e2b", "user": "carol"})
check({s.sandbox_id for s in listed(metadata={"suite": "e2b"})}
      == {sandbox.sandbox_id, other.sandbox_id}, "list by metadata")
check([s.sandbox_id for s in listed(metadata={"user": "alice bob"})] == [sandbox.sandbox_id],
      "list by a value with a space")
pages = Sandbox.list(limit=1)
first = pages.next_items()
check(len(first) == 1 and pages.has_next, "a page of one says there is more")
second = pages.next_items()
check(len(second) == 1 and second[0].sandbox_id != first[0].sandbox_id, "the next page")

sandbox.set_timeout(60)
left = (sandbox.get_info().end_at - datetime.now(timezone.utc)).total_seconds()
check(40 < left <= 61, "set_timeout moved end_at")

sandbox.pause()
check(sandbox.get_info().state == SandboxState.PAUSED, "paused")
check([s.sandbox_id for s in listed(state=[SandboxState.PAUSED])] == [sandbox.sandbox_id],
      "list of paused ones")
resumed = Sandbox.connect(sandbox.sandbox_id)
check(resumed.get_info().state == SandboxState.RUNNING, "connect resumed it")

metrics = other.get_metrics()
check(len(metrics) == 1 and metrics[0].mem_used > 0 and metrics[0].mem_total > 0,
      f"metrics {metrics}")
forks = other.fork(count=2)
check(len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks), f"fork {forks}")
check(all(f.get_info().state == SandboxState.RUNNING for f in forks), "the forks run")
for fork in forks:
    fork.kill()
snapshot = other.create_snapshot()
check(snapshot.snapshot_id in [s.snapshot_id for s in other.list_snapshots().next_items()],
      "list_snapshots of the sandbox")
from_snapshot = Sandbox.create(snapshot.snapshot_id)
check(from_snapshot.get_info().state == SandboxState.RUNNING, "a sandbox from the snapshot")
from_snapshot.kill()
check(Sandbox.delete_snapshot(snapshot.snapshot_id) is True, "delete_snapshot")
check(Sandbox.delete_snapshot(snapshot.snapshot_id) is False, "a second delete finds nothing")
check(snapshot.snapshot_id not in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()],
      "a deleted snapshot is not listed")
check(other.is_running(), "envd /health of a running sandbox")
check(other.kill() is True, "kill")
check(not other.is_running(), "a killed sandbox is not running (envd /health 502)")
check(Sandbox.kill(other.sandbox_id) is False, "a second kill finds nothing")
try:
    Sandbox.create("no-such-template")
    sys.exit("e2b control plane: an unknown template was created")
except SandboxException as e:
    check("404" in str(e) and "no-such-template" in str(e), f"unknown template: {e}")
try:
    Sandbox.connect("sb-000000000000").get_info()
    sys.exit("e2b control plane: an unknown sandbox was found")
except SandboxNotFoundException:
    pass
try:
    Sandbox.create(TEMPLATE, api_key="e2b_wrong")
    sys.exit("e2b control plane: a wrong key was accepted")
except AuthenticationException:
    pass

resumed.kill()
check(listed() == [], "nothing left")
print("e2b control plane: create, get_info, list (metadata, state, pages), set_timeout, metrics, "
      "fork, snapshots (create, list, create from, delete), pause, connect, kill, errors ok")

"""The control plane against a real daemon with the built-in demo guest (no agent inside):
create, list, filter, kill, context manager, branch, fork, pause/resume, logs, timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forkd
from forkd import Client, NotFoundError, Sandbox

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "python" / "spawn_ten.py"


def wait_for(predicate, what: str, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        time.sleep(0.1)


def ids(sandboxes) -> set:
    return {s.id for s in sandboxes}


def test_ten_sandboxes_are_created_listed_filtered_by_metadata_and_killed(host):
    with Client(host) as client:
        ten = Sandbox.create("demo", count=10, metadata={"run": "a"}, envs={"X": "1"}, client=client)
        other = Sandbox.create("demo", metadata={"run": "b"}, client=client)
        assert len(ids(ten)) == 10 and all(s.info.tag == "demo" for s in ten)
        assert all(s.info.metadata == {"run": "a"} and s.info.envs == {"X": "1"} for s in ten)
        assert all(s.info.state == "running" and s.info.pid > 0 for s in ten)

        assert ids(Sandbox.list(client=client)) == ids(ten) | {other.id}
        assert ids(Sandbox.list(metadata={"run": "a"}, client=client)) == ids(ten)
        assert ids(Sandbox.list(tag="demo", metadata={"run": "b"}, client=client)) == {other.id}
        assert Sandbox.list(tag="no-such-tag", client=client) == []

        for s in ten:
            s.kill()
        assert ids(Sandbox.list(client=client)) == {other.id}
        with pytest.raises(NotFoundError):
            ten[0].kill()
        other.kill()


def test_connect_finds_a_sandbox_by_id_and_the_context_manager_kills_it(host):
    with Sandbox.create("demo", host=host) as sandbox:
        again = Sandbox.connect(sandbox.id, host=host)
        assert again.info == sandbox.info
        again.close()
        assert [s.id for s in Sandbox.list(host=host)] == [sandbox.id]
    assert Sandbox.list(host=host) == []
    with pytest.raises(NotFoundError, match=f'no sandbox "{sandbox.id}"'):
        Sandbox.connect(sandbox.id, host=host)


def test_a_context_manager_exits_cleanly_when_the_sandbox_was_already_killed(host):
    with Sandbox.create("demo", host=host) as sandbox:
        sandbox.kill()
    assert Sandbox.list(host=host) == []


def test_branch_and_fork_of_a_running_sandbox_give_sandboxes_that_continue_from_it(host):
    with Client(host) as client:
        parent = Sandbox.create("demo", metadata={"role": "parent"}, timeout=600, client=client)
        snapshot = parent.branch(tag="warm")
        assert (snapshot.tag, snapshot.sandbox_id, snapshot.mode) == ("warm", parent.id, "diff")
        assert snapshot.parent == "demo" and snapshot.pause_ms >= 0
        assert client.get_snapshot("warm").parent_tag == "demo"
        child = Sandbox.create("warm", client=client)
        assert child.info.tag == "warm"

        kids = parent.fork(3)
        assert len(ids(kids)) == 3
        branch_tag = kids[0].info.tag
        assert branch_tag.startswith(f"{parent.id}-branch-")
        assert all(k.info.tag == branch_tag for k in kids)
        assert all(k.info.metadata == {"role": "parent"} and k.info.timeout == 600 for k in kids)
        assert parent.get_info().state == "running", "the parent runs on"

        full = parent.branch(diff=False)
        assert full.mode == "full" and full.parent is None
        for s in Sandbox.list(client=client):
            s.kill()


def test_forked_and_listed_sandboxes_share_the_client_their_parent_made(host):
    with Sandbox.create("demo", host=host) as parent:
        client = parent.client
        kids = parent.fork(2)
        listed = Sandbox.list(host=host)
    # The parent is gone; its children still talk through the client it made.
    assert {k.get_info().state for k in kids} == {"running"}
    assert not client._transport.http.is_closed
    for kid in kids:
        kid.kill()
        kid.close()
    assert {s.id for s in listed} == {parent.id, *ids(kids)}
    for s in listed:
        s.close()
    assert listed[0].client is not client and listed[0].client._transport.http.is_closed
    assert client._transport.http.is_closed, "the last sandbox holding it closed it"
    # A call that makes a client and fails, or finds nothing, leaves none open.
    assert Sandbox.list(host=host) == []
    with pytest.raises(forkd.NotFoundError):
        Sandbox.connect("sb-000000000000", host=host)


def test_pause_keeps_the_id_and_resume_restores_it(host):
    with Client(host) as client:
        sandbox = Sandbox.create("demo", timeout=600, client=client)
        sandbox.pause()
        assert sandbox.info.state == "paused" and sandbox.info.pid == 0
        assert sandbox.info.expires_at is None, "a paused sandbox does not time out"
        assert Sandbox.connect(sandbox.id, client=client).info.state == "paused"
        with pytest.raises(forkd.ConflictError) as refused:
            sandbox.logs()
        assert refused.value.code == "paused" and refused.value.status == 409

        resumed = Sandbox.resume(sandbox.id, timeout=60, client=client)
        assert (resumed.id, resumed.info.state) == (sandbox.id, "running")
        assert resumed.info.pid > 0 and resumed.info.expires_at is not None
        with pytest.raises(forkd.ConflictError) as again:
            Sandbox.resume(sandbox.id, client=client)
        assert again.value.code == "not_paused"
        resumed.kill()


def test_logs_show_the_demo_guests_console(host):
    with Sandbox.create("demo", host=host) as sandbox:
        text = wait_for(sandbox.logs, "console output")
        assert text.startswith("counter "), text
        assert len(sandbox.logs(tail=5)) == 5


def test_a_sandbox_timeout_expires_and_set_timeout_moves_it(host):
    with Client(host) as client:
        short = Sandbox.create("demo", timeout=1, client=client)
        kept = Sandbox.create("demo", timeout=1, client=client)
        kept.set_timeout(3600)
        assert kept.info.expires_at >= int(time.time()) + 3500

        def gone() -> bool:
            try:
                short.get_info()
            except NotFoundError:
                return True
            return False

        wait_for(gone, "the 1 s timeout")
        assert ids(Sandbox.list(client=client)) == {kept.id}
        kept.kill()


def test_the_ten_line_example_spawns_lists_and_kills_ten_sandboxes(daemon):
    env = {**os.environ, "FORKD_HOST": daemon.host, "FORKD_TAG": "demo"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(forkd.__file__).parent.parent),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(EXAMPLE)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "10 sandboxes running" and lines[-1] == "0 left", out.stdout
    assert Sandbox.list(host=daemon.host) == []


def test_the_client_reports_health_version_and_snapshots(host):
    with Client(host) as client:
        assert client.health() is True
        version = client.version()
        assert version.api == "v1" and version.version
        snapshots = {s.tag: s for s in client.list_snapshots()}
        assert snapshots["demo"].kernel.startswith("builtin:demo") and snapshots["demo"].memory_mib == 64
        with pytest.raises(NotFoundError):
            client.get_snapshot("missing")
        Sandbox.create("demo", client=client).branch(tag="gone")
        assert client.delete_snapshot("gone") == ["gone"]
        assert "gone" not in {s.tag for s in client.list_snapshots()}


def test_a_pull_reports_its_progress_and_a_failed_pull_raises_the_daemons_error(host, tmp_path):
    seen = []
    with Client(host) as client:
        with pytest.raises(forkd.ForkdError) as failed:
            client.pull(str(tmp_path / "missing.forkd-snapshot.tar.zst"), on_progress=seen.append,
                        poll_interval=0.05, timeout=60)
    assert seen and seen[-1].state == "failed", seen
    assert failed.value.code == seen[-1].error_code and str(failed.value) == seen[-1].error_message

"""Commands, files and eval against Linux children: a daemon (FORKD_SDK_LAB_HOST) serving a
Linux snapshot with forkd-agent and a warm Python interpreter (FORKD_SDK_LAB_TAG). Run by
crates/forkd-cli/tests/linux_e2e.rs inside the Linux lab; skipped elsewhere."""

from __future__ import annotations

import io
import os
from typing import Iterator, List

import pytest

import forkd
from forkd import AsyncSandbox, Sandbox

pytestmark = pytest.mark.lab

HOST = os.environ.get("FORKD_SDK_LAB_HOST", "")
TAG = os.environ.get("FORKD_SDK_LAB_TAG", "")


@pytest.fixture()
def sandbox() -> Iterator[Sandbox]:
    with Sandbox.create(TAG, host=HOST, timeout=1800) as s:
        yield s


def test_commands_run_streams_output_and_reports_the_exit(sandbox):
    chunks: List[str] = []
    result = sandbox.commands.run("echo hello; echo oops >&2; exit 3", on_stdout=chunks.append)
    assert (result.stdout, result.stderr, result.exit_code) == ("hello\n", "oops\n", 3)
    assert "".join(chunks) == "hello\n"
    result = sandbox.commands.run("echo $GREETING; pwd", envs={"GREETING": "hi"}, cwd="/tmp")
    assert result.stdout == "hi\n/tmp\n" and result.ok
    assert sandbox.commands.run("cat", stdin="from stdin").stdout == "from stdin"
    assert sandbox.commands.run(["printf", "%s-%s", "a", "b"]).stdout == "a-b"


def test_check_raises_on_a_failing_command_and_a_timeout_kills_it(sandbox):
    with pytest.raises(forkd.CommandExitError) as failed:
        sandbox.commands.run("echo bad >&2; exit 4", check=True)
    assert failed.value.exit_code == 4 and failed.value.stderr == "bad\n"
    assert str(failed.value) == "command ended with exit code 4: bad"
    with pytest.raises(forkd.TimeoutError) as slow:
        sandbox.commands.run("echo started; sleep 60", timeout=2)
    assert slow.value.result.timed_out and slow.value.result.stdout == "started\n"


def test_background_commands_are_waited_for_listed_and_killed(sandbox):
    quick = sandbox.commands.run("sleep 1; echo done", background=True)
    assert quick.wait(timeout=300).stdout == "done\n"
    sleeper = sandbox.commands.run("sleep 600", background=True)
    assert sleeper.pid in [p.pid for p in sandbox.commands.list()]
    with pytest.raises(forkd.TimeoutError, match="still running"):
        sleeper.wait(timeout=0)
    sleeper.kill()
    ended = sleeper.wait(timeout=300)
    assert ended.signal == 9 and ended.exit_code is None
    failing = sandbox.commands.run("exit 5", background=True, check=True)
    with pytest.raises(forkd.CommandExitError):
        failing.wait(timeout=300)


def test_files_are_written_read_listed_and_removed(sandbox):
    files = sandbox.files
    assert files.make_dir("/tmp/sdk") is True and files.make_dir("/tmp/sdk") is False
    assert files.write("/tmp/sdk/a.txt", "héllo\n").size == len("héllo\n".encode())
    assert files.read("/tmp/sdk/a.txt") == "héllo\n"
    every_byte = bytes(range(256))
    files.write("/tmp/sdk/nested/b.bin", every_byte, mode=0o600)
    assert files.read("/tmp/sdk/nested/b.bin", format="bytes") == every_byte
    assert files.stat("/tmp/sdk/nested/b.bin").mode == 0o600
    big = os.urandom(8 << 20)
    assert files.write("/tmp/sdk/big", io.BytesIO(big)).size == len(big)
    with files.read("/tmp/sdk/big", format="stream") as stream:
        assert stream.size == len(big)
        assert b"".join(stream) == big
    listed = {e.name: e for e in files.list("/tmp/sdk")}
    assert sorted(listed) == ["a.txt", "big", "nested"]
    assert listed["nested"].type == "dir" and listed["big"].size == len(big)
    assert files.exists("/tmp/sdk/a.txt") and not files.exists("/tmp/sdk/missing")
    files.remove("/tmp/sdk/a.txt")
    assert not files.exists("/tmp/sdk/a.txt")
    with pytest.raises(forkd.NotFoundError):
        files.read("/tmp/sdk/a.txt")
    files.remove("/tmp/sdk", recursive=True)
    assert not files.exists("/tmp/sdk")


def test_eval_keeps_state_reports_exceptions_and_times_out(sandbox):
    assert sandbox.eval("x = 41").error is None
    assert sandbox.eval("x + 1").value == "42"
    printed = sandbox.eval("print('side')")
    assert printed.stdout == "side\n" and printed.value is None
    raised = sandbox.eval("1/0")
    assert raised.error is not None and raised.error.name == "ZeroDivisionError"
    with pytest.raises(forkd.TimeoutError):
        sandbox.eval("import time; time.sleep(60)", timeout=2)


def test_forked_children_continue_from_the_sandboxs_files_and_interpreter(sandbox):
    sandbox.files.write("/tmp/state", "v1")
    sandbox.eval("marker = 'from parent'")
    kids = sandbox.fork(2)
    try:
        for kid in kids:
            assert kid.files.read("/tmp/state") == "v1"
            assert kid.eval("marker").value == "'from parent'"
    finally:
        for kid in kids:
            kid.kill()


def test_the_ten_sandbox_script_with_commands_files_and_eval():
    sandboxes = Sandbox.create(TAG, count=10, metadata={"lab": "ten"}, timeout=1800, host=HOST)
    try:
        assert len(Sandbox.list(metadata={"lab": "ten"}, host=HOST)) == 10
        for s in sandboxes:
            assert s.commands.run("echo $((6 * 7))").stdout == "42\n"
            s.files.write("/tmp/id", s.id)
            assert s.files.read("/tmp/id") == s.id
            assert s.eval("6 * 7").value == "42"
    finally:
        for s in sandboxes:
            s.kill()
    assert Sandbox.list(metadata={"lab": "ten"}, host=HOST) == []


@pytest.mark.anyio
async def test_the_async_sandbox_runs_commands_files_and_eval():
    chunks: List[str] = []

    async def on_stdout(chunk: str) -> None:
        chunks.append(chunk)

    async with await AsyncSandbox.create(TAG, host=HOST, timeout=1800) as s:
        result = await s.commands.run("echo async", on_stdout=on_stdout)
        assert result.stdout == "async\n" and "".join(chunks) == "async\n"
        await s.files.write("/tmp/async", b"bytes")
        assert await s.files.read("/tmp/async", format="bytes") == b"bytes"
        stream = await s.files.read("/tmp/async", format="stream")
        assert b"".join([chunk async for chunk in stream]) == b"bytes"
        assert (await s.eval("2 ** 10")).value == "1024"
        with pytest.raises(forkd.CommandExitError):
            await s.commands.run("false", check=True)

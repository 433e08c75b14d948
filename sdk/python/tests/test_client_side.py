"""The SDK's own logic, against a stand-in daemon (httpx.MockTransport) speaking the API's
shapes: the exec stream read chunk by chunk, check=True, command timeouts, background handles,
uploads from file objects, error bodies. The real agent behind these routes is covered by the
``lab`` tests."""

from __future__ import annotations

import base64
import io
import json
from typing import Callable, List

import httpx
import pytest

import forkd
from forkd import AsyncClient, AsyncSandbox, Client, Sandbox
from forkd._transport import timeout_of

INFO = forkd.SandboxInfo("sb-1", "py", "running", "2026-01-01T00:00:00Z", {}, {}, 7, 1.0)


def ndjson(*events: dict) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def sync_sandbox(handler: Callable[[httpx.Request], httpx.Response]) -> Sandbox:
    client = Client("/nonexistent.sock")
    client._transport.http = httpx.Client(base_url="http://forkd", timeout=timeout_of(5),
                                          transport=httpx.MockTransport(handler))
    return Sandbox(INFO, client)


def async_sandbox(handler: Callable[[httpx.Request], httpx.Response]) -> AsyncSandbox:
    client = AsyncClient("/nonexistent.sock")
    client._transport.http = httpx.AsyncClient(base_url="http://forkd", timeout=timeout_of(5),
                                               transport=httpx.MockTransport(handler))
    return AsyncSandbox(INFO, client)


EXIT_1 = ndjson({"type": "stdout", "data": "out 1\n"},
                {"type": "stderr", "data_b64": base64.b64encode(b"err \xff\n").decode()},
                {"type": "stdout", "data": "out 2\n"},
                {"type": "exit", "exit_code": 1, "timed_out": False, "duration_ms": 12})


def exec_handler(body: bytes, seen: List[dict]) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/sandboxes/sb-1/exec"
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=body, headers={"content-type": "application/x-ndjson"})
    return handle


def test_exec_output_goes_to_the_callbacks_chunk_by_chunk_and_into_the_result():
    seen: List[dict] = []
    chunks: List[str] = []
    sandbox = sync_sandbox(exec_handler(EXIT_1, seen))
    result = sandbox.commands.run(["sh", "-c", "x"], envs={"A": "b"}, cwd="/tmp", timeout=2.5,
                                  stdin=b"in", on_stdout=lambda c: chunks.append("o:" + c),
                                  on_stderr=lambda c: chunks.append("e:" + c))
    assert seen == [{"cmd": ["sh", "-c", "x"], "env": {"A": "b"}, "cwd": "/tmp",
                     "timeout_secs": 3, "stdin": "in"}]
    assert chunks == ["o:out 1\n", "e:err \ufffd\n", "o:out 2\n"]
    assert (result.stdout, result.exit_code, result.duration_ms) == ("out 1\nout 2\n", 1, 12)
    assert result.stderr_bytes == b"err \xff\n" and not result.ok


def test_check_raises_command_exit_error_with_the_result():
    sandbox = sync_sandbox(exec_handler(EXIT_1, []))
    with pytest.raises(forkd.CommandExitError) as caught:
        sandbox.commands.run("false", check=True)
    assert caught.value.exit_code == 1 and caught.value.stdout == "out 1\nout 2\n"
    assert str(caught.value) == "command ended with exit code 1: err \ufffd"
    ok = ndjson({"type": "exit", "exit_code": 0, "timed_out": False, "duration_ms": 1})
    assert sync_sandbox(exec_handler(ok, [])).commands.run("true", check=True).ok


def test_a_command_killed_by_its_timeout_raises_timeout_error_with_its_output():
    body = ndjson({"type": "stdout", "data": "partial"},
                  {"type": "exit", "signal": 9, "timed_out": True, "duration_ms": 1000})
    with pytest.raises(forkd.TimeoutError) as caught:
        sync_sandbox(exec_handler(body, [])).commands.run("sleep 9", timeout=1)
    assert caught.value.result.stdout == "partial" and caught.value.result.signal == 9


def test_a_stream_that_breaks_off_is_an_error_not_a_result():
    broken = ndjson({"type": "stdout", "data": "x"},
                    {"type": "error", "code": "agent_unavailable", "message": "the agent went away"})
    with pytest.raises(forkd.ForkdError, match="^the agent went away$") as caught:
        sync_sandbox(exec_handler(broken, [])).commands.run("x")
    assert caught.value.code == "agent_unavailable"
    with pytest.raises(forkd.ForkdError, match="ended before the command's exit"):
        sync_sandbox(exec_handler(ndjson({"type": "stdout", "data": "x"}), [])).commands.run("x")


def test_error_bodies_become_typed_exceptions_with_code_message_and_status():
    cases = [(400, "bad_request", forkd.BadRequestError), (404, "not_found", forkd.NotFoundError),
             (409, "no_agent", forkd.ConflictError), (422, "spawn_failed", forkd.UnprocessableError),
             (429, "too_many_sandboxes", forkd.RateLimitError), (502, "agent_unavailable", forkd.ServerError)]
    for status, code, cls in cases:
        body = {"code": code, "message": f"{code} happened"}
        sandbox = sync_sandbox(lambda r, s=status, b=body: httpx.Response(s, json=b))
        for call in (lambda: sandbox.commands.run("x"), sandbox.get_info):
            with pytest.raises(cls) as caught:
                call()
            assert (caught.value.status, caught.value.code, str(caught.value)) == (status, code, f"{code} happened")
    html = sync_sandbox(lambda r: httpx.Response(500, text="<html>oops</html>"))
    with pytest.raises(forkd.ServerError, match="^<html>oops</html>$"):
        html.kill()


def test_a_background_command_is_waited_for_and_killed_through_processes_routes():
    calls: List[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}?{request.url.query.decode()}")
        if request.url.path.endswith("/processes"):
            return httpx.Response(201, json={"pid": 42, "started_ms": 1})
        if request.url.path.endswith("/wait"):
            running = "timeout=0" in request.url.query.decode()
            return httpx.Response(200, json={
                "pid": 42, "argv": ["sh"], "state": "running" if running else "exited",
                "exit_code": None if running else 3, "timed_out": False, "started_ms": 1,
                "ended_ms": None if running else 11, "stdout_bytes": 2, "stderr_bytes": 0,
                "stdout": "hi", "stderr_b64": base64.b64encode(b"\x00").decode(),
                "stdout_dropped": 0, "stderr_dropped": 0})
        return httpx.Response(200, json={"pid": 42, "signal": 15, "state": "running"})

    out: List[str] = []
    handle_ = sync_sandbox(handle).commands.run("x", background=True, check=True,
                                                on_stdout=out.append)
    assert handle_.pid == 42
    with pytest.raises(forkd.TimeoutError, match="process 42 is still running"):
        handle_.wait(timeout=0)
    assert out == [], "no output is delivered before the end"
    handle_.kill("TERM")
    with pytest.raises(forkd.CommandExitError) as caught:
        handle_.wait()
    assert out == ["hi"] and caught.value.result.stderr_bytes == b"\x00"
    assert caught.value.result.duration_ms == 10
    assert calls == ["POST /v1/sandboxes/sb-1/processes?",
                     "POST /v1/sandboxes/sb-1/processes/42/wait?timeout=0",
                     "DELETE /v1/sandboxes/sb-1/processes/42?signal=TERM",
                     "POST /v1/sandboxes/sb-1/processes/42/wait?"]


def upload_handler(received: List[bytes]) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "application/octet-stream"
        body = request.read()
        received.append(body)
        return httpx.Response(200, json={"path": request.url.params["path"], "size": len(body)})
    return handle


def test_files_write_streams_str_bytes_file_objects_and_chunks():
    received: List[bytes] = []
    files = sync_sandbox(upload_handler(received)).files
    big = bytes(range(256)) * 4096
    assert files.write("/a", "héllo").size == 6
    assert files.write("/b", b"\x00\x01").size == 2
    assert files.write("/c", io.BytesIO(big), mode=0o755).size == len(big)
    assert files.write("/d", iter([b"ab", b"cd"])).path == "/d"
    assert received == ["héllo".encode(), b"\x00\x01", big, b"abcd"]
    with pytest.raises(forkd.ForkdError, match="cannot write data of type int"):
        files.write("/e", 5)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_the_async_twin_streams_exec_with_coroutine_callbacks_and_uploads():
    chunks: List[str] = []

    async def on_stdout(chunk: str) -> None:
        chunks.append(chunk)

    sandbox = async_sandbox(exec_handler(EXIT_1, []))
    with pytest.raises(forkd.CommandExitError):
        await sandbox.commands.run("x", on_stdout=on_stdout, check=True)
    assert chunks == ["out 1\n", "out 2\n"]
    received: List[bytes] = []
    files = async_sandbox(upload_handler(received)).files
    assert (await files.write("/f", io.BytesIO(b"x" * 300_000))).size == 300_000
    assert received == [b"x" * 300_000]


RECORD = {"id": "sb-2", "tag": "net", "state": "running", "created_at": "2026-01-01T00:00:00Z",
          "metadata": {}, "env": {}, "pid": 9, "restore_ms": 1.0,
          "network": {"address": "10.200.0.6", "guest_address": "10.0.2.15",
                      "namespace": "forkd-9-0", "allow": ["10.1.2.0/24:443"], "allow_dns": True,
                      "publish": ["18080:8080"]}}


def create_handler(seen: List[dict]) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/v1/sandboxes")
        seen.append(json.loads(request.content))
        return httpx.Response(201, json={"sandboxes": [RECORD]})
    return handle


def test_create_sends_the_network_section_and_the_record_carries_the_network():
    seen: List[dict] = []
    client = sync_sandbox(create_handler(seen)).client
    made = Sandbox.create("net", allow=["10.1.2.0/24:443"], allow_dns=True,
                          publish=["18080:8080"], client=client)
    assert seen[-1]["network"] == {"allow": ["10.1.2.0/24:443"], "allow_dns": True,
                                   "publish": ["18080:8080"]}
    net = made.info.network
    assert net is not None
    assert (net.address, net.namespace, net.allow, net.allow_dns, net.publish) == (
        "10.200.0.6", "forkd-9-0", ["10.1.2.0/24:443"], True, ["18080:8080"])
    # Nothing asked: no section (the snapshot's recorded policy applies).
    Sandbox.create("net", client=client)
    assert "network" not in seen[-1]
    # allow_dns alone is a policy of its own: it replaces the recorded one.
    Sandbox.create("net", allow_dns=True, client=client)
    assert seen[-1]["network"] == {"allow": [], "allow_dns": True}
    # Ports only: the recorded policy, and the ports.
    Sandbox.create("net", publish=["18081:80"], client=client)
    assert seen[-1]["network"] == {"publish": ["18081:80"]}
    with pytest.raises(TypeError, match="allow takes a list"):
        Sandbox.create("net", allow="10.0.0.0/8", client=client)  # type: ignore[arg-type]
    assert forkd.SandboxInfo.from_json({**RECORD, "network": None}).network is None


def test_network_refusals_are_typed():
    for status, code, cls in [(409, "port_taken", forkd.ConflictError),
                              (422, "no_network_device", forkd.UnprocessableError)]:
        client = sync_sandbox(lambda r, s=status, c=code: httpx.Response(
            s, json={"code": c, "message": f"{c} here"})).client
        with pytest.raises(cls) as caught:
            Sandbox.create("net", publish=["18080:80"], client=client)
        assert caught.value.code == code


@pytest.mark.anyio
async def test_the_async_create_sends_the_network_section_too():
    seen: List[dict] = []
    client = async_sandbox(create_handler(seen)).client
    made = await AsyncSandbox.create("net", allow=["10.1.2.0/24:443"], publish=["18080:8080"],
                                     client=client)
    assert seen[-1]["network"] == {"allow": ["10.1.2.0/24:443"], "allow_dns": False,
                                   "publish": ["18080:8080"]}
    assert made.info.network is not None and made.info.network.publish == ["18080:8080"]

"""Every error path: no daemon, a wrong or missing token, an https daemon whose certificate is
not trusted, an unknown sandbox, a request that times out, refused limits, bad arguments, and
what the demo guest (no agent) refuses."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

import forkd
from forkd import Client, Sandbox

from conftest import start_daemon, stop_daemon


def test_no_daemon_is_one_clear_message_naming_how_to_start_one(tmp_path):
    path = tmp_path / "forkd.sock"
    with pytest.raises(forkd.DaemonNotRunningError) as caught:
        Sandbox.create("demo", host=str(path))
    message = str(caught.value)
    assert message.startswith(f"no forkd daemon answers at unix:{path} (")
    assert "start one with `forkd serve`" in message and "\n" not in message
    assert caught.value.status is None and caught.value.code == "daemon_not_running"


def test_no_daemon_on_tcp_names_the_url(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(forkd.DaemonNotRunningError, match=f"^no forkd daemon answers at http://127.0.0.1:{port} "):
        Client(f"http://127.0.0.1:{port}").health()


def test_the_default_host_follows_forkd_host_and_the_default_socket_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("FORKD_HOST", raising=False)
    assert forkd.default_socket_path() == f"{tmp_path}/forkd/forkd.sock"
    with pytest.raises(forkd.DaemonNotRunningError, match=f"at unix:{tmp_path}/forkd/forkd.sock "):
        Client().health()
    monkeypatch.setenv("FORKD_HOST", f"unix:{tmp_path}/other.sock")
    assert Client().endpoint.describe() == f"unix:{tmp_path}/other.sock"
    monkeypatch.setenv("FORKD_HOST", "http://127.0.0.1:9/")
    monkeypatch.setenv("FORKD_TOKEN", "secret")
    client = Client()
    assert client.endpoint.describe() == "http://127.0.0.1:9"
    assert client.endpoint.headers() == {"Authorization": "Bearer secret"}
    for bad in ("ftp://x", "http://h:1/path"):
        monkeypatch.setenv("FORKD_HOST", bad)
        with pytest.raises(forkd.ForkdError, match=f"^FORKD_HOST '{bad}': "):
            Client()


@pytest.fixture()
def token_daemon(demo_home: Path):
    token_file = demo_home / "token"
    token_file.write_text("right-token\n")
    d = start_daemon(demo_home, "--listen", "127.0.0.1:0", "--token-file", str(token_file))
    try:
        yield d
    finally:
        stop_daemon(d)


def test_a_wrong_or_missing_token_is_an_authentication_error(token_daemon):
    with pytest.raises(forkd.AuthenticationError) as wrong:
        Sandbox.list(host=token_daemon.url, token="wrong-token")
    assert (wrong.value.status, wrong.value.code) == (401, "unauthorized")
    assert str(wrong.value) == "the bearer token is wrong"
    with pytest.raises(forkd.AuthenticationError, match="Authorization: Bearer"):
        Sandbox.list(host=token_daemon.url, token="")
    with Sandbox.create("demo", host=token_daemon.url, token="right-token") as sandbox:
        assert [s.id for s in Sandbox.list(host=token_daemon.host)] == [sandbox.id]


@pytest.fixture()
def tls_daemon(demo_home: Path):
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl is missing: no certificate for the https daemon")
    cert, key = demo_home / "cert.pem", demo_home / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    (demo_home / "token").write_text("tls-token\n")
    d = start_daemon(demo_home, "--listen", "127.0.0.1:0", "--token-file",
                     str(demo_home / "token"), "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        yield d, cert
    finally:
        stop_daemon(d)


def test_an_https_daemon_is_trusted_through_forkd_ca_cert_and_refused_without(tls_daemon,
                                                                              monkeypatch):
    daemon, cert = tls_daemon
    assert daemon.url.startswith("https://127.0.0.1:")
    monkeypatch.delenv("FORKD_CA_CERT", raising=False)
    with pytest.raises(forkd.ForkdError) as untrusted:
        Client(daemon.url, "tls-token").health()
    message = str(untrusted.value)
    assert untrusted.value.code == "tls" and "\n" not in message
    assert message.startswith(f"TLS with the daemon at {daemon.url}: certificate verify failed")
    assert message.endswith("; trust its certificate with FORKD_CA_CERT")

    monkeypatch.setenv("FORKD_CA_CERT", str(cert))
    with Sandbox.create("demo", host=daemon.url, token="tls-token") as sandbox:
        assert [s.id for s in Sandbox.list(host=daemon.url, token="tls-token")] == [sandbox.id]
    monkeypatch.setenv("FORKD_CA_CERT", str(daemon.home / "token"))
    with pytest.raises(forkd.ForkdError, match=f"^FORKD_CA_CERT {daemon.home}/token: "):
        Client(daemon.url, "tls-token")


def test_an_unknown_sandbox_is_not_found_for_every_call(host):
    with Client(host) as client:
        ghost = Sandbox(Sandbox.create("demo", client=client).info, client)
        ghost.kill()
        calls = [ghost.kill, ghost.pause, ghost.logs, ghost.branch, lambda: ghost.set_timeout(5),
                 lambda: Sandbox.resume(ghost.id, client=client),
                 lambda: Sandbox.connect("sb-000000000000", client=client),
                 lambda: ghost.commands.run("true"), lambda: ghost.files.read("/etc/hostname"),
                 lambda: ghost.files.exists("/etc/hostname"), lambda: ghost.eval("1")]
        for call in calls:
            with pytest.raises(forkd.NotFoundError) as caught:
                call()
            assert caught.value.status == 404 and caught.value.code == "not_found"
            assert str(caught.value).startswith("no sandbox ")


def test_limits_this_host_cannot_enforce_are_refused_with_422_or_applied(host):
    with Client(host) as client:
        try:
            sandbox = Sandbox.create("demo", limits=forkd.Limits(memory_mib=512, pids=64), client=client)
        except forkd.UnprocessableError as e:
            assert (e.status, e.code) == (422, "limits_unsupported")
            assert str(e).startswith("resource limits need cgroup v2: ")
            assert Sandbox.list(client=client) == [], "nothing was started"
            return
        assert sandbox.info.limits == forkd.Limits(memory_mib=512, pids=64)
        sandbox.kill()


def test_bad_arguments_are_bad_request_errors_naming_them(host):
    with Client(host) as client:
        with pytest.raises(forkd.BadRequestError, match="count"):
            Sandbox.create("demo", count=0, client=client)
        with pytest.raises(forkd.BadRequestError, match="limits.memory_mib 1"):
            Sandbox.create("demo", limits={"memory_mib": 1}, client=client)
        with pytest.raises(forkd.NotFoundError):
            Sandbox.create("no-such-snapshot", client=client)
        with pytest.raises(forkd.ForkdError, match="^timeout -1 is negative$"):
            Sandbox.create("demo", timeout=-1, client=client)


def test_commands_files_and_eval_in_a_guest_without_an_agent_are_conflicts(host):
    with Sandbox.create("demo", host=host) as sandbox:
        calls = [lambda: sandbox.commands.run("echo hi"),
                 lambda: sandbox.commands.run("sleep 1", background=True),
                 lambda: sandbox.files.read("/etc/hostname"),
                 lambda: sandbox.files.read("/etc/hostname", format="stream"),
                 lambda: sandbox.files.write("/tmp/x", "data"),
                 lambda: sandbox.files.list("/"), lambda: sandbox.files.exists("/"),
                 lambda: sandbox.files.make_dir("/tmp/d"), lambda: sandbox.files.remove("/tmp/x"),
                 lambda: sandbox.eval("1 + 1")]
        for call in calls:
            with pytest.raises(forkd.ConflictError) as caught:
                call()
            assert (caught.value.status, caught.value.code) == (409, "no_agent")
            assert "has no forkd-agent" in str(caught.value)


def test_a_daemon_that_does_not_answer_in_time_is_a_timeout(tmp_path):
    path = str(tmp_path / "silent.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        with Client(path, request_timeout=0.5) as client:
            with pytest.raises(forkd.TimeoutError) as caught:
                client.health()
        assert isinstance(caught.value, TimeoutError), "also the built-in TimeoutError"
        assert str(caught.value).startswith(f"the daemon at unix:{path} did not answer in time")
    finally:
        server.close()
        for conn, _ in accepted:
            conn.close()


def test_a_bad_file_format_is_refused_before_any_request(tmp_path):
    sandbox = Sandbox(forkd.SandboxInfo("sb-1", "demo", "running", "", {}, {}, 1, 0.0),
                      Client(str(tmp_path / "none.sock")))
    with pytest.raises(forkd.ForkdError, match="^format 'lines' is not one of text, bytes, stream$"):
        sandbox.files.read("/x", format="lines")
    assert not os.path.exists(tmp_path / "none.sock")

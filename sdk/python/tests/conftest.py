"""Fixtures: a real ``forkd serve`` with the built-in demo guest's snapshot, in a temporary
home, stopped (with every zygote it started) when the tests are done.

``FORKD_BIN`` names the forkd binary (default: ``forkd`` on PATH). Tests that need KVM skip,
saying why, where /dev/kvm cannot be opened. Tests marked ``lab`` run against the daemon named
by ``FORKD_SDK_LAB_HOST`` that serves the Linux snapshot ``FORKD_SDK_LAB_TAG``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

SDK_DIR = Path(__file__).resolve().parent.parent
if str(SDK_DIR) not in sys.path:
    sys.path.insert(0, str(SDK_DIR))

LISTENING = re.compile(r"^forkd serve: listening on unix:(\S+?)(?:, (https?://\S+))?$")


def forkd_bin() -> str:
    """The forkd binary under test; skips when there is none."""
    path = os.environ.get("FORKD_BIN") or shutil.which("forkd")
    if not path or not os.access(path, os.X_OK):
        pytest.skip("no forkd binary: set FORKD_BIN (or put forkd on PATH)")
    return path


def require_kvm() -> None:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        pytest.skip(f"/dev/kvm is not usable here ({e.strerror})")


@dataclass
class DemoDaemon:
    """A running ``forkd serve`` over a home holding the demo snapshot ``demo``."""

    home: Path
    process: subprocess.Popen
    socket: str
    tcp: Optional[str] = None
    stderr_lines: List[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"unix:{self.socket}"

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (``https://`` when it serves TLS)."""
        assert self.tcp, "this daemon has no TCP listener"
        return self.tcp


def forkd_env(home: Path) -> dict:
    runtime = home / "runtime"
    runtime.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "FORKD_HOST", "FORKD_TOKEN")}
    env.update(FORKD_HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
    return env


def snapshot_demo(home: Path, tag: str = "demo") -> None:
    out = subprocess.run(
        [forkd_bin(), "snapshot", "--tag", tag, "--kernel", "builtin:demo", "--mem-mib", "64"],
        env=forkd_env(home), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def start_daemon(home: Path, *args: str) -> DemoDaemon:
    """``forkd serve`` on ``home``; returns once it says where it listens."""
    socket = home / "forkd.sock"
    process = subprocess.Popen(
        [forkd_bin(), "serve", "--socket", str(socket), *args], env=forkd_env(home),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline().strip()
    match = LISTENING.match(line)
    if not match:
        process.kill()
        raise AssertionError(f"forkd serve said {line!r}: {process.stderr.read()}")
    daemon = DemoDaemon(home, process, match.group(1), match.group(2))
    # Keep draining its stderr so it never blocks on a full pipe.
    threading.Thread(target=lambda: daemon.stderr_lines.extend(process.stderr), daemon=True).start()
    return daemon


def stop_daemon(daemon: DemoDaemon) -> None:
    daemon.process.terminate()
    try:
        daemon.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        daemon.process.wait()


def kill_zygotes(home: Path) -> None:
    """The zygotes (and their sandboxes) a daemon of ``home`` started outlive it by design."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"__zygote" in cmdline and str(home).encode() in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture()
def demo_home() -> Iterator[Path]:
    """A temporary forkd home with the demo snapshot ``demo``; its zygotes killed at the end."""
    forkd_bin()
    require_kvm()
    home = Path(tempfile.mkdtemp(prefix="forkd-pysdk-"))
    try:
        snapshot_demo(home)
        yield home
    finally:
        kill_zygotes(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture()
def daemon(demo_home: Path) -> Iterator[DemoDaemon]:
    """A ``forkd serve`` of its own for one test (Unix socket only)."""
    d = start_daemon(demo_home)
    try:
        yield d
    finally:
        stop_daemon(d)


@pytest.fixture()
def host(daemon: DemoDaemon) -> str:
    return daemon.host


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if os.environ.get("FORKD_SDK_LAB_HOST") and os.environ.get("FORKD_SDK_LAB_TAG"):
        return
    skip = pytest.mark.skip(
        reason="Linux guest SDK tests need a daemon serving a Linux snapshot "
               "(FORKD_SDK_LAB_HOST, FORKD_SDK_LAB_TAG; the Linux lab's linux_e2e sets them)")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def anyio_backend() -> str:
    """The async tests run on asyncio (anyio's pytest plugin)."""
    return "asyncio"

"""The wheel scripts/build-wheel.sh built (and cached) for the current sources, installed into
a fresh virtualenv with pip: `forkd --version` runs, `import forkd` finds the installed SDK, and
the examples' ten-line scripts work with it, spawn_ten.py against the demo guest here and
quickstart.py against Linux children in the lab. Skipped when no wheel is cached for these
sources (scripts/test.sh builds it before the tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "python"


def cached_wheel() -> Path:
    out = subprocess.run([str(REPO / "scripts/build-wheel.sh"), "--print"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("no wheel cached for these sources: scripts/build-wheel.sh builds one")
    return Path(out.stdout.split()[0])


@dataclass
class WheelEnv:
    root: Path
    #: The environment a script run with the virtualenv's python gets: httpx (the wheel's one
    #: dependency) from this test run's site-packages, installed offline with --no-deps.
    env: Dict[str, str]

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    def run(self, *args: str, extra: Dict[str, str] = {}, timeout: float = 600,
            cwd: Path = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **extra}, cwd=cwd)


@pytest.fixture()
def wheel_env(tmp_path) -> WheelEnv:
    wheel = cached_wheel()
    root = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(root)
    subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=900)
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    env = {"PYTHONPATH": deps, "PATH": f"{root / 'bin'}:/usr/bin:/bin",
           "HOME": os.environ.get("HOME", "/root")}
    return WheelEnv(root, env)


def test_the_wheel_installs_the_binary_and_the_sdk_and_spawns_ten(wheel_env, tmp_path, daemon):
    version = wheel_env.run(str(wheel_env.root / "bin" / "forkd"), "--version")
    assert version.returncode == 0 and version.stdout.startswith("forkd "), version
    code = "import forkd, sys; print(forkd.__file__); print(forkd.Sandbox.create.__doc__ is not None)"
    # From an empty directory: `python -c` puts the working directory first on sys.path.
    imported = wheel_env.run(wheel_env.python, "-c", code, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    where, documented = imported.stdout.split()
    assert where.startswith(str(wheel_env.root)) and documented == "True", imported.stdout

    spawned = wheel_env.run(wheel_env.python, str(EXAMPLES / "spawn_ten.py"), cwd=tmp_path,
                            extra={"FORKD_HOST": daemon.host, "FORKD_TAG": "demo"})
    assert spawned.returncode == 0, spawned.stderr
    lines = spawned.stdout.splitlines()
    assert (lines[0], lines[-1], len(lines)) == ("10 sandboxes running", "0 left", 12), lines


@pytest.mark.lab
def test_the_wheel_runs_the_quickstart_against_linux_children(wheel_env, tmp_path):
    out = wheel_env.run(wheel_env.python, str(EXAMPLES / "quickstart.py"), cwd=tmp_path,
                        extra={"FORKD_HOST": os.environ["FORKD_SDK_LAB_HOST"],
                               "FORKD_TAG": os.environ["FORKD_SDK_LAB_TAG"]})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Linux ") and lines[1:] == ["hello from the host True", "45"], lines

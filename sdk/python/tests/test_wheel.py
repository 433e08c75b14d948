"""The wheel scripts/build-wheel.sh built (and cached) for the current sources, installed into
a fresh virtualenv: `forkd --version` runs and `import forkd` finds the SDK. Skipped when no
wheel is cached for these sources (building one is a release build, not part of a test run)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def cached_wheel() -> Path:
    out = subprocess.run([str(REPO / "scripts/build-wheel.sh"), "--print"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("no wheel cached for these sources: scripts/build-wheel.sh builds one")
    return Path(out.stdout.split()[0])


def test_the_cached_wheel_installs_the_binary_and_the_sdk(tmp_path):
    wheel = cached_wheel()
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # --no-deps: offline; httpx comes from this test environment's site-packages below.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, timeout=300)
    version = subprocess.run([str(env_dir / "bin" / "forkd"), "--version"], capture_output=True,
                             text=True, check=True, timeout=60)
    assert version.stdout.startswith("forkd "), version.stdout
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    code = "import forkd, sys; print(forkd.__file__); print(forkd.Sandbox.create.__doc__ is not None)"
    # From an empty directory: `python -c` puts the working directory first on sys.path.
    imported = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                              cwd=tmp_path, env={"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"},
                              timeout=60)
    assert imported.returncode == 0, imported.stderr
    where, documented = imported.stdout.split()
    assert where.startswith(str(env_dir)) and documented == "True", imported.stdout

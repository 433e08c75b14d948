"""A parallel pytest farm: one warm sandbox forked into N, each running a slice of the tests.

The parent sandbox gets the test directory and collects it with pytest in its warm
interpreter, which imports the test modules and everything they import. It is then forked
into N children, and child i runs every N-th test with pytest.main in that same interpreter,
so no child pays for those imports again. Each child's JUnit XML is read back and the results
are added up; the exit status is non-zero when any test failed.

    python pytest_farm.py examples/python/farm_tests -n 4 --tag python-numpy
"""
from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from forkd import Sandbox

REMOTE = "/work/tests"
# sys-level capture: the warm interpreter's own file descriptors are not the tests' to take.
PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "--capture=sys"]


@dataclass
class Slice:
    sandbox: Sandbox
    tests: List[str]
    exit_code: int = -1
    failures: List[str] = field(default_factory=list)
    passed: int = 0


def upload(sandbox: Sandbox, tests: Path) -> None:
    for path in sorted(tests.rglob("*.py")):
        sandbox.files.write(f"{REMOTE}/{path.relative_to(tests)}", path.read_bytes())


def collect(sandbox: Sandbox) -> List[str]:
    """The test ids pytest collects in the parent's interpreter (importing the modules)."""
    result = sandbox.eval(
        f"import os, pytest; os.chdir({REMOTE!r})\n"
        f"int(pytest.main(['--collect-only', *{PYTEST_ARGS!r}]))", timeout=600)
    if result.error or result.value != "0":
        sys.exit(f"collecting the tests failed:\n{result.stdout}{result.error}")
    return [line for line in result.stdout.splitlines() if "::" in line]


def run_slice(s: Slice) -> Slice:
    """Runs s.tests in s.sandbox's warm interpreter and reads its JUnit XML."""
    report = "/tmp/forkd-farm.xml"
    result = s.sandbox.eval(
        f"int(pytest.main([*{s.tests!r}, '--junitxml={report}', *{PYTEST_ARGS!r}]))",
        timeout=1800)
    if result.error:
        s.failures.append(f"pytest itself failed: {result.error.message}")
        return s
    s.exit_code = int(result.value or -1)
    for case in ET.fromstring(s.sandbox.files.read(report)).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            s.failures.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is None:
            s.passed += 1
    return s


def farm(tests: Path, n: int, tag: str, host: Optional[str] = None) -> List[Slice]:
    with Sandbox.create(tag, host=host, metadata={"example": "pytest-farm"}) as parent:
        upload(parent, tests)
        ids = collect(parent)
        children = parent.fork(n)
    slices = [Slice(child, ids[i::n]) for i, child in enumerate(children)]
    try:
        with ThreadPoolExecutor(n) as pool:
            slices = list(pool.map(run_slice, slices))
    finally:
        for s in slices:
            s.sandbox.kill()
    for s in slices:
        print(f"{s.sandbox.id}: {len(s.tests)} tests, {s.passed} passed, "
              f"{len(s.failures)} failed (pytest exit {s.exit_code})")
    failures = [f for s in slices for f in s.failures]
    print(f"{len(ids)} tests in {n} sandboxes: {sum(s.passed for s in slices)} passed, "
          f"{len(failures)} failed" + "".join(f"\n  FAILED {f}" for f in failures))
    return slices


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", type=Path, help="a directory of pytest tests")
    parser.add_argument("-n", type=int, default=4, help="how many sandboxes (default 4)")
    parser.add_argument("--tag", default=os.environ.get("FORKD_TAG", "python-numpy"),
                        help="a snapshot of a Linux image with python3 and pytest")
    args = parser.parse_args()
    done = farm(args.tests, args.n, args.tag)
    sys.exit(1 if any(s.failures or s.exit_code != 0 for s in done) else 0)

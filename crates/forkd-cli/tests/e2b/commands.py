"""E2B's `e2b` SDK, unmodified, on forkd's envd process service: commands in the foreground
with their output and exit, a failing one raising E2B's exception, one in the background
listed, killed and waited for, a timeout. FORKD_E2B_SANDBOX is a running sandbox with an agent
(crates/forkd-cli/tests/cli_e2b.rs: an agent on this host). Exits non-zero on the first
mismatch."""

import os
import sys

from e2b import CommandExitException, Sandbox, TimeoutException


def check(condition, what):
    if not condition:
        sys.exit(f"e2b commands: {what}")


sandbox = Sandbox.connect(os.environ["FORKD_E2B_SANDBOX"])

seen = []
result = sandbox.commands.run("echo hello; echo oops >&2", on_stdout=seen.append)
check((result.stdout, result.stderr, result.exit_code) == ("hello\n", "oops\n", 0), result)
check("".join(seen) == "hello\n", f"on_stdout got {seen}")
check(sandbox.commands.run("echo $GREETING; pwd", envs={"GREETING": "hi"}, cwd="/tmp").stdout
      == "hi\n/tmp\n", "envs and cwd")

try:
    sandbox.commands.run("echo partial; exit 3")
    sys.exit("e2b commands: a failing command did not raise")
except CommandExitException as e:
    check(e.exit_code == 3 and e.stdout == "partial\n", f"the failure: {e}")

handle = sandbox.commands.run("sleep 30", background=True)
check(handle.pid in [p.pid for p in sandbox.commands.list()], "the background command is listed")
check(sandbox.commands.kill(handle.pid) is True, "kill")
try:
    handle.wait()
    sys.exit("e2b commands: a killed command ended well")
except CommandExitException as e:
    check(e.exit_code == -1, f"killed: {e}")
check(handle.pid not in [p.pid for p in sandbox.commands.list()], "a killed command is gone")
check(sandbox.commands.kill(handle.pid) is False, "killing it again finds nothing")

quick = sandbox.commands.run("sleep 0.2; echo done", background=True)
check(quick.wait().stdout == "done\n", "waiting for a background command")

try:
    sandbox.commands.run("sleep 30", timeout=1)
    sys.exit("e2b commands: a command outlived its timeout")
except TimeoutException:
    pass
print("e2b commands: run (output, callbacks, envs, cwd), exit exception, background (list, kill, "
      "wait), timeout ok")

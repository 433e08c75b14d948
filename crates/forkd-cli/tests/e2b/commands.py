"""E2B's `e2b` SDK, unmodified, on forkd's envd process service: commands in the foreground
with their output and exit, a failing one raising E2B's exception, one in the background
listed, killed and waited for, one fed through its stdin after a disconnect and a connect, a
timeout. FORKD_E2B_SANDBOX is a running sandbox with an agent
(crates/forkd-cli/tests/cli_e2b.rs: an agent on this host). Exits non-zero on the first
mismatch."""

import os
import sys

from e2b import CommandExitException, PtySize, Sandbox, TimeoutException


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

# The pid is the guest's own: the process is there under it.
check(sandbox.commands.run(f"kill -0 {quick.pid} 2>/dev/null || echo gone").stdout == "gone\n",
      "an ended command's pid is gone in the guest")
reader = sandbox.commands.run("while read -r l; do echo \"got:$l\"; done; echo eof",
                              background=True, stdin=True)
check(sandbox.commands.run(f"tr '\\0' ' ' < /proc/{reader.pid}/cmdline").stdout.startswith(
    "/bin/bash"), "the pid names the command in the guest")
listed = {p.pid: p for p in sandbox.commands.list()}
check(listed[reader.pid].cmd == "/bin/bash" and listed[reader.pid].args[-1].startswith("while"),
      f"listed as started: {listed.get(reader.pid)}")
sandbox.commands.send_stdin(reader.pid, "one\n")
for stdout, _, _ in reader:  # streamed as the command writes it
    if stdout:
        check(stdout == "got:one\n", f"the first echo: {stdout!r}")
        break
# Leave the stream and come back: the command keeps running, a new connection sees what follows.
reader.disconnect()
again = sandbox.commands.connect(reader.pid)
sandbox.commands.stream_input(reader.pid, ["two\n", "three\n"])
sandbox.commands.close_stdin(reader.pid)
result = again.wait()
check(result.stdout == "got:two\ngot:three\neof\n", f"after reconnecting: {result.stdout!r}")
try:
    sandbox.commands.send_stdin(reader.pid, "late\n")
    sys.exit("e2b commands: input to an ended command was taken")
except Exception as e:  # E2B raises its NotFoundException (a SandboxException)
    check("not found" in str(e), f"input after the end: {e}")
try:
    sandbox.commands.connect(999999)
    sys.exit("e2b commands: connected to a pid that does not exist")
except Exception as e:
    check("not found" in str(e), f"connect to an unknown pid: {e}")

# A terminal: bash on a pty, resized, typed into; its output is the terminal's.
terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
sandbox.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
sandbox.pty.send_stdin(terminal.pid, b"stty size; tty; exit 3\n")
typed = []
try:
    terminal.wait(on_pty=typed.append)
    sys.exit("e2b commands: the terminal's bash did not exit with 3")
except CommandExitException as e:
    check(e.exit_code == 3, f"the terminal's exit: {e}")
screen = b"".join(typed).decode(errors="replace")
check("30 100" in screen and "/dev/pts/" in screen, f"the terminal's output: {screen!r}")

try:
    sandbox.commands.run("sleep 30", timeout=1)
    sys.exit("e2b commands: a command outlived its timeout")
except TimeoutException:
    pass
print("e2b commands: run (output, callbacks, envs, cwd), exit exception, background (list, kill, "
      "wait), guest pids, stdin (send, stream, close), disconnect and connect, a terminal (pty "
      "create, resize, input), timeout ok")

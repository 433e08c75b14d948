"""E2B's documented quickstart flows, with E2B's official SDKs unmodified, against Linux
children: run by crates/forkd-cli/tests/linux_e2e.rs in the Linux lab with only E2B_API_URL,
E2B_SANDBOX_URL and E2B_API_KEY set, and the template a forkd snapshot of a Linux image with
a warm Python (FORKD_E2B_TEMPLATE). Exits non-zero on the first mismatch."""

import http.client
import os
import sys
import time
import urllib.parse

from e2b import CommandExitException, PtySize
from e2b_code_interpreter import Sandbox

TEMPLATE = os.environ["FORKD_E2B_TEMPLATE"]


def check(condition, what):
    if not condition:
        sys.exit(f"e2b quickstart: {what}")


with Sandbox.create(TEMPLATE, timeout=900, metadata={"flow": "quickstart"}) as sandbox:
    result = sandbox.commands.run('echo "Hello from E2B!"')
    check(result.stdout == "Hello from E2B!\n" and result.exit_code == 0, result)
    background = sandbox.commands.run("sleep 1; echo in the background", background=True)
    check(background.wait().stdout == "in the background\n", "background wait")
    try:
        sandbox.commands.run("echo failing >&2; exit 2")
        sys.exit("e2b quickstart: a failing command did not raise")
    except CommandExitException as e:
        check(e.exit_code == 2 and e.stderr == "failing\n", f"the failure: {e}")

    piped = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(piped.pid, "piped in\n")
    sandbox.commands.close_stdin(piped.pid)
    check(piped.wait().stdout == "piped in\n", "stdin of a background command")

    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(terminal.pid, b"tty; exit\n")
    screen = []
    terminal.wait(on_pty=screen.append)
    check(b"/dev/pts/" in b"".join(screen), f"a terminal: {b''.join(screen)!r}")

    # A server in the guest, reached the E2B way: the host name get_host() gives, through the
    # daemon's listener (forkd carries it over vsock: the child has no network).
    sandbox.files.write("/root/www/page.txt", "served from the guest\n")
    server = sandbox.commands.run("cd /root/www && exec python3 -m http.server 8000",
                                  background=True)
    api = urllib.parse.urlsplit(os.environ["E2B_API_URL"])
    status, body = None, b""
    for _ in range(200):
        conn = http.client.HTTPConnection(api.hostname, api.port, timeout=30)
        conn.request("GET", "/page.txt", headers={"Host": sandbox.get_host(8000)})
        response = conn.getresponse()
        status, body = response.status, response.read()
        if status == 200:
            break
        time.sleep(0.25)
    check(status == 200 and body == b"served from the guest\n", f"the guest's server through get_host: {status} {body!r}")
    server.kill()

    sandbox.files.write("/root/e2b/notes.txt", "written by e2b\n")
    check(sandbox.files.read("/root/e2b/notes.txt") == "written by e2b\n", "read")
    check([e.name for e in sandbox.files.list("/root/e2b")] == ["notes.txt"], "list")
    check(any(e.name == "root" for e in sandbox.files.list("/")), "list /")
    sandbox.files.remove("/root/e2b/notes.txt")
    check(not sandbox.files.exists("/root/e2b/notes.txt"), "remove")

    sandbox.run_code("x = 1")
    execution = sandbox.run_code("x += 1; x")
    check(execution.text == "2", f"state across run_code: {execution}")
    execution = sandbox.run_code('print("hello world")')
    check(execution.logs.stdout == ["hello world\n"], f"stdout {execution.logs}")
    execution = sandbox.run_code("import numpy; numpy.arange(4).sum()")
    check(execution.text == "6", f"numpy: {execution}")
    error = sandbox.run_code("undefined_name").error
    check(error is not None and error.name == "NameError" and "undefined_name" in error.traceback,
          f"error {error}")

    context = sandbox.create_code_context()
    sandbox.run_code("y = 5", context=context)
    check(sandbox.run_code("y * 2", context=context).text == "10", "a context keeps its own state")
    check(sandbox.run_code("'y' in globals()").text == "False", "the default context does not see it")
    html = sandbox.run_code("class T:\n    def _repr_html_(self): return '<b>t</b>'\nT()")
    check(html.results[0].html == "<b>t</b>", f"an html result: {html.results}")

    sandbox.set_timeout(600)
    listed = Sandbox.list().next_items()
    check([s.sandbox_id for s in listed] == [sandbox.sandbox_id], "Sandbox.list")
check(Sandbox.list().next_items() == [], "killed at the end of the with block")
print("e2b quickstart: commands (foreground, background, failing, stdin), a terminal, a guest port via "
      "get_host, files, run_code (state, stdout, numpy, error, a context, html), set_timeout, list, "
      "kill ok")

"""A Linux sandbox in ten lines: a command, a file and the warm interpreter (FORKD_TAG: a
snapshot of a Linux image with forkd-agent, such as `forkd image build python-numpy`'s)."""
import os

from forkd import Sandbox

with Sandbox.create(os.environ.get("FORKD_TAG", "python-numpy")) as sandbox:
    print(sandbox.commands.run("uname -sr").stdout.strip())
    sandbox.files.write("/tmp/hello.txt", "hello from the host\n")
    print(sandbox.files.read("/tmp/hello.txt").strip(), sandbox.files.exists("/tmp/hello.txt"))
    print(sandbox.eval("sum(range(10))").value)

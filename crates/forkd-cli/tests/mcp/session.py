"""A real MCP client (the `mcp` package's stdio client) driving `forkd mcp`.

Run with FORKD_BIN (the forkd binary), FORKD_HOST (a daemon serving the snapshot FORKD_MCP_TAG,
default "demo") and FORKD_MCP_EXEC_OK ("1" when the snapshot's guest is Linux with forkd-agent
and a warm Python, so that exec, eval and the file tools work): by
crates/forkd-cli/tests/cli_mcp.rs with the demo guest, and by linux_e2e.rs in the Linux lab.
Exits non-zero on the first mismatch.
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

EXPECTED_TOOLS = {
    "spawn", "list_sandboxes", "exec", "eval", "read_file", "write_file", "branch",
    "fork", "pause", "resume", "kill", "list_snapshots", "pull_snapshot",
}


def text_of(result) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def ok(session, tool, **arguments):
    result = await session.call_tool(tool, arguments)
    if result.isError:
        sys.exit(f"{tool}({arguments}) failed: {text_of(result)}")
    return json.loads(text_of(result))


async def refused(session, tool, needle, **arguments):
    result = await session.call_tool(tool, arguments)
    message = text_of(result)
    if not result.isError or needle not in message or "\n" in message.strip():
        sys.exit(f"{tool}({arguments}): expected one-line error with {needle!r}, got {message!r}")
    return message


TAG = os.environ.get("FORKD_MCP_TAG", "demo")


async def guest_work(session, sandbox):
    """exec, eval and the file tools in a Linux child."""
    ran = await ok(session, "exec", id=sandbox, command="echo hi; exit 3")
    if (ran["stdout"], ran["exit_code"]) != ("hi\n", 3):
        sys.exit(f"exec: {ran}")
    await ok(session, "write_file", id=sandbox, path="/tmp/mcp/new/dir.txt", content="from mcp")
    read = await ok(session, "read_file", id=sandbox, path="/tmp/mcp/new/dir.txt")
    if read.get("content") != "from mcp":
        sys.exit(f"read_file: {read}")
    evaluated = await ok(session, "eval", id=sandbox, code="6 * 7")
    if evaluated.get("value") != "42":
        sys.exit(f"eval: {evaluated}")
    await refused(session, "read_file", "/nosuch", id=sandbox, path="/nosuch")


async def session_run():
    server = StdioServerParameters(
        command=os.environ["FORKD_BIN"], args=["mcp"], env=dict(os.environ)
    )
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            names = {t.name for t in tools.tools}
            if names != EXPECTED_TOOLS:
                sys.exit(f"tools: {sorted(names)}")
            spawn = next(t for t in tools.tools if t.name == "spawn")
            if "tag" not in spawn.inputSchema.get("required", []):
                sys.exit(f"spawn's input schema: {spawn.inputSchema}")

            snapshots = await ok(session, "list_snapshots")
            if TAG not in [s["tag"] for s in snapshots["snapshots"]]:
                sys.exit(f"snapshots: {snapshots}")
            made = await ok(session, "spawn", tag=TAG, count=2, metadata={"by": "mcp"})
            ids = [s["id"] for s in made["sandboxes"]]
            if os.environ.get("FORKD_MCP_EXEC_OK") == "1":
                await guest_work(session, ids[0])
            else:
                await refused(session, "exec", "built-in guest", id=ids[0], command="true")
            branch = await ok(session, "branch", id=ids[0], tag="mcp-branch")
            if branch["tag"] != "mcp-branch" or branch["parent"] != TAG:
                sys.exit(f"branch: {branch}")
            forked = await ok(session, "fork", id=ids[1], count=2)
            ids += [s["id"] for s in forked["sandboxes"]]
            listed = await ok(session, "list_sandboxes")
            if sorted(s["id"] for s in listed["sandboxes"]) != sorted(ids):
                sys.exit(f"list: {listed}")
            paused = await ok(session, "pause", id=ids[0])
            if paused["state"] != "paused":
                sys.exit(f"pause: {paused}")
            await ok(session, "resume", id=ids[0])
            await refused(session, "spawn", "no snapshot", tag="nosuch")
            await refused(session, "kill", "no sandbox", id="sb-nosuch")
            for sandbox in ids:
                await ok(session, "kill", id=sandbox)
            left = await ok(session, "list_sandboxes")
            if left["sandboxes"]:
                sys.exit(f"left: {left}")
    print(f"mcp session: {len(names)} tools; spawn, exec, branch, fork, pause, resume, kill ok")


asyncio.run(session_run())

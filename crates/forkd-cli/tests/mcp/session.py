"""A real MCP client (the `mcp` package's stdio client) driving `forkd mcp`.

Run by crates/forkd-cli/tests/cli_mcp.rs with FORKD_BIN (the forkd binary), FORKD_HOST (a
daemon serving the demo guest's snapshot, tagged "demo") and FORKD_MCP_EXEC_OK ("1" when the
snapshot's guest has an agent, so that exec succeeds). Exits non-zero on the first mismatch.
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
            if "demo" not in [s["tag"] for s in snapshots["snapshots"]]:
                sys.exit(f"snapshots: {snapshots}")
            made = await ok(session, "spawn", tag="demo", count=2, metadata={"by": "mcp"})
            ids = [s["id"] for s in made["sandboxes"]]
            if os.environ.get("FORKD_MCP_EXEC_OK") == "1":
                ran = await ok(session, "exec", id=ids[0], command="echo hi; exit 3")
                if (ran["stdout"], ran["exit_code"]) != ("hi\n", 3):
                    sys.exit(f"exec: {ran}")
            else:
                await refused(session, "exec", "built-in guest", id=ids[0], command="true")
            branch = await ok(session, "branch", id=ids[0], tag="mcp-branch")
            if branch["tag"] != "mcp-branch" or branch["parent"] != "demo":
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

"""The scripts in examples/, run as a user would run them: the MCP configuration against the
demo guest here (spawn_ten.py is run by test_sandboxes.py and test_wheel.py); quickstart.py,
the fan-out agent (with a fake model endpoint) and the pytest farm against Linux children in
the lab."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from forkd import Sandbox

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
SDK = REPO / "sdk" / "python"
LAB_HOST = os.environ.get("FORKD_SDK_LAB_HOST", "")
LAB_TAG = os.environ.get("FORKD_SDK_LAB_TAG", "")


def run_example(script: str, *args: str, env: Dict[str, str],
                timeout: float = 600) -> subprocess.CompletedProcess:
    """examples/python/<script> in a fresh interpreter that imports this checkout's SDK."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("FORKD_HOST", "FORKD_TOKEN")}
    full_env.update(env, PYTHONPATH=str(SDK))
    return subprocess.run([sys.executable, str(EXAMPLES / "python" / script), *args],
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def test_the_mcp_configuration_starts_a_server_that_drives_sandboxes(daemon):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    config = json.loads((EXAMPLES / "mcp" / "mcp.json").read_text())
    server = config["mcpServers"]["forkd"]
    # As an MCP client would start it: the command found on PATH, here the binary under test.
    path = f"{Path(os.environ.get('FORKD_BIN') or shutil.which('forkd')).parent}:{os.environ['PATH']}"
    env = {**os.environ, **server.get("env", {}), "PATH": path, "FORKD_HOST": daemon.host}

    async def session() -> List[str]:
        params = StdioServerParameters(command=server["command"], args=server["args"], env=env)
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                tools = [t.name for t in (await s.list_tools()).tools]
                made = await s.call_tool("spawn", {"tag": "demo"})
                assert not made.isError, made.content
                sandbox_id = json.loads(made.content[0].text)["sandboxes"][0]["id"]
                killed = await s.call_tool("kill", {"id": sandbox_id})
                assert not killed.isError, killed.content
                return tools

    tools = asyncio.run(session())
    assert {"spawn", "exec", "branch", "fork", "kill"} <= set(tools), tools
    assert Sandbox.list(host=daemon.host) == []


# ---- Linux children (the lab) --------------------------------------------------------------


@pytest.mark.lab
def test_quickstart_runs_a_command_writes_a_file_and_evaluates():
    out = run_example("quickstart.py", env={"FORKD_HOST": LAB_HOST, "FORKD_TAG": LAB_TAG})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("Linux "), out.stdout
    assert out.stdout.splitlines()[1:] == ["hello from the host True", "45"], out.stdout
    assert Sandbox.list(host=LAB_HOST) == []


class FakeModel(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint answering per strategy hint: the set
    strategy with a wrong answer (order lost), the dict one right and fast, the comparing one
    right and slow."""

    answers = {
        "set": "def dedupe(items):\n    return list(set(items))\n",
        "dict": "```python\ndef dedupe(items):\n    return list(dict.fromkeys(items))\n```",
        "Compare": ("def dedupe(items):\n    kept = []\n    for x in items:\n"
                    "        if x not in kept:\n            kept.append(x)\n    return kept\n"),
    }
    requests: List[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeModel.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                   "body": body})
        prompt = body["messages"][-1]["content"]
        answer = next(code for key, code in self.answers.items() if key in prompt)
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def fake_model(monkeypatch) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeModel.requests = []
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    monkeypatch.setenv("FORKD_EXAMPLE_MODEL_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    try:
        yield url
    finally:
        server.shutdown()


@pytest.mark.lab
def test_the_fanout_agent_keeps_the_fastest_correct_strategy(fake_model, capsys):
    sys.path.insert(0, str(EXAMPLES / "python"))
    try:
        import fanout_agent
    finally:
        sys.path.remove(str(EXAMPLES / "python"))
    best = fanout_agent.run(LAB_TAG, host=LAB_HOST)
    try:
        assert best.strategy == fanout_agent.STRATEGIES[1], capsys.readouterr().out
        assert [r["auth"] for r in FakeModel.requests] == ["Bearer sk-test"] * 3
        assert sorted(r["body"]["messages"][-1]["content"].split("Strategy: ")[1]
                      for r in FakeModel.requests) == sorted(fanout_agent.STRATEGIES)
        # Only the winner runs on, and it holds its own answer, not a sibling's.
        assert [s.id for s in Sandbox.list(host=LAB_HOST)] == [best.sandbox.id]
        assert "dict.fromkeys" in best.sandbox.files.read("/work/solution.py")
        printed = capsys.readouterr().out
        assert "wrong" in printed and f"kept {best.sandbox.id}" in printed, printed
    finally:
        best.sandbox.kill()


@pytest.mark.lab
def test_the_pytest_farm_adds_up_the_slices_and_names_the_failures(tmp_path):
    tests = tmp_path / "tests"
    shutil.copytree(EXAMPLES / "python" / "farm_tests", tests,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tests / "test_broken.py").write_text("def test_broken():\n    assert 1 + 1 == 3\n")
    out = run_example("pytest_farm.py", str(tests), "-n", "3",
                      env={"FORKD_HOST": LAB_HOST, "FORKD_TAG": LAB_TAG}, timeout=1800)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    summary = [line for line in out.stdout.splitlines() if " tests in 3 sandboxes" in line]
    assert summary == ["14 tests in 3 sandboxes: 13 passed, 1 failed"], out.stdout + out.stderr
    assert "  FAILED test_broken::test_broken" in out.stdout, out.stdout
    assert len([line for line in out.stdout.splitlines() if line.startswith("sb-")]) == 3
    assert Sandbox.list(host=LAB_HOST) == []

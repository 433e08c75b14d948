"""E2B's `e2b-code-interpreter` SDK, unmodified, on forkd's code-interpreter plane: state kept
across run_code calls, stdout streamed while the code runs, an expression's result, display
formats (html, png, json) and display(), an error with its traceback, env_vars, contexts
(create, isolation, list, restart, remove, unknown), another language refused.
FORKD_E2B_SANDBOX is a running sandbox whose agent has a warm Python
(crates/forkd-cli/tests/cli_e2b.rs: an agent on this host). Exits non-zero on the first
mismatch."""

import base64
import os
import sys
import time

from e2b import NotFoundException, SandboxException
from e2b_code_interpreter import Sandbox


def check(condition, what):
    if not condition:
        sys.exit(f"e2b code interpreter: {what}")


sandbox = Sandbox.connect(os.environ["FORKD_E2B_SANDBOX"])
sandbox.run_code("x = 1")
execution = sandbox.run_code("x += 1; x")
check(execution.text == "2" and execution.error is None, f"state across calls: {execution}")
check(execution.execution_count == 2, f"execution_count {execution.execution_count}")

printed = []
execution = sandbox.run_code('print("hello world")', on_stdout=lambda m: printed.append(m.line))
check(execution.logs.stdout == ["hello world\n"], f"logs {execution.logs}")
check(printed == ["hello world\n"], f"on_stdout {printed}")
check(execution.results == [], f"no result: {execution.results}")

# Streamed: the print reaches on_stdout while the code still sleeps.
seen = []
start = time.monotonic()
execution = sandbox.run_code(
    "import time, sys\nprint('before sleep')\ntime.sleep(1)\nprint('after', file=sys.stderr)\n6 * 7",
    on_stdout=lambda m: seen.append(("stdout", m.line, time.monotonic() - start)),
    on_stderr=lambda m: seen.append(("stderr", m.line, time.monotonic() - start)),
)
took = time.monotonic() - start
check([s[:2] for s in seen] == [("stdout", "before sleep\n"), ("stderr", "after\n")], f"streamed {seen}")
check(seen[0][2] + 0.7 < took, f"the print arrived only at the end: {seen}, run took {took:.2f}s")
check(execution.text == "42" and execution.logs.stderr == ["after\n"], f"streamed run {execution}")

execution = sandbox.run_code("'a' + 'b'")
check(execution.text == "ab", f"a string's text: {execution.text!r}")

# Display formats: what the object offers, and display() for more results.
rich = """
class Rich:
    def __repr__(self):
        return 'Rich()'
    def _repr_html_(self):
        return '<b>rich</b>'
    def _repr_png_(self):
        return b'\\x89PNG fake'
    def _repr_json_(self):
        return {'n': 1}
display('shown first')
Rich()
"""
execution = sandbox.run_code(rich)
check(execution.error is None, f"rich: {execution.error}")
check(len(execution.results) == 2, f"results {execution.results}")
shown, main = execution.results
check(shown.text == "shown first" and not shown.is_main_result, f"display(): {shown}")
check(main.is_main_result and main.text == "Rich()" and execution.text == "Rich()", f"main {main}")
check(main.html == "<b>rich</b>", f"html {main.html!r}")
check(base64.b64decode(main.png) == b"\x89PNG fake", f"png {main.png!r}")
check(main.json == {"n": 1}, f"json {main.json!r}")
check(set(main.formats()) == {"text", "html", "png", "json"}, f"formats {list(main.formats())}")

execution = sandbox.run_code("1 / 0")
error = execution.error
check(error is not None and error.name == "ZeroDivisionError", f"error {error}")
check("division by zero" in error.value and "ZeroDivisionError" in error.traceback, error)

# env_vars hold for that run only.
execution = sandbox.run_code("import os; os.environ.get('FORKD_E2B_VAR')", envs={"FORKD_E2B_VAR": "v1"})
check(execution.text == "v1", f"env_vars: {execution.text!r}")
execution = sandbox.run_code("os.environ.get('FORKD_E2B_VAR') is None")
check(execution.text == "True", f"env_vars after the run: {execution.text!r}")

# Contexts.
contexts = sandbox.list_code_contexts()
check([c.id for c in contexts] == ["default"] and contexts[0].language == "python", contexts)
workdir = os.environ.get("FORKD_E2B_DIR")
ctx = sandbox.create_code_context(cwd=workdir) if workdir else sandbox.create_code_context()
check(ctx.language == "python" and ctx.id != "default", f"created {ctx}")
if workdir:
    check(ctx.cwd == workdir, f"cwd {ctx.cwd}")
execution = sandbox.run_code("x", context=ctx)
check(execution.error is not None and execution.error.name == "NameError", f"isolated: {execution}")
execution = sandbox.run_code("import os\ny = 5\nos.getcwd()", context=ctx)
check(execution.text == ctx.cwd, f"context cwd {execution.text!r} != {ctx.cwd!r}")
check(execution.execution_count == 2, f"per-context count {execution.execution_count}")
check(sandbox.run_code("x").text == "2", "default kept its x")
ids = sorted(c.id for c in sandbox.list_code_contexts())
check(ids == sorted(["default", ctx.id]), f"listed {ids}")
sandbox.restart_code_context(ctx)
execution = sandbox.run_code("y", context=ctx)
check(execution.error is not None and execution.error.name == "NameError", f"restarted: {execution}")
sandbox.remove_code_context(ctx.id)
check([c.id for c in sandbox.list_code_contexts()] == ["default"], "removed")
try:
    sandbox.run_code("1", context=ctx)
    check(False, "run_code in a removed context did not raise")
except NotFoundException as e:
    check(f"Context {ctx.id} not found" in str(e), f"not found: {e}")

# Only Python runs here; the refusal says so.
try:
    sandbox.run_code("console.log(1)", language="javascript")
    check(False, "javascript did not raise")
except SandboxException as e:
    check("javascript" in str(e) and "only Python" in str(e), f"javascript refused: {e}")
print(
    "e2b code interpreter: run_code (state, streamed stdout, results with display formats, "
    "display(), error, env_vars), contexts (create, isolate, list, restart, remove), "
    "other languages refused: ok"
)

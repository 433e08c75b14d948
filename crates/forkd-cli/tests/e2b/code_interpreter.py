"""E2B's `e2b-code-interpreter` SDK, unmodified, on forkd's code-interpreter plane: state kept
across run_code calls, stdout, an expression's result, an error with its traceback, the
contexts it lists. FORKD_E2B_SANDBOX is a running sandbox whose agent has a warm Python
(crates/forkd-cli/tests/cli_e2b.rs: an agent on this host). Exits non-zero on the first
mismatch."""

import os
import sys

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

execution = sandbox.run_code("'a' + 'b'")
check(execution.text == "ab", f"a string's text: {execution.text!r}")

execution = sandbox.run_code("1 / 0")
error = execution.error
check(error is not None and error.name == "ZeroDivisionError", f"error {error}")
check("division by zero" in error.value and "ZeroDivisionError" in error.traceback, error)

contexts = sandbox.list_code_contexts()
check([c.id for c in contexts] == ["default"] and contexts[0].language == "python", contexts)
print("e2b code interpreter: run_code (state, stdout, result, error), contexts ok")

# forkd-agent eval driver. Runs inside the long-lived interpreter the agent starts with
# `<interpreter> -c <this file>`. Protocol with the agent: one JSON object per line on fd 0
# (requests) and one JSON object per line on the original fd 1 (replies).
#   {"op": "eval", "code": "..."} -> {"value": str|None, "stdout": str, "stderr": str,
#                                      "error": None|{"type", "message", "traceback"}}
#   {"op": "reseed"}               -> {"reseeded": [module names]}
# User code must not be able to corrupt the protocol, so the protocol keeps private duplicates
# of fds 0 and 1; fd 0 then reads /dev/null and fd 1 goes to fd 2 (which the agent logs).
import ast
import io
import json
import linecache
import os
import sys
import traceback
import types

LIMITS = {"stdout": 256 * 1024, "stderr": 64 * 1024, "value": 256 * 1024, "traceback": 64 * 1024}


def _setup_fds():
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return requests, replies


def _clean(text, limit):
    # Lone surrogates cannot travel as JSON the agent accepts; replace them.
    text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) > limit:
        text = text[:limit] + "\n...[truncated %d characters]" % (len(text) - limit)
    return text


def _format_error(exc, skip_frames):
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None:
            tb = tb.tb_next
    if isinstance(exc, SyntaxError):
        tb = None
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return {
        "type": type(exc).__name__,
        "message": _clean(str(exc), LIMITS["traceback"]),
        "traceback": _clean(text, LIMITS["traceback"]),
    }


def _evaluate(code, namespace, number):
    filename = "<eval-%d>" % number
    # Registering the source lets tracebacks show the offending lines.
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    value, error = None, None
    try:
        tree = ast.parse(code, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            result = eval(compile(last, filename, "eval"), namespace)
            # Like the interactive prompt: a None result (print(...), f()) shows nothing.
            if result is not None:
                value = repr(result)
    except BaseException as exc:  # noqa: B036 - SystemExit/KeyboardInterrupt are user errors too
        error = _format_error(exc, skip_frames=1)
    finally:
        sys.stdout, sys.stderr = saved
    return {
        "value": None if value is None else _clean(value, LIMITS["value"]),
        "stdout": _clean(out.getvalue(), LIMITS["stdout"]),
        "stderr": _clean(err.getvalue(), LIMITS["stderr"]),
        "error": error,
    }


def _reseed():
    # Every forked child starts with the parent's generator state; give each its own.
    reseeded = []
    if "random" in sys.modules:
        sys.modules["random"].seed()
        reseeded.append("random")
    numpy = sys.modules.get("numpy")
    if numpy is not None and hasattr(numpy, "random"):
        numpy.random.seed()
        reseeded.append("numpy.random")
    return {"reseeded": reseeded}


def main():
    requests, replies = _setup_fds()
    # User code runs in a fresh __main__ module, so it cannot clobber the driver's globals and
    # pickle/multiprocessing still find its definitions under __main__.
    user_main = types.ModuleType("__main__")
    user_main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = user_main
    number = 0
    for line in requests:
        try:
            message = json.loads(line)
            op = message.get("op")
            if op == "eval":
                number += 1
                reply = _evaluate(message["code"], user_main.__dict__, number)
            elif op == "reseed":
                reply = _reseed()
            else:
                reply = {"driver_error": "unknown driver op %r" % (op,)}
        except Exception as exc:
            reply = {"driver_error": "%s: %s" % (type(exc).__name__, exc)}
        replies.write(json.dumps(reply).encode("ascii") + b"\n")
        replies.flush()


main()

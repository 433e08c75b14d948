# forkd-agent eval driver. Runs inside the long-lived interpreter the agent starts with
# `<interpreter> -c <this file>`. Protocol with the agent: one JSON object per line on fd 0
# (requests) and one JSON object per line on the original fd 1 (replies and events).
#
#   {"op": "eval", "code": str, "context": str|None, "stream": bool, "env": {str: str},
#    "count": bool}
#     -> with "stream": {"event": "started"} once the context is found, then
#        {"event": "stdout"|"stderr", "text": str} as the code writes (lines, or what it
#        flushed; partial lines after FLUSH_DELAY), then the reply. Without: the reply only.
#     -> {"value": str|None, "stdout": str, "stderr": str (empty when streamed),
#         "error": None|{"type", "message", "traceback"},
#         "results": [{"data": {mime: value}, "is_main": bool}], "execution_count": int}
#   {"op": "context", "action": "create"|"list"|"restart"|"remove", "context": str|None,
#    "cwd": str|None}
#     -> {"contexts": [{"id", "language", "cwd", "execution_count"}]}
#   {"op": "reseed"}
#     -> {"reseeded": [module names]}
# A request that cannot be served answers {"fail": {"code": "not_found"|"bad_request",
# "message": str}}; a driver bug answers {"driver_error": str}.
#
# Contexts are namespaces (each its own `__main__` module dict) with their own working
# directory, in this one interpreter: imported modules, sys.path, os.environ and threads are
# shared. "default" always exists; it starts in the interpreter's working directory.
#
# User code must not be able to corrupt the protocol, so the protocol keeps private duplicates
# of fds 0 and 1; fd 0 then reads /dev/null and fd 1 goes to fd 2 (which the agent logs).
# sys.stdout and sys.stderr are replaced for good by writers that route to the eval running
# at the time (or, between evals and in forked children, to fd 2), so a handler that kept a
# reference to them (logging) still reaches the next eval's output.
import ast
import base64
import io
import json
import linecache
import os
import sys
import threading
import time
import traceback
import types
import uuid

LIMITS = {"stdout": 256 * 1024, "stderr": 64 * 1024, "value": 256 * 1024, "traceback": 64 * 1024}
# The agent refuses replies above 1 MiB; this leaves room for its envelope.
REPLY_LIMIT = (1 << 20) - 16 * 1024
# Largest text of one output event (characters), and how long a partial line may wait.
EVENT_TEXT = 32 * 1024
FLUSH_DELAY = 0.1
DEFAULT_CONTEXT = "default"

# Display formats a value may offer, as IPython's formatters look for them.
REPR_METHODS = [
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("application/pdf", "_repr_pdf_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
    ("application/javascript", "_repr_javascript_"),
]
BINARY_MIMES = {"image/png", "image/jpeg", "application/pdf"}


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


class Failure(Exception):
    """A request this driver refuses: answered as {"fail": {code, message}}."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class Channel:
    """The reply stream to the agent, shared by the main thread and the output flusher."""

    def __init__(self, replies):
        self._replies = replies
        self._lock = threading.Lock()

    def send(self, message):
        line = json.dumps(message).encode("ascii") + b"\n"
        with self._lock:
            self._replies.write(line)
            self._replies.flush()


class Run:
    """One eval in progress: what it printed (unless streamed) and what it displayed."""

    def __init__(self, stream):
        self.stream = stream
        self.captured = {"stdout": [], "stderr": []}
        self.sizes = {"stdout": 0, "stderr": 0}
        self.results = []

    def capture(self, name, text):
        # Keep a little past the limit so _clean can say how much was cut.
        room = LIMITS[name] + 1 - self.sizes[name]
        if room > 0:
            piece = text[:room]
            self.captured[name].append(piece)
            self.sizes[name] += len(piece)
        else:
            self.sizes[name] += len(text)

    def captured_text(self, name):
        text = "".join(self.captured[name])
        cut = self.sizes[name] - len(text)
        text = _clean(text, LIMITS[name])
        if cut > 0 and not text.endswith("characters]"):
            text += "\n...[truncated %d characters]" % cut
        return text


class Router:
    """Where sys.stdout / sys.stderr writes go: the running eval (captured, or sent as events
    in order, coalesced into lines) or, outside an eval, the agent's log."""

    def __init__(self, channel, fallback):
        self.channel = channel
        self.fallback = fallback
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.run = None
        self.pending_name = None
        self.pending = []
        self.pending_len = 0
        self.pending_since = None
        self.flusher = None
        self.pid = os.getpid()

    def after_fork_in_child(self):
        # A forked child (multiprocessing) must not write into the parent's protocol.
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.run = None
        self.pending = []
        self.pending_len = 0
        self.pending_since = None
        self.flusher = None

    def write(self, name, text):
        if os.getpid() != self.pid:
            self._to_log(text)
            return
        with self.lock:
            run = self.run
            if run is None:
                self._to_log(text)
            elif not run.stream:
                run.capture(name, text)
            else:
                if self.pending and self.pending_name != name:
                    self._send_pending()
                self.pending_name = name
                self.pending.append(text)
                self.pending_len += len(text)
                if "\n" in text or self.pending_len >= EVENT_TEXT:
                    self._send_pending()
                elif self.pending and self.pending_since is None:
                    self.pending_since = time.monotonic()
                    self._start_flusher()
                    self.wake.notify()

    def flush(self):
        if os.getpid() != self.pid:
            return
        with self.lock:
            self._send_pending()

    def _to_log(self, text):
        try:
            self.fallback.write(text)
            self.fallback.flush()
        except Exception:
            pass

    def _send_pending(self):
        self.pending_since = None
        if not self.pending:
            return
        text = "".join(self.pending)
        self.pending, self.pending_len = [], 0
        for start in range(0, len(text), EVENT_TEXT):
            piece = text[start : start + EVENT_TEXT]
            self.channel.send({"event": self.pending_name, "text": _clean(piece, EVENT_TEXT)})

    def _start_flusher(self):
        if self.flusher is None:
            self.flusher = threading.Thread(target=self._flush_loop, name="forkd-output", daemon=True)
            self.flusher.start()

    def _flush_loop(self):
        with self.lock:
            while True:
                if self.pending_since is None:
                    self.wake.wait()
                    continue
                delay = self.pending_since + FLUSH_DELAY - time.monotonic()
                if delay > 0:
                    self.wake.wait(delay)
                    continue
                try:
                    self._send_pending()
                except Exception:
                    self.pending_since = None

    def begin(self, run):
        with self.lock:
            self.run = run

    def end(self):
        with self.lock:
            self._send_pending()
            self.run = None

    def note(self, text):
        """A message from the driver itself, on the running eval's stderr."""
        self.write("stderr", text + "\n")


class Output(io.TextIOBase):
    """sys.stdout / sys.stderr: a text stream that hands what is written to the router."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, name, router):
        super().__init__()
        self._name = name
        self._router = router

    @property
    def name(self):
        return "<%s>" % self._name

    def writable(self):
        return True

    def isatty(self):
        return False

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        if text:
            self._router.write(self._name, text)
        return len(text)

    def flush(self):
        self._router.flush()


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


# ---------------------------------------------------------------------------------------------
# Display formats


def _mime_value(mime, value):
    """A display format's value as JSON can carry it, or None to leave it out."""
    if isinstance(value, tuple) and len(value) == 2:
        value = value[0]  # (data, metadata), as IPython allows
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        if mime in BINARY_MIMES or not mime.startswith("text/"):
            return base64.b64encode(value).decode("ascii")
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return _clean(value, LIMITS["value"])
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def _offers_reprs(obj):
    # Classes have the methods unbound; objects answering every attribute (mocks, proxies)
    # would answer ours too: IPython skips both the same way.
    if isinstance(obj, type):
        return False
    try:
        return getattr(obj, "_forkd_no_such_attribute_", None) is None
    except Exception:
        return False


def _call_repr(obj, method_name, router, *args):
    try:
        method = getattr(obj, method_name, None)
        if not callable(method):
            return None
        return method(*args)
    except Exception as exc:
        router.note(
            "forkd: %s.%s() raised %s: %s; that format is left out"
            % (type(obj).__name__, method_name, type(exc).__name__, exc)
        )
        return None


def _bundle(obj, router, text=None):
    """The value's Jupyter MIME bundle: text/plain (its repr) plus the formats it offers."""
    data = {}
    if _offers_reprs(obj):
        offered = _call_repr(obj, "_repr_mimebundle_", router, None, None)
        if isinstance(offered, tuple) and len(offered) == 2:
            offered = offered[0]
        if isinstance(offered, dict):
            for mime, value in offered.items():
                value = _mime_value(mime, value) if isinstance(mime, str) else None
                if value is not None:
                    data[mime] = value
        for mime, method_name in REPR_METHODS:
            if mime not in data:
                value = _mime_value(mime, _call_repr(obj, method_name, router))
                if value is not None:
                    data[mime] = value
    if not isinstance(data.get("text/plain"), str):
        if text is None:
            text = repr(obj)
        data["text/plain"] = _clean(text, LIMITS["value"])
    return data


def _figures(run, router):
    """Open matplotlib figures, when the code uses pyplot: each a png result, then closed."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    try:
        numbers = list(pyplot.get_fignums())
    except Exception:
        return
    for number in numbers:
        figure = None
        try:
            figure = pyplot.figure(number)
            image = io.BytesIO()
            figure.savefig(image, format="png", bbox_inches="tight")
            data = {
                "text/plain": repr(figure),
                "image/png": base64.b64encode(image.getvalue()).decode("ascii"),
            }
            run.results.append({"data": data, "is_main": False})
        except Exception as exc:
            router.note("forkd: matplotlib figure %s not rendered: %s: %s" % (number, type(exc).__name__, exc))
        finally:
            try:
                pyplot.close(figure if figure is not None else number)
            except Exception:
                pass


def _fit(reply, run, router):
    """Leaves out the largest display formats until the reply fits the agent's limit."""
    while len(json.dumps(reply)) > REPLY_LIMIT:
        largest = None
        for result in reply["results"]:
            for mime, value in result["data"].items():
                size = len(json.dumps(value))
                if largest is None or size > largest[0]:
                    largest = (size, result, mime)
        if largest is None or largest[0] <= 1024:
            break
        size, result, mime = largest
        if mime == "text/plain":
            result["data"][mime] = _clean(result["data"][mime], 512)
        else:
            del result["data"][mime]
        note = "forkd: a result's %s (%d bytes) was left out: an eval's reply is limited to %d bytes" % (
            mime,
            size,
            REPLY_LIMIT,
        )
        if run.stream:
            router.channel.send({"event": "stderr", "text": note + "\n"})
        else:
            reply["stderr"] += note + "\n"


# ---------------------------------------------------------------------------------------------
# Contexts and evaluation


def _display_function(router):
    def display(*objs, raw=False, **_ignored):
        """Shows each object as a result of the running execution, in all the formats it
        offers (IPython's display; with raw=True each object is a {mime: data} bundle)."""
        run = router.run
        if run is None:
            return
        for obj in objs:
            if raw and isinstance(obj, dict):
                data = {}
                for mime, value in obj.items():
                    value = _mime_value(mime, value) if isinstance(mime, str) else None
                    if value is not None:
                        data[mime] = value
            else:
                data = _bundle(obj, router)
            run.results.append({"data": data, "is_main": False})

    return display


class Context:
    def __init__(self, context_id, cwd, router):
        self.id = context_id
        self.home = cwd
        self.cwd = cwd
        self.count = 0
        self.router = router
        self.module = self._fresh_module()

    def _fresh_module(self):
        # Each context's code runs in a __main__ module of its own, so it cannot clobber the
        # driver's globals or another context's, and pickle/multiprocessing still find its
        # definitions under __main__ while it runs.
        module = types.ModuleType("__main__")
        module.__dict__["__builtins__"] = __builtins__
        module.__dict__["display"] = _display_function(self.router)
        return module

    def restart(self):
        self.module = self._fresh_module()
        self.count = 0
        self.cwd = self.home

    def info(self):
        return {"id": self.id, "language": "python", "cwd": self.cwd, "execution_count": self.count}


class Driver:
    def __init__(self, channel, router):
        self.channel = channel
        self.router = router
        self.outputs = Output("stdout", router), Output("stderr", router)
        sys.stdout, sys.stderr = self.outputs
        self.home = os.getcwd()
        self.contexts = {DEFAULT_CONTEXT: Context(DEFAULT_CONTEXT, self.home, router)}
        self.number = 0
        sys.modules["__main__"] = self.contexts[DEFAULT_CONTEXT].module

    def context(self, context_id):
        ctx = self.contexts.get(context_id or DEFAULT_CONTEXT)
        if ctx is None:
            raise Failure("not_found", "no context %r in this interpreter" % (context_id,))
        return ctx

    def context_op(self, message):
        action = message.get("action")
        if action == "list":
            return {"contexts": [c.info() for c in self.contexts.values()]}
        if action == "create":
            cwd = message.get("cwd")
            if cwd is None:
                cwd = next(d for d in ("/home/user", "/root", "/") if os.path.isdir(d))
            cwd = os.path.normpath(os.path.join(self.home, cwd))
            if not os.path.isdir(cwd):
                raise Failure("bad_request", "cwd %r is not a directory" % (cwd,))
            ctx = Context(str(uuid.uuid4()), cwd, self.router)
            self.contexts[ctx.id] = ctx
            return {"contexts": [ctx.info()]}
        ctx = self.context(message.get("context"))
        if action == "restart":
            ctx.restart()
            if ctx.id == DEFAULT_CONTEXT:
                sys.modules["__main__"] = ctx.module
            return {"contexts": [ctx.info()]}
        if action == "remove":
            if ctx.id == DEFAULT_CONTEXT:
                raise Failure("bad_request", "the default context cannot be removed (restart it to clear it)")
            del self.contexts[ctx.id]
            return {"contexts": [ctx.info()]}
        raise Failure("bad_request", "unknown context action %r" % (action,))

    def evaluate(self, message):
        ctx = self.context(message.get("context"))
        stream = bool(message.get("stream"))
        saved_env = self._apply_env(message.get("env") or {})
        if stream:
            self.channel.send({"event": "started"})
        if message.get("count", True):
            ctx.count += 1
        self.number += 1
        code = message["code"]
        filename = "<eval-%d>" % self.number
        # Registering the source lets tracebacks show the offending lines.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        run = Run(stream)
        self.router.begin(run)
        # Code that replaced sys.stdout / sys.stderr last time does not keep this run's output.
        sys.stdout, sys.stderr = self.outputs
        self._enter(ctx)
        namespace = ctx.module.__dict__
        sys.modules["__main__"] = ctx.module
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
                    run.results.append({"data": _bundle(result, self.router, value), "is_main": True})
        except BaseException as exc:  # noqa: B036 - SystemExit/KeyboardInterrupt are user errors too
            error = _format_error(exc, skip_frames=1)
        finally:
            try:
                _figures(run, self.router)
            finally:
                self._leave(ctx)
                sys.modules["__main__"] = self.contexts[DEFAULT_CONTEXT].module
                self._restore_env(saved_env)
                self.router.flush()
        reply = {
            "value": None if value is None else _clean(value, LIMITS["value"]),
            "stdout": "" if stream else run.captured_text("stdout"),
            "stderr": "" if stream else run.captured_text("stderr"),
            "error": error,
            "results": run.results,
            "execution_count": ctx.count,
        }
        _fit(reply, run, self.router)
        self.router.end()
        return reply

    def _enter(self, ctx):
        try:
            os.chdir(ctx.cwd)
        except OSError as exc:
            self.router.note("forkd: context %s: cannot enter %s (%s); running in %s" % (ctx.id, ctx.cwd, exc, os.getcwd()))

    def _leave(self, ctx):
        try:
            ctx.cwd = os.getcwd()
        except OSError:
            pass  # its directory was removed: keep the last known one
        try:
            os.chdir(self.home)
        except OSError:
            pass

    def _apply_env(self, env):
        saved = {}
        for key, value in env.items():
            saved[key] = os.environ.get(key)
            try:
                os.environ[key] = value
            except (TypeError, ValueError) as exc:
                self._restore_env(saved)
                raise Failure("bad_request", "environment variable %r: %s" % (key, exc))
        return saved

    @staticmethod
    def _restore_env(saved):
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    channel = Channel(replies)
    router = Router(channel, sys.__stderr__)
    os.register_at_fork(after_in_child=router.after_fork_in_child)
    driver = Driver(channel, router)
    for line in requests:
        try:
            message = json.loads(line)
            op = message.get("op")
            if op == "eval":
                reply = driver.evaluate(message)
            elif op == "context":
                reply = driver.context_op(message)
            elif op == "reseed":
                reply = _reseed()
            else:
                reply = {"driver_error": "unknown driver op %r" % (op,)}
        except Failure as exc:
            reply = {"fail": {"code": exc.code, "message": str(exc)}}
        except Exception as exc:
            router.end()
            reply = {"driver_error": "%s: %s" % (type(exc).__name__, exc)}
        channel.send(reply)


main()

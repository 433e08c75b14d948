"""The daemon's routes as request descriptions and answer parsers, shared by the sync and the
async SDK: each public call builds a :class:`Call` here and a transport sends it."""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generic, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union
from urllib.parse import quote

import httpx

from .errors import ForkdError, TimeoutError, error_from_body
from .models import (
    CommandResult, EntryInfo, EvalResult, Job, Limits, ProcessInfo, SandboxInfo, Snapshot,
    SnapshotInfo, VersionInfo, WriteInfo, command_result_of_wait,
)

T = TypeVar("T")
Params = List[Tuple[str, str]]
#: A command: a string run by ``sh -c``, or an argument vector.
Cmd = Union[str, Sequence[str]]

#: Sentinel: use the client's own request timeout.
DEFAULT = object()


@dataclass
class Call(Generic[T]):
    """One request to the daemon and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Params = field(default_factory=list)
    json: Any = None
    #: A raw body (bytes or an iterator of chunks) sent as application/octet-stream.
    content: Any = None
    #: Seconds to wait for the answer; None: no limit; DEFAULT: the client's.
    timeout: Any = DEFAULT


def check(response: httpx.Response) -> None:
    """Raises the daemon's error for an error status (the body must have been read)."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text.strip()[:200] or None}
    raise error_from_body(body, response.status_code)


def _json(response: httpx.Response) -> Any:
    return response.json()


def _none(_response: httpx.Response) -> None:
    return None


def _seconds(value: Optional[float], name: str) -> Optional[int]:
    """A timeout in whole seconds (rounded up), as the daemon takes it."""
    if value is None:
        return None
    if value < 0:
        raise ForkdError(f"{name} {value} is negative")
    return int(math.ceil(value))


def _id(value: str) -> str:
    return quote(value, safe="")


def sandbox_path(sandbox_id: str, rest: str = "") -> str:
    return f"/v1/sandboxes/{_id(sandbox_id)}{rest}"


def _metadata_params(metadata: Optional[Mapping[str, str]]) -> Params:
    return [(f"metadata.{key}", value) for key, value in (metadata or {}).items()]


# ---- sandboxes -----------------------------------------------------------------------------

def _limits_json(limits: Union[Limits, Mapping[str, Any], None]) -> Optional[Dict[str, Any]]:
    if limits is None:
        return None
    return limits.to_json() if isinstance(limits, Limits) else dict(limits)


def _sandboxes(response: httpx.Response) -> List[SandboxInfo]:
    return [SandboxInfo.from_json(s) for s in response.json()["sandboxes"]]


def _sandbox(response: httpx.Response) -> SandboxInfo:
    return SandboxInfo.from_json(response.json())


def _network_json(allow: Optional[Sequence[str]], allow_dns: Optional[bool],
                  publish: Optional[Sequence[str]]) -> Optional[Dict[str, Any]]:
    """The create's ``network`` section (None: nothing asked). ``allow`` or ``allow_dns``
    given: the sandbox's own policy, replacing its snapshot's recorded one."""
    for name, values in (("allow", allow), ("publish", publish)):
        if isinstance(values, str):
            raise TypeError(f"{name} takes a list of strings, not one string")
    network: Dict[str, Any] = {}
    if allow is not None or allow_dns is not None:
        network["allow"] = list(allow or [])
        network["allow_dns"] = bool(allow_dns)
    if publish:
        network["publish"] = list(publish)
    return network or None


def create_sandboxes(tag: str, *, count: int, timeout: Optional[float],
                     envs: Optional[Mapping[str, str]], metadata: Optional[Mapping[str, str]],
                     limits: Union[Limits, Mapping[str, Any], None],
                     allow: Optional[Sequence[str]] = None, allow_dns: Optional[bool] = None,
                     publish: Optional[Sequence[str]] = None) -> Call[List[SandboxInfo]]:
    body: Dict[str, Any] = {"tag": tag, "count": count}
    network = _network_json(allow, allow_dns, publish)
    if network is not None:
        body["network"] = network
    if timeout is not None:
        body["timeout_secs"] = _seconds(timeout, "timeout")
    if envs:
        body["env"] = dict(envs)
    if metadata:
        body["metadata"] = dict(metadata)
    if limits is not None:
        body["limits"] = _limits_json(limits)
    return Call("POST", "/v1/sandboxes", _sandboxes, json=body)


def list_sandboxes(tag: Optional[str], metadata: Optional[Mapping[str, str]]) -> Call[List[SandboxInfo]]:
    params = ([("tag", tag)] if tag else []) + _metadata_params(metadata)
    return Call("GET", "/v1/sandboxes", _sandboxes, params=params)


def get_sandbox(sandbox_id: str) -> Call[SandboxInfo]:
    return Call("GET", sandbox_path(sandbox_id), _sandbox)


def kill_sandbox(sandbox_id: str) -> Call[None]:
    return Call("DELETE", sandbox_path(sandbox_id), _none)


def set_timeout(sandbox_id: str, seconds: float) -> Call[SandboxInfo]:
    return Call("POST", sandbox_path(sandbox_id, "/timeout"), _sandbox,
                json={"timeout_secs": _seconds(seconds, "timeout")})


def pause(sandbox_id: str) -> Call[SandboxInfo]:
    return Call("POST", sandbox_path(sandbox_id, "/pause"), _sandbox)


def resume(sandbox_id: str, timeout: Optional[float]) -> Call[SandboxInfo]:
    body = {} if timeout is None else {"timeout_secs": _seconds(timeout, "timeout")}
    return Call("POST", sandbox_path(sandbox_id, "/resume"), _sandbox, json=body)


def logs(sandbox_id: str, tail: Optional[int]) -> Call[str]:
    params = [] if tail is None else [("tail", str(int(tail)))]
    return Call("GET", sandbox_path(sandbox_id, "/logs"), lambda r: r.text, params=params)


def branch(sandbox_id: str, tag: Optional[str], diff: bool) -> Call[Snapshot]:
    body: Dict[str, Any] = {"diff": diff}
    if tag is not None:
        body["tag"] = tag
    return Call("POST", sandbox_path(sandbox_id, "/branch"),
                lambda r: Snapshot.from_json(r.json()), json=body)


# ---- commands and eval ---------------------------------------------------------------------

def exec_body(cmd: Cmd, *, envs: Optional[Mapping[str, str]], cwd: Optional[str],
              timeout: Optional[float], stdin: Union[str, bytes, None]) -> Dict[str, Any]:
    """The body of an exec or a background start."""
    body: Dict[str, Any] = {"cmd": cmd if isinstance(cmd, str) else list(cmd)}
    if envs:
        body["env"] = dict(envs)
    if cwd is not None:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout_secs"] = _seconds(timeout, "timeout")
    if stdin is not None:
        body["stdin"] = stdin.decode() if isinstance(stdin, bytes) else stdin
    return body


def exec_call(sandbox_id: str, body: Dict[str, Any]) -> Call[None]:
    """The streamed exec: its answer is read line by line by an :class:`ExecStream`."""
    return Call("POST", sandbox_path(sandbox_id, "/exec"), _none, json=body, timeout=None)


OutputCallback = Callable[[str], Any]


class ExecStream:
    """Reads an exec's NDJSON events as they arrive: output chunks go to the callbacks and are
    kept; the ``exit`` line ends it (``error``: the command could not run to its end)."""

    def __init__(self, on_stdout: Optional[OutputCallback], on_stderr: Optional[OutputCallback]):
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._chunks: Dict[str, List[bytes]] = {"stdout": [], "stderr": []}
        self._exit: Optional[Dict[str, Any]] = None

    def feed(self, line: str) -> Optional[Tuple[OutputCallback, str]]:
        """Takes one line; returns the callback to call with its text, if any (an async caller
        may have to await it)."""
        if not line.strip():
            return None
        event = json.loads(line)
        kind = event.get("type")
        if kind in self._chunks:
            data = (event["data"].encode() if event.get("data") is not None
                    else base64.b64decode(event.get("data_b64") or ""))
            self._chunks[kind].append(data)
            callback = self._callbacks[kind]
            return (callback, data.decode(errors="replace")) if callback else None
        if kind == "exit":
            self._exit = event
        elif kind == "error":
            raise error_from_body(event, None)
        return None

    def result(self) -> CommandResult:
        """The command's result; raises when the stream ended without its ``exit`` line, and
        :class:`TimeoutError` (holding the output so far) when its timeout killed it."""
        if self._exit is None:
            raise ForkdError("the daemon's exec stream ended before the command's exit")
        out, err = b"".join(self._chunks["stdout"]), b"".join(self._chunks["stderr"])
        result = CommandResult(
            stdout=out.decode(errors="replace"), stderr=err.decode(errors="replace"),
            exit_code=self._exit.get("exit_code"), signal=self._exit.get("signal"),
            timed_out=bool(self._exit.get("timed_out")),
            duration_ms=self._exit.get("duration_ms"), stdout_bytes=out, stderr_bytes=err,
        )
        if result.timed_out:
            raise TimeoutError("the command's timeout expired and it was killed",
                               code="command_timeout", result=result)
        return result


def start_process(sandbox_id: str, body: Dict[str, Any]) -> Call[int]:
    return Call("POST", sandbox_path(sandbox_id, "/processes"), lambda r: int(r.json()["pid"]),
                json=body)


def list_processes(sandbox_id: str) -> Call[List[ProcessInfo]]:
    return Call("GET", sandbox_path(sandbox_id, "/processes"),
                lambda r: [ProcessInfo.from_json(p) for p in r.json()["processes"]])


def _waited(response: httpx.Response) -> Tuple[str, CommandResult]:
    data = response.json()
    return data["state"], command_result_of_wait(data)


def wait_process(sandbox_id: str, pid: int, timeout: Optional[float]) -> Call[Tuple[str, CommandResult]]:
    """A wait: (state, result so far); ``running`` when the timeout came first."""
    params = [] if timeout is None else [("timeout", str(_seconds(timeout, "timeout")))]
    return Call("POST", sandbox_path(sandbox_id, f"/processes/{int(pid)}/wait"), _waited,
                params=params, timeout=None)


def kill_process(sandbox_id: str, pid: int, signal: Optional[str]) -> Call[None]:
    params = [] if signal is None else [("signal", str(signal))]
    return Call("DELETE", sandbox_path(sandbox_id, f"/processes/{int(pid)}"), _none, params=params)


def finished(state: str, result: CommandResult, check_exit: bool) -> CommandResult:
    """A wait's outcome as the handle returns it: raises when still running, on a timeout,
    and (with ``check_exit``) on a non-zero exit."""
    if state == "running":
        raise TimeoutError(f"process {result.pid} is still running", code="wait_timeout", result=result)
    if result.timed_out:
        raise TimeoutError(f"process {result.pid}'s timeout expired and it was killed",
                           code="command_timeout", result=result)
    return checked(result, check_exit)


def checked(result: CommandResult, check_exit: bool) -> CommandResult:
    """``result``, or :class:`CommandExitError` when asked to check and it failed."""
    from .errors import CommandExitError

    if check_exit and result.exit_code != 0:
        raise CommandExitError(result)
    return result


def eval_call(sandbox_id: str, code: str, timeout: Optional[float]) -> Call[EvalResult]:
    body: Dict[str, Any] = {"code": code}
    if timeout is not None:
        body["timeout_secs"] = _seconds(timeout, "timeout")
    return Call("POST", sandbox_path(sandbox_id, "/eval"), _eval_result, json=body, timeout=None)


def _eval_result(response: httpx.Response) -> EvalResult:
    data = response.json()
    if data.get("timed_out"):
        raise TimeoutError("the evaluation's timeout expired; the interpreter was restarted "
                           "and its state is lost", code="eval_timeout")
    return EvalResult.from_json(data)


# ---- files ---------------------------------------------------------------------------------

def _path_params(path: str, **flags: Any) -> Params:
    params = [("path", path)]
    for name, value in flags.items():
        if value is True:
            params.append((name, "true"))
        elif value not in (None, False):
            params.append((name, str(value)))
    return params


def stat(sandbox_id: str, path: str) -> Call[EntryInfo]:
    return Call("GET", sandbox_path(sandbox_id, "/files/stat"),
                lambda r: EntryInfo.from_stat(path, r.json()), params=_path_params(path))


def _entries(directory: str) -> Callable[[httpx.Response], List[EntryInfo]]:
    base = directory.rstrip("/")
    return lambda r: [EntryInfo.from_stat(f"{base}/{e['name']}", e["stat"])
                      for e in r.json()["entries"]]


def list_dir(sandbox_id: str, path: str) -> Call[List[EntryInfo]]:
    return Call("GET", sandbox_path(sandbox_id, "/files/list"), _entries(path),
                params=_path_params(path))


def remove(sandbox_id: str, path: str, recursive: bool) -> Call[None]:
    return Call("DELETE", sandbox_path(sandbox_id, "/files"), _none,
                params=_path_params(path, recursive=recursive))


def make_dir(sandbox_id: str, path: str, parents: bool, mode: Optional[int]) -> Call[bool]:
    params = _path_params(path, parents=parents, mode=None if mode is None else format(mode, "o"))
    return Call("POST", sandbox_path(sandbox_id, "/files/mkdir"),
                lambda r: bool(r.json()["created"]), params=params)


def write_params(path: str, mode: Optional[int], create_dirs: bool) -> Params:
    return _path_params(path, create_dirs=create_dirs,
                        mode=None if mode is None else format(mode, "o"))


def upload(sandbox_id: str, path: str, content: Any, mode: Optional[int],
           create_dirs: bool) -> Call[WriteInfo]:
    return Call("PUT", sandbox_path(sandbox_id, "/files"), written,
                params=write_params(path, mode, create_dirs), content=content, timeout=None)


def download(sandbox_id: str, path: str) -> Call[None]:
    """A download, read as a stream."""
    return Call("GET", sandbox_path(sandbox_id, "/files"), _none, params=_path_params(path),
                timeout=None)


def read_file(sandbox_id: str, path: str) -> Call[bytes]:
    """A download read whole."""
    return Call("GET", sandbox_path(sandbox_id, "/files"), lambda r: r.content,
                params=_path_params(path), timeout=None)


def written(response: httpx.Response) -> WriteInfo:
    data = response.json()
    return WriteInfo(path=data["path"], size=int(data["size"]))


def exists_from(error: Exception) -> bool:
    """What a failed stat says about existence: a missing file is False, anything else (a
    missing sandbox included) is raised."""
    from .errors import NotFoundError

    if isinstance(error, NotFoundError) and not error.message.startswith("no sandbox "):
        return False
    raise error


#: Chunk size for file uploads read from a file object.
CHUNK = 256 * 1024

FILE_FORMATS = ("text", "bytes", "stream")


def check_format(format: str) -> None:
    if format not in FILE_FORMATS:
        raise ForkdError(f"format {format!r} is not one of {', '.join(FILE_FORMATS)}")


# ---- snapshots, jobs, system ---------------------------------------------------------------

def list_snapshots() -> Call[List[SnapshotInfo]]:
    return Call("GET", "/v1/snapshots",
                lambda r: [SnapshotInfo.from_json(s) for s in r.json()["snapshots"]])


def get_snapshot(tag: str) -> Call[SnapshotInfo]:
    return Call("GET", f"/v1/snapshots/{_id(tag)}", lambda r: SnapshotInfo.from_json(r.json()))


def delete_snapshot(tag: str, cascade: bool, force: bool) -> Call[List[str]]:
    params = [(k, "true") for k, v in (("cascade", cascade), ("force", force)) if v]
    return Call("DELETE", f"/v1/snapshots/{_id(tag)}", lambda r: list(r.json()["deleted"]),
                params=params)


def start_pull(reference: str, tag: Optional[str], hub: Optional[str], force: bool) -> Call[Job]:
    body: Dict[str, Any] = {"reference": reference, "force": force}
    if tag is not None:
        body["tag"] = tag
    if hub is not None:
        body["hub"] = hub
    return Call("POST", "/v1/snapshots", lambda r: Job.from_json(r.json()), json=body)


def get_job(job_id: str) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{_id(job_id)}", lambda r: Job.from_json(r.json()))


def pulled_tag(job: Job) -> str:
    """The tag a finished pull installed; its error when it failed."""
    if job.state == "failed":
        raise error_from_body({"code": job.error_code, "message": job.error_message}, None)
    result = job.result if isinstance(job.result, dict) else {}
    if not isinstance(result.get("tag"), str):
        raise ForkdError(f"pull job {job.id} succeeded without naming the tag it installed")
    return result["tag"]


def health() -> Call[bool]:
    return Call("GET", "/healthz", lambda r: r.json().get("status") == "ok")


def version() -> Call[VersionInfo]:
    return Call("GET", "/version", lambda r: VersionInfo(**r.json()))

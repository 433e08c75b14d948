"""``forkd.Sandbox``: one sandbox of a forkd daemon, its commands, files and interpreter."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union, overload

import httpx

from . import _api
from ._api import Cmd, OutputCallback
from ._transport import translate
from ._upload import WriteData, sync_body
from .client import Client
from .errors import NotFoundError
from .models import (
    CommandResult, EntryInfo, EvalResult, Limits, ProcessInfo, SandboxInfo, Snapshot, WriteInfo,
)

__all__ = ["Sandbox", "Commands", "CommandHandle", "Files", "FileStream"]

LimitsArg = Union[Limits, Mapping[str, Any], None]


def _client(client: Optional[Client], host: Optional[str], token: Optional[str]) -> Tuple[Client, bool]:
    """The client to use, and whether it was made here (and so belongs to the caller)."""
    if client is not None:
        return client, False
    return Client(host, token), True


@contextlib.contextmanager
def _closed_unless_held(client: Client, owned: bool) -> Iterator[None]:
    """Closes a client made for a call when no sandbox came to hold it (nothing was made, or
    the call failed)."""
    try:
        yield
    finally:
        if owned and client._holders == 0:
            client.close()


class Sandbox:
    """A sandbox: a microVM forked from a snapshot, kept by the daemon until killed or its
    timeout expires.

    Make one with :meth:`create`, :meth:`connect`, :meth:`list`, :meth:`resume` or
    :meth:`fork`. As a context manager it is killed on exit.
    """

    def __init__(self, info: SandboxInfo, client: Client, *, owns_client: bool = False):
        self._info = info
        self._client = client
        # Whether this sandbox holds a share of a client made for it (see Client._hold).
        self._owns_client = owns_client
        if owns_client:
            client._hold()
        #: Commands run in the sandbox.
        self.commands = Commands(self)
        #: The sandbox's files.
        self.files = Files(self)

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, tag={self._info.tag!r}, state={self._info.state!r})"

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.kill()
        except NotFoundError:
            pass
        finally:
            self.close()

    @property
    def id(self) -> str:
        """The sandbox's id."""
        return self._info.id

    @property
    def info(self) -> SandboxInfo:
        """The record as last seen (see :meth:`get_info` for a fresh one)."""
        return self._info

    @property
    def client(self) -> Client:
        """The client this sandbox talks through."""
        return self._client

    def _call(self, call: "_api.Call[Any]") -> Any:
        return self._client._transport.call(call)

    # ---- making sandboxes ------------------------------------------------------------------

    @overload
    @classmethod
    def create(cls, tag: str, *, timeout: Optional[float] = None,
               envs: Optional[Mapping[str, str]] = None,
               metadata: Optional[Mapping[str, str]] = None, limits: LimitsArg = None,
               allow: Optional[Sequence[str]] = None, allow_dns: Optional[bool] = None,
               publish: Optional[Sequence[str]] = None,
               count: None = None, host: Optional[str] = None, token: Optional[str] = None,
               client: Optional[Client] = None) -> "Sandbox": ...

    @overload
    @classmethod
    def create(cls, tag: str, *, timeout: Optional[float] = None,
               envs: Optional[Mapping[str, str]] = None,
               metadata: Optional[Mapping[str, str]] = None, limits: LimitsArg = None,
               allow: Optional[Sequence[str]] = None, allow_dns: Optional[bool] = None,
               publish: Optional[Sequence[str]] = None,
               count: int, host: Optional[str] = None, token: Optional[str] = None,
               client: Optional[Client] = None) -> List["Sandbox"]: ...

    @classmethod
    def create(cls, tag: str, *, timeout: Optional[float] = None,
               envs: Optional[Mapping[str, str]] = None,
               metadata: Optional[Mapping[str, str]] = None, limits: LimitsArg = None,
               allow: Optional[Sequence[str]] = None, allow_dns: Optional[bool] = None,
               publish: Optional[Sequence[str]] = None,
               count: Optional[int] = None, host: Optional[str] = None,
               token: Optional[str] = None,
               client: Optional[Client] = None) -> Union["Sandbox", List["Sandbox"]]:
        """Forks a sandbox (or ``count`` of them: a list) from the snapshot ``tag``.

        Args:
            tag: The snapshot to fork.
            timeout: Seconds until it is killed and its files removed (default: never).
            envs: Environment variables every command run in it gets.
            metadata: Labels to find it by (:meth:`list`).
            limits: cgroup limits (:class:`~forkd.models.Limits` or a dict with
                ``memory_mib``, ``cpus``, ``pids``); a host without cgroup v2 controllers
                refuses them with :class:`~forkd.errors.UnprocessableError`.
            allow: What it may reach, ``CIDR[:PORT]`` (e.g. ``"10.1.2.0/24:443"``); with
                ``allow_dns``, its own egress policy, replacing the one its snapshot recorded
                (which applies otherwise). Egress is denied unless allowed. The snapshot needs
                a network device (:class:`~forkd.errors.UnprocessableError` otherwise).
            allow_dns: It may reach the host's resolvers (port 53).
            publish: Host TCP ports forwarded to its guest ports, ``"HOST_PORT:GUEST_PORT"``
                (only with one sandbox; a port another sandbox has raises
                :class:`~forkd.errors.ConflictError`). Its network is in
                ``info.network``.
            count: Make this many at once and return a list.
            host, token, client: Where the daemon is (see :class:`~forkd.Client`).
        """
        c, owned = _client(client, host, token)
        with _closed_unless_held(c, owned):
            infos = c._transport.call(_api.create_sandboxes(
                tag, count=1 if count is None else count, timeout=timeout, envs=envs,
                metadata=metadata, limits=limits, allow=allow, allow_dns=allow_dns,
                publish=publish))
            made = [cls(info, c, owns_client=owned) for info in infos]
        return made[0] if count is None else made

    @classmethod
    def connect(cls, sandbox_id: str, *, host: Optional[str] = None, token: Optional[str] = None,
                client: Optional[Client] = None) -> "Sandbox":
        """The running (or paused) sandbox ``sandbox_id``; NotFoundError if there is none."""
        c, owned = _client(client, host, token)
        with _closed_unless_held(c, owned):
            return cls(c._transport.call(_api.get_sandbox(sandbox_id)), c, owns_client=owned)

    @classmethod
    def list(cls, tag: Optional[str] = None, metadata: Optional[Mapping[str, str]] = None, *,
             host: Optional[str] = None, token: Optional[str] = None,
             client: Optional[Client] = None) -> List["Sandbox"]:
        """The daemon's sandboxes, only those of snapshot ``tag`` and carrying every label
        of ``metadata`` when given."""
        c, owned = _client(client, host, token)
        with _closed_unless_held(c, owned):
            infos = c._transport.call(_api.list_sandboxes(tag, metadata))
            return [cls(info, c, owns_client=owned) for info in infos]

    @classmethod
    def resume(cls, sandbox_id: str, *, timeout: Optional[float] = None,
               host: Optional[str] = None, token: Optional[str] = None,
               client: Optional[Client] = None) -> "Sandbox":
        """Restores the paused sandbox ``sandbox_id`` under the same id, where it left off.
        ``timeout``: seconds until it is killed (default: the one it was created with)."""
        c, owned = _client(client, host, token)
        with _closed_unless_held(c, owned):
            return cls(c._transport.call(_api.resume(sandbox_id, timeout)), c, owns_client=owned)

    # ---- its life --------------------------------------------------------------------------

    def get_info(self) -> SandboxInfo:
        """The sandbox's record, fresh from the daemon."""
        self._info = self._call(_api.get_sandbox(self.id))
        return self._info

    def kill(self) -> None:
        """Kills the sandbox and removes its files."""
        self._call(_api.kill_sandbox(self.id))

    def close(self) -> None:
        """Closes the connection this sandbox made for itself, once no sandbox forked or
        listed with it uses it any more (the sandbox runs on)."""
        if self._owns_client:
            self._owns_client = False
            self._client._release()

    def set_timeout(self, seconds: float) -> None:
        """Kills the sandbox ``seconds`` from now (instead of its earlier timeout)."""
        self._info = self._call(_api.set_timeout(self.id, seconds))

    def pause(self) -> None:
        """Suspends the sandbox to disk: its process ends, its id stays, its timeout stops.
        :meth:`resume` brings it back."""
        self._info = self._call(_api.pause(self.id))

    def logs(self, tail: Optional[int] = None) -> str:
        """The sandbox's serial console since it was restored (the last ``tail`` bytes)."""
        return self._call(_api.logs(self.id, tail))

    def branch(self, tag: Optional[str] = None, diff: bool = True) -> Snapshot:
        """Snapshots the running sandbox into a new tag (default ``<id>-branch-<n>``); the
        sandbox runs on and sandboxes can be created from the tag at once. ``diff`` saves
        only the pages written since its snapshot."""
        return self._call(_api.branch(self.id, tag, diff))

    def fork(self, n: int, *, timeout: Optional[float] = None,
             envs: Optional[Mapping[str, str]] = None,
             metadata: Optional[Mapping[str, str]] = None) -> List["Sandbox"]:
        """``n`` new sandboxes continuing from this one's current state: a branch, then a
        create from it. They get this sandbox's environment, labels, limits and timeout
        unless given others."""
        snapshot = self.branch()
        info = self._info
        children = Sandbox.create(
            snapshot.tag, count=n, client=self._client,
            timeout=timeout if timeout is not None else info.timeout,
            envs=envs if envs is not None else info.envs,
            metadata=metadata if metadata is not None else info.metadata, limits=info.limits)
        if self._owns_client:
            # They share this sandbox's client and keep it open after this one closes.
            for child in children:
                child._owns_client = True
                self._client._hold()
        return children

    def eval(self, code: str, timeout: Optional[float] = None) -> EvalResult:
        """Evaluates Python ``code`` in the sandbox's warm interpreter (its state persists
        between calls). An exception in the code is in the result's ``error``; a timeout
        raises :class:`~forkd.errors.TimeoutError` (the interpreter restarts, state lost)."""
        return self._call(_api.eval_call(self.id, code, timeout))


class CommandHandle:
    """A command running in the background: wait for it or kill it."""

    def __init__(self, sandbox: Sandbox, pid: int, *, check: bool = False,
                 on_stdout: Optional[OutputCallback] = None,
                 on_stderr: Optional[OutputCallback] = None):
        self._sandbox = sandbox
        #: Its process id in the guest.
        self.pid = pid
        self._check = check
        self._callbacks = (on_stdout, on_stderr)

    def __repr__(self) -> str:
        return f"CommandHandle(sandbox={self._sandbox.id!r}, pid={self.pid})"

    def wait(self, timeout: Optional[float] = None) -> CommandResult:
        """Waits for the command to end (at most ``timeout`` seconds, else
        :class:`~forkd.errors.TimeoutError`) and returns its result with its output (the last
        MiB of each stream). The output callbacks, if any, get it now."""
        state, result = self._sandbox._call(_api.wait_process(self._sandbox.id, self.pid, timeout))
        if state != "running":
            _deliver(result, *self._callbacks)
        return _api.finished(state, result, self._check)

    def kill(self, signal: Optional[str] = None) -> None:
        """Sends ``signal`` (default KILL) to the command's process group."""
        self._sandbox._call(_api.kill_process(self._sandbox.id, self.pid, signal))


def _deliver(result: CommandResult, on_stdout: Optional[OutputCallback],
             on_stderr: Optional[OutputCallback]) -> None:
    if on_stdout is not None and result.stdout:
        on_stdout(result.stdout)
    if on_stderr is not None and result.stderr:
        on_stderr(result.stderr)


class Commands:
    """``sandbox.commands``: run commands in the sandbox."""

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    @overload
    def run(self, cmd: Cmd, *, envs: Optional[Mapping[str, str]] = None,
            cwd: Optional[str] = None, timeout: Optional[float] = None,
            stdin: Union[str, bytes, None] = None, on_stdout: Optional[OutputCallback] = None,
            on_stderr: Optional[OutputCallback] = None, background: Literal[False] = False,
            check: bool = False) -> CommandResult: ...

    @overload
    def run(self, cmd: Cmd, *, envs: Optional[Mapping[str, str]] = None,
            cwd: Optional[str] = None, timeout: Optional[float] = None,
            stdin: Union[str, bytes, None] = None, on_stdout: Optional[OutputCallback] = None,
            on_stderr: Optional[OutputCallback] = None, background: Literal[True],
            check: bool = False) -> CommandHandle: ...

    def run(self, cmd: Cmd, *, envs: Optional[Mapping[str, str]] = None,
            cwd: Optional[str] = None, timeout: Optional[float] = None,
            stdin: Union[str, bytes, None] = None, on_stdout: Optional[OutputCallback] = None,
            on_stderr: Optional[OutputCallback] = None, background: bool = False,
            check: bool = False) -> Union[CommandResult, CommandHandle]:
        """Runs ``cmd`` (a string for ``sh -c``, or an argument vector) and returns its result.

        Args:
            envs: Added to the sandbox's environment for this command.
            cwd: Absolute working directory in the guest.
            timeout: Seconds after which its process group is killed; then
                :class:`~forkd.errors.TimeoutError` is raised (its ``result`` has the output).
            stdin: Text given to its standard input.
            on_stdout, on_stderr: Called with each chunk of output as it arrives (for a
                background command: with all of it, at the wait).
            background: Start it and return a :class:`CommandHandle` at once.
            check: Raise :class:`~forkd.errors.CommandExitError` on a non-zero exit.
        """
        body = _api.exec_body(cmd, envs=envs, cwd=cwd, timeout=timeout, stdin=stdin)
        if background:
            pid = self._sandbox._call(_api.start_process(self._sandbox.id, body))
            return CommandHandle(self._sandbox, pid, check=check, on_stdout=on_stdout,
                                 on_stderr=on_stderr)
        stream = _api.ExecStream(on_stdout, on_stderr)
        transport = self._sandbox.client._transport
        with transport.stream(_api.exec_call(self._sandbox.id, body)) as response:
            for line in response.iter_lines():
                callback = stream.feed(line)
                if callback is not None:
                    callback[0](callback[1])
        return _api.checked(stream.result(), check)

    def list(self) -> List[ProcessInfo]:
        """The background commands: running ones and ended ones not yet waited for."""
        return self._sandbox._call(_api.list_processes(self._sandbox.id))

    def connect(self, pid: int) -> CommandHandle:
        """A handle on the background command ``pid``."""
        return CommandHandle(self._sandbox, pid)

    def kill(self, pid: int, signal: Optional[str] = None) -> None:
        """Sends ``signal`` (default KILL) to background command ``pid``'s process group."""
        self._sandbox._call(_api.kill_process(self._sandbox.id, pid, signal))


class FileStream:
    """A file being downloaded: iterate over its chunks of bytes; close it (or use it as a
    context manager) when done early."""

    def __init__(self, sandbox: Sandbox, path: str):
        self._context = sandbox.client._transport.stream(_api.download(sandbox.id, path))
        self._response: httpx.Response = self._context.__enter__()
        self._endpoint = sandbox.client.endpoint
        self._closed = False

    @property
    def size(self) -> Optional[int]:
        """The file's size in bytes, as the daemon announced it."""
        length = self._response.headers.get("content-length")
        return int(length) if length is not None else None

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._response.iter_bytes():
                yield chunk
        except httpx.HTTPError as e:
            raise translate(e, self._endpoint) from None
        finally:
            self.close()

    def __enter__(self) -> "FileStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ends the download."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self._context.__exit__(None, None, None)


class Files:
    """``sandbox.files``: the sandbox's filesystem. Paths are absolute paths in the guest."""

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    @overload
    def read(self, path: str, *, format: Literal["text"] = "text") -> str: ...

    @overload
    def read(self, path: str, *, format: Literal["bytes"]) -> bytes: ...

    @overload
    def read(self, path: str, *, format: Literal["stream"]) -> FileStream: ...

    def read(self, path: str, *, format: str = "text") -> Union[str, bytes, FileStream]:
        """The file's contents: ``text`` (UTF-8, undecodable bytes replaced), ``bytes``, or
        ``stream`` (a :class:`FileStream` of chunks, for large files)."""
        _api.check_format(format)
        if format == "stream":
            return FileStream(self._sandbox, path)
        data = self._sandbox._call(_api.read_file(self._sandbox.id, path))
        return data if format == "bytes" else data.decode(errors="replace")

    def write(self, path: str, data: WriteData, *, mode: Optional[int] = None,
              create_dirs: bool = True) -> WriteInfo:
        """Writes ``data`` (str, bytes, a file object or an iterable of byte chunks, streamed)
        to ``path``; the file appears whole when the upload ends. ``mode``: permission bits
        (e.g. ``0o755``); ``create_dirs``: make missing parent directories."""
        return self._sandbox._call(
            _api.upload(self._sandbox.id, path, sync_body(data), mode, create_dirs))

    def list(self, path: str) -> List[EntryInfo]:
        """The entries of directory ``path``, sorted by name."""
        return self._sandbox._call(_api.list_dir(self._sandbox.id, path))

    def stat(self, path: str) -> EntryInfo:
        """The kind, size, mode, time and owner of ``path`` (a final symlink not followed)."""
        return self._sandbox._call(_api.stat(self._sandbox.id, path))

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        try:
            self.stat(path)
        except NotFoundError as e:
            return _api.exists_from(e)
        return True

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file, or a directory (with ``recursive``, and everything in it)."""
        self._sandbox._call(_api.remove(self._sandbox.id, path, recursive))

    def make_dir(self, path: str, *, parents: bool = True, mode: Optional[int] = None) -> bool:
        """Creates directory ``path`` (with ``parents``: its missing parents too); returns
        False when it already existed."""
        return self._sandbox._call(_api.make_dir(self._sandbox.id, path, parents, mode))


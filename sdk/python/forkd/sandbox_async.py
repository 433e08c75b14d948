"""``forkd.AsyncSandbox``: the async twin of :class:`forkd.Sandbox` (same calls, awaited).

The requests and the parsing of answers are shared with the sync SDK (``forkd._api``); only
the sending differs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import (
    Any, AsyncIterator, Awaitable, Callable, List, Literal, Mapping, Optional, Sequence, Tuple, Union,
    overload,
)

import httpx

from . import _api
from ._api import Cmd
from ._transport import translate
from ._upload import async_body
from .client import AsyncClient
from .errors import NotFoundError
from .models import (
    CommandResult, EntryInfo, EvalResult, Limits, ProcessInfo, SandboxInfo, Snapshot, WriteInfo,
)

__all__ = ["AsyncSandbox", "AsyncCommands", "AsyncCommandHandle", "AsyncFiles", "AsyncFileStream"]

LimitsArg = Union[Limits, Mapping[str, Any], None]
#: An output callback: a function or a coroutine function, called with each chunk.
AsyncOutputCallback = Callable[[str], Union[Any, Awaitable[Any]]]


def _client(client: Optional[AsyncClient], host: Optional[str],
            token: Optional[str]) -> Tuple[AsyncClient, bool]:
    if client is not None:
        return client, False
    return AsyncClient(host, token), True


@contextlib.asynccontextmanager
async def _closed_unless_held(client: AsyncClient, owned: bool) -> AsyncIterator[None]:
    """Closes a client made for a call when no sandbox came to hold it."""
    try:
        yield
    finally:
        if owned and client._holders == 0:
            await client.aclose()


async def _invoke(callback: Optional[AsyncOutputCallback], text: str) -> None:
    if callback is None:
        return
    outcome = callback(text)
    if asyncio.iscoroutine(outcome):
        await outcome


class AsyncSandbox:
    """A sandbox, driven with async/await (see :class:`forkd.Sandbox` for every call).

    As an async context manager it is killed on exit.
    """

    def __init__(self, info: SandboxInfo, client: AsyncClient, *, owns_client: bool = False):
        self._info = info
        self._client = client
        # Whether this sandbox holds a share of a client made for it (see Client._hold).
        self._owns_client = owns_client
        if owns_client:
            client._hold()
        #: Commands run in the sandbox.
        self.commands = AsyncCommands(self)
        #: The sandbox's files.
        self.files = AsyncFiles(self)

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, tag={self._info.tag!r}, state={self._info.state!r})"

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.kill()
        except NotFoundError:
            pass
        finally:
            await self.close()

    @property
    def id(self) -> str:
        """The sandbox's id."""
        return self._info.id

    @property
    def info(self) -> SandboxInfo:
        """The record as last seen (see :meth:`get_info` for a fresh one)."""
        return self._info

    @property
    def client(self) -> AsyncClient:
        """The client this sandbox talks through."""
        return self._client

    async def _call(self, call: "_api.Call[Any]") -> Any:
        return await self._client._transport.call(call)

    @overload
    @classmethod
    async def create(cls, tag: str, *, timeout: Optional[float] = None,
                     envs: Optional[Mapping[str, str]] = None,
                     metadata: Optional[Mapping[str, str]] = None, limits: LimitsArg = None,
                     allow: Optional[Sequence[str]] = None, allow_dns: Optional[bool] = None,
                     publish: Optional[Sequence[str]] = None,
                     count: None = None, host: Optional[str] = None,
                     token: Optional[str] = None,
                     client: Optional[AsyncClient] = None) -> "AsyncSandbox": ...

    @overload
    @classmethod
    async def create(cls, tag: str, *, timeout: Optional[float] = None,
                     envs: Optional[Mapping[str, str]] = None,
                     metadata: Optional[Mapping[str, str]] = None, limits: LimitsArg = None,
                     allow: Optional[Sequence[str]] = None, allow_dns: Optional[bool] = None,
                     publish: Optional[Sequence[str]] = None,
                     count: int, host: Optional[str] = None, token: Optional[str] = None,
                     client: Optional[AsyncClient] = None) -> List["AsyncSandbox"]: ...

    @classmethod
    async def create(cls, tag: str, *, timeout: Optional[float] = None,
                     envs: Optional[Mapping[str, str]] = None,
                     metadata: Optional[Mapping[str, str]] = None, limits: LimitsArg = None,
                     allow: Optional[Sequence[str]] = None, allow_dns: Optional[bool] = None,
                     publish: Optional[Sequence[str]] = None,
                     count: Optional[int] = None, host: Optional[str] = None,
                     token: Optional[str] = None, client: Optional[AsyncClient] = None,
                     ) -> Union["AsyncSandbox", List["AsyncSandbox"]]:
        """Forks a sandbox (or ``count``: a list) from snapshot ``tag``; see
        :meth:`forkd.Sandbox.create`."""
        c, owned = _client(client, host, token)
        async with _closed_unless_held(c, owned):
            infos = await c._transport.call(_api.create_sandboxes(
                tag, count=1 if count is None else count, timeout=timeout, envs=envs,
                metadata=metadata, limits=limits, allow=allow, allow_dns=allow_dns,
                publish=publish))
            made = [cls(info, c, owns_client=owned) for info in infos]
        return made[0] if count is None else made

    @classmethod
    async def connect(cls, sandbox_id: str, *, host: Optional[str] = None,
                      token: Optional[str] = None,
                      client: Optional[AsyncClient] = None) -> "AsyncSandbox":
        """The sandbox ``sandbox_id``; NotFoundError if there is none."""
        c, owned = _client(client, host, token)
        async with _closed_unless_held(c, owned):
            info = await c._transport.call(_api.get_sandbox(sandbox_id))
            return cls(info, c, owns_client=owned)

    @classmethod
    async def list(cls, tag: Optional[str] = None, metadata: Optional[Mapping[str, str]] = None,
                   *, host: Optional[str] = None, token: Optional[str] = None,
                   client: Optional[AsyncClient] = None) -> List["AsyncSandbox"]:
        """The daemon's sandboxes, filtered by snapshot ``tag`` and ``metadata`` labels."""
        c, owned = _client(client, host, token)
        async with _closed_unless_held(c, owned):
            infos = await c._transport.call(_api.list_sandboxes(tag, metadata))
            return [cls(info, c, owns_client=owned) for info in infos]

    @classmethod
    async def resume(cls, sandbox_id: str, *, timeout: Optional[float] = None,
                     host: Optional[str] = None, token: Optional[str] = None,
                     client: Optional[AsyncClient] = None) -> "AsyncSandbox":
        """Restores the paused sandbox ``sandbox_id`` where it left off."""
        c, owned = _client(client, host, token)
        async with _closed_unless_held(c, owned):
            info = await c._transport.call(_api.resume(sandbox_id, timeout))
            return cls(info, c, owns_client=owned)

    async def get_info(self) -> SandboxInfo:
        """The sandbox's record, fresh from the daemon."""
        self._info = await self._call(_api.get_sandbox(self.id))
        return self._info

    async def kill(self) -> None:
        """Kills the sandbox and removes its files."""
        await self._call(_api.kill_sandbox(self.id))

    async def close(self) -> None:
        """Closes the connection this sandbox made for itself (the sandbox runs on)."""
        if self._owns_client:
            self._owns_client = False
            await self._client._release()

    async def set_timeout(self, seconds: float) -> None:
        """Kills the sandbox ``seconds`` from now."""
        self._info = await self._call(_api.set_timeout(self.id, seconds))

    async def pause(self) -> None:
        """Suspends the sandbox to disk (see :meth:`forkd.Sandbox.pause`)."""
        self._info = await self._call(_api.pause(self.id))

    async def logs(self, tail: Optional[int] = None) -> str:
        """The sandbox's serial console since it was restored."""
        return await self._call(_api.logs(self.id, tail))

    async def branch(self, tag: Optional[str] = None, diff: bool = True) -> Snapshot:
        """Snapshots the running sandbox into a new tag (see :meth:`forkd.Sandbox.branch`)."""
        return await self._call(_api.branch(self.id, tag, diff))

    async def fork(self, n: int, *, timeout: Optional[float] = None,
                   envs: Optional[Mapping[str, str]] = None,
                   metadata: Optional[Mapping[str, str]] = None) -> List["AsyncSandbox"]:
        """``n`` new sandboxes continuing from this one's current state (branch + create)."""
        snapshot = await self.branch()
        info = self._info
        children = await AsyncSandbox.create(
            snapshot.tag, count=n, client=self._client,
            timeout=timeout if timeout is not None else info.timeout,
            envs=envs if envs is not None else info.envs,
            metadata=metadata if metadata is not None else info.metadata, limits=info.limits)
        if self._owns_client:
            for child in children:  # they share this sandbox's client, as in forkd.Sandbox
                child._owns_client = True
                self._client._hold()
        return children

    async def eval(self, code: str, timeout: Optional[float] = None) -> EvalResult:
        """Evaluates Python ``code`` in the sandbox's warm interpreter."""
        return await self._call(_api.eval_call(self.id, code, timeout))


class AsyncCommandHandle:
    """A command running in the background (see :class:`forkd.CommandHandle`)."""

    def __init__(self, sandbox: AsyncSandbox, pid: int, *, check: bool = False,
                 on_stdout: Optional[AsyncOutputCallback] = None,
                 on_stderr: Optional[AsyncOutputCallback] = None):
        self._sandbox = sandbox
        #: Its process id in the guest.
        self.pid = pid
        self._check = check
        self._callbacks = (on_stdout, on_stderr)

    def __repr__(self) -> str:
        return f"AsyncCommandHandle(sandbox={self._sandbox.id!r}, pid={self.pid})"

    async def wait(self, timeout: Optional[float] = None) -> CommandResult:
        """Waits for the command to end (at most ``timeout`` seconds) and returns its result."""
        state, result = await self._sandbox._call(
            _api.wait_process(self._sandbox.id, self.pid, timeout))
        if state != "running":
            if result.stdout:
                await _invoke(self._callbacks[0], result.stdout)
            if result.stderr:
                await _invoke(self._callbacks[1], result.stderr)
        return _api.finished(state, result, self._check)

    async def kill(self, signal: Optional[str] = None) -> None:
        """Sends ``signal`` (default KILL) to the command's process group."""
        await self._sandbox._call(_api.kill_process(self._sandbox.id, self.pid, signal))


class AsyncCommands:
    """``sandbox.commands`` of an :class:`AsyncSandbox`."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sandbox = sandbox

    @overload
    async def run(self, cmd: Cmd, *, envs: Optional[Mapping[str, str]] = None,
                  cwd: Optional[str] = None, timeout: Optional[float] = None,
                  stdin: Union[str, bytes, None] = None,
                  on_stdout: Optional[AsyncOutputCallback] = None,
                  on_stderr: Optional[AsyncOutputCallback] = None,
                  background: Literal[False] = False, check: bool = False) -> CommandResult: ...

    @overload
    async def run(self, cmd: Cmd, *, envs: Optional[Mapping[str, str]] = None,
                  cwd: Optional[str] = None, timeout: Optional[float] = None,
                  stdin: Union[str, bytes, None] = None,
                  on_stdout: Optional[AsyncOutputCallback] = None,
                  on_stderr: Optional[AsyncOutputCallback] = None,
                  background: Literal[True], check: bool = False) -> AsyncCommandHandle: ...

    async def run(self, cmd: Cmd, *, envs: Optional[Mapping[str, str]] = None,
                  cwd: Optional[str] = None, timeout: Optional[float] = None,
                  stdin: Union[str, bytes, None] = None,
                  on_stdout: Optional[AsyncOutputCallback] = None,
                  on_stderr: Optional[AsyncOutputCallback] = None, background: bool = False,
                  check: bool = False) -> Union[CommandResult, AsyncCommandHandle]:
        """Runs ``cmd`` (see :meth:`forkd.Commands.run`); callbacks may be coroutine functions."""
        body = _api.exec_body(cmd, envs=envs, cwd=cwd, timeout=timeout, stdin=stdin)
        if background:
            pid = await self._sandbox._call(_api.start_process(self._sandbox.id, body))
            return AsyncCommandHandle(self._sandbox, pid, check=check, on_stdout=on_stdout,
                                      on_stderr=on_stderr)
        stream = _api.ExecStream(on_stdout, on_stderr)
        transport = self._sandbox.client._transport
        async with transport.stream(_api.exec_call(self._sandbox.id, body)) as response:
            async for line in response.aiter_lines():
                callback = stream.feed(line)
                if callback is not None:
                    await _invoke(*callback)
        return _api.checked(stream.result(), check)

    async def list(self) -> List[ProcessInfo]:
        """The background commands: running ones and ended ones not yet waited for."""
        return await self._sandbox._call(_api.list_processes(self._sandbox.id))

    def connect(self, pid: int) -> AsyncCommandHandle:
        """A handle on the background command ``pid``."""
        return AsyncCommandHandle(self._sandbox, pid)

    async def kill(self, pid: int, signal: Optional[str] = None) -> None:
        """Sends ``signal`` (default KILL) to background command ``pid``'s process group."""
        await self._sandbox._call(_api.kill_process(self._sandbox.id, pid, signal))


class AsyncFileStream:
    """A file being downloaded: ``async for chunk in stream``; ``await stream.aclose()`` (or
    ``async with``) when done early. Made by ``await files.read(path, format="stream")``."""

    def __init__(self, sandbox: AsyncSandbox, context: Any, response: httpx.Response):
        self._context = context
        self._response = response
        self._endpoint = sandbox.client.endpoint
        self._closed = False

    @classmethod
    async def open(cls, sandbox: AsyncSandbox, path: str) -> "AsyncFileStream":
        context = sandbox.client._transport.stream(_api.download(sandbox.id, path))
        return cls(sandbox, context, await context.__aenter__())

    @property
    def size(self) -> Optional[int]:
        """The file's size in bytes, as the daemon announced it."""
        length = self._response.headers.get("content-length")
        return int(length) if length is not None else None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as e:
            raise translate(e, self._endpoint) from None
        finally:
            await self.aclose()

    async def __aenter__(self) -> "AsyncFileStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Ends the download."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                await self._context.__aexit__(None, None, None)


class AsyncFiles:
    """``sandbox.files`` of an :class:`AsyncSandbox` (see :class:`forkd.Files`)."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sandbox = sandbox

    @overload
    async def read(self, path: str, *, format: Literal["text"] = "text") -> str: ...

    @overload
    async def read(self, path: str, *, format: Literal["bytes"]) -> bytes: ...

    @overload
    async def read(self, path: str, *, format: Literal["stream"]) -> AsyncFileStream: ...

    async def read(self, path: str, *,
                   format: str = "text") -> Union[str, bytes, AsyncFileStream]:
        """The file's contents as ``text``, ``bytes`` or a ``stream`` of chunks."""
        _api.check_format(format)
        if format == "stream":
            return await AsyncFileStream.open(self._sandbox, path)
        data = await self._sandbox._call(_api.read_file(self._sandbox.id, path))
        return data if format == "bytes" else data.decode(errors="replace")

    async def write(self, path: str, data: Any, *, mode: Optional[int] = None,
                    create_dirs: bool = True) -> WriteInfo:
        """Writes ``data`` (str, bytes, a file object, or a sync or async iterable of byte
        chunks, streamed) to ``path``."""
        return await self._sandbox._call(
            _api.upload(self._sandbox.id, path, async_body(data), mode, create_dirs))

    async def list(self, path: str) -> List[EntryInfo]:
        """The entries of directory ``path``, sorted by name."""
        return await self._sandbox._call(_api.list_dir(self._sandbox.id, path))

    async def stat(self, path: str) -> EntryInfo:
        """The stat of ``path``."""
        return await self._sandbox._call(_api.stat(self._sandbox.id, path))

    async def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        try:
            await self.stat(path)
        except NotFoundError as e:
            return _api.exists_from(e)
        return True

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file, or a directory (with ``recursive``)."""
        await self._sandbox._call(_api.remove(self._sandbox.id, path, recursive))

    async def make_dir(self, path: str, *, parents: bool = True,
                       mode: Optional[int] = None) -> bool:
        """Creates directory ``path``; False when it already existed."""
        return await self._sandbox._call(_api.make_dir(self._sandbox.id, path, parents, mode))

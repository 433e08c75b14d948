"""``forkd.Client`` and ``forkd.AsyncClient``: a connection to the daemon, the snapshot store
(list, get, delete, pull with progress) and the daemon's health and version."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, List, Optional, Union

from . import _api
from ._config import Endpoint, resolve_endpoint
from ._transport import DEFAULT_REQUEST_TIMEOUT, AsyncTransport, SyncTransport
from .errors import TimeoutError
from .models import Job, SnapshotInfo, VersionInfo

__all__ = ["Client", "AsyncClient"]

ProgressCallback = Callable[[Job], Any]


def _pull_deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _check_deadline(job: Job, deadline: Optional[float]) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"pull of {job.target} still running after its timeout "
                           f"(job {job.id}, {job.bytes_done} bytes so far)", code="pull_timeout")


class Client:
    """A connection to a forkd daemon.

    Args:
        host: A Unix socket path, ``unix:PATH``, or ``http(s)://HOST:PORT``; default
            ``FORKD_HOST``, else the daemon's default socket.
        token: Bearer token for a TCP daemon; default ``FORKD_TOKEN``.
        request_timeout: Seconds to wait for an answer (None: no limit). Commands, waits and
            evaluations are bounded by their own timeouts instead.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, host: Optional[str] = None, token: Optional[str] = None, *,
                 request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT):
        self.endpoint: Endpoint = resolve_endpoint(host, token)
        self._transport = SyncTransport(self.endpoint, request_timeout)
        # Sandboxes that made this client for themselves (and those forked or listed with
        # them) share it; the last of them to close closes it.
        self._holders = 0

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connections."""
        self._transport.close()

    def _hold(self) -> None:
        self._holders += 1

    def _release(self) -> None:
        self._holders -= 1
        if self._holders <= 0:
            self.close()

    def health(self) -> bool:
        """True when the daemon answers and is serving."""
        return self._transport.call(_api.health())

    def version(self) -> VersionInfo:
        """The daemon's version and API version."""
        return self._transport.call(_api.version())

    def list_snapshots(self) -> List[SnapshotInfo]:
        """The snapshots in the daemon's store."""
        return self._transport.call(_api.list_snapshots())

    def get_snapshot(self, tag: str) -> SnapshotInfo:
        """One snapshot; :class:`~forkd.errors.NotFoundError` when there is none."""
        return self._transport.call(_api.get_snapshot(tag))

    def delete_snapshot(self, tag: str, *, cascade: bool = False, force: bool = False) -> List[str]:
        """Deletes a snapshot (with ``cascade``, the snapshots that are diffs of it too) and
        returns every tag removed. Refused (ConflictError) while others depend on it."""
        return self._transport.call(_api.delete_snapshot(tag, cascade, force))

    def get_job(self, job_id: str) -> Job:
        """One of the daemon's jobs (a pull), with its progress."""
        return self._transport.call(_api.get_job(job_id))

    def pull(self, reference: str, *, tag: Optional[str] = None, hub: Optional[str] = None,
             force: bool = False, on_progress: Optional[ProgressCallback] = None,
             poll_interval: float = 0.25, timeout: Optional[float] = None) -> SnapshotInfo:
        """Pulls a snapshot (``namespace/name[@version]`` from the hub, a pack URL, or a pack
        file on the daemon's host) and returns it once installed.

        ``on_progress`` is called with the :class:`~forkd.models.Job` at every poll (its
        ``bytes_done`` and ``bytes_total``). A failed pull raises the daemon's error.
        """
        job = self._transport.call(_api.start_pull(reference, tag, hub, force))
        deadline = _pull_deadline(timeout)
        while True:
            if on_progress is not None:
                on_progress(job)
            if job.state != "running":
                return self.get_snapshot(_api.pulled_tag(job))
            _check_deadline(job, deadline)
            time.sleep(poll_interval)
            job = self.get_job(job.id)


class AsyncClient:
    """The async twin of :class:`Client` (same arguments), on ``httpx.AsyncClient``.

    Use it as an async context manager, or await :meth:`aclose`.
    """

    def __init__(self, host: Optional[str] = None, token: Optional[str] = None, *,
                 request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT):
        self.endpoint: Endpoint = resolve_endpoint(host, token)
        self._transport = AsyncTransport(self.endpoint, request_timeout)
        self._holders = 0  # as Client's

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the connections."""
        await self._transport.aclose()

    def _hold(self) -> None:
        self._holders += 1

    async def _release(self) -> None:
        self._holders -= 1
        if self._holders <= 0:
            await self.aclose()

    async def health(self) -> bool:
        """True when the daemon answers and is serving."""
        return await self._transport.call(_api.health())

    async def version(self) -> VersionInfo:
        """The daemon's version and API version."""
        return await self._transport.call(_api.version())

    async def list_snapshots(self) -> List[SnapshotInfo]:
        """The snapshots in the daemon's store."""
        return await self._transport.call(_api.list_snapshots())

    async def get_snapshot(self, tag: str) -> SnapshotInfo:
        """One snapshot; :class:`~forkd.errors.NotFoundError` when there is none."""
        return await self._transport.call(_api.get_snapshot(tag))

    async def delete_snapshot(self, tag: str, *, cascade: bool = False,
                              force: bool = False) -> List[str]:
        """Deletes a snapshot and returns every tag removed (see :meth:`Client.delete_snapshot`)."""
        return await self._transport.call(_api.delete_snapshot(tag, cascade, force))

    async def get_job(self, job_id: str) -> Job:
        """One of the daemon's jobs (a pull), with its progress."""
        return await self._transport.call(_api.get_job(job_id))

    async def pull(self, reference: str, *, tag: Optional[str] = None, hub: Optional[str] = None,
                   force: bool = False,
                   on_progress: Optional[Callable[[Job], Union[Any, Awaitable[Any]]]] = None,
                   poll_interval: float = 0.25, timeout: Optional[float] = None) -> SnapshotInfo:
        """Pulls a snapshot and returns it once installed (see :meth:`Client.pull`);
        ``on_progress`` may be a coroutine function."""
        job = await self._transport.call(_api.start_pull(reference, tag, hub, force))
        deadline = _pull_deadline(timeout)
        while True:
            if on_progress is not None:
                outcome = on_progress(job)
                if asyncio.iscoroutine(outcome):
                    await outcome
            if job.state != "running":
                return await self.get_snapshot(_api.pulled_tag(job))
            _check_deadline(job, deadline)
            await asyncio.sleep(poll_interval)
            job = await self.get_job(job.id)

"""What the daemon's answers become: plain, typed, immutable records."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = [
    "Limits",
    "Network",
    "SandboxInfo",
    "Snapshot",
    "SnapshotInfo",
    "CommandResult",
    "ProcessInfo",
    "EntryInfo",
    "WriteInfo",
    "EvalError",
    "EvalResult",
    "Job",
    "VersionInfo",
]


@dataclass(frozen=True)
class Limits:
    """cgroup v2 limits on a sandbox's VMM process (None: unlimited)."""

    memory_mib: Optional[int] = None
    cpus: Optional[float] = None
    pids: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        return {k: v for k, v in (("memory_mib", self.memory_mib), ("cpus", self.cpus),
                                  ("pids", self.pids)) if v is not None}

    @classmethod
    def from_json(cls, data: Optional[Dict[str, Any]]) -> Optional["Limits"]:
        if not data:
            return None
        return cls(data.get("memory_mib"), data.get("cpus"), data.get("pids"))


@dataclass(frozen=True)
class Network:
    """A sandbox's network: its own namespace behind NAT, egress denied unless allowed."""

    #: What it may reach: ``CIDR[:PORT]``.
    allow: List[str]
    #: It may reach the host's resolvers (port 53).
    allow_dns: bool
    #: Host TCP ports forwarded to its guest ports, ``HOST_PORT:GUEST_PORT``.
    publish: List[str]
    #: The guest's own address in its network.
    guest_address: str
    #: Where the daemon's host reaches it (None while paused).
    address: Optional[str] = None
    #: Its network namespace on the daemon's host (None while paused).
    namespace: Optional[str] = None
    #: Why its snapshot's recorded policy was not applied (a pulled snapshot's).
    note: Optional[str] = None

    @classmethod
    def from_json(cls, data: Optional[Dict[str, Any]]) -> Optional["Network"]:
        if not data:
            return None
        return cls(
            allow=list(data.get("allow") or []),
            allow_dns=bool(data.get("allow_dns", False)),
            publish=list(data.get("publish") or []),
            guest_address=data.get("guest_address", ""),
            address=data.get("address"),
            namespace=data.get("namespace"),
            note=data.get("note"),
        )


@dataclass(frozen=True)
class SandboxInfo:
    """One sandbox as the daemon records it."""

    id: str
    #: The snapshot it was forked from.
    tag: str
    #: ``running`` or ``paused``.
    state: str
    #: RFC 3339, UTC.
    created_at: str
    metadata: Dict[str, str]
    envs: Dict[str, str]
    #: Its VMM process on the daemon's host (0 while paused).
    pid: int
    restore_ms: float
    #: Unix seconds after which it is killed; None: it lives until killed.
    expires_at: Optional[int] = None
    timeout: Optional[int] = None
    limits: Optional[Limits] = None
    #: Its network (None: its snapshot has no network device).
    network: Optional[Network] = None

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "SandboxInfo":
        return cls(
            id=data["id"],
            tag=data["tag"],
            state=data.get("state", "running"),
            created_at=data["created_at"],
            metadata=dict(data.get("metadata") or {}),
            envs=dict(data.get("env") or {}),
            pid=int(data.get("pid", 0)),
            restore_ms=float(data.get("restore_ms", 0.0)),
            expires_at=data.get("expires_at"),
            timeout=data.get("timeout_secs"),
            limits=Limits.from_json(data.get("limits")),
            network=Network.from_json(data.get("network")),
        )


@dataclass(frozen=True)
class Snapshot:
    """What :meth:`Sandbox.branch` made: a new snapshot tag sandboxes can be created from."""

    tag: str
    #: The sandbox it was branched from.
    sandbox_id: str
    #: ``diff`` or ``full``.
    mode: str
    #: The snapshot a diff is layered on.
    parent: Optional[str]
    #: How long the sandbox's guest was stopped.
    pause_ms: float
    total_ms: float
    pages_written: int

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Snapshot":
        return cls(
            tag=data["tag"],
            sandbox_id=data["id"],
            mode=data["mode"],
            parent=data.get("parent"),
            pause_ms=float(data["pause_ms"]),
            total_ms=float(data["total_ms"]),
            pages_written=int(data["pages_written"]),
        )


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot in the daemon's store."""

    tag: str
    created_at: str
    memory_mib: int
    vcpus: int
    kernel: str
    description: str
    #: The snapshot this one is a diff against ("" when it stands alone).
    parent_tag: str
    package: str
    package_version: str
    logical_bytes: int
    disk_bytes: int

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "SnapshotInfo":
        names = cls.__dataclass_fields__  # type: ignore[attr-defined]
        return cls(**{name: data[name] for name in names})


def _stream_text(data: Dict[str, Any], name: str) -> bytes:
    """A stream given as ``name`` (UTF-8 text) or ``name_b64`` (other bytes)."""
    if data.get(name) is not None:
        return str(data[name]).encode()
    if data.get(f"{name}_b64") is not None:
        return base64.b64decode(data[f"{name}_b64"])
    return b""


@dataclass(frozen=True)
class CommandResult:
    """How a command ended and what it wrote."""

    stdout: str
    stderr: str
    #: None when a signal ended it.
    exit_code: Optional[int]
    signal: Optional[int] = None
    #: Its own timeout expired and it was killed.
    timed_out: bool = False
    duration_ms: Optional[int] = None
    #: A background command's pid in the guest.
    pid: Optional[int] = None
    stdout_bytes: bytes = field(default=b"", repr=False)
    stderr_bytes: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        """It exited with code 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class ProcessInfo:
    """A background process in a sandbox."""

    pid: int
    argv: List[str]
    #: ``running`` or ``exited``.
    state: str
    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    started_ms: int
    ended_ms: Optional[int]
    stdout_bytes: int
    stderr_bytes: int

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ProcessInfo":
        return cls(
            pid=int(data["pid"]), argv=list(data.get("argv") or []), state=data["state"],
            exit_code=data.get("exit_code"), signal=data.get("signal"),
            timed_out=bool(data.get("timed_out")), started_ms=int(data.get("started_ms", 0)),
            ended_ms=data.get("ended_ms"), stdout_bytes=int(data.get("stdout_bytes", 0)),
            stderr_bytes=int(data.get("stderr_bytes", 0)),
        )


def command_result_of_wait(data: Dict[str, Any]) -> CommandResult:
    """The result of a background process's wait."""
    out, err = _stream_text(data, "stdout"), _stream_text(data, "stderr")
    started, ended = data.get("started_ms"), data.get("ended_ms")
    return CommandResult(
        stdout=out.decode(errors="replace"), stderr=err.decode(errors="replace"),
        exit_code=data.get("exit_code"), signal=data.get("signal"),
        timed_out=bool(data.get("timed_out")),
        duration_ms=(ended - started) if started is not None and ended is not None else None,
        pid=data.get("pid"), stdout_bytes=out, stderr_bytes=err,
    )


@dataclass(frozen=True)
class EntryInfo:
    """A file's or directory's stat."""

    name: str
    path: str
    #: ``file``, ``dir``, ``symlink`` or ``other``.
    type: str
    size: int
    #: Permission bits.
    mode: int
    mtime_ms: int
    uid: int
    gid: int
    symlink_target: Optional[str] = None

    @classmethod
    def from_stat(cls, path: str, stat: Dict[str, Any]) -> "EntryInfo":
        return cls(
            name=path.rstrip("/").rsplit("/", 1)[-1] or "/", path=path, type=stat["kind"],
            size=int(stat["size"]), mode=int(stat["mode"]), mtime_ms=int(stat["mtime_ms"]),
            uid=int(stat["uid"]), gid=int(stat["gid"]), symlink_target=stat.get("link_target"),
        )


@dataclass(frozen=True)
class WriteInfo:
    """A written file."""

    path: str
    size: int


@dataclass(frozen=True)
class EvalError:
    """The exception evaluated code raised."""

    name: str
    value: str
    traceback: str


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation in the warm interpreter gave."""

    stdout: str
    stderr: str
    #: ``repr()`` of the last expression's value, when it has one.
    value: Optional[str]
    error: Optional[EvalError]

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "EvalResult":
        error = data.get("error")
        return cls(
            stdout=data.get("stdout", ""), stderr=data.get("stderr", ""), value=data.get("value"),
            error=EvalError(error["type"], error["message"], error["traceback"]) if error else None,
        )


@dataclass(frozen=True)
class Job:
    """A long-running piece of the daemon's work (a pull) and its progress."""

    id: str
    kind: str
    target: str
    #: ``running``, ``succeeded`` or ``failed``.
    state: str
    started_at: str
    bytes_done: int
    bytes_total: Optional[int]
    result: Any = None
    error_code: Optional[str] = None
    error_message: Optional[str] = None

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Job":
        error = data.get("error") or {}
        return cls(
            id=data["id"], kind=data["kind"], target=data["target"], state=data["state"],
            started_at=data["started_at"], bytes_done=int(data["bytes_done"]),
            bytes_total=data.get("bytes_total"), result=data.get("result"),
            error_code=error.get("code"), error_message=error.get("message"),
        )


@dataclass(frozen=True)
class VersionInfo:
    """The daemon's version and API version prefix."""

    version: str
    api: str

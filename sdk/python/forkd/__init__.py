"""forkd: fork microVMs from warmed snapshots, from Python.

A client of the forkd daemon (``forkd serve``): over its Unix socket by default, or the
``host=``/``token=`` arguments, or ``FORKD_HOST``/``FORKD_TOKEN``.

    from forkd import Sandbox

    with Sandbox.create("python") as sandbox:
        print(sandbox.commands.run("echo hi").stdout)
"""

from ._config import default_socket_path
from .client import AsyncClient, Client
from .errors import (
    AuthenticationError, BadRequestError, CommandExitError, ConflictError, DaemonNotRunningError,
    ForkdError, NotFoundError, RateLimitError, ServerError, TimeoutError, UnprocessableError,
)
from .models import (
    CommandResult, EntryInfo, EvalError, EvalResult, Job, Limits, Network, ProcessInfo,
    SandboxInfo, Snapshot, SnapshotInfo, VersionInfo, WriteInfo,
)
from .sandbox import CommandHandle, Commands, Files, FileStream, Sandbox
from .sandbox_async import (
    AsyncCommandHandle, AsyncCommands, AsyncFiles, AsyncFileStream, AsyncSandbox,
)

def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "0"
    try:
        return version("forkd")
    except PackageNotFoundError:  # imported from a source tree
        return "0+source"


#: The installed package's version (the forkd binary's, from the wheel's metadata).
__version__ = _version()

__all__ = [
    "Sandbox", "AsyncSandbox", "Client", "AsyncClient",
    "Commands", "AsyncCommands", "CommandHandle", "AsyncCommandHandle",
    "Files", "AsyncFiles", "FileStream", "AsyncFileStream",
    "CommandResult", "EntryInfo", "EvalError", "EvalResult", "Job", "Limits", "Network",
    "ProcessInfo", "SandboxInfo", "Snapshot", "SnapshotInfo", "VersionInfo", "WriteInfo",
    "ForkdError", "BadRequestError", "AuthenticationError", "NotFoundError", "ConflictError",
    "UnprocessableError", "RateLimitError", "ServerError", "TimeoutError",
    "DaemonNotRunningError", "CommandExitError",
    "default_socket_path",
]

"""The exceptions the SDK raises.

Every error the daemon answers carries its JSON body's stable ``code`` (``not_found``,
``conflict``, ``no_agent``, ...), its one-line ``message`` and the HTTP ``status``.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any, Dict, Optional, Type

if TYPE_CHECKING:
    from .models import CommandResult

__all__ = [
    "ForkdError",
    "BadRequestError",
    "AuthenticationError",
    "NotFoundError",
    "ConflictError",
    "UnprocessableError",
    "RateLimitError",
    "ServerError",
    "TimeoutError",
    "DaemonNotRunningError",
    "CommandExitError",
]


class ForkdError(Exception):
    """Base of every forkd SDK error.

    Attributes:
        message: One line for a human.
        code: The daemon's machine-readable code (``not_found``, ``conflict``, ...), or
            None when the error did not come from the daemon.
        status: The HTTP status of the daemon's answer, or None.
    """

    def __init__(self, message: str, *, code: Optional[str] = None, status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        return self.message


class BadRequestError(ForkdError):
    """The daemon refused the request's arguments (HTTP 400)."""


class AuthenticationError(ForkdError):
    """The bearer token is missing or wrong (HTTP 401), or the guest refused access (403)."""


class NotFoundError(ForkdError):
    """No such sandbox, snapshot, file, process or job (HTTP 404)."""


class ConflictError(ForkdError):
    """The request does not fit the thing's state (HTTP 409): a paused sandbox, a snapshot
    without an agent (``no_agent``), a path that exists, a host port another sandbox has
    (``port_taken``), ..."""


class UnprocessableError(ForkdError):
    """Understood but impossible here (HTTP 422): resource limits on a host without cgroup v2
    controllers (``limits_unsupported``), a network for a snapshot without a network device
    (``no_network_device``), a command that cannot be started, a bad pack."""


class RateLimitError(ForkdError):
    """The daemon runs as many sandboxes as it may (HTTP 429)."""


class ServerError(ForkdError):
    """The daemon or the sandbox failed (HTTP 5xx)."""


class TimeoutError(ForkdError, builtins.TimeoutError):
    """A request, a command or an evaluation ran out of time.

    Also a :class:`builtins.TimeoutError`. ``result`` holds a command's output up to the
    moment it was killed, when there was a command.
    """

    def __init__(self, message: str, *, code: Optional[str] = None, status: Optional[int] = None,
                 result: Optional["CommandResult"] = None):
        super().__init__(message, code=code, status=status)
        self.result = result


class DaemonNotRunningError(ForkdError):
    """Nothing answers where the daemon should be; the message says how to start one."""


class CommandExitError(ForkdError):
    """A command run with ``check=True`` ended with a non-zero exit code (or a signal).

    ``result`` is its :class:`~forkd.models.CommandResult`; ``stdout``, ``stderr`` and
    ``exit_code`` are shortcuts to it.
    """

    def __init__(self, result: "CommandResult"):
        how = f"exit code {result.exit_code}" if result.signal is None else f"signal {result.signal}"
        last = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
        message = f"command ended with {how}" + (f": {last[0]}" if last else "")
        super().__init__(message, code="command_failed")
        self.result = result

    @property
    def stdout(self) -> str:
        return self.result.stdout

    @property
    def stderr(self) -> str:
        return self.result.stderr

    @property
    def exit_code(self) -> Optional[int]:
        return self.result.exit_code


_BY_CODE: Dict[str, Type[ForkdError]] = {
    "bad_request": BadRequestError,
    "unauthorized": AuthenticationError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "paused": ConflictError,
    "not_paused": ConflictError,
    "no_agent": ConflictError,
    "limits_unsupported": UnprocessableError,
    "port_taken": ConflictError,
    "no_network_device": UnprocessableError,
    "too_many_sandboxes": RateLimitError,
}

_BY_STATUS: Dict[int, Type[ForkdError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableError,
    429: RateLimitError,
}


def error_from_body(body: Any, status: Optional[int]) -> ForkdError:
    """The exception for the daemon's error body ``{"code", "message"}`` and status."""
    code = body.get("code") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message:
        message = f"the daemon answered HTTP {status} without an error message"
    message = " ".join(message.splitlines())
    code = code if isinstance(code, str) else None
    cls = _BY_STATUS.get(status or 0) or _BY_CODE.get(code or "")
    if cls is None:
        cls = ServerError if status is not None and status >= 500 else ForkdError
    return cls(message, code=code, status=status)

"""Sending a :class:`~forkd._api.Call` over httpx, sync and async, with the daemon's and the
network's failures turned into :mod:`forkd.errors` exceptions."""

from __future__ import annotations

import contextlib
import ssl
from typing import Any, AsyncIterator, Dict, Iterator, Optional, TypeVar

import httpx

from ._api import DEFAULT, Call, check
from ._config import Endpoint
from .errors import DaemonNotRunningError, ForkdError, TimeoutError

T = TypeVar("T")

#: Seconds to wait for a request's answer unless told otherwise (creating many sandboxes or
#: branching a large one takes a while); commands, waits and evaluations have no limit but
#: their own timeouts.
DEFAULT_REQUEST_TIMEOUT = 600.0
CONNECT_TIMEOUT = 10.0


def timeout_of(request_timeout: Optional[float]) -> httpx.Timeout:
    return httpx.Timeout(request_timeout, connect=CONNECT_TIMEOUT)


def translate(error: httpx.HTTPError, endpoint: Endpoint) -> ForkdError:
    """A transport failure as the SDK reports it."""
    certificate = _certificate_failure(error)
    if certificate:
        return ForkdError(
            f"TLS with the daemon at {endpoint.describe()}: {certificate}; trust its certificate "
            "with FORKD_CA_CERT", code="tls")
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        reason = str(error) or type(error).__name__
        return DaemonNotRunningError(
            f"no forkd daemon answers at {endpoint.describe()} ({reason}); start one with "
            "`forkd serve`, or point FORKD_HOST (or host=) at it",
            code="daemon_not_running",
        )
    if isinstance(error, httpx.TimeoutException):
        return TimeoutError(
            f"the daemon at {endpoint.describe()} did not answer in time ({type(error).__name__})",
            code="request_timeout",
        )
    return ForkdError(f"talking to the daemon at {endpoint.describe()}: {error}",
                      code="transport_error")


def _certificate_failure(error: BaseException) -> Optional[str]:
    """The reason of a failed certificate check somewhere in ``error``'s causes."""
    current: Optional[BaseException] = error
    for _ in range(5):
        if current is None:
            return None
        if isinstance(current, ssl.SSLCertVerificationError):
            return current.verify_message or str(current)
        if "CERTIFICATE_VERIFY_FAILED" in str(current):
            return str(current).split("] ", 1)[-1].split(" (_ssl", 1)[0]
        current = current.__cause__ or current.__context__
    return None


def request_kwargs(call: Call[Any]) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {"params": call.params or None}
    if call.json is not None:
        kwargs["json"] = call.json
    if call.content is not None:
        kwargs["content"] = call.content
        kwargs["headers"] = {"Content-Type": "application/octet-stream"}
    if call.timeout is not DEFAULT:
        kwargs["timeout"] = timeout_of(call.timeout)
    return kwargs


def sync_http(endpoint: Endpoint, request_timeout: Optional[float]) -> httpx.Client:
    transport = httpx.HTTPTransport(uds=endpoint.uds) if endpoint.uds else None
    return httpx.Client(base_url=endpoint.base_url, transport=transport, verify=endpoint.verify(),
                        headers=endpoint.headers(), timeout=timeout_of(request_timeout))


def async_http(endpoint: Endpoint, request_timeout: Optional[float]) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=endpoint.uds) if endpoint.uds else None
    return httpx.AsyncClient(base_url=endpoint.base_url, transport=transport,
                             verify=endpoint.verify(), headers=endpoint.headers(),
                             timeout=timeout_of(request_timeout))


class SyncTransport:
    """Sends calls on one ``httpx.Client``."""

    def __init__(self, endpoint: Endpoint, request_timeout: Optional[float]):
        self.endpoint = endpoint
        self.http = sync_http(endpoint, request_timeout)

    def call(self, call: Call[T]) -> T:
        try:
            response = self.http.request(call.method, call.path, **request_kwargs(call))
        except httpx.HTTPError as e:
            raise translate(e, self.endpoint) from None
        check(response)
        return call.parse(response)

    @contextlib.contextmanager
    def stream(self, call: Call[Any], **extra: Any) -> Iterator[httpx.Response]:
        """The response with its body left to read (an error status is raised first)."""
        kwargs = {**request_kwargs(call), **extra}
        try:
            with self.http.stream(call.method, call.path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    check(response)
                yield response
        except httpx.HTTPError as e:
            raise translate(e, self.endpoint) from None

    def close(self) -> None:
        self.http.close()


class AsyncTransport:
    """Sends calls on one ``httpx.AsyncClient``."""

    def __init__(self, endpoint: Endpoint, request_timeout: Optional[float]):
        self.endpoint = endpoint
        self.http = async_http(endpoint, request_timeout)

    async def call(self, call: Call[T]) -> T:
        try:
            response = await self.http.request(call.method, call.path, **request_kwargs(call))
        except httpx.HTTPError as e:
            raise translate(e, self.endpoint) from None
        check(response)
        return call.parse(response)

    @contextlib.asynccontextmanager
    async def stream(self, call: Call[Any], **extra: Any) -> AsyncIterator[httpx.Response]:
        """The response with its body left to read (an error status is raised first)."""
        kwargs = {**request_kwargs(call), **extra}
        try:
            async with self.http.stream(call.method, call.path, **kwargs) as response:
                if response.status_code >= 400:
                    await response.aread()
                    check(response)
                yield response
        except httpx.HTTPError as e:
            raise translate(e, self.endpoint) from None

    async def aclose(self) -> None:
        await self.http.aclose()

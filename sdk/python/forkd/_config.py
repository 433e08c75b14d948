"""Where the daemon is: an explicit ``host``, else ``FORKD_HOST``, else the default socket (the
same rule as ``forkd serve``'s default ``--socket``)."""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Optional, Union

from .errors import ForkdError

#: The base URL of requests over a Unix socket (the host part is not used).
UNIX_BASE_URL = "http://forkd"


def default_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/forkd/forkd.sock``; else ``/run/forkd/forkd.sock`` for root, else
    ``$TMPDIR/forkd-<uid>/forkd.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "forkd", "forkd.sock")
    uid = os.getuid()
    if uid == 0:
        return "/run/forkd/forkd.sock"
    return os.path.join(tempfile.gettempdir(), f"forkd-{uid}", "forkd.sock")


@dataclass(frozen=True)
class Endpoint:
    """A resolved daemon address: a Unix socket (``uds``) or a TCP base URL."""

    base_url: str
    uds: Optional[str] = None
    token: Optional[str] = None
    #: A PEM file of certificates to trust for an https daemon, besides the usual ones
    #: (``FORKD_CA_CERT``).
    ca_cert: Optional[str] = None

    def describe(self) -> str:
        """``unix:/path`` or ``http://host:port``, as error messages name it."""
        return f"unix:{self.uds}" if self.uds is not None else self.base_url

    def verify(self) -> Union[bool, ssl.SSLContext]:
        """httpx's ``verify``: the default trust, plus ``ca_cert`` when there is one."""
        if not self.ca_cert:
            return True
        context = ssl.create_default_context()
        try:
            context.load_verify_locations(cafile=self.ca_cert)
        except (OSError, ssl.SSLError) as e:
            raise ForkdError(f"FORKD_CA_CERT {self.ca_cert}: {e}") from None
        return context

    def headers(self) -> dict:
        """The Authorization header for a TCP daemon with a token."""
        if self.uds is None and self.token:
            return {"Authorization": f"Bearer {self.token}"}
        return {}


def resolve_endpoint(host: Optional[str] = None, token: Optional[str] = None) -> Endpoint:
    """The daemon's endpoint from ``host`` (a socket path, ``unix:PATH``, ``http://HOST:PORT``
    or ``https://HOST:PORT``) or ``FORKD_HOST``, and ``token`` or ``FORKD_TOKEN``."""
    source = "host"
    if not host:
        host = os.environ.get("FORKD_HOST") or None
        source = "FORKD_HOST"
    if token is None:
        token = os.environ.get("FORKD_TOKEN") or None
    if host is None:
        return Endpoint(UNIX_BASE_URL, uds=default_socket_path(), token=token)
    if host.startswith(("http://", "https://")):
        scheme, rest = host.split("://", 1)
        authority = rest.rstrip("/")
        if not authority or "/" in authority:
            raise ForkdError(f"{source} {host!r}: expected {scheme}://HOST:PORT")
        ca_cert = os.environ.get("FORKD_CA_CERT") or None if scheme == "https" else None
        return Endpoint(f"{scheme}://{authority}", token=token, ca_cert=ca_cert)
    if "://" in host:
        raise ForkdError(
            f"{source} {host!r}: only a socket path, unix:PATH, http://HOST:PORT or "
            "https://HOST:PORT is supported"
        )
    path = host[len("unix:"):] if host.startswith("unix:") else host
    return Endpoint(UNIX_BASE_URL, uds=path, token=token)

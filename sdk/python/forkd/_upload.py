"""What ``files.write`` accepts (str, bytes, a file object, chunks) as an httpx body, read in
chunks so a large file is never all in memory."""

from __future__ import annotations

from typing import IO, Any, AsyncIterable, AsyncIterator, Iterable, Iterator, Union

from ._api import CHUNK
from .errors import ForkdError

#: ``files.write`` data: text (written as UTF-8), bytes, a binary (or text) file object, or an
#: iterable of byte chunks (async: also an async iterable).
WriteData = Union[str, bytes, bytearray, memoryview, IO[Any], Iterable[bytes]]


def _as_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, str):
        return chunk.encode()
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    raise ForkdError(f"files.write: cannot write a chunk of type {type(chunk).__name__}")


def _file_chunks(file: IO[Any]) -> Iterator[bytes]:
    while True:
        chunk = file.read(CHUNK)
        if not chunk:
            return
        yield _as_bytes(chunk)


def sync_body(data: Any) -> Union[bytes, Iterator[bytes]]:
    """The body for a sync upload."""
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        return _as_bytes(data)
    if hasattr(data, "read"):
        return _file_chunks(data)
    if isinstance(data, Iterable):
        return (_as_bytes(chunk) for chunk in data)
    raise ForkdError(f"files.write: cannot write data of type {type(data).__name__}")


async def _async_chunks(data: Any) -> AsyncIterator[bytes]:
    if isinstance(data, AsyncIterable):
        async for chunk in data:
            yield _as_bytes(chunk)
        return
    for chunk in sync_body(data):
        yield chunk


def async_body(data: Any) -> Union[bytes, AsyncIterator[bytes]]:
    """The body for an async upload (a sync file object is read in chunks between sends)."""
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        return _as_bytes(data)
    if not (isinstance(data, (AsyncIterable, Iterable)) or hasattr(data, "read")):
        raise ForkdError(f"files.write: cannot write data of type {type(data).__name__}")
    return _async_chunks(data)

"""E2B's `e2b` SDK, unmodified, on forkd's envd plane: files through `/files` and the
filesystem service. FORKD_E2B_SANDBOX is a running sandbox whose agent serves the files of
FORKD_E2B_DIR (crates/forkd-cli/tests/cli_e2b.rs: an agent on this host). Exits non-zero on
the first mismatch."""

import os
import sys

from e2b import FileType, NotFoundException, Sandbox

ROOT = os.environ["FORKD_E2B_DIR"]


def check(condition, what):
    if not condition:
        sys.exit(f"e2b files: {what}")


sandbox = Sandbox.connect(os.environ["FORKD_E2B_SANDBOX"])
check(sandbox.is_running(), "envd /health")

info = sandbox.files.write(f"{ROOT}/notes/hello.txt", "hello from e2b\n")
check(info.path == f"{ROOT}/notes/hello.txt" and info.name == "hello.txt", f"write {info}")
check(sandbox.files.read(f"{ROOT}/notes/hello.txt") == "hello from e2b\n", "read text")
sandbox.files.write(f"{ROOT}/notes/data.bin", bytes(range(256)) * 100)
check(sandbox.files.read(f"{ROOT}/notes/data.bin", format="bytes") == bytes(range(256)) * 100,
      "read bytes")
sandbox.files.write_files([{"path": f"{ROOT}/many/a.txt", "data": "a"},
                           {"path": f"{ROOT}/many/b.txt", "data": "b"}])
check(sorted(e.name for e in sandbox.files.list(f"{ROOT}/many")) == ["a.txt", "b.txt"],
      "write_files")

entries = {e.name: e for e in sandbox.files.list(f"{ROOT}/notes")}
check(set(entries) == {"hello.txt", "data.bin"}, f"list {sorted(entries)}")
check(entries["hello.txt"].type == FileType.FILE and entries["hello.txt"].size == 15,
      f"entry {entries['hello.txt']}")
deep = [e.path for e in sandbox.files.list(ROOT, depth=2)]
check(f"{ROOT}/notes/hello.txt" in deep, f"depth 2: {deep}")

check(sandbox.files.exists(f"{ROOT}/notes/hello.txt"), "exists")
check(not sandbox.files.exists(f"{ROOT}/notes/nope.txt"), "a missing file does not exist")
stat = sandbox.files.get_info(f"{ROOT}/notes")
check(stat.type == FileType.DIR and stat.name == "notes", f"get_info {stat}")
check(sandbox.files.make_dir(f"{ROOT}/made/deep") is True, "make_dir")
check(sandbox.files.make_dir(f"{ROOT}/made/deep") is False, "make_dir of an existing one")
moved = sandbox.files.rename(f"{ROOT}/notes/hello.txt", f"{ROOT}/notes/moved.txt")
check(moved.path == f"{ROOT}/notes/moved.txt" and moved.type == FileType.FILE, f"rename {moved}")
check(sandbox.files.read(f"{ROOT}/notes/moved.txt") == "hello from e2b\n", "a moved file's content")
check(not sandbox.files.exists(f"{ROOT}/notes/hello.txt"), "a moved file left its old name")
sandbox.files.remove(f"{ROOT}/notes")
check(not sandbox.files.exists(f"{ROOT}/notes/moved.txt"), "remove")
try:
    sandbox.files.read(f"{ROOT}/notes/hello.txt")
    sys.exit("e2b files: a removed file was read")
except NotFoundException:
    pass

# Larger than any request-body buffer: uploads and downloads stream. Streamed and gzip
# uploads take the octet-stream route.
big = os.urandom(1 << 20) * 6
sandbox.files.write(f"{ROOT}/big.bin", big)
check(sandbox.files.read(f"{ROOT}/big.bin", format="bytes") == big, "a 6 MiB file round trip")
sandbox.files.write(f"{ROOT}/streamed.bin", iter([big[:1000], big[1000:5000]]))
check(sandbox.files.read(f"{ROOT}/streamed.bin", format="bytes") == big[:5000], "a streamed upload")
sandbox.files.write(f"{ROOT}/zipped.txt", "compressed " * 1000, gzip=True)
check(sandbox.files.read(f"{ROOT}/zipped.txt") == "compressed " * 1000, "a gzip upload")

# A watched directory (the sync SDK polls): what was created, written, changed mode, removed.
from e2b import FilesystemEventType  # noqa: E402
sandbox.files.make_dir(f"{ROOT}/watched")
sandbox.files.write(f"{ROOT}/watched/old.txt", "old")
watch = sandbox.files.watch_dir(f"{ROOT}/watched")
check(watch.get_new_events() == [], "no events before any change")
sandbox.files.write(f"{ROOT}/watched/new.txt", "new")
sandbox.files.write(f"{ROOT}/watched/old.txt", "older")
events = {(e.name, e.type) for e in watch.get_new_events()}
check(events == {("new.txt", FilesystemEventType.CREATE), ("old.txt", FilesystemEventType.WRITE)},
      f"created and written: {events}")
sandbox.files.remove(f"{ROOT}/watched/old.txt")
events = [(e.name, e.type) for e in watch.get_new_events()]
check(events == [("old.txt", FilesystemEventType.REMOVE)], f"removed: {events}")
watch.stop()
try:
    sandbox.files.watch_dir(f"{ROOT}/watched/new.txt")
    sys.exit("e2b files: watched a file as a directory")
except Exception as e:
    check("not a directory" in str(e).lower() or "invalid" in str(e).lower(), f"watch a file: {e}")

# The async SDK's watch is a stream (WatchDir): events arrive through on_event.
import asyncio  # noqa: E402
from e2b import AsyncSandbox  # noqa: E402


async def watch_streamed():
    streamed = await AsyncSandbox.connect(os.environ["FORKD_E2B_SANDBOX"])
    await streamed.files.make_dir(f"{ROOT}/streamed")
    seen = []
    handle = await streamed.files.watch_dir(
        f"{ROOT}/streamed", on_event=lambda e: seen.append((e.name, e.type)), timeout=30)
    await streamed.files.write(f"{ROOT}/streamed/x.txt", "x")
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0.1)
    await handle.stop()
    return seen


seen = asyncio.run(watch_streamed())
check(seen == [("x.txt", FilesystemEventType.CREATE)], f"streamed watch: {seen}")

# Signed URLs carry no sandbox header: the signature names the sandbox.
import httpx  # noqa: E402 - a dependency of the e2b package
sandbox.files.write(f"{ROOT}/shared.txt", "shared by url\n")
fetched = httpx.get(sandbox.download_url(f"{ROOT}/shared.txt"))
check(fetched.status_code == 200 and fetched.text == "shared by url\n",
      f"download_url: {fetched.status_code} {fetched.text}")
posted = httpx.post(sandbox.upload_url(f"{ROOT}/posted.txt"),
                    files={"file": ("posted.txt", b"posted by url\n")})
check(posted.status_code == 200, f"upload_url: {posted.status_code} {posted.text}")
check(sandbox.files.read(f"{ROOT}/posted.txt") == "posted by url\n", "the uploaded file")
forged = httpx.get(sandbox.download_url(f"{ROOT}/shared.txt").replace("signature=v1_", "signature=v1_x"))
check(forged.status_code in (401, 404), f"a forged signature: {forged.status_code}")

# A disk too small for the file: E2B's NotEnoughSpaceException, and nothing left behind.
SMALL = os.environ.get("FORKD_E2B_SMALL_DIR")
if SMALL:
    from e2b import NotEnoughSpaceException
    try:
        sandbox.files.write(f"{SMALL}/too-big.bin", big)
        sys.exit("e2b files: a file larger than its disk was written")
    except NotEnoughSpaceException as e:
        check("too-big.bin" in str(e), f"the error names the file: {e}")
    check(sandbox.files.list(SMALL) == [], f"a failed upload leaves nothing: {sandbox.files.list(SMALL)}")
else:
    print("SKIP: e2b files on a full disk: no small tmpfs (needs root and mount)")
print("e2b files: write, write_files, read (text, bytes), list (depth), exists, get_info, "
      "make_dir, rename, remove, watch_dir (polled, streamed), errors, 6 MiB streamed both ways, gzip, signed URLs"
      + (", full disk" if SMALL else "") + " ok")

"""AsyncSandbox and AsyncClient against a real daemon with the demo guest."""

from __future__ import annotations

import asyncio

import pytest

import forkd
from forkd import AsyncClient, AsyncSandbox

pytestmark = pytest.mark.anyio


async def test_async_sandboxes_are_created_listed_branched_forked_paused_and_killed(host):
    async with AsyncClient(host) as client:
        assert await client.health()
        many = await AsyncSandbox.create("demo", count=3, metadata={"a": "1"}, client=client)
        one, two = await asyncio.gather(AsyncSandbox.create("demo", client=client),
                                        AsyncSandbox.create("demo", client=client))
        listed = await AsyncSandbox.list(metadata={"a": "1"}, client=client)
        assert {s.id for s in listed} == {s.id for s in many}
        kids = await many[0].fork(2)
        assert {k.info.tag for k in kids} == {f"{many[0].id}-branch-1"}
        await one.pause()
        assert (await one.get_info()).state == "paused"
        resumed = await AsyncSandbox.resume(one.id, client=client)
        assert resumed.info.state == "running"
        for s in await AsyncSandbox.list(client=client):
            await s.kill()
        assert await AsyncSandbox.list(client=client) == []
        with pytest.raises(forkd.NotFoundError):
            await two.kill()


async def test_async_forked_sandboxes_share_the_client_their_parent_made(host):
    async with await AsyncSandbox.create("demo", host=host) as parent:
        client = parent.client
        kids = await parent.fork(2)
    assert {(await k.get_info()).state for k in kids} == {"running"}
    for kid in kids:
        assert not client._transport.http.is_closed
        await kid.kill()
        await kid.close()
    assert client._transport.http.is_closed


async def test_the_async_context_manager_kills_and_errors_match_the_sync_ones(host, tmp_path):
    async with await AsyncSandbox.create("demo", host=host) as sandbox:
        with pytest.raises(forkd.ConflictError) as caught:
            await sandbox.commands.run("echo hi")
        assert caught.value.code == "no_agent"
    with pytest.raises(forkd.NotFoundError):
        await AsyncSandbox.connect(sandbox.id, host=host)
    with pytest.raises(forkd.DaemonNotRunningError, match="start one with `forkd serve`"):
        await AsyncSandbox.list(host=str(tmp_path / "none.sock"))

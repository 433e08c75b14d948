/**
 * The SDK against a real `forkd serve` with the built-in demo guest (needs /dev/kvm): create,
 * list, filter, kill; branch and fork; pause and resume; logs; timeouts; limits; snapshots.
 * The demo guest has no agent, so commands, files and eval answer ConflictError `no_agent`.
 */

import assert from "node:assert/strict";
import path from "node:path";
import { after, before, describe, test } from "node:test";

import { Client, ConflictError, NotFoundError, RefusedError, Sandbox, withSandbox } from "forkd";

import { eventually, forkd, kvmMissing, snapshotDemo, startDaemon, tempHome, type Daemon } from "./helpers.js";

/** The sorted ids of sandboxes or records. */
function idsOf(items: { id: string }[]): string[] {
  return items.map((item) => item.id).sort();
}

const skip = kvmMissing("TypeScript SDK tests with the demo guest");

describe("sandboxes of the demo guest", { skip }, () => {
  let daemon: Daemon;
  let client: Client;
  before(async () => {
    const home = tempHome("demo");
    snapshotDemo(home);
    daemon = await startDaemon(home);
    // A request that hangs fails its test in a minute rather than hanging the run.
    client = new Client({ host: daemon.socket, requestTimeoutMs: 60_000 });
  });
  after(async () => {
    await client?.close();
    await daemon?.stop();
  });

  test("create 10, list them, filter by tag and metadata, kill them", async () => {
    const made = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        Sandbox.create("demo", { client, metadata: { run: "ten", half: String(i % 2) }, envs: { N: String(i) } }),
      ),
    );
    const all = idsOf(made);
    assert.equal(new Set(all).size, 10);
    assert.ok(made.every((s) => s.tag === "demo" && s.record.state === "running"));
    assert.equal(made[3]!.record.env.N, "3");

    assert.deepEqual(idsOf(await Sandbox.list({}, { client })), all);
    assert.deepEqual(idsOf(await Sandbox.list({ tag: "demo" }, { client })), all);
    assert.deepEqual(await Sandbox.list({ tag: "other" }, { client }), []);
    const odd = await Sandbox.list({ metadata: { run: "ten", half: "1" } }, { client });
    assert.deepEqual(idsOf(odd), idsOf(made.filter((_, i) => i % 2 === 1)));

    const again = await Sandbox.connect(made[0]!.id, { client });
    assert.equal(again.id, made[0]!.id);
    assert.deepEqual(again.record.metadata, { run: "ten", half: "0" });

    await Promise.all(made.slice(0, 5).map((s) => s.kill()));
    assert.equal((await Sandbox.list({ metadata: { run: "ten" } }, { client })).length, 5);
    await assert.rejects(made[0]!.kill(), NotFoundError);
    assert.equal(await made[0]!.isRunning(), false);
    const killed = await Sandbox.killAll({ metadata: { run: "ten" } }, { client });
    assert.deepEqual(killed.deleted.sort(), idsOf(made.slice(5)));
    assert.deepEqual(await Sandbox.list({}, { client }), []);
  });

  test("a branch is a snapshot, and fork(n) makes n sandboxes continuing from it", async () => {
    await withSandbox(
      "demo",
      async (parent) => {
        const report = await parent.branch({ tag: "ts-branch" });
        assert.equal(report.tag, "ts-branch");
        assert.equal(report.mode, "diff");
        assert.equal((await client.snapshots.get("ts-branch")).parent_tag, "demo");
        await assert.rejects(parent.branch({ tag: "ts-branch" }), ConflictError);

        const kids = await parent.fork(3, { metadata: { role: "kid" } });
        assert.equal(kids.length, 3);
        assert.ok(kids.every((k) => k.tag !== "demo" && k.tag !== "ts-branch"));
        assert.equal((await client.snapshots.get(kids[0]!.tag)).parent_tag, "ts-branch");
        assert.equal((await Sandbox.list({ tag: kids[0]!.tag }, { client })).length, 3);
        // A child's demo guest keeps counting where its parent was.
        const log = await eventually("a child's console", 30_000, async () => (await kids[0]!.logs()) || undefined);
        assert.match(log, /^counter \d+/);
        await Promise.all(kids.map((k) => k.kill()));
      },
      { client },
    );
    assert.deepEqual(await Sandbox.list({}, { client }), []);
    const removed = await client.snapshots.delete("ts-branch", { cascade: true });
    assert.ok(removed.includes("ts-branch") && removed.length === 2, String(removed));
  });

  test("pause keeps the id; a paused sandbox refuses what needs its VM; resume continues it", async () => {
    const sandbox = await Sandbox.create("demo", { client, timeoutSecs: 600 });
    try {
      const paused = await sandbox.pause();
      assert.equal(paused.state, "paused");
      assert.equal(paused.expires_at ?? null, null);
      const logs = await sandbox.logs().catch((e: unknown) => e);
      assert.ok(logs instanceof ConflictError && logs.code === "paused", String(logs));
      await assert.rejects(sandbox.pause(), ConflictError);
      assert.equal(await sandbox.isRunning(), false);

      const resumed = await Sandbox.resume(sandbox.id, { client, timeoutSecs: 120 });
      assert.equal(resumed.id, sandbox.id);
      assert.equal(resumed.record.state, "running");
      assert.ok(resumed.record.expires_at! <= Date.now() / 1000 + 121);
      await assert.rejects(resumed.resume(), ConflictError);
      // Polled until a whole word is there: the guest may be mid-line when the log is read.
      const resumedLog = await eventually("console after resume", 30_000, async () => {
        const log = await resumed.logs();
        return /counter/.test(log) ? log : undefined;
      });
      assert.match(resumedLog, /counter/);
    } finally {
      await sandbox.kill();
    }
  });

  test("logs are the console, and tail keeps the last bytes", async () => {
    await using sandbox = await Sandbox.create("demo", { client });
    const text = await eventually("console output", 30_000, async () => (await sandbox.logs()) || undefined);
    assert.match(text, /^counter \d+\n/);
    const tail = await sandbox.logs({ tail: 5 });
    assert.ok(tail.length > 0 && tail.length <= 5, JSON.stringify(tail));
  });

  test("await using kills the sandbox at the end of its scope", async () => {
    let id: string;
    {
      await using sandbox = await Sandbox.create("demo", { client });
      id = sandbox.id;
      assert.equal(await sandbox.isRunning(), true);
    }
    await assert.rejects(Sandbox.connect(id, { client }), NotFoundError);
  });

  test("a timeout kills the sandbox; setTimeout moves it", async () => {
    const short = await Sandbox.create("demo", { client, timeoutSecs: 1 });
    const long = await Sandbox.create("demo", { client, timeoutSecs: 3600 });
    const moved = await long.setTimeout(1);
    assert.ok(moved.expires_at! <= Math.ceil(Date.now() / 1000) + 1, String(moved.expires_at));
    for (const sandbox of [short, long]) {
      await eventually(`${sandbox.id} expired`, 30_000, async () =>
        (await sandbox.getInfo().then(() => undefined, (e: unknown) => (e instanceof NotFoundError ? e : undefined))),
      );
    }
  });

  test("limits are refused with 422 where the host has no cgroup v2 controllers", async (t) => {
    const limits = { memory_mib: 512, cpus: 0.5, pids: 64 };
    const outcome = await Sandbox.create("demo", { client, limits }).catch((e: unknown) => e);
    if (outcome instanceof Sandbox) {
      assert.deepEqual(outcome.record.limits, limits);
      await outcome.kill();
      return;
    }
    assert.ok(outcome instanceof RefusedError, String(outcome));
    assert.equal(outcome.status, 422);
    assert.equal(outcome.code, "limits_unsupported");
    assert.match(outcome.message, /^resource limits need cgroup v2: /);
    t.diagnostic(`limits refused here: ${outcome.message}`);
  });

  test("commands, files and eval name the missing agent", async () => {
    await using sandbox = await Sandbox.create("demo", { client });
    for (const call of [
      () => sandbox.commands.run("echo hi"),
      () => sandbox.commands.run("sleep 1", { background: true }),
      () => sandbox.commands.list(),
      () => sandbox.files.read("/etc/hostname"),
      () => sandbox.files.write("/tmp/x", "x"),
      () => sandbox.files.makeDir("/tmp/d"),
      () => sandbox.eval("1 + 1"),
      () => sandbox.ping(),
    ]) {
      const error = await call().then(
        () => assert.fail("expected no_agent"),
        (e: unknown) => e,
      );
      assert.ok(error instanceof ConflictError, String(error));
      assert.equal(error.code, "no_agent");
      assert.match(error.message, /has no forkd-agent/);
    }
  });

  test("snapshots: list, get, pack pulled back under a new tag with progress, delete", async () => {
    const tags = (await client.snapshots.list()).map((s) => s.tag);
    assert.ok(tags.includes("demo"), String(tags));
    assert.equal((await client.snapshots.get("demo")).kernel.startsWith("builtin:demo"), true);

    const pack = path.join(daemon.home, "demo.forkd-snapshot.tar.zst");
    forkd(daemon.home, ["pack", "--tag", "demo", "--output", pack]);
    const states: string[] = [];
    const job = await client.snapshots.pull(pack, {
      tag: "pulled",
      pollIntervalMs: 50,
      onProgress: (j) => states.push(j.state),
    });
    assert.equal(job.state, "succeeded");
    assert.equal(states.at(-1), "succeeded");
    assert.equal((await client.job(job.id)).state, "succeeded");
    await withSandbox("pulled", async (s) => assert.equal(s.tag, "pulled"), { client });
    assert.deepEqual(await client.snapshots.delete("pulled"), ["pulled"]);
    await assert.rejects(client.snapshots.get("pulled"), NotFoundError);
  });
});

/**
 * Every error path against a real `forkd serve` (none needs KVM): no daemon, a wrong or
 * missing token, an unknown sandbox or snapshot, a malformed filter, an https daemon whose
 * certificate is not trusted.
 */

import assert from "node:assert/strict";
import net from "node:net";
import path from "node:path";
import { after, before, describe, test } from "node:test";

import {
  AuthError,
  Client,
  DaemonNotRunningError,
  ForkdError,
  NotFoundError,
  RefusedError,
  Sandbox,
} from "forkd";

import { selfSignedCertificate, startTlsDaemon, startTokenDaemon, tempHome, type Daemon } from "./helpers.js";

/** The error `promise` rejects with, checked to be a one-line ForkdError of `kind`. */
async function rejection<E extends ForkdError>(promise: Promise<unknown>, kind: new (...args: never[]) => E): Promise<E> {
  const error = await promise.then(
    () => assert.fail("expected a rejection"),
    (e: unknown) => e,
  );
  assert.ok(error instanceof kind, `expected ${kind.name}, got ${String(error)}`);
  assert.ok(error.message.length > 0 && !error.message.includes("\n"), error.message);
  return error;
}

describe("no daemon", () => {
  test("a missing socket says where it looked and how to start a daemon", async () => {
    const socket = path.join(tempHome("nodaemon"), "forkd.sock");
    const error = await rejection(Sandbox.list({}, { host: socket }), DaemonNotRunningError);
    assert.equal(error.status, 0);
    assert.equal(error.code, "daemon_not_running");
    assert.match(error.message, new RegExp(`^no forkd daemon answers at unix:${socket} \\(ENOENT\\); start one with \`forkd serve\``));
  });

  test("the default socket is under XDG_RUNTIME_DIR, and FORKD_HOST overrides it", async () => {
    const runtime = tempHome("xdg");
    const saved = { xdg: process.env.XDG_RUNTIME_DIR, host: process.env.FORKD_HOST };
    try {
      process.env.XDG_RUNTIME_DIR = runtime;
      delete process.env.FORKD_HOST;
      const error = await rejection(new Client().health(), DaemonNotRunningError);
      assert.ok(error.message.includes(`unix:${runtime}/forkd/forkd.sock`), error.message);
      const port = await closedPort();
      process.env.FORKD_HOST = `http://127.0.0.1:${port}`;
      const tcp = await rejection(Sandbox.connect("sb-x"), DaemonNotRunningError);
      assert.ok(tcp.message.startsWith(`no forkd daemon answers at http://127.0.0.1:${port} (ECONNREFUSED)`), tcp.message);
    } finally {
      restore("XDG_RUNTIME_DIR", saved.xdg);
      restore("FORKD_HOST", saved.host);
    }
  });

  test("a host that is neither a socket nor http:// is refused by name", () => {
    assert.throws(() => new Client({ host: "ftp://example" }), /only a socket path, unix:PATH, http:\/\/HOST:PORT or https:\/\/HOST:PORT/);
  });
});

describe("a daemon with a token", () => {
  let daemon: Daemon;
  before(async () => {
    daemon = await startTokenDaemon(tempHome("token"), "right-token");
  });
  after(async () => {
    await daemon?.stop();
  });

  test("a wrong token is an AuthError with the daemon's message", async () => {
    const error = await rejection(Sandbox.list({}, { host: daemon.origin!, token: "wrong" }), AuthError);
    assert.equal(error.status, 401);
    assert.equal(error.code, "unauthorized");
    assert.equal(error.message, "the bearer token is wrong");
  });

  test("no token is an AuthError too, and FORKD_TOKEN is the default", async () => {
    const error = await rejection(new Client({ host: daemon.origin! }).snapshots.list(), AuthError);
    assert.match(error.message, /Bearer/);
    const saved = process.env.FORKD_TOKEN;
    process.env.FORKD_TOKEN = "right-token";
    try {
      assert.deepEqual(await new Client({ host: daemon.origin! }).snapshots.list(), []);
    } finally {
      restore("FORKD_TOKEN", saved);
    }
  });

  test("the right token works over TCP, and the socket needs none", async () => {
    assert.deepEqual(await Sandbox.list({}, { host: daemon.origin!, token: "right-token" }), []);
    assert.deepEqual(await Sandbox.list({}, { host: `unix:${daemon.socket}` }), []);
    const client = new Client({ host: daemon.socket });
    assert.deepEqual(await client.health(), { status: "ok" });
    assert.equal((await client.version()).api, "v1");
  });

  test("an unknown sandbox is a NotFoundError for every verb", async () => {
    const options = { host: daemon.socket };
    for (const call of [
      () => Sandbox.connect("sb-nope", options),
      () => Sandbox.resume("sb-nope", options),
    ]) {
      const error = await rejection(call(), NotFoundError);
      assert.equal(error.status, 404);
      assert.equal(error.code, "not_found");
      assert.match(error.message, /sb-nope/);
    }
  });

  test("an unknown snapshot is a NotFoundError at create, get and delete", async () => {
    const client = new Client({ host: daemon.socket });
    const created = await rejection(Sandbox.create("no-such-tag", { client }), NotFoundError);
    assert.equal(created.message, 'no snapshot tagged "no-such-tag"');
    await rejection(client.snapshots.get("no-such-tag"), NotFoundError);
    await rejection(client.snapshots.delete("no-such-tag"), NotFoundError);
  });

  test("a pull of a pack that is not there fails with the job's error", async () => {
    const client = new Client({ host: daemon.socket });
    const seen: string[] = [];
    const error = await rejection(
      client.snapshots.pull(path.join(daemon.home, "missing.forkd-snapshot.tar.zst"), {
        pollIntervalMs: 50,
        onProgress: (job) => seen.push(job.state),
      }),
      ForkdError,
    );
    assert.match(error.message, /missing\.forkd-snapshot\.tar\.zst/);
    assert.equal(seen.at(-1), "failed");
  });

  test("an unknown create field or bad count is a RefusedError (400)", async () => {
    const client = new Client({ host: daemon.socket });
    const error = await rejection(Sandbox.createMany("demo", 0, { client }), RefusedError);
    assert.equal(error.status, 400);
    assert.equal(error.code, "bad_request");
  });
});

/** A loopback port nobody listens on (it was free a moment ago). */
async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

function restore(name: string, value: string | undefined): void {
  if (value === undefined) delete process.env[name];
  else process.env[name] = value;
}

describe("a daemon over https", () => {
  const home = tempHome("tls");
  const tls = selfSignedCertificate(home, "the TypeScript SDK over https");
  let daemon: Daemon | undefined;
  before(async () => {
    if (tls) daemon = await startTlsDaemon(home, "tls-token", tls);
  });
  after(async () => daemon?.stop());

  test("caCert (or FORKD_CA_CERT) trusts its certificate; without it the error says so", async (t) => {
    if (!daemon || !tls) return t.skip("no certificate");
    const host = daemon.origin!;
    assert.match(host, /^https:\/\//);
    const trusted = new Client({ host, token: "tls-token", caCert: tls.cert });
    assert.equal((await trusted.health()).status, "ok");
    assert.deepEqual(await Sandbox.list({}, { host, token: "tls-token", caCert: tls.cert }), []);
    await trusted.close();

    const saved = process.env.FORKD_CA_CERT;
    delete process.env.FORKD_CA_CERT;
    try {
      const error = await rejection(Sandbox.list({}, { host, token: "tls-token" }), ForkdError);
      assert.equal(error.code, "tls");
      assert.ok(error.message.startsWith(`TLS with the daemon at ${host}: `), error.message);
      assert.ok(error.message.endsWith("trust its certificate with FORKD_CA_CERT (or caCert)"), error.message);
      process.env.FORKD_CA_CERT = tls.cert;
      assert.deepEqual(await Sandbox.list({}, { host, token: "tls-token" }), []);
    } finally {
      if (saved === undefined) delete process.env.FORKD_CA_CERT;
      else process.env.FORKD_CA_CERT = saved;
    }
  });

  test("a caCert that is not a PEM certificate is refused in one line", () => {
    if (!daemon) return;
    const notPem = path.join(home, "token");
    assert.throws(
      () => new Client({ host: daemon!.origin!, caCert: notPem }),
      (e: unknown) => e instanceof ForkdError && e.code === "bad_ca_cert" && e.message === `FORKD_CA_CERT ${notPem}: no PEM certificate in it`,
    );
  });
});

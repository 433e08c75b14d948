/**
 * What the demo guest cannot show (it has no agent): exec's NDJSON stream read as it arrives,
 * background processes, files and a request timeout — against a stand-in daemon on a Unix
 * socket that answers as the API document says, recording the requests it gets.
 */

import assert from "node:assert/strict";
import http from "node:http";
import path from "node:path";
import { after, before, describe, test } from "node:test";

import { Client, CommandExitError, ConflictError, ForkdError, NotFoundError, RequestTimeoutError, Sandbox } from "forkd";

import { tempHome } from "./helpers.js";

type Handler = (req: http.IncomingMessage, body: Buffer, res: http.ServerResponse) => void;

const RECORD = {
  id: "sb-1",
  tag: "py",
  state: "running",
  created_at: "2026-01-01T00:00:00Z",
  metadata: {},
  env: {},
  pid: 1,
  restore_ms: 1,
};

describe("the SDK's side of the protocol", () => {
  let server: http.Server;
  let socket: string;
  const routes = new Map<string, Handler>();
  const seen: { method: string; url: string; body: string }[] = [];
  let sandbox: Sandbox;

  before(async () => {
    socket = path.join(tempHome("fake"), "fake.sock");
    server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        const body = Buffer.concat(chunks);
        seen.push({ method: req.method!, url: req.url!, body: body.toString() });
        const route = routes.get(`${req.method} ${req.url!.split("?")[0]}`);
        if (route) return route(req, body, res);
        json(res, 404, { code: "not_found", message: `no route ${req.url}` });
      });
    });
    await new Promise<void>((resolve) => server.listen(socket, resolve));
    routes.set("GET /v1/sandboxes/sb-1", (_q, _b, res) => json(res, 200, RECORD));
    sandbox = await Sandbox.connect("sb-1", { client: new Client({ host: socket }) });
  });
  after(async () => {
    await sandbox.client.close();
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  });

  // Output held back until the exit would leave the stand-in waiting: the test times out.
  test("run streams output to the callbacks before the command ends", { timeout: 10_000 }, async () => {
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    routes.set("POST /v1/sandboxes/sb-1/exec", async (_req, _body, res) => {
      res.writeHead(200, { "content-type": "application/x-ndjson" });
      res.write(`${JSON.stringify({ type: "stdout", data: "first\n" })}\n`);
      await released; // the exit line waits until the client has seen the first output
      res.write(`${JSON.stringify({ type: "stderr", data_b64: Buffer.from("w\u00e4rn").toString("base64") })}\n`);
      res.end(`${JSON.stringify({ type: "exit", exit_code: 0, timed_out: false, duration_ms: 7 })}\n`);
    });
    const out: string[] = [];
    const err: string[] = [];
    const result = await sandbox.commands.run(["echo", "first"], {
      envs: { A: "1" },
      cwd: "/tmp",
      timeoutSecs: 5,
      stdin: "in",
      onStdout: (d) => {
        out.push(d);
        release();
      },
      onStderr: (d) => err.push(d),
    });
    assert.deepEqual(out, ["first\n"]);
    assert.deepEqual(err, ["w\u00e4rn"]);
    assert.deepEqual(result, { stdout: "first\n", stderr: "w\u00e4rn", exitCode: 0, signal: null, timedOut: false, durationMs: 7 });
    assert.deepEqual(JSON.parse(seen.at(-1)!.body), { cmd: ["echo", "first"], env: { A: "1" }, cwd: "/tmp", timeout_secs: 5, stdin: "in" });
  });

  test("a non-zero exit is a result, or a CommandExitError with check", async () => {
    routes.set("POST /v1/sandboxes/sb-1/exec", (_req, _body, res) => {
      res.writeHead(200, { "content-type": "application/x-ndjson" });
      res.write(`${JSON.stringify({ type: "stderr", data: "boom\nno such file\n" })}\n`);
      res.end(`${JSON.stringify({ type: "exit", exit_code: 3, timed_out: false, duration_ms: 1 })}\n`);
    });
    assert.equal((await sandbox.commands.run("false")).exitCode, 3);
    const error = await sandbox.commands.run("false", { check: true }).catch((e: unknown) => e);
    assert.ok(error instanceof CommandExitError, String(error));
    assert.equal(error.exitCode, 3);
    assert.equal(error.message, 'command "false" exited with 3: no such file');
  });

  test("an error line or a stream cut before the exit is a ForkdError", async () => {
    routes.set("POST /v1/sandboxes/sb-1/exec", (_req, _body, res) => {
      res.writeHead(200, { "content-type": "application/x-ndjson" });
      res.end(`${JSON.stringify({ type: "error", code: "agent_unavailable", message: "the agent went away" })}\n`);
    });
    const error = await sandbox.commands.run("x").catch((e: unknown) => e);
    assert.ok(error instanceof ForkdError && error.code === "agent_unavailable", String(error));
    assert.equal(error.message, "the agent went away");
    routes.set("POST /v1/sandboxes/sb-1/exec", (_req, _body, res) => {
      res.writeHead(200, { "content-type": "application/x-ndjson" });
      res.end(`${JSON.stringify({ type: "stdout", data: "partial" })}\n`);
    });
    await assert.rejects(sandbox.commands.run("x"), /ended without the command's exit/);
  });

  test("background: start, wait with a timeout, kill with a signal", async () => {
    routes.set("POST /v1/sandboxes/sb-1/processes", (_req, _body, res) => json(res, 201, { pid: 42, started_ms: 1000 }));
    routes.set("POST /v1/sandboxes/sb-1/processes/42/wait", (_req, _body, res) =>
      json(res, 200, {
        pid: 42, argv: ["sh", "-c", "sleep 9"], state: "exited", exit_code: null, signal: 15, timed_out: false,
        started_ms: 1000, ended_ms: 1500, stdout_bytes: 2, stderr_bytes: 0, stdout: "hi", stdout_dropped: 0, stderr_dropped: 0,
      }),
    );
    routes.set("DELETE /v1/sandboxes/sb-1/processes/42", (_req, _body, res) => json(res, 200, { pid: 42, signal: 15, state: "running" }));
    const handle = await sandbox.commands.run("sleep 9", { background: true, timeoutSecs: 60 });
    assert.equal(handle.pid, 42);
    assert.deepEqual(JSON.parse(seen.at(-1)!.body), { cmd: "sleep 9", timeout_secs: 60 });
    assert.deepEqual(await handle.kill("TERM"), { pid: 42, signal: 15, state: "running" });
    assert.equal(seen.at(-1)!.url, "/v1/sandboxes/sb-1/processes/42?signal=TERM");
    const waited = await handle.wait({ timeoutSecs: 2 });
    assert.equal(seen.at(-1)!.url, "/v1/sandboxes/sb-1/processes/42/wait?timeout=2");
    assert.equal(waited.signal, 15);
    assert.equal(waited.stdout, "hi");
    assert.equal(waited.durationMs, 500);
    await assert.rejects(handle.wait({ check: true }), /was killed by signal 15/);
    await assert.rejects(sandbox.commands.run("x", { background: true, onStdout: () => {} }), /need a foreground command/);
  });

  test("files: write text, bytes and a stream; read each form; exists tells a missing file from a missing sandbox", async () => {
    const stored = new Map<string, Buffer>();
    routes.set("PUT /v1/sandboxes/sb-1/files", (req, body, res) => {
      const file = new URL(req.url!, "http://x").searchParams.get("path")!;
      stored.set(file, body);
      json(res, 200, { path: file, size: body.length });
    });
    routes.set("GET /v1/sandboxes/sb-1/files", (req, _body, res) => {
      const data = stored.get(new URL(req.url!, "http://x").searchParams.get("path")!);
      if (!data) return json(res, 404, { code: "not_found", message: "no such file" });
      res.writeHead(200, { "content-type": "application/octet-stream" });
      res.end(data);
    });
    routes.set("GET /v1/sandboxes/sb-1/files/stat", (req, _body, res) => {
      const data = stored.get(new URL(req.url!, "http://x").searchParams.get("path")!);
      if (!data) return json(res, 404, { code: "not_found", message: "no such file" });
      json(res, 200, { kind: "file", size: data.length, mode: 0o644, mtime_ms: 0, uid: 0, gid: 0, link_target: null });
    });

    assert.deepEqual(await sandbox.files.write("/a.txt", "h\u00e9llo", { mode: 0o600, createDirs: true }), { path: "/a.txt", size: 6 });
    assert.equal(seen.at(-1)!.url, "/v1/sandboxes/sb-1/files?path=%2Fa.txt&mode=600&create_dirs=true");
    await sandbox.files.write("/b.bin", new Uint8Array([0, 255, 1]));
    const big = Buffer.alloc(3 << 20, 7);
    async function* chunks(): AsyncGenerator<Uint8Array> {
      for (let i = 0; i < big.length; i += 1 << 20) yield big.subarray(i, i + (1 << 20));
    }
    assert.equal((await sandbox.files.write("/big", chunks())).size, big.length);

    assert.equal(await sandbox.files.read("/a.txt"), "h\u00e9llo");
    assert.deepEqual(await sandbox.files.read("/b.bin", { format: "bytes" }), new Uint8Array([0, 255, 1]));
    let streamed = 0;
    for await (const chunk of await sandbox.files.read("/big", { format: "stream" }) as unknown as AsyncIterable<Uint8Array>) {
      streamed += chunk.length;
    }
    assert.equal(streamed, big.length);

    assert.equal(await sandbox.files.exists("/a.txt"), true);
    assert.equal(await sandbox.files.exists("/nope"), false);
    await assert.rejects(sandbox.files.read("/nope"), NotFoundError);
    routes.delete("GET /v1/sandboxes/sb-1"); // the sandbox is gone too: exists throws
    await assert.rejects(sandbox.files.exists("/nope"), NotFoundError);
    routes.set("GET /v1/sandboxes/sb-1", (_q, _b, res) => json(res, 200, RECORD));
  });

  test("a daemon that does not answer in requestTimeoutMs is a RequestTimeoutError", async () => {
    routes.set("GET /v1/sandboxes/sb-1/ping", () => undefined); // never answers
    const slow = await Sandbox.connect("sb-1", { host: socket, requestTimeoutMs: 200 });
    const error = await slow.ping().catch((e: unknown) => e);
    assert.ok(error instanceof RequestTimeoutError, String(error));
    assert.match(error.message, /^GET \/v1\/sandboxes\/sb-1\/ping at unix:.* took more than 200 ms$/);
  });

  test("logs pass tail as a query parameter, and a non-JSON error keeps its status", async () => {
    routes.set("GET /v1/sandboxes/sb-1/logs", (_req, _body, res) => {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end("counter 1\n");
    });
    assert.equal(await sandbox.logs({ tail: 10 }), "counter 1\n");
    assert.equal(seen.at(-1)!.url, "/v1/sandboxes/sb-1/logs?tail=10");
    routes.set("POST /v1/sandboxes/sb-1/eval", (_req, _body, res) => {
      res.writeHead(502);
      res.end("bad gateway\nsecond line");
    });
    const error = await sandbox.eval("1").catch((e: unknown) => e);
    assert.ok(error instanceof ForkdError && error.status === 502 && error.code === "http_502", String(error));
    assert.equal(error.message, "the daemon answered HTTP 502");
  });

  test("create sends the network section and the record carries the network", async () => {
    const network = {
      address: "10.200.0.6",
      guest_address: "10.0.2.15",
      namespace: "forkd-9-0",
      allow: ["10.1.2.0/24:443"],
      allow_dns: true,
      publish: ["18080:8080"],
    };
    routes.set("POST /v1/sandboxes", (_req, _body, res) =>
      json(res, 201, { sandboxes: [{ ...RECORD, network }] }),
    );
    const sent = () => JSON.parse(seen.at(-1)!.body) as { network?: unknown };
    const made = await Sandbox.create("net", {
      client: sandbox.client,
      allow: ["10.1.2.0/24:443"],
      allowDns: true,
      publish: ["18080:8080"],
    });
    assert.deepEqual(sent().network, { allow: ["10.1.2.0/24:443"], allow_dns: true, publish: ["18080:8080"] });
    assert.deepEqual(made.record.network, network);
    // Nothing asked: no section (the snapshot's recorded policy applies).
    await Sandbox.create("net", { client: sandbox.client });
    assert.equal(sent().network, undefined);
    // allowDns alone is a policy of its own; ports alone keep the recorded policy.
    await Sandbox.create("net", { client: sandbox.client, allowDns: true });
    assert.deepEqual(sent().network, { allow: [], allow_dns: true });
    await Sandbox.create("net", { client: sandbox.client, publish: ["18081:80"] });
    assert.deepEqual(sent().network, { publish: ["18081:80"] });
    routes.set("POST /v1/sandboxes", (_req, _body, res) =>
      json(res, 409, { code: "port_taken", message: "host port 18081 is already published to sandbox sb-2" }),
    );
    const taken = await Sandbox.create("net", { client: sandbox.client, publish: ["18081:80"] }).catch(
      (e: unknown) => e,
    );
    assert.ok(taken instanceof ConflictError && taken.code === "port_taken", String(taken));
  });
});

function json(res: http.ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
}

/**
 * Where the daemon is and how to talk to it: a Unix socket (the default) or `http(s)://HOST:PORT`
 * with a bearer token, one fetch per API call.
 */

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import tls from "node:tls";
import { Agent, fetch, type Dispatcher, type Response } from "undici";

import {
  DaemonNotRunningError,
  ForkdError,
  RequestTimeoutError,
  errorFromResponse,
} from "./errors.js";

/** How to reach the daemon; everything is optional. */
export interface ConnectionOptions {
  /**
   * A socket path, `unix:PATH`, `http://HOST:PORT` or `https://HOST:PORT` (default:
   * `FORKD_HOST`, else the daemon's default socket).
   */
  host?: string;
  /** Bearer token for a TCP daemon (default: `FORKD_TOKEN`). */
  token?: string;
  /**
   * A PEM file of certificates to trust for an https daemon, besides Node's own (default:
   * `FORKD_CA_CERT`).
   */
  caCert?: string;
  /** Give up on a request after this many milliseconds (default: no limit). */
  requestTimeoutMs?: number;
}

/** A resolved daemon address. */
export type Endpoint =
  | { kind: "unix"; socketPath: string }
  | { kind: "tcp"; origin: string; token?: string; caCert?: string };

/** The daemon's default socket, as `forkd serve` picks it. */
export function defaultSocketPath(): string {
  const runtime = process.env.XDG_RUNTIME_DIR;
  if (runtime) return path.join(runtime, "forkd", "forkd.sock");
  const uid = process.getuid?.() ?? 0;
  if (uid === 0) return "/run/forkd/forkd.sock";
  return path.join(os.tmpdir(), `forkd-${uid}`, "forkd.sock");
}

/** The endpoint for `options`, else `FORKD_HOST` / `FORKD_TOKEN`, else the default socket. */
export function resolveEndpoint(options: ConnectionOptions = {}): Endpoint {
  const host = options.host || process.env.FORKD_HOST || "";
  const token = options.token ?? (process.env.FORKD_TOKEN || undefined);
  if (!host) return { kind: "unix", socketPath: defaultSocketPath() };
  if (host.startsWith("http://") || host.startsWith("https://")) {
    const url = new URL(host);
    if (url.pathname !== "/" || url.search) {
      throw new ForkdError(`host ${JSON.stringify(host)}: expected http(s)://HOST:PORT`, 0, "bad_host");
    }
    const caCert =
      url.protocol === "https:" ? options.caCert || process.env.FORKD_CA_CERT || undefined : undefined;
    return {
      kind: "tcp",
      origin: url.origin,
      ...(token ? { token } : {}),
      ...(caCert ? { caCert } : {}),
    };
  }
  if (host.includes("://")) {
    throw new ForkdError(
      `host ${JSON.stringify(host)}: only a socket path, unix:PATH, http://HOST:PORT or https://HOST:PORT is supported`,
      0,
      "bad_host",
    );
  }
  return { kind: "unix", socketPath: host.startsWith("unix:") ? host.slice(5) : host };
}

/** The endpoint as people write it: `unix:/run/forkd/forkd.sock` or `http://127.0.0.1:8800`. */
export function describeEndpoint(endpoint: Endpoint): string {
  return endpoint.kind === "unix" ? `unix:${endpoint.socketPath}` : endpoint.origin;
}

/** A request body: JSON, raw bytes, or a stream of bytes. */
export type RequestBody =
  | { json: unknown }
  | { bytes: Uint8Array | string }
  | { stream: AsyncIterable<Uint8Array> | ReadableStream<Uint8Array> };

/** One API call. */
export interface RequestSpec {
  method: "GET" | "POST" | "PUT" | "DELETE";
  path: string;
  query?: Record<string, string | number | boolean | undefined>;
  body?: RequestBody;
  /** Stops the request (and a response body still streaming). */
  signal?: AbortSignal;
}

/** The HTTP connection to one daemon, shared by a Client and its sandboxes. */
export class Connection {
  readonly endpoint: Endpoint;
  private readonly dispatcher: Dispatcher;
  private readonly requestTimeoutMs: number | undefined;

  constructor(options: ConnectionOptions = {}) {
    this.endpoint = resolveEndpoint(options);
    this.requestTimeoutMs = options.requestTimeoutMs;
    // No idle limits of undici's own: a create of many sandboxes or a quiet command may take
    // minutes; `requestTimeoutMs` is the caller's limit.
    const timeouts = { headersTimeout: 0, bodyTimeout: 0 };
    this.dispatcher =
      this.endpoint.kind === "unix"
        ? new Agent({ ...timeouts, connect: { socketPath: this.endpoint.socketPath } })
        : new Agent({ ...timeouts, connect: tlsOptions(this.endpoint.caCert) });
  }

  /** Sends a request; an error status becomes a ForkdError. The body is left to read. */
  async request(spec: RequestSpec): Promise<Response> {
    const response = await this.send(spec);
    if (response.status >= 400) throw await this.errorOf(response);
    return response;
  }

  /** Sends a request and parses its JSON answer. */
  async json<T>(spec: RequestSpec): Promise<T> {
    const response = await this.request(spec);
    return (await response.json()) as T;
  }

  /** Closes the connections (pending requests finish first). */
  async close(): Promise<void> {
    await this.dispatcher.close();
  }

  private async send(spec: RequestSpec): Promise<Response> {
    const url = this.urlOf(spec);
    const signal = this.signalOf(spec.signal);
    const { headers, body } = encodeBody(spec.body);
    if (this.endpoint.kind === "tcp" && this.endpoint.token) {
      headers.authorization = `Bearer ${this.endpoint.token}`;
    }
    try {
      return await fetch(url, {
        method: spec.method,
        headers,
        body: body as never,
        dispatcher: this.dispatcher,
        signal,
        ...(isStreamBody(spec.body) ? { duplex: "half" as const } : {}),
      });
    } catch (error) {
      throw this.transportError(error, spec);
    }
  }

  private urlOf(spec: RequestSpec): string {
    const base = this.endpoint.kind === "unix" ? "http://forkd" : this.endpoint.origin;
    const url = new URL(spec.path, base);
    for (const [key, value] of Object.entries(spec.query ?? {})) {
      if (value !== undefined) url.searchParams.set(key, String(value));
    }
    return url.toString();
  }

  private signalOf(signal: AbortSignal | undefined): AbortSignal | undefined {
    if (this.requestTimeoutMs === undefined) return signal;
    const timeout = AbortSignal.timeout(this.requestTimeoutMs);
    return signal ? anySignal([signal, timeout]) : timeout;
  }

  private async errorOf(response: Response): Promise<ForkdError> {
    const text = await response.text().catch(() => "");
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      body = undefined;
    }
    return errorFromResponse(response.status, body);
  }

  /** A failure before any answer: the daemon is not there, or the request timed out. */
  private transportError(error: unknown, spec: RequestSpec): Error {
    const where = describeEndpoint(this.endpoint);
    const name = (error as { name?: string })?.name;
    if (name === "TimeoutError") {
      return new RequestTimeoutError(
        `${spec.method} ${spec.path} at ${where} took more than ${this.requestTimeoutMs} ms`,
        0,
        "timeout",
        { cause: error },
      );
    }
    if (name === "AbortError") return error as Error;
    const certificate = certificateFailure(error);
    if (certificate) {
      return new ForkdError(
        `TLS with the daemon at ${where}: ${certificate}; trust its certificate with FORKD_CA_CERT (or caCert)`,
        0,
        "tls",
        { cause: error },
      );
    }
    const reason = causeCode(error);
    if (reason && CONNECT_FAILURES.has(reason)) {
      return new DaemonNotRunningError(
        `no forkd daemon answers at ${where} (${reason}); start one with \`forkd serve\`, or point FORKD_HOST at it`,
        0,
        "daemon_not_running",
        { cause: error },
      );
    }
    const detail = (error as Error)?.message ?? String(error);
    return new ForkdError(`${spec.method} ${spec.path} at ${where}: ${detail}`, 0, "transport", {
      cause: error,
    });
  }
}

/** Socket errors that mean nobody listens at the address. */
const CONNECT_FAILURES = new Set(["ENOENT", "ECONNREFUSED", "ENOTSOCK", "EACCES", "ENOTDIR"]);

/** The errno code under fetch's `TypeError: fetch failed`. */
/** undici's connect options for a TCP daemon: Node's CAs plus those of `caCert`. */
function tlsOptions(caCert: string | undefined): { ca?: string[] } {
  if (!caCert) return {};
  let pem: string;
  try {
    pem = fs.readFileSync(caCert, "utf8");
  } catch (error) {
    throw new ForkdError(`FORKD_CA_CERT ${caCert}: ${(error as Error).message}`, 0, "bad_ca_cert");
  }
  if (!pem.includes("-----BEGIN CERTIFICATE-----")) {
    throw new ForkdError(`FORKD_CA_CERT ${caCert}: no PEM certificate in it`, 0, "bad_ca_cert");
  }
  return { ca: [...tls.rootCertificates, pem] };
}

/** The message of a certificate check that failed somewhere in `error`'s causes. */
function certificateFailure(error: unknown): string | undefined {
  let current = error as { code?: string; message?: string; cause?: unknown } | undefined;
  for (let depth = 0; current && depth < 5; depth++) {
    const code = current.code ?? "";
    if (code.includes("CERT") || code.startsWith("ERR_TLS") || code.includes("UNABLE_TO_VERIFY")) {
      return current.message ?? code;
    }
    current = current.cause as typeof current;
  }
  return undefined;
}

function causeCode(error: unknown): string | undefined {
  let current = error as { code?: string; cause?: unknown } | undefined;
  for (let depth = 0; current && depth < 5; depth++) {
    if (typeof current.code === "string" && current.code.startsWith("E")) return current.code;
    current = current.cause as typeof current;
  }
  return undefined;
}

function isStreamBody(body: RequestBody | undefined): boolean {
  return body !== undefined && "stream" in body;
}

function encodeBody(body: RequestBody | undefined): {
  headers: Record<string, string>;
  body: unknown;
} {
  if (body === undefined) return { headers: {}, body: undefined };
  if ("json" in body) {
    return { headers: { "content-type": "application/json" }, body: JSON.stringify(body.json) };
  }
  const headers = { "content-type": "application/octet-stream" };
  return { headers, body: "bytes" in body ? body.bytes : body.stream };
}

/** An AbortSignal that fires when any of `signals` does (AbortSignal.any is Node ≥ 20). */
function anySignal(signals: AbortSignal[]): AbortSignal {
  const controller = new AbortController();
  for (const signal of signals) {
    if (signal.aborted) {
      controller.abort(signal.reason);
      break;
    }
    signal.addEventListener("abort", () => controller.abort(signal.reason), { once: true });
  }
  return controller.signal;
}

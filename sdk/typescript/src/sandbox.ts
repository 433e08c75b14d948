/**
 * `Sandbox`: one microVM the daemon keeps — create, connect, list, kill, branch, fork, pause,
 * resume, logs, timeout — with its `commands` and `files`. Every method is one API call
 * (`fork` is two: branch, then create).
 */

import { Client, sharedClient } from "./client.js";
import { Commands } from "./commands.js";
import type { ConnectionOptions } from "./connection.js";
import { NotFoundError } from "./errors.js";
import { Files } from "./files.js";
import type {
  BranchReport,
  CreateSandboxes,
  DeletedSandboxes,
  EvalOutcome,
  NetworkSpec,
  Pong,
  SandboxLimits,
  SandboxList,
  SandboxRecord,
} from "./types.js";

// Node 18.18+ and 20+ define Symbol.asyncDispose; on older 18.x, the symbol Node itself uses.
(Symbol as { asyncDispose?: symbol }).asyncDispose ??= Symbol.for("nodejs.asyncDispose");

/** Which daemon: connection options, or a {@link Client} to share. */
export interface DaemonOptions extends ConnectionOptions {
  client?: Client;
}

/** What a new sandbox gets. */
export interface SandboxOptions {
  /** Seconds until it is killed and its files removed (default: until killed). */
  timeoutSecs?: number;
  /** Environment variables for every command run in it. */
  envs?: Record<string, string>;
  /** Labels to filter by later. */
  metadata?: Record<string, string>;
  /** cgroup v2 limits (refused with 422 where the host does not delegate the controllers). */
  limits?: SandboxLimits;
  /**
   * What it may reach, `CIDR[:PORT]` (e.g. `"10.1.2.0/24:443"`). With `allowDns`, its own
   * egress policy, replacing the one its snapshot recorded (which applies otherwise); egress
   * is denied unless allowed. The snapshot needs a network device (422 `no_network_device`).
   */
  allow?: string[];
  /** It may reach the host's resolvers (port 53). */
  allowDns?: boolean;
  /**
   * Host TCP ports forwarded to its guest ports, `"HOST_PORT:GUEST_PORT"`: one sandbox only
   * (a port another sandbox has is a 409 `port_taken`). Its network is in `record.network`.
   */
  publish?: string[];
}

/** Filters of {@link Sandbox.list} and {@link Sandbox.killAll}. */
export interface SandboxFilter {
  /** Only this snapshot's sandboxes. */
  tag?: string;
  /** Only those with every one of these labels. */
  metadata?: Record<string, string>;
}

/** Options of {@link Sandbox.branch}. */
export interface BranchOptions {
  /** The new snapshot's tag (default: `<id>-branch-<n>`). */
  tag?: string;
  /** Save only pages written since the last snapshot (default true); false: all of memory. */
  diff?: boolean;
}

/** A sandbox: a microVM forked from a snapshot, kept by the daemon. */
export class Sandbox implements AsyncDisposable {
  /** Run commands in it. */
  readonly commands: Commands;
  /** Its files. */
  readonly files: Files;

  private constructor(
    /** The daemon it lives in. */
    readonly client: Client,
    private current: SandboxRecord,
  ) {
    this.commands = new Commands(client.connection, current.id);
    this.files = new Files(client.connection, current.id);
  }

  /** Its id (`sb-...`). */
  get id(): string {
    return this.current.id;
  }

  /** The snapshot it was forked from. */
  get tag(): string {
    return this.current.tag;
  }

  /** The daemon's record of it, as of the last call that returned one. */
  get record(): SandboxRecord {
    return this.current;
  }

  /** Forks a new sandbox from the snapshot `tag`. */
  static async create(tag: string, options: SandboxOptions & DaemonOptions = {}): Promise<Sandbox> {
    const [sandbox] = await Sandbox.createMany(tag, 1, options);
    return sandbox!;
  }

  /** Forks `count` sandboxes from `tag` in one request. */
  static async createMany(
    tag: string,
    count: number,
    options: SandboxOptions & DaemonOptions = {},
  ): Promise<Sandbox[]> {
    const client = sharedClient(options);
    const list = await client.connection.json<SandboxList>({
      method: "POST",
      path: "/v1/sandboxes",
      body: { json: createRequest(tag, count, options) },
    });
    return list.sandboxes.map((record) => new Sandbox(client, record));
  }

  /** The sandbox `id`, which must exist. */
  static async connect(id: string, options: DaemonOptions = {}): Promise<Sandbox> {
    const client = sharedClient(options);
    const record = await client.connection.json<SandboxRecord>({ method: "GET", path: sandboxPath(id) });
    return new Sandbox(client, record);
  }

  /** The daemon's sandboxes, running and paused, optionally filtered. */
  static async list(filter: SandboxFilter = {}, options: DaemonOptions = {}): Promise<SandboxRecord[]> {
    const client = sharedClient(options);
    const list = await client.connection.json<SandboxList>({
      method: "GET",
      path: "/v1/sandboxes",
      query: filterQuery(filter),
    });
    return list.sandboxes;
  }

  /** Kills every sandbox matching `filter` (`{}` kills them all); what was and wasn't deleted. */
  static async killAll(filter: SandboxFilter, options: DaemonOptions = {}): Promise<DeletedSandboxes> {
    const query = filterQuery(filter);
    if (Object.keys(query).length === 0) query.all = "true";
    return sharedClient(options).connection.json<DeletedSandboxes>({
      method: "DELETE",
      path: "/v1/sandboxes",
      query,
    });
  }

  /** Restores a paused sandbox under its id (its timeout starts again, or `timeoutSecs`). */
  static async resume(
    id: string,
    options: { timeoutSecs?: number } & DaemonOptions = {},
  ): Promise<Sandbox> {
    const client = sharedClient(options);
    const body = options.timeoutSecs === undefined ? {} : { timeout_secs: options.timeoutSecs };
    const record = await client.connection.json<SandboxRecord>({
      method: "POST",
      path: `${sandboxPath(id)}/resume`,
      body: { json: body },
    });
    return new Sandbox(client, record);
  }

  /** Kills it and removes its files. */
  async kill(): Promise<void> {
    await this.client.connection.json<unknown>({ method: "DELETE", path: sandboxPath(this.id) });
  }

  /** Its record, fresh from the daemon. */
  async getInfo(): Promise<SandboxRecord> {
    return this.remember(await this.call("GET", ""));
  }

  /** Whether the daemon still has it and its VM runs. */
  async isRunning(): Promise<boolean> {
    try {
      return (await this.getInfo()).state !== "paused";
    } catch (error) {
      if (error instanceof NotFoundError) return false;
      throw error;
    }
  }

  /** Evaluates code in its warm interpreter (state persists between calls). */
  async eval(code: string, options: { timeoutSecs?: number } = {}): Promise<EvalOutcome> {
    const body = { code, ...(options.timeoutSecs === undefined ? {} : { timeout_secs: options.timeoutSecs }) };
    return this.call("POST", "/eval", body);
  }

  /** Asks its agent for a pong (a guest without an agent: ConflictError `no_agent`). */
  async ping(): Promise<Pong> {
    return this.call("GET", "/ping");
  }

  /** Snapshots its current state (it keeps running): a new tag to create sandboxes from. */
  async branch(options: BranchOptions = {}): Promise<BranchReport> {
    const body: { tag?: string; diff?: boolean } = {};
    if (options.tag !== undefined) body.tag = options.tag;
    if (options.diff !== undefined) body.diff = options.diff;
    return this.call("POST", "/branch", body);
  }

  /**
   * `n` new sandboxes continuing from its current state: a branch, then one create of `n`
   * (they get its environment unless `envs` is given).
   */
  async fork(n: number, options: SandboxOptions & BranchOptions = {}): Promise<Sandbox[]> {
    const branchOptions: BranchOptions = {};
    if (options.tag !== undefined) branchOptions.tag = options.tag;
    if (options.diff !== undefined) branchOptions.diff = options.diff;
    const report = await this.branch(branchOptions);
    const envs = options.envs ?? this.current.env;
    return Sandbox.createMany(report.tag, n, { ...options, envs, client: this.client });
  }

  /** Saves it to disk and stops its VM; its id stays (resume with {@link Sandbox.resume}). */
  async pause(): Promise<SandboxRecord> {
    return this.remember(await this.call("POST", "/pause"));
  }

  /** Resumes it after {@link pause}. */
  async resume(options: { timeoutSecs?: number } = {}): Promise<SandboxRecord> {
    const resumed = await Sandbox.resume(this.id, { ...options, client: this.client });
    return this.remember(resumed.record);
  }

  /** Its serial console since it was restored (at most the last `tail` bytes). */
  async logs(options: { tail?: number } = {}): Promise<string> {
    const response = await this.client.connection.request({
      method: "GET",
      path: `${sandboxPath(this.id)}/logs`,
      query: { tail: options.tail },
    });
    return response.text();
  }

  /** Kills it `seconds` from now instead of at its current expiry. */
  async setTimeout(seconds: number): Promise<SandboxRecord> {
    return this.remember(await this.call("POST", "/timeout", { timeout_secs: seconds }));
  }

  /** `await using sandbox = await Sandbox.create(...)` kills it at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill().catch((error: unknown) => {
      if (!(error instanceof NotFoundError)) throw error;
    });
  }

  private remember(record: SandboxRecord): SandboxRecord {
    this.current = record;
    return record;
  }

  private async call<T>(method: "GET" | "POST", suffix: string, json?: unknown): Promise<T> {
    return this.client.connection.json<T>({
      method,
      path: `${sandboxPath(this.id)}${suffix}`,
      ...(json === undefined ? {} : { body: { json } }),
    });
  }
}

/**
 * Runs `body` with a new sandbox and kills it afterwards, whatever happens (for code that
 * cannot use `await using`).
 */
export async function withSandbox<T>(
  tag: string,
  body: (sandbox: Sandbox) => Promise<T>,
  options: SandboxOptions & DaemonOptions = {},
): Promise<T> {
  const sandbox = await Sandbox.create(tag, options);
  try {
    return await body(sandbox);
  } finally {
    await sandbox[Symbol.asyncDispose]();
  }
}

function createRequest(tag: string, count: number, options: SandboxOptions): CreateSandboxes {
  const request: CreateSandboxes = { tag, count };
  if (options.timeoutSecs !== undefined) request.timeout_secs = options.timeoutSecs;
  if (options.envs) request.env = options.envs;
  if (options.metadata) request.metadata = options.metadata;
  if (options.limits) request.limits = options.limits;
  const network: NetworkSpec = {};
  if (options.allow !== undefined || options.allowDns !== undefined) {
    network.allow = [...(options.allow ?? [])];
    network.allow_dns = options.allowDns ?? false;
  }
  if (options.publish?.length) network.publish = [...options.publish];
  if (Object.keys(network).length > 0) request.network = network;
  return request;
}

function filterQuery(filter: SandboxFilter): Record<string, string> {
  const query: Record<string, string> = {};
  if (filter.tag !== undefined) query.tag = filter.tag;
  for (const [key, value] of Object.entries(filter.metadata ?? {})) query[`metadata.${key}`] = value;
  return query;
}

function sandboxPath(id: string): string {
  return `/v1/sandboxes/${encodeURIComponent(id)}`;
}

/**
 * `Client`: one daemon connection, the snapshot store (list, get, delete, pull with progress),
 * jobs, health and version. Sandboxes made through the same options share one Client.
 */

import { Connection, describeEndpoint, type ConnectionOptions } from "./connection.js";
import { ForkdError } from "./errors.js";
import type {
  Deleted,
  Health,
  JobView,
  PullRequest,
  SnapshotInfo,
  SnapshotList,
  Version,
} from "./types.js";

/** Options of {@link Snapshots.pull}. */
export interface PullOptions {
  /** Install under this tag (default: the package's name). */
  tag?: string;
  /** The hub's URL or directory (default: the daemon's). */
  hub?: string;
  /** Replace a different snapshot already under the tag. */
  force?: boolean;
  /** Called after each poll of the pull's job, with its progress. */
  onProgress?: (job: JobView) => void;
  /** How often to poll the job (default 250 ms). */
  pollIntervalMs?: number;
}

/** The daemon's snapshot store. */
export class Snapshots {
  constructor(private readonly connection: Connection) {}

  /** Every snapshot the store can read. */
  async list(): Promise<SnapshotInfo[]> {
    const list = await this.connection.json<SnapshotList>({ method: "GET", path: "/v1/snapshots" });
    return list.snapshots;
  }

  /** One snapshot. */
  async get(tag: string): Promise<SnapshotInfo> {
    return this.connection.json<SnapshotInfo>({ method: "GET", path: snapshotPath(tag) });
  }

  /** Deletes a snapshot (with `cascade`, its dependents too); the tags removed. */
  async delete(tag: string, options: { cascade?: boolean; force?: boolean } = {}): Promise<string[]> {
    const deleted = await this.connection.json<Deleted>({
      method: "DELETE",
      path: snapshotPath(tag),
      query: { cascade: options.cascade || undefined, force: options.force || undefined },
    });
    return deleted.deleted;
  }

  /**
   * Pulls `reference` (`namespace/name[@version]`, a pack URL, or a pack file on the daemon's
   * host) and waits for it; the finished job. A failed pull throws its error.
   */
  async pull(reference: string, options: PullOptions = {}): Promise<JobView> {
    const request: PullRequest = { reference };
    if (options.tag !== undefined) request.tag = options.tag;
    if (options.hub !== undefined) request.hub = options.hub;
    if (options.force) request.force = true;
    let job = await this.connection.json<JobView>({
      method: "POST",
      path: "/v1/snapshots",
      body: { json: request },
    });
    const interval = options.pollIntervalMs ?? 250;
    for (;;) {
      options.onProgress?.(job);
      if (job.state !== "running") break;
      await sleep(interval);
      job = await this.connection.json<JobView>({ method: "GET", path: jobPath(job.id) });
    }
    if (job.state === "failed") {
      const message = job.error?.message ?? `pull of ${reference} failed`;
      throw new ForkdError(message, 0, job.error?.code ?? "pull_failed");
    }
    return job;
  }
}

/** A connection to one forkd daemon. */
export class Client {
  readonly connection: Connection;
  readonly snapshots: Snapshots;

  constructor(options: ConnectionOptions = {}) {
    this.connection = new Connection(options);
    this.snapshots = new Snapshots(this.connection);
  }

  /** Where the daemon is, as `unix:PATH` or `http://HOST:PORT`. */
  get address(): string {
    return describeEndpoint(this.connection.endpoint);
  }

  /** `{status: "ok"}` when the daemon answers. */
  async health(): Promise<Health> {
    return this.connection.json<Health>({ method: "GET", path: "/healthz" });
  }

  /** forkd's version and the API's. */
  async version(): Promise<Version> {
    return this.connection.json<Version>({ method: "GET", path: "/version" });
  }

  /** One job (a pull), as it is now. */
  async job(id: string): Promise<JobView> {
    return this.connection.json<JobView>({ method: "GET", path: jobPath(id) });
  }

  /** Closes the client's connections. */
  async close(): Promise<void> {
    await this.connection.close();
  }
}

/** The Client for these options, shared by every call that passes the same ones. */
export function sharedClient(options: ConnectionOptions & { client?: Client } = {}): Client {
  if (options.client) return options.client;
  const key = JSON.stringify([
    options.host ?? process.env.FORKD_HOST ?? "",
    options.token ?? process.env.FORKD_TOKEN ?? "",
    options.requestTimeoutMs ?? null,
    process.env.XDG_RUNTIME_DIR ?? "",
    options.caCert ?? process.env.FORKD_CA_CERT ?? "",
  ]);
  let client = clients.get(key);
  if (!client) {
    client = new Client(options);
    clients.set(key, client);
  }
  return client;
}

const clients = new Map<string, Client>();

function snapshotPath(tag: string): string {
  return `/v1/snapshots/${encodeURIComponent(tag)}`;
}

function jobPath(id: string): string {
  return `/v1/jobs/${encodeURIComponent(id)}`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

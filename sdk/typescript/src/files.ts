/**
 * `sandbox.files`: a sandbox's files through its agent. Reads and writes stream both ways, so a
 * file of any size can go through a stream without being held in memory.
 */

import type { Connection } from "./connection.js";
import { NotFoundError } from "./errors.js";
import type { DirEntry, DirListing, FileStat, MakeDirInfo, WriteInfo } from "./types.js";

/** What a write takes: text (UTF-8), bytes, or a stream of bytes. */
export type WriteData = string | Uint8Array | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

/** Options of {@link Files.write}. */
export interface WriteOptions {
  /** Permission bits, e.g. 0o755 (default 0o644). */
  mode?: number;
  /** Create missing parent directories. */
  createDirs?: boolean;
}

/** Options of {@link Files.makeDir}. */
export interface MakeDirOptions {
  /** Permission bits (default 0o755). */
  mode?: number;
  /** Create missing parents, and accept a directory that exists (`mkdir -p`). */
  parents?: boolean;
}

/** The files of one sandbox; every path is absolute in the guest. */
export class Files {
  constructor(
    private readonly connection: Connection,
    private readonly sandboxId: string,
  ) {}

  /** A file's contents as text (UTF-8). */
  read(path: string, options?: { format?: "text" }): Promise<string>;
  /** A file's contents as bytes. */
  read(path: string, options: { format: "bytes" }): Promise<Uint8Array>;
  /** A file's contents as a stream, read from the guest as it is consumed. */
  read(path: string, options: { format: "stream" }): Promise<ReadableStream<Uint8Array>>;
  async read(
    path: string,
    options: { format?: "text" | "bytes" | "stream" } = {},
  ): Promise<string | Uint8Array | ReadableStream<Uint8Array>> {
    const response = await this.connection.request({
      method: "GET",
      path: this.route(""),
      query: { path },
    });
    if (options.format === "stream") return response.body ?? new ReadableStream();
    const bytes = new Uint8Array(await response.arrayBuffer());
    return options.format === "bytes" ? bytes : new TextDecoder().decode(bytes);
  }

  /** Writes a file (it appears, whole, when the upload ends). */
  async write(path: string, data: WriteData, options: WriteOptions = {}): Promise<WriteInfo> {
    const body =
      typeof data === "string" || data instanceof Uint8Array ? { bytes: data } : { stream: data };
    return this.connection.json<WriteInfo>({
      method: "PUT",
      path: this.route(""),
      query: { path, mode: octal(options.mode), create_dirs: options.createDirs || undefined },
      body,
    });
  }

  /** A directory's entries, sorted by name. */
  async list(path: string): Promise<DirEntry[]> {
    const listing = await this.connection.json<DirListing>({
      method: "GET",
      path: this.route("/list"),
      query: { path },
    });
    return listing.entries;
  }

  /** A file's kind, size, mode, time and owner (a final symlink is not followed). */
  async stat(path: string): Promise<FileStat> {
    return this.connection.json<FileStat>({ method: "GET", path: this.route("/stat"), query: { path } });
  }

  /** Whether `path` exists in the guest (a missing sandbox still throws NotFoundError). */
  async exists(path: string): Promise<boolean> {
    try {
      await this.stat(path);
      return true;
    } catch (error) {
      if (!(error instanceof NotFoundError)) throw error;
      // 404 for the file or for the sandbox itself: only the sandbox's is an error.
      await this.connection.request({ method: "GET", path: this.sandboxPath() });
      return false;
    }
  }

  /** Removes a file, or a directory with everything in it. */
  async remove(path: string): Promise<void> {
    await this.connection.json<unknown>({
      method: "DELETE",
      path: this.route(""),
      query: { path, recursive: true },
    });
  }

  /** Creates a directory. */
  async makeDir(path: string, options: MakeDirOptions = {}): Promise<MakeDirInfo> {
    return this.connection.json<MakeDirInfo>({
      method: "POST",
      path: this.route("/mkdir"),
      query: { path, mode: octal(options.mode), parents: options.parents || undefined },
    });
  }

  private sandboxPath(): string {
    return `/v1/sandboxes/${encodeURIComponent(this.sandboxId)}`;
  }

  private route(suffix: string): string {
    return `${this.sandboxPath()}/files${suffix}`;
  }
}

function octal(mode: number | undefined): string | undefined {
  return mode === undefined ? undefined : mode.toString(8);
}

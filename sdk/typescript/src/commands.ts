/**
 * `sandbox.commands`: run a command and read its output as it arrives (exec's NDJSON stream),
 * or start it in the background and wait for it or kill it later (the /processes routes).
 */

import type { Connection } from "./connection.js";
import { CommandExitError, ForkdError } from "./errors.js";
import type {
  ExecEvent,
  ExecRequest,
  ProcessInfo,
  ProcessKilled,
  ProcessList,
  ProcessStarted,
  ProcessWait,
} from "./types.js";

/** A command: a string for `sh -c`, or an argument vector. */
export type Cmd = string | string[];

/** Options of {@link Commands.run}. */
export interface RunOptions {
  /** Added to (and overriding) the sandbox's environment. */
  envs?: Record<string, string>;
  /** Absolute working directory in the guest. */
  cwd?: string;
  /** The command's process group is killed after this many seconds. */
  timeoutSecs?: number;
  /** Text for the command's standard input (then end of file). */
  stdin?: string;
  /** Called with each piece of standard output as it arrives (foreground only). */
  onStdout?: (data: string) => void;
  /** Called with each piece of standard error as it arrives (foreground only). */
  onStderr?: (data: string) => void;
  /** Throw a {@link CommandExitError} when the command does not exit with 0. */
  check?: boolean;
  /** Leaving the stream early ends the command in the guest. */
  signal?: AbortSignal;
}

/** How a command ended and what it wrote. */
export interface CommandResult {
  stdout: string;
  stderr: string;
  /** Its exit code; null when a signal ended it. */
  exitCode: number | null;
  /** The signal that ended it, if one did. */
  signal: number | null;
  /** Its `timeoutSecs` expired and it was killed. */
  timedOut: boolean;
  durationMs: number;
}

/** Run commands in one sandbox. */
export class Commands {
  constructor(
    private readonly connection: Connection,
    private readonly sandboxId: string,
  ) {}

  /** Runs `cmd` to its end, streaming its output to `onStdout` / `onStderr`. */
  run(cmd: Cmd, options?: RunOptions & { background?: false }): Promise<CommandResult>;
  /** Starts `cmd` in the background: a handle to wait for it or kill it. */
  run(cmd: Cmd, options: RunOptions & { background: true }): Promise<CommandHandle>;
  async run(
    cmd: Cmd,
    options: RunOptions & { background?: boolean } = {},
  ): Promise<CommandResult | CommandHandle> {
    if (options.background) return this.start(cmd, options);
    const response = await this.connection.request({
      method: "POST",
      path: `${this.base()}/exec`,
      body: { json: execRequest(cmd, options) },
      ...(options.signal ? { signal: options.signal } : {}),
    });
    const result = await readExecStream(response.body, options);
    if (options.check) checkExit(cmd, result);
    return result;
  }

  /** The background processes: running, and ended but not yet waited for. */
  async list(): Promise<ProcessInfo[]> {
    const list = await this.connection.json<ProcessList>({
      method: "GET",
      path: `${this.base()}/processes`,
    });
    return list.processes;
  }

  /** A handle on a background process started earlier. */
  connect(pid: number): CommandHandle {
    return new CommandHandle(this.connection, this.sandboxId, pid, null);
  }

  private async start(cmd: Cmd, options: RunOptions): Promise<CommandHandle> {
    if (options.onStdout || options.onStderr) {
      throw new ForkdError("onStdout/onStderr need a foreground command; call wait() on the handle", 0, "bad_request");
    }
    const started = await this.connection.json<ProcessStarted>({
      method: "POST",
      path: `${this.base()}/processes`,
      body: { json: execRequest(cmd, options) },
    });
    return new CommandHandle(this.connection, this.sandboxId, started.pid, started.started_ms);
  }

  private base(): string {
    return `/v1/sandboxes/${encodeURIComponent(this.sandboxId)}`;
  }
}

/** What a wait gives: the process's state and the output it captured. */
export interface ProcessResult extends CommandResult {
  /** `running` when the wait's timeout came first. */
  state: ProcessInfo["state"];
  /** Bytes that no longer fitted the daemon's capture (the last MiB of each is kept). */
  stdoutDropped: number;
  stderrDropped: number;
}

/** A background process in a sandbox. */
export class CommandHandle {
  constructor(
    private readonly connection: Connection,
    private readonly sandboxId: string,
    /** Its process id in the guest. */
    readonly pid: number,
    /** When it started (milliseconds since the epoch, guest clock), when known. */
    readonly startedMs: number | null,
  ) {}

  /** Waits for its end (or at most `timeoutSecs`; 0 just looks); check throws on non-zero. */
  async wait(options: { timeoutSecs?: number; check?: boolean } = {}): Promise<ProcessResult> {
    const waited = await this.connection.json<ProcessWait>({
      method: "POST",
      path: `${this.base()}/wait`,
      query: { timeout: options.timeoutSecs },
    });
    const result = processResult(waited);
    if (options.check && result.state === "exited") checkExit(waited.argv, result);
    return result;
  }

  /** Sends a signal (a number or a name like `TERM`; KILL by default). */
  async kill(signal?: number | string): Promise<ProcessKilled> {
    return this.connection.json<ProcessKilled>({
      method: "DELETE",
      path: this.base(),
      query: { signal },
    });
  }

  private base(): string {
    return `/v1/sandboxes/${encodeURIComponent(this.sandboxId)}/processes/${this.pid}`;
  }
}

function execRequest(cmd: Cmd, options: RunOptions): ExecRequest {
  const request: ExecRequest = { cmd };
  if (options.envs) request.env = options.envs;
  if (options.cwd !== undefined) request.cwd = options.cwd;
  if (options.timeoutSecs !== undefined) request.timeout_secs = options.timeoutSecs;
  if (options.stdin !== undefined) request.stdin = options.stdin;
  return request;
}

/** Reads exec's NDJSON lines as they arrive, until the `exit` (or `error`) line. */
export async function readExecStream(
  body: AsyncIterable<Uint8Array> | null,
  handlers: Pick<RunOptions, "onStdout" | "onStderr"> = {},
): Promise<CommandResult> {
  const output = { stdout: "", stderr: "" };
  for await (const line of ndjsonLines(body)) {
    const event = JSON.parse(line) as ExecEvent;
    if (event.type === "stdout" || event.type === "stderr") {
      const text = eventText(event);
      output[event.type] += text;
      (event.type === "stdout" ? handlers.onStdout : handlers.onStderr)?.(text);
    } else if (event.type === "exit") {
      return {
        ...output,
        exitCode: event.exit_code ?? null,
        signal: event.signal ?? null,
        timedOut: event.timed_out,
        durationMs: event.duration_ms,
      };
    } else if (event.type === "error") {
      throw new ForkdError(event.message, 502, event.code);
    }
  }
  throw new ForkdError("the exec stream ended without the command's exit", 502, "stream_ended");
}

/** The lines of a body, each as soon as its newline arrives. */
async function* ndjsonLines(body: AsyncIterable<Uint8Array> | null): AsyncGenerator<string> {
  if (!body) return;
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of body) {
    pending += decoder.decode(chunk, { stream: true });
    let newline: number;
    while ((newline = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, newline).trim();
      pending = pending.slice(newline + 1);
      if (line) yield line;
    }
  }
  pending += decoder.decode();
  if (pending.trim()) yield pending.trim();
}

/** An output event's text (`data`, or `data_b64` decoded, invalid UTF-8 replaced). */
function eventText(event: { data?: string | null; data_b64?: string | null }): string {
  if (event.data != null) return event.data;
  if (event.data_b64 != null) return Buffer.from(event.data_b64, "base64").toString("utf8");
  return "";
}

function processResult(waited: ProcessWait): ProcessResult {
  return {
    stdout: eventText({ data: waited.stdout ?? null, data_b64: waited.stdout_b64 ?? null }),
    stderr: eventText({ data: waited.stderr ?? null, data_b64: waited.stderr_b64 ?? null }),
    exitCode: waited.exit_code ?? null,
    signal: waited.signal ?? null,
    timedOut: waited.timed_out,
    durationMs: waited.ended_ms != null ? waited.ended_ms - waited.started_ms : 0,
    state: waited.state,
    stdoutDropped: waited.stdout_dropped,
    stderrDropped: waited.stderr_dropped,
  };
}

/** Throws a CommandExitError unless the command exited with 0. */
function checkExit(cmd: Cmd, result: CommandResult): void {
  if (result.exitCode === 0 && !result.timedOut) return;
  const how = result.timedOut
    ? "timed out"
    : result.signal != null
      ? `was killed by signal ${result.signal}`
      : `exited with ${result.exitCode}`;
  const lastLine = result.stderr.trim().split("\n").pop() ?? "";
  const text = Array.isArray(cmd) ? cmd.join(" ") : cmd;
  const message = `command ${JSON.stringify(text)} ${how}${lastLine ? `: ${lastLine}` : ""}`;
  throw new CommandExitError(message, result.exitCode, result.stdout, result.stderr);
}

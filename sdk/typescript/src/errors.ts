/**
 * Errors: every failure the SDK reports is a {@link ForkdError} carrying the daemon's HTTP
 * status, its stable `code` and its one-line message.
 */

/** What the daemon sends with every error response. */
export interface ErrorBody {
  code: string;
  message: string;
}

/** A request the daemon refused, or could not be reached for. */
export class ForkdError extends Error {
  /** The HTTP status (0 when no answer came at all). */
  readonly status: number;
  /** Stable and machine-readable: `not_found`, `conflict`, `no_agent`, `unauthorized`, ... */
  readonly code: string;

  constructor(message: string, status: number, code: string, options?: { cause?: unknown }) {
    super(oneLine(message), options);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
  }
}

/** 404: no such sandbox, snapshot, file, process or job. */
export class NotFoundError extends ForkdError {}

/** 401: a missing or wrong bearer token. */
export class AuthError extends ForkdError {}

/** 409: the thing exists but is in the wrong state (paused, no agent, tag taken, a host port another sandbox has, ...). */
export class ConflictError extends ForkdError {}

/** Another 4xx: a request the daemon will not honour (400, 403, 422 limits unsupported or no network device, 429 too many). */
export class RefusedError extends ForkdError {}

/** No daemon answers where the SDK looked; the message names the address and how to start one. */
export class DaemonNotRunningError extends ForkdError {}

/** A request did not finish within the client's `requestTimeoutMs`. */
export class RequestTimeoutError extends ForkdError {}

/** A command ended with a non-zero exit (raised by `commands.run` only with `check: true`). */
export class CommandExitError extends ForkdError {
  readonly exitCode: number | null;
  readonly stdout: string;
  readonly stderr: string;

  constructor(message: string, exitCode: number | null, stdout: string, stderr: string) {
    super(message, 0, "command_failed");
    this.exitCode = exitCode;
    this.stdout = stdout;
    this.stderr = stderr;
  }
}

/** The error for an HTTP error response, by status, from the daemon's `{code, message}`. */
export function errorFromResponse(status: number, body: unknown): ForkdError {
  const parsed = asErrorBody(body);
  const code = parsed?.code ?? `http_${status}`;
  const message = parsed?.message ?? `the daemon answered HTTP ${status}`;
  const Kind = errorClassFor(status);
  return new Kind(message, status, code);
}

function errorClassFor(status: number): typeof ForkdError {
  if (status === 404) return NotFoundError;
  if (status === 401) return AuthError;
  if (status === 409) return ConflictError;
  if (status >= 400 && status < 500) return RefusedError;
  return ForkdError;
}

function asErrorBody(body: unknown): ErrorBody | undefined {
  if (typeof body !== "object" || body === null) return undefined;
  const { code, message } = body as Record<string, unknown>;
  if (typeof code !== "string" || typeof message !== "string") return undefined;
  return { code, message };
}

/** Multi-line text as one line (the daemon's messages already are). */
export function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, "; ").trim();
}

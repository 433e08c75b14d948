/**
 * forkd's TypeScript SDK: drive microVM sandboxes through the forkd daemon's REST API
 * (`forkd serve`), over its Unix socket by default or `http://HOST:PORT` with a token.
 *
 * @example
 * ```ts
 * import { Sandbox } from "forkd";
 * await using sandbox = await Sandbox.create("python");
 * const result = await sandbox.commands.run("echo hi");
 * ```
 */

export { Sandbox, withSandbox } from "./sandbox.js";
export type { BranchOptions, DaemonOptions, SandboxFilter, SandboxOptions } from "./sandbox.js";
export { Commands, CommandHandle, readExecStream } from "./commands.js";
export type { Cmd, CommandResult, ProcessResult, RunOptions } from "./commands.js";
export { Files } from "./files.js";
export type { MakeDirOptions, WriteData, WriteOptions } from "./files.js";
export { Client, Snapshots } from "./client.js";
export type { PullOptions } from "./client.js";
export { Connection, defaultSocketPath, describeEndpoint, resolveEndpoint } from "./connection.js";
export type { ConnectionOptions, Endpoint } from "./connection.js";
export {
  AuthError,
  CommandExitError,
  ConflictError,
  DaemonNotRunningError,
  ForkdError,
  NotFoundError,
  RefusedError,
  RequestTimeoutError,
} from "./errors.js";
export type * from "./types.js";
export type { components, paths } from "./schema.js";

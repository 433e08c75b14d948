/**
 * The API's shapes, named: aliases of the types generated from the daemon's OpenAPI document
 * (`schema.ts`), plus the file routes' answers, which the document leaves as plain objects.
 */

import type { components } from "./schema.js";

type Schemas = components["schemas"];

export type SandboxRecord = Schemas["SandboxRecord"];
export type SandboxState = Schemas["SandboxState"];
export type SandboxLimits = Schemas["SandboxLimits"];
export type SandboxNetwork = Schemas["SandboxNetwork"];
export type NetworkSpec = Schemas["NetworkSpec"];
export type CreateSandboxes = Schemas["CreateSandboxes"];
export type SandboxList = Schemas["SandboxList"];
export type DeletedSandboxes = Schemas["DeletedSandboxes"];
export type BranchReport = Schemas["BranchReport"];
export type ExecRequest = Schemas["ExecRequest"];
export type ExecEvent = Schemas["ExecEvent"];
export type EvalOutcome = Schemas["EvalOutcome"];
export type EvalException = Schemas["EvalException"];
export type ProcessInfo = Schemas["ProcessInfo"];
export type ProcessStarted = Schemas["ProcessStarted"];
export type ProcessWait = Schemas["ProcessWait"];
export type ProcessKilled = Schemas["ProcessKilled"];
export type ProcessList = Schemas["ProcessList"];
export type Pong = Schemas["Pong"];
export type SnapshotInfo = Schemas["SnapshotInfo"];
export type SnapshotList = Schemas["SnapshotList"];
export type Deleted = Schemas["Deleted"];
export type JobView = Schemas["JobView"];
export type JobState = Schemas["JobState"];
export type PullRequest = Schemas["PullRequest"];
export type Health = Schemas["Health"];
export type Version = Schemas["Version"];

/** What a file is. */
export type FileKind = "file" | "dir" | "symlink" | "other";

/** A file's stat (a final symlink is not followed). */
export interface FileStat {
  kind: FileKind;
  size: number;
  /** Permission bits (`st_mode & 0o7777`). */
  mode: number;
  mtime_ms: number;
  uid: number;
  gid: number;
  link_target: string | null;
}

/** One directory entry. */
export interface DirEntry {
  name: string;
  stat: FileStat;
}

/** A directory's entries, sorted by name. */
export interface DirListing {
  entries: DirEntry[];
  /** The directory had more entries than the agent lists; only the first ones are here. */
  truncated: boolean;
}

/** What an upload wrote. */
export interface WriteInfo {
  path: string;
  size: number;
}

/** What a mkdir did. */
export interface MakeDirInfo {
  path: string;
  /** False when `parents` was set and the directory already existed. */
  created: boolean;
  stat: FileStat;
}

/**
 * Test helpers: a real `forkd serve` in a temporary home (FORKD_BIN, else the cargo target
 * directory's debug build), the demo guest's snapshot, and KVM detection.
 */

import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { accessSync, constants, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";

/** The forkd binary under test. */
export function forkdBin(): string {
  if (process.env.FORKD_BIN) return process.env.FORKD_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? path.join(os.homedir(), ".cache/forkd/target");
  return path.join(target, "debug/forkd");
}

/** Why tests needing KVM cannot run here (printed once as `SKIP: ...`), or undefined. */
export function kvmMissing(what: string): string | undefined {
  try {
    accessSync("/dev/kvm", constants.R_OK | constants.W_OK);
    return undefined;
  } catch {
    const reason = `${what}: /dev/kvm is missing or not writable`;
    console.log(`SKIP: ${reason}`);
    return reason;
  }
}

/** Temporary homes made by this test process, removed when it exits. */
const homes: string[] = [];
process.on("exit", () => homes.forEach((home) => rmSync(home, { recursive: true, force: true })));

/** A temporary forkd home with a runtime directory. */
export function tempHome(name: string): string {
  const home = mkdtempSync(path.join(os.tmpdir(), `forkd-ts-${name}-`));
  mkdirSync(path.join(home, "runtime"));
  homes.push(home);
  return home;
}

/** Environment for forkd commands run in `home`. */
function forkdEnv(home: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, FORKD_HOME: home, XDG_RUNTIME_DIR: path.join(home, "runtime") };
  delete env.RUST_LOG;
  return env;
}

/** Runs `forkd args...` in `home`; its stdout (throws with its stderr on failure). */
export function forkd(home: string, args: string[]): string {
  return execFileSync(forkdBin(), args, { env: forkdEnv(home), encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

/** The demo guest's snapshot (64 MiB) tagged `tag` in `home`. */
export function snapshotDemo(home: string, tag = "demo"): void {
  forkd(home, ["snapshot", "--tag", tag, "--kernel", "builtin:demo", "--mem-mib", "64"]);
}

/** A running `forkd serve`. */
export interface Daemon {
  home: string;
  socket: string;
  /** `http://127.0.0.1:PORT` (or `https://`) when started with a TCP listener. */
  origin?: string;
  stop(): Promise<void>;
}

/** Starts `forkd serve` in `home` and waits for its "listening on" line. */
export async function startDaemon(home: string, args: string[] = []): Promise<Daemon> {
  const socket = path.join(home, "forkd.sock");
  const child = spawn(forkdBin(), ["serve", "--socket", socket, "--state-dir", path.join(home, "daemon"), ...args], {
    env: forkdEnv(home),
    stdio: ["ignore", "ignore", "pipe"],
  });
  const line = await firstLine(child);
  if (!line.startsWith("forkd serve: listening on unix:")) {
    child.kill("SIGKILL");
    throw new Error(`forkd serve said ${JSON.stringify(line)}`);
  }
  const origin = /https?:\/\/[0-9.:]+/.exec(line)?.[0];
  return { home, socket, ...(origin ? { origin } : {}), stop: () => stopDaemon(child, home) };
}

/** A daemon listening on 127.0.0.1 too, whose TCP clients need `token`. */
export async function startTokenDaemon(home: string, token: string): Promise<Daemon> {
  const file = path.join(home, "token");
  writeFileSync(file, `${token}\n`, { mode: 0o600 });
  return startDaemon(home, ["--listen", "127.0.0.1:0", "--token-file", file]);
}

/**
 * A self-signed certificate for 127.0.0.1 made with openssl, as `{ cert, key }` paths in `home`;
 * undefined (after one SKIP line) without openssl.
 */
export function selfSignedCertificate(home: string, what: string): { cert: string; key: string } | undefined {
  const cert = path.join(home, "cert.pem");
  const key = path.join(home, "key.pem");
  try {
    execFileSync("openssl", [
      "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
      "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
      "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
    ], { stdio: "ignore" });
  } catch (error) {
    console.log(`SKIP: ${what}: openssl could not make a certificate (${(error as Error).message})`);
    return undefined;
  }
  return { cert, key };
}

/** A daemon serving HTTPS on 127.0.0.1 with `cert`/`key`, whose clients need `token`. */
export async function startTlsDaemon(home: string, token: string, tls: { cert: string; key: string }): Promise<Daemon> {
  const file = path.join(home, "token");
  writeFileSync(file, `${token}\n`, { mode: 0o600 });
  return startDaemon(home, ["--listen", "127.0.0.1:0", "--token-file", file, "--tls-cert", tls.cert, "--tls-key", tls.key]);
}

function firstLine(child: ChildProcess): Promise<string> {
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: child.stderr! });
    const timer = setTimeout(() => reject(new Error("forkd serve did not start within 30 s")), 30_000);
    lines.once("line", (line) => {
      clearTimeout(timer);
      // Keep draining stderr so the daemon never blocks on it.
      child.stderr!.resume();
      resolve(line);
    });
    child.once("exit", (code) => reject(new Error(`forkd serve exited with ${code} before listening`)));
  });
}

/** SIGTERM, then the zygotes this home's daemon started (they outlive it by design), then the home. */
async function stopDaemon(child: ChildProcess, home: string): Promise<void> {
  if (child.exitCode === null) {
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  }
  for (const pid of zygotePids(home)) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  }
  rmSync(home, { recursive: true, force: true });
}

/** Processes running `forkd __zygote` for the data directory `home`. */
function zygotePids(home: string): number[] {
  return readdirSync("/proc")
    .filter((name) => /^\d+$/.test(name))
    .map(Number)
    .filter((pid) => {
      try {
        const cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8");
        return cmdline.includes("__zygote") && cmdline.includes(home);
      } catch {
        return false;
      }
    });
}

/** Polls `probe` until it returns something other than undefined, or throws after `ms`. */
export async function eventually<T>(what: string, ms: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/**
 * src/schema.ts is what the pinned openapi-typescript makes of the daemon's OpenAPI document:
 * regenerated and compared, so a changed API fails here until `npm run generate` is run.
 */

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { tempHome } from "./helpers.js";

const root = fileURLToPath(new URL("../..", import.meta.url));
const generator = path.join(root, "scripts/generate-schema.mjs");
const documentPath = path.join(root, "../../crates/forkd-daemon/openapi.json");

function generate(...args: string[]): string {
  return execFileSync(process.execPath, [generator, "--stdout", ...args], { encoding: "utf8", maxBuffer: 16 << 20 });
}

test("src/schema.ts matches crates/forkd-daemon/openapi.json (else run `npm run generate`)", () => {
  const checkedIn = readFileSync(path.join(root, "src/schema.ts"), "utf8");
  assert.ok(generate() === checkedIn, "src/schema.ts is stale: run `npm run generate` in sdk/typescript");
});

test("a changed document generates a different schema", () => {
  const document = JSON.parse(readFileSync(documentPath, "utf8"));
  document.components.schemas.Version.properties.build = { type: "string" };
  const altered = path.join(tempHome("schema"), "openapi.json");
  writeFileSync(altered, JSON.stringify(document));
  const text = generate("--input", altered);
  assert.match(text, /build\?: string;/);
  assert.notEqual(text, readFileSync(path.join(root, "src/schema.ts"), "utf8"));
});

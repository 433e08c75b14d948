#!/usr/bin/env node
// Generates src/schema.ts from the daemon's OpenAPI document with the pinned openapi-typescript.
//
//   node scripts/generate-schema.mjs            writes src/schema.ts
//   node scripts/generate-schema.mjs --stdout   prints it (the staleness test compares the two)
//   ... --input FILE                            from another document (the test's altered copy)

import { readFile, writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";

import openapiTS, { COMMENT_HEADER, astToString } from "openapi-typescript";

const here = (relative) => fileURLToPath(new URL(relative, import.meta.url));
export const DOCUMENT = here("../../../crates/forkd-daemon/openapi.json");
export const OUTPUT = here("../src/schema.ts");

/** The schema module's text for the document at `path`. */
export async function generate(path = DOCUMENT) {
  const document = JSON.parse(await readFile(path, "utf8"));
  const ast = await openapiTS(document, { silent: true });
  return COMMENT_HEADER + astToString(ast);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const input = process.argv.indexOf("--input");
  const text = await generate(input > 0 ? process.argv[input + 1] : DOCUMENT);
  if (process.argv.includes("--stdout")) process.stdout.write(text);
  else await writeFile(OUTPUT, text);
}

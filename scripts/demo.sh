#!/usr/bin/env bash
# Installs what forkd needs (idempotently), builds it, and runs its main job on the built-in
# default: check the host, then snapshot the built-in demo guest and fork children from it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
setup_host

log "cargo build --release"
cargo build --release --quiet -p forkd-cli
forkd="$CARGO_TARGET_DIR/release/forkd"

log "forkd doctor"
"$forkd" doctor

log "forkd demo: snapshot the built-in demo guest (once), fork 100 children from it"
"$forkd" demo

log "forkd images"
"$forkd" images

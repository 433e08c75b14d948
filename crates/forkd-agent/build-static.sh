#!/bin/sh
# Builds a statically linked forkd-agent for guest images and verifies that it is static.
# Prints the binary's path as the last line of stdout.
#
#   crates/forkd-agent/build-static.sh            # musl when its Rust target is installed,
#                                                  # else glibc with +crt-static
#   FORKD_AGENT_LIBC=gnu crates/forkd-agent/build-static.sh   # force the glibc variant
#
# The target is always passed explicitly so RUSTFLAGS reach only the agent and its
# dependencies, never build scripts or proc macros (which must stay dynamic).
set -eu
cd "$(dirname "$0")/../.."

libc_choice=${FORKD_AGENT_LIBC:-auto}
if [ "$libc_choice" = auto ]; then
    if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        libc_choice=musl
    else
        libc_choice=gnu
    fi
fi
case "$libc_choice" in
    musl)
        target=x86_64-unknown-linux-musl
        rustflags="-C target-feature=+crt-static"
        ;;
    gnu)
        target=x86_64-unknown-linux-gnu
        rustflags="-C target-feature=+crt-static"
        ;;
    *)
        echo "build-static.sh: FORKD_AGENT_LIBC=$libc_choice is not one of auto, musl, gnu" >&2
        exit 2
        ;;
esac

# The workspace release profile keeps debug info; the guest copy does not need it.
RUSTFLAGS="${RUSTFLAGS:-} $rustflags" \
CARGO_PROFILE_RELEASE_DEBUG=0 \
CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release -p forkd-agent --bin forkd-agent --target "$target" >&2

# Where cargo put it: CARGO_TARGET_DIR moves the target directory (scripts/lib.sh sets it).
bin="${CARGO_TARGET_DIR:-target}/$target/release/forkd-agent"
description=$(file -b "$bin")
case "$description" in
    *"statically linked"* | *"static-pie linked"*) ;;
    *)
        echo "build-static.sh: $bin is not static: $description" >&2
        exit 1
        ;;
esac
if ldd "$bin" >/dev/null 2>&1 && ! ldd "$bin" 2>&1 | grep -q "statically linked"; then
    echo "build-static.sh: ldd lists shared libraries for $bin:" >&2
    ldd "$bin" >&2
    exit 1
fi
echo "build-static.sh: $bin ($libc_choice, $(wc -c <"$bin") bytes): $description" >&2
echo "$bin"

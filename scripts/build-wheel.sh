#!/usr/bin/env bash
# Builds `pip install forkd`: a manylinux x86_64 wheel holding the `forkd` binary and the Python
# SDK (sdk/python, maturin `bindings = "bin"`), and the source distribution (checked to build a
# wheel with cargo on its own), into dist/.
#
# The wheel is a release build, so it is cached under ~/.cache/forkd/wheels keyed by a hash of
# everything that goes into it (Cargo.lock, Cargo.toml, crates/ and sdk/python/ but their tests,
# the tool versions): a second run with the same inputs only copies the cached files.
#
#   scripts/build-wheel.sh            build (or reuse) dist/forkd-<version>-py3-none-manylinux_2_28_x86_64.whl
#   scripts/build-wheel.sh --print    print the cached wheel's path if there is one, build nothing
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

MATURIN_VERSION=1.16.0
# zig links the binary against an old glibc's symbol versions, so the wheel runs on any
# manylinux_2_28 system (this host's glibc 2.36 would otherwise make it manylinux_2_34 at best).
ZIG_VERSION=0.17.1
COMPATIBILITY=manylinux_2_28

wheel_inputs_hash() {
    {
        echo "maturin $MATURIN_VERSION zig $ZIG_VERSION $COMPATIBILITY"
        find Cargo.lock Cargo.toml crates sdk/python scripts/build-wheel.sh -type f \
            -not -path 'sdk/python/tests/*' -not -path 'crates/*/tests/*' -not -path 'crates/*/benches/*' \
            -not -path '*/__pycache__/*' \
            -not -path '*/.pytest_cache/*' -not -name '*.pyc' -print0 \
            | sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-16
}

# A private virtualenv with the pinned maturin and zig.
ensure_maturin() {
    local venv="$FORKD_CACHE/tools/maturin-$MATURIN_VERSION-zig-$ZIG_VERSION"
    if [ ! -x "$venv/bin/maturin" ]; then
        log "installing maturin $MATURIN_VERSION and zig $ZIG_VERSION into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet "maturin==$MATURIN_VERSION" "ziglang==$ZIG_VERSION"
    fi
    MATURIN="$venv/bin/maturin"
    # maturin finds zig through `python -m ziglang` of the python on PATH.
    export PATH="$venv/bin:$PATH"
}

main() {
    local hash cache
    hash="$(wheel_inputs_hash)"
    cache="$FORKD_CACHE/wheels/$hash"
    if [ "${1:-}" = --print ]; then
        compgen -G "$cache/forkd-*.whl" || return 1
        return 0
    fi
    if ! compgen -G "$cache/forkd-*.whl" >/dev/null || ! compgen -G "$cache/forkd-*.tar.gz" >/dev/null; then
        ensure_rust
        ensure_maturin
        local staging="$cache.tmp.$$"
        rm -rf "$staging"
        mkdir -p "$staging"
        log "building the wheel (release build of crates/forkd-cli) into $cache"
        (cd sdk/python && "$MATURIN" build --release --strip --zig \
            --compatibility "$COMPATIBILITY" --out "$staging")
        (cd sdk/python && "$MATURIN" sdist --out "$staging")
        # The sdist must build on its own with cargo, as `pip install forkd-*.tar.gz` does. Its
        # files all carry one fixed old mtime, so cargo would take the shared target directory's
        # build of an earlier sdist for current: unpack it and give its files the time of now.
        log "checking that the sdist builds a wheel with cargo"
        mkdir -p "$staging/sdist-src"
        tar xzf "$staging"/forkd-*.tar.gz -C "$staging/sdist-src"
        find "$staging/sdist-src" -type f -exec touch {} +
        "$(dirname "$MATURIN")/pip" wheel --quiet --no-deps --no-build-isolation \
            --wheel-dir "$staging/from-sdist" "$staging"/sdist-src/forkd-*/
        rm -rf "$staging/from-sdist" "$staging/sdist-src"
        rm -rf "$cache"
        mv "$staging" "$cache"
        # Every source change makes a new entry: keep the newest few.
        ls -1dt "$FORKD_CACHE/wheels"/*/ | tail -n +4 | xargs -r rm -rf
    else
        log "wheel inputs unchanged ($hash): reusing $cache"
    fi
    mkdir -p dist
    cp "$cache"/forkd-* dist/
    ls -1 "$cache"/forkd-* | sed 's|.*/|dist/|'
}

main "$@"

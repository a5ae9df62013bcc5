#!/usr/bin/env bash
# Installs what building and testing Holdfast needs on a fresh machine.
# Idempotent: safe to run before every build.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed; install Rust with rustup first" >&2
    exit 1
fi
if command -v rustup >/dev/null 2>&1; then
    # rust-toolchain.toml pins the toolchain; make sure it, its components
    # and the wasm target for plugins are present.
    toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
    rustup toolchain install "$toolchain" --profile minimal --component rustfmt,clippy >/dev/null
    rustup target add --toolchain "$toolchain" wasm32-wasip2 >/dev/null
fi

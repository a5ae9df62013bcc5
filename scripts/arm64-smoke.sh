#!/usr/bin/env bash
# Cross-compiles holdfast for aarch64-unknown-linux-gnu and runs scripts/smoke.py on it
# under qemu-user-static: start, an MQTT QoS 1 round trip, a plugin swap and rollback
# (cranelift compiling for aarch64), the range cache serving a byte range.
#
#   scripts/arm64-smoke.sh             # dev profile (shares the test build's host artifacts)
#   scripts/arm64-smoke.sh --release   # the release profile that scripts/package.sh ships
#
# Installs what it needs on Debian: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross,
# qemu-user-static, and the rustup target.
set -euo pipefail
cd "$(dirname "$0")/.."

profile_args=()
profile_dir=debug
if [ "${1:-}" = "--release" ]; then
    profile_args=(--release)
    profile_dir=release
fi

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        echo "error: need root (or sudo) to run: $*" >&2
        exit 1
    fi
}
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || ! command -v qemu-aarch64-static >/dev/null 2>&1 \
    || [ ! -d /usr/aarch64-linux-gnu/lib ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static >/dev/null
fi
if command -v rustup >/dev/null 2>&1; then
    toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
    rustup target add --toolchain "$toolchain" aarch64-unknown-linux-gnu >/dev/null
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
started=$(date +%s)
cargo build --locked -p holdfast --target aarch64-unknown-linux-gnu "${profile_args[@]}"
echo "arm64-smoke: cross build took $(($(date +%s) - started)) s"

python3 scripts/smoke.py --binary "target/aarch64-unknown-linux-gnu/$profile_dir/holdfast" \
    --runner "qemu-aarch64-static -L /usr/aarch64-linux-gnu"

#!/usr/bin/env bash
# Runs every test: plugin logic natively, the plugin runtime against real
# wasm components, and end-to-end tests of the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check-layers.sh
cargo test --workspace --locked "$@"

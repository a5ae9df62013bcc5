#!/usr/bin/env bash
# Builds and runs the gateway on its embedded defaults (or pass --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --locked -p holdfast -- run "$@"

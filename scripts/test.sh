#!/usr/bin/env bash
# Runs every test: plugin logic natively, the plugin runtime against real
# wasm components, and end-to-end tests of the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check-layers.sh
cargo test --workspace --locked "$@"
# The example Prometheus alert rules: valid, and firing when they should.
if [ $# -eq 0 ]; then
    promtool check rules packaging/prometheus/holdfast-alerts.yml
    promtool test rules packaging/prometheus/holdfast-alerts.test.yml
fi
# With no filter: the smoke test (scripts/smoke.py) on this machine's build, then on
# the ARM64 build under qemu-user-static (HOLDFAST_SKIP_ARM64=1 skips the ARM64 one:
# its cross build takes about 7 minutes on 2 cores).
if [ $# -eq 0 ]; then
    python3 scripts/smoke.py --binary target/debug/holdfast
    if [ "${HOLDFAST_SKIP_ARM64:-}" != 1 ]; then
        scripts/arm64-smoke.sh
    fi
fi

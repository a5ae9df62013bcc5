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

# Real peers for the end-to-end tests: Mosquitto's clients (and the broker,
# the benchmarks' peer) from Debian, Python paho-mqtt from PyPI.
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        echo "error: need root (or sudo) to run: $*" >&2
        exit 1
    fi
}
if ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1 \
    || ! { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi
# The range cache's clients: curl, wget and apt-get (with dpkg-deb to build
# the test repository's package).
missing=""
for tool in curl wget apt-get dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl wget apt dpkg >/dev/null
fi
# The status page's test drives headless Chromium through chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# The JetStream upstream's tests start a three-node cluster of nats-server.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi
# promtool checks and unit-tests the example alert rules (packaging/prometheus/).
if ! command -v promtool >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! python3 -c 'import paho.mqtt' >/dev/null 2>&1; then
    python3 -m pip install --quiet 'paho-mqtt>=2,<3'
fi
# The admin API's OpenAPI document is checked with openapi-spec-validator,
# and /metrics with prometheus_client's OpenMetrics parser.
if ! python3 -c 'import openapi_spec_validator' >/dev/null 2>&1; then
    python3 -m pip install --quiet 'openapi-spec-validator>=0.7,<1'
fi
if ! python3 -c 'import prometheus_client.openmetrics.parser' >/dev/null 2>&1; then
    python3 -m pip install --quiet 'prometheus-client>=0.17,<1'
fi
# docs/iothub.md's recipe is run with the real Azure IoT device SDK for
# Python (tests/e2e_readme.rs). It pins paho-mqtt 1.x, the tests above use
# 2.x, so it gets a virtual environment of its own.
azure_venv=target/azure-iot-venv
if ! "$azure_venv/bin/python" -c 'import azure.iot.device' >/dev/null 2>&1; then
    python3 -m venv "$azure_venv"
    "$azure_venv/bin/python" -m pip install --quiet 'azure-iot-device==2.14.0'
fi

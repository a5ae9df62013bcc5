#!/usr/bin/env bash
# Checks the crate layering of the workspace with `cargo tree`:
# - only holdfast-plugins depends on wasmtime (directly);
# - only holdfast-broker (its MQTT-over-QUIC listener) and holdfast-link
#   depend on quinn;
# - only holdfast-store depends on fjall;
# - the outbox, cache, store, model, broker, registry, iothub, link and
#   deploy crates do not pull in wasmtime at all, even indirectly (their tests
#   compile without a WebAssembly runtime);
# - the sans-IO protocol crates (holdfast-mqtt, holdfast-link-proto) pull in
#   no async runtime, no QUIC, no storage and no wasmtime;
# - holdfast-link reaches the broker, the hub, the deployer and the registry
#   only through holdfast-model's ports: it depends on none of them, even
#   indirectly.
# Cargo itself refuses dependency cycles between crates.
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0
crates=(holdfast-model holdfast-mqtt holdfast-store holdfast-metrics holdfast-tls holdfast-outbox
        holdfast-cache holdfast-plugins holdfast-registry holdfast-broker holdfast-iothub holdfast-link-proto
        holdfast-link holdfast-deploy holdfast)

direct() { # crate -> its direct normal dependencies, one name per line
    cargo tree --locked -p "$1" -e normal --depth 1 --prefix none --format '{p}' | tail -n +2 | awk '{print $1}' | sort -u
}
all() { # crate -> every normal dependency
    cargo tree --locked -p "$1" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u
}

allowed() { # dependency crate -> the crates allowed to depend on it directly
    case "$1" in
        wasmtime|wasmtime-wasi) echo "holdfast-plugins" ;;
        quinn) echo "holdfast-broker holdfast-link" ;;
        fjall) echo "holdfast-store" ;;
    esac
}

for c in "${crates[@]}"; do
    deps=$(direct "$c")
    for d in wasmtime wasmtime-wasi quinn fjall; do
        # Whole names: "holdfast" is not "holdfast-broker".
        if grep -qx "$d" <<<"$deps" && ! tr ' ' '\n' <<<"$(allowed "$d")" | grep -qx -- "$c"; then
            echo "layering: $c depends on $d directly (only $(allowed "$d") may)" >&2
            fail=1
        fi
    done
done

for c in holdfast-model holdfast-store holdfast-outbox holdfast-cache holdfast-registry holdfast-broker \
         holdfast-iothub holdfast-link holdfast-deploy; do
    if all "$c" | grep -qx wasmtime; then
        echo "layering: $c pulls in wasmtime" >&2
        fail=1
    fi
done

# The sans-IO protocol crates: no runtime, no sockets, no disk.
for c in holdfast-mqtt holdfast-link-proto; do
    for d in tokio quinn fjall wasmtime; do
        if all "$c" | grep -qx "$d"; then
            echo "layering: $c (sans-IO) pulls in $d" >&2
            fail=1
        fi
    done
done

# The link talks to the rest of the node through ports only.
for d in holdfast-broker holdfast-iothub holdfast-deploy holdfast-registry holdfast-plugins holdfast-cache; do
    if all holdfast-link | grep -qx "$d"; then
        echo "layering: holdfast-link depends on $d (use the ports in holdfast-model)" >&2
        fail=1
    fi
done

if [ "$fail" -ne 0 ]; then
    exit 1
fi
echo "layering: ok (${#crates[@]} crates checked)"

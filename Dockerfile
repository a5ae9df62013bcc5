# syntax=docker/dockerfile:1
#
# Holdfast edge gateway image.
#
#   docker build -t holdfast .
#   docker run -d --name holdfast -p 1883:1883 -p 8080:8080 \
#       -v holdfast-data:/var/lib/holdfast holdfast
#   docker exec holdfast holdfast link status
#
# The image runs `holdfast run` with /etc/holdfast/holdfast.toml: the embedded
# defaults with data_dir on the volume. Mount your own file there to change it.
# The admin API stays on 127.0.0.1:9600 inside the container; use it with
# `docker exec`. docs/operator-guide.md has the details.

# Match rust-toolchain.toml (channel = "1.95.0").
ARG RUST_VERSION=1.95.0

# ---------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build

# rust-toolchain.toml pins the toolchain; rustup uses it for every cargo call
# in this directory. Install that toolchain and the wasm32-wasip2 target that
# crates/holdfast-plugins/build.rs needs to compile the first-party plugins (as scripts/setup.sh
# does). This layer is cached until rust-toolchain.toml changes.
COPY rust-toolchain.toml ./
RUN toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml) \
    && test -n "$toolchain" \
    && rustup toolchain install "$toolchain" --profile minimal --component rustfmt,clippy \
    && rustup target add --toolchain "$toolchain" wasm32-wasip2

# The whole workspace: every member must be present for cargo to load it, and
# build.rs builds the plugins from plugins/, sdk/, wit/, tests/plugins/ and
# examples/. .dockerignore keeps target/ and .git out.
COPY . .

# target/ is a cache mount, so copy the binary out in the same step. The
# release profile keeps line tables (a 229 MB binary); the image gets it
# without debug info (about 50 MB), symbols kept for backtraces.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked -p holdfast \
    && mkdir -p /out \
    && strip --strip-debug -o /out/holdfast target/release/holdfast

# The image's config: the embedded defaults (MQTT on 0.0.0.0:1883, the range
# cache on 0.0.0.0:8080, admin on 127.0.0.1:9600, the example package sources)
# with data_dir moved to the volume. Checked before it is shipped.
RUN { printf '%s\n' \
        '# Holdfast container config: the embedded defaults (holdfast config default)' \
        '# with data_dir on the image volume. Mount your own file over this one.' \
        '# Every key is documented in docs/configuration.md.' \
        ''; \
      /out/holdfast config default \
        | sed 's|^data_dir = .*$|data_dir = "/var/lib/holdfast"|'; \
    } > /out/holdfast.toml \
    && grep -q '^data_dir = "/var/lib/holdfast"$' /out/holdfast.toml \
    && /out/holdfast config check /out/holdfast.toml

# ---------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: the system trust store for https origins of the range cache
# and for TLS to an MQTT broker.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged user. A bind-mounted data directory must be owned by
# uid 10001.
RUN groupadd --system --gid 10001 holdfast \
    && useradd --system --uid 10001 --gid holdfast --home-dir /var/lib/holdfast \
        --no-create-home --shell /usr/sbin/nologin holdfast \
    && install -d -o holdfast -g holdfast -m 0700 /var/lib/holdfast \
    && install -d -m 0755 /etc/holdfast

COPY --from=builder /out/holdfast /usr/local/bin/holdfast
COPY --from=builder /out/holdfast.toml /etc/holdfast/holdfast.toml

# Every holdfast command in the container (`run`, and `docker exec … holdfast
# status` and the like) reads this file, so the CLI finds the admin address
# and <data_dir>/admin.token without flags.
ENV HOLDFAST_CONFIG=/etc/holdfast/holdfast.toml

USER holdfast
WORKDIR /var/lib/holdfast
VOLUME ["/var/lib/holdfast"]

# MQTT (plain TCP) and the range cache, as in the shipped config. Publish more
# when your config enables them: 8883/tcp (mqtt.tls), 14567/udp (mqtt.quic),
# 15600/udp (link.enabled, child gateways connect here).
EXPOSE 1883/tcp 8080/tcp

# SIGTERM drains and syncs; give it time: docker stop -t 30.
STOPSIGNAL SIGTERM

# Healthy when the admin API answers. The first start compiles the plugins,
# hence the start period. Needs the admin API enabled in the config.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["holdfast", "status"]

ENTRYPOINT ["/usr/local/bin/holdfast"]
CMD ["run"]

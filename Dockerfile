# outboxd container image.
#
#   docker build -t outboxd .
#   docker run --rm -e DATABASE_URL=... -e OUTBOXD_RABBITMQ_URL=... outboxd
#
# Built with BuildKit (the default builder of Docker Engine 23+ and of Docker
# Compose v2); see the note on benches/ below for the legacy builder.

# ---- build stage ------------------------------------------------------------
FROM rust:1-bookworm AS builder

# native-tls links OpenSSL: headers and pkg-config for openssl-sys. Versions pinned to
# Debian 12's series, so a rebuild gets the same libraries (hadolint DL3008).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev=3.0.* pkg-config=1.8.* \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

COPY Cargo.toml Cargo.lock ./
COPY src/ src/
COPY sql/ sql/
COPY migrations/ migrations/
# benches/ is copied so that any [[bench]] target Cargo.toml declares resolves.
# The glob makes it optional: git does not keep an empty directory, and BuildKit
# lets a glob match nothing (the legacy builder does not, so with it benches/
# must exist in the build context).
COPY benche[s] benches/

# The registry and the build directory are BuildKit caches: a rebuild after a source
# change recompiles outboxd, not its dependencies. The binary is copied out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin outboxd \
 && cp target/release/outboxd /usr/local/bin/outboxd

# ---- runtime stage ----------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates=20230311* libssl3=3.0.* \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 outboxd \
 && useradd --system --uid 10001 --gid outboxd \
      --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin outboxd

COPY --from=builder /usr/local/bin/outboxd /usr/local/bin/outboxd

# Numeric so that orchestrators checking runAsNonRoot can verify it.
USER 10001:10001

# /metrics, /healthz and /readyz. outboxd listens on loopback by default (safe on a
# host); in a container loopback is the container's own, so nothing outside it
# (Prometheus, the orchestrator's probes) could reach it: the image listens on every
# address of the container. Override OUTBOXD_HTTP_LISTEN to change it.
ENV OUTBOXD_HTTP_LISTEN=0.0.0.0:9187
EXPOSE 9187

# `outboxd health` asks /readyz on this host (0.0.0.0 is asked on loopback): exit 0
# while ready, 1 while the database or a destination is down.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["outboxd", "health", "--timeout", "3s"]

ENTRYPOINT ["outboxd"]
CMD ["run", "--migrate"]

# outboxd container image.
#
#   docker build -t outboxd .
#   docker run --rm -e DATABASE_URL=... -e OUTBOXD_RABBITMQ_URL=... outboxd
#
# Built with BuildKit (the default builder of Docker Engine 23+ and of Docker
# Compose v2); see the note on benches/ below for the legacy builder.

# ---- build stage ------------------------------------------------------------
FROM rust:1-bookworm AS builder

# native-tls links OpenSSL: headers and pkg-config for openssl-sys.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config \
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

RUN cargo build --release --locked --bin outboxd

# ---- runtime stage ----------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 outboxd \
 && useradd --system --uid 10001 --gid outboxd \
      --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin outboxd

COPY --from=builder /build/target/release/outboxd /usr/local/bin/outboxd

# Numeric so that orchestrators checking runAsNonRoot can verify it.
USER 10001:10001

# /metrics and /healthz; outboxd listens on loopback unless OUTBOXD_HTTP_LISTEN
# says otherwise (e.g. 0.0.0.0:9187):
EXPOSE 9187

ENTRYPOINT ["outboxd"]
CMD ["run", "--migrate"]

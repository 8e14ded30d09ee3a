# Build stage: librdkafka is compiled by rdkafka-sys (needs a C toolchain, OpenSSL and zlib headers).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY schemas ./schemas
COPY benches ./benches
RUN cargo build --release --locked --bin copilot-ingest

# Runtime stage: small image, non-root user.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/copilot-ingest --create-home copilot
COPY --from=build /src/target/release/copilot-ingest /usr/local/bin/copilot-ingest
COPY schemas /usr/share/copilot-ingest/schemas
USER 10001
WORKDIR /var/lib/copilot-ingest
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:9464/healthz || exit 1
ENTRYPOINT ["copilot-ingest"]
CMD ["run"]

# Build: the same release build of the same binary that scripts/demo.sh runs.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
COPY config ./config
COPY benches ./benches
RUN cargo build --release --locked --bin keygate

# Run: small, non-root; migrations are embedded in the binary, so no loose files.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin keygate \
    && mkdir -p /var/lib/keygate/spool && chown keygate /var/lib/keygate/spool
COPY --from=build /src/target/release/keygate /usr/local/bin/keygate
COPY config/keygate.example.toml /etc/keygate/keygate.toml
USER keygate
ENV KEYGATE_CONFIG=/etc/keygate/keygate.toml
# Usage rows wait here while PostgreSQL is unreachable: keep it on a volume.
VOLUME ["/var/lib/keygate/spool"]
EXPOSE 8080 9090
# Probes the admin listener's /healthz; the image needs no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["keygate", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["serve"]

# Build: the same `cargo build --release` the quick start runs.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
COPY config ./config
COPY benches ./benches
RUN cargo build --release --locked --bin keygate

# Run: small, non-root, no shell tools needed (migrations are embedded in the binary).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin keygate
COPY --from=build /src/target/release/keygate /usr/local/bin/keygate
COPY config/keygate.example.toml /etc/keygate/keygate.toml
USER keygate
ENV KEYGATE_CONFIG=/etc/keygate/keygate.toml
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["serve"]

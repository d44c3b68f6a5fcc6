# Multi-stage build of the memtel service.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin memtel

FROM debian:bookworm-slim
COPY --from=build /src/target/release/memtel /usr/local/bin/memtel
ENV MEMTEL_LISTEN=0.0.0.0:8080
EXPOSE 8080
USER 65534
ENTRYPOINT ["/usr/local/bin/memtel"]

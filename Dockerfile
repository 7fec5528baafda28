# Build in the Rust image, run in slim Debian as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs* ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin beep-sfu

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home beep
COPY --from=build /src/target/release/beep-sfu /usr/local/bin/beep-sfu
USER beep
# Signalling/HTTP (LISTEN), the one media socket (UDP_LISTEN) and ICE over
# TCP for clients without UDP (TCP_LISTEN, the same port number by default).
ENV LISTEN=:8080 UDP_LISTEN=0.0.0.0:50000 RUST_LOG=info
EXPOSE 8080/tcp 50000/udp 50000/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/beep-sfu"]

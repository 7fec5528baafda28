# Build in the Rust image, run in slim Debian as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs* ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
# No debug info in the image's binary (about 12 MB instead of 130 MB; the
# repository's release profile keeps line tables for profiling).
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
RUN cargo build --release --locked --bin beep-sfu

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home beep \
    && mkdir -p /var/lib/beep-sfu && chown beep:beep /var/lib/beep-sfu
COPY --from=build /src/target/release/beep-sfu /usr/local/bin/beep-sfu
USER beep
# The data directory: the spool (bites NATS did not take before an exit,
# published at the next start) and, with --dev, the bite files. Keep it on a
# volume so a restarted container finds its spool.
WORKDIR /var/lib/beep-sfu
VOLUME /var/lib/beep-sfu
# Signalling/HTTP (LISTEN), the one media socket (UDP_LISTEN) and ICE over
# TCP for clients without UDP (TCP_LISTEN, the same port number by default).
ENV LISTEN=:8080 UDP_LISTEN=0.0.0.0:50000 RUST_LOG=info SPOOL_DIR=/var/lib/beep-sfu/spool
EXPOSE 8080/tcp 50000/udp 50000/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/beep-sfu"]

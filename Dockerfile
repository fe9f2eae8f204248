# Multi-stage build: compile in the Rust image, run as a non-root user in Debian slim.
# Build: docker build -t watchpost .     Run: see README.md#docker.
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, from the manifest alone with stub sources: this layer is rebuilt only
# when Cargo.toml, Cargo.lock or benches/ (declared in the manifest) change.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/.fingerprint/watchpost-* target/release/deps/watchpost-* \
              target/release/deps/libwatchpost-*
# Then the crate itself.
COPY src ./src
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/watchpost --create-home \
               --shell /usr/sbin/nologin watchpost
COPY --from=build /src/target/release/watchpost /usr/local/bin/watchpost
# The repository's layout, so a mounted config/ and probes/ work unchanged.
COPY config /etc/watchpost/config
COPY probes /etc/watchpost/probes
USER watchpost
# The data directory is the volume (owned by the watchpost user, whatever data_dir the
# config names); the API listens on all interfaces of the container.
ENV WATCHPOST_CONFIG=/etc/watchpost/config/watchpost.toml \
    WATCHPOST_DATA_DIR=/var/lib/watchpost \
    WATCHPOST_LISTEN=0.0.0.0:9464
VOLUME ["/var/lib/watchpost"]
EXPOSE 9464
# No curl in the image: bash's /dev/tcp asks the agent's own /health (503 when failing).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/9464 && printf "GET /health HTTP/1.0\r\n\r\n" >&3 && head -n1 <&3 | grep -q " 200 "'
ENTRYPOINT ["watchpost"]
CMD ["run"]

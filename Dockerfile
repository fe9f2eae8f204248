# Multi-stage build: compile in the Rust image, run as a non-root user in Debian slim.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked && strip target/release/watchpost

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/watchpost --create-home watchpost
COPY --from=build /src/target/release/watchpost /usr/local/bin/watchpost
COPY config /etc/watchpost
COPY probes /etc/watchpost/probes
# The shipped config points data_dir and probes relative to itself; in the image they live
# under /etc/watchpost and /var/lib/watchpost.
RUN sed -i 's|^data_dir = .*|data_dir = "/var/lib/watchpost"|; s|^probes = .*|probes = ["probes/*.toml"]|; s|^listen = .*|listen = "0.0.0.0:9464"|' /etc/watchpost/watchpost.toml
USER watchpost
VOLUME ["/var/lib/watchpost"]
EXPOSE 9464
ENV WATCHPOST_CONFIG=/etc/watchpost/watchpost.toml
# No curl in the image: bash's /dev/tcp asks the agent's own /health (503 when failing).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/9464 && printf "GET /health HTTP/1.0\r\n\r\n" >&3 && head -n1 <&3 | grep -q " 200 "'
ENTRYPOINT ["watchpost"]
CMD ["run"]

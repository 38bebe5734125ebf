# syntax=docker/dockerfile:1
# mjpfl images: one binary (coordinator, client, adversary, simulate, ...) on a small Debian.
#
# Users with registry access:   docker compose build && docker compose up
# Machines without a registry:  scripts/docker-local.sh  (builds the base image with debootstrap,
#                               the binary on the host, and this file's `prebuilt` target)

ARG BASE_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1.95-slim-bookworm

# --- runtime base: Debian + Fashion-MNIST (Debian package) + an unprivileged user -------------
FROM ${BASE_IMAGE} AS runtime-base
RUN set -eux; \
    if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dataset-fashion-mnist ca-certificates; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    useradd --system --uid 10001 --home-dir /runs --shell /usr/sbin/nologin mjpfl; \
    mkdir -p /runs /secrets /etc/mjpfl; chown mjpfl:mjpfl /runs /secrets
ENV MJPFL_DATA=/data RUST_LOG=info
WORKDIR /runs
EXPOSE 50051

# --- prebuilt: the binary built on the host (scripts/docker-local.sh) ------------------------
FROM runtime-base AS prebuilt
COPY docker/bin/mjpfl /usr/local/bin/mjpfl
USER mjpfl
ENTRYPOINT ["/usr/local/bin/mjpfl"]

# --- build: compile in a Rust image ----------------------------------------------------------
FROM ${RUST_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked && install -m 0755 target/release/mjpfl /mjpfl

# --- runtime (default target) ----------------------------------------------------------------
FROM runtime-base AS runtime
COPY --from=build /mjpfl /usr/local/bin/mjpfl
USER mjpfl
ENTRYPOINT ["/usr/local/bin/mjpfl"]

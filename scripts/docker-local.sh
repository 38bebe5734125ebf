#!/usr/bin/env bash
# Builds the mjpfl image on a machine that has a Docker engine but no image registry:
#  1. the base image the Dockerfile expects (debian:bookworm-slim) from a minimal Debian rootfs
#     made with debootstrap (with dataset-fashion-mnist and ca-certificates), `docker import`ed;
#  2. the release binary, on the host (Debian bookworm: same glibc as the image);
#  3. the Dockerfile's `prebuilt` target, tagged mjpfl:latest (what docker-compose.yml runs).
# Users with registry access do not need this: `docker compose build` builds everything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

base="${MJPFL_BASE_IMAGE:-debian:bookworm-slim}"
image="${MJPFL_IMAGE:-mjpfl:latest}"
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! docker image inspect "$base" >/dev/null 2>&1; then
  echo "[docker-local] building base image $base with debootstrap"
  if ! command -v debootstrap >/dev/null; then
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
  fi
  rootfs="$(mktemp -d)"
  trap 'as_root rm -rf "$rootfs"' EXIT
  as_root debootstrap --variant=minbase --include=dataset-fashion-mnist,ca-certificates \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
  as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  as_root tar -C "$rootfs" -c . | docker import - "$base" >/dev/null
fi

echo "[docker-local] building the release binary"
cargo build --release --locked
mkdir -p docker/bin
install -m 0755 -s "${CARGO_TARGET_DIR:-target}/release/mjpfl" docker/bin/mjpfl

echo "[docker-local] building $image (target prebuilt)"
docker build --target prebuilt --build-arg BASE_IMAGE="$base" -t "$image" . >/dev/null
echo "[docker-local] $image ready"

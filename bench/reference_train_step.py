#!/usr/bin/env python3
"""PyTorch reference for `mjpfl bench train-step`: the same ViT (linear patch embedding, CLS
token, learned additive PE, pre-norm blocks with fused qkv and GELU MLP, final LayerNorm, linear
head), the same shapes, one training step = forward + cross-entropy + backward + AdamW.

With `--pe mjp` the step is MJP's, as mjpfl's clients take it: each step draws a mask of
floor(ratio * N) patch positions (a uniform subset here, mjpfl draws blocks: the same number of
positions, so the same work), permutes those patches among themselves, gives every masked
position the shared unk row of the PE table (N + 2 rows), and adds the DAL loss (a
Linear-ReLU-Linear regressor from the visible positions' PE vectors to their grid coordinates,
L1, weight 0.01) to the cross-entropy.

Prints one JSON line: {"ms_per_step": ..., "std_ms": ..., "device": ..., "torch": ...}.
"""
import argparse, json, statistics, time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "vit-micro-28": dict(image=28, channels=1, patch=4, dim=64, depth=4, heads=4, classes=10),
    "vit-tiny-32": dict(image=32, channels=3, patch=4, dim=192, depth=12, heads=3, classes=10),
    "deit-s-224": dict(image=224, channels=3, patch=16, dim=384, depth=12, heads=6, classes=1000),
}


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        x = x + self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Vit(nn.Module):
    def __init__(self, image, channels, patch, dim, depth, heads, classes, mjp=False):
        super().__init__()
        self.patch = patch
        self.grid = image // patch
        n = self.grid ** 2
        self.n = n
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        # Row 0 cls, rows 1..=N the patches, row N + 1 unk (MJP only).
        self.pos = nn.Parameter(torch.randn(n + 1 + int(mjp), dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        self.dal = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 2)) if mjp else None
        if mjp:
            g = torch.arange(n)
            self.register_buffer("coords", torch.stack([g // self.grid, g % self.grid], 1).float())

    def forward(self, x, masked=None):
        b, c, hh, ww = x.shape
        p = self.patch
        x = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        rows = torch.arange(1, self.n + 1, device=x.device)
        if masked is not None:
            # The masked patches trade places; their positions read the unk row.
            sources = torch.arange(self.n, device=x.device)
            sources[masked] = masked[torch.randperm(len(masked), device=x.device)]
            x = x[:, sources]
            rows[masked] = self.n + 1
        x = self.embed(x) + self.pos[rows]
        x = torch.cat([(self.cls + self.pos[0]).expand(b, -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])

    def dal_loss(self, masked):
        visible = torch.ones(self.n, device=self.pos.device)
        visible[masked] = 0.0
        pred = self.dal(self.pos[1 : self.n + 1])
        return ((pred - self.coords).abs().sum(1) * visible).sum() / (2 * visible.sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="vit-tiny-32", choices=PRESETS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--pe", default="learned", choices=["learned", "mjp"])
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--dal-weight", type=float, default=0.01)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    cfg = PRESETS[a.preset]
    dev = torch.device(a.device)
    torch.manual_seed(0)
    mjp = a.pe == "mjp"
    model = Vit(**cfg, mjp=mjp).to(dev)
    masked_count = int(a.ratio * model.n)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.rand(a.batch, cfg["channels"], cfg["image"], cfg["image"], device=dev)
    y = torch.randint(0, cfg["classes"], (a.batch,), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for i in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if mjp:
            masked = torch.randperm(model.n, device=dev)[:masked_count]
            loss = F.cross_entropy(model(x, masked), y) + a.dal_weight * model.dal_loss(masked)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sync()
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({
        "ms_per_step": statistics.mean(times),
        "std_ms": statistics.pstdev(times),
        "device": str(dev),
        "pe": a.pe,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()

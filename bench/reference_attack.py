#!/usr/bin/env python3
"""PyTorch reference for `mjpfl bench attack`: Inverting Gradients with the PE-gradient term on
the same ViT (bench/reference_train_step.py's model), batch 1, learned PE, with the exact double
backward (create_graph=True) PyTorch offers. One iteration = the parameter gradient at the
current image, cosine distance to the target gradient (all parameters + the PE gradient as an
extra term), total variation, backward to the image, a signed Adam step.

Prints one JSON line: {"its_per_sec": ..., "torch": ..., "threads": ...}.
"""
import argparse, json, os, sys, time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_train_step import PRESETS, Vit  # noqa: E402


def cosine_distance(a, b):
    num = sum((x * y).sum() for x, y in zip(a, b))
    na = sum((x * x).sum() for x in a).sqrt()
    nb = sum((y * y).sum() for y in b).sqrt()
    return 1 - num / (na * nb + 1e-12)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="vit-micro-28", choices=PRESETS)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--pe-weight", type=float, default=30.0)
    ap.add_argument("--tv", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    cfg = PRESETS[a.preset]
    torch.manual_seed(0)
    model = Vit(**cfg)
    params = list(model.parameters())
    shape = (1, cfg["channels"], cfg["image"], cfg["image"])
    secret = torch.rand(shape)
    label = torch.tensor([3])
    target = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(secret), label), params)]
    pe_index = [i for i, (n, _) in enumerate(model.named_parameters()) if n == "pos"][0]

    x = torch.randn(shape).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.035)

    def step():
        opt.zero_grad()
        g = torch.autograd.grad(F.cross_entropy(model(x), label), params, create_graph=True)
        loss = cosine_distance(g, target) + a.pe_weight * cosine_distance([g[pe_index]], [target[pe_index]])
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        (loss + a.tv * tv).backward()
        x.grad.sign_()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)

    for _ in range(5):
        step()
    t = time.perf_counter()
    for _ in range(a.iterations):
        step()
    secs = time.perf_counter() - t
    print(json.dumps({"its_per_sec": a.iterations / secs, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()

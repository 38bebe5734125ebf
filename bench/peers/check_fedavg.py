#!/usr/bin/env python3
"""Checks that flower_bench.py and pfl_bench.py compute the job's FedAvg: a tiny federation
where the result does not depend on sampling or batch order (every client in every round, one
local step over its whole shard), run through both scripts and recomputed here directly.

    python check_fedavg.py          # prints the largest difference per framework; exit 1 if off

30 images, 4 clients (shards of 8, 8, 7, 7, so the example-count weighting matters), 2 rounds,
1 AdamW step of batch 8 (= the whole shard). The result is compared as the relative L2 error of
the whole update (see TOL), beside the error a plain unweighted mean would have.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EXAMPLES, CLIENTS, ROUNDS, BATCH, LR = 30, 4, 2, 8, 2e-3


def reference(weighted=True):
    """The job's FedAvg computed directly (weighted=False: a plain mean of the deltas, which the
    check must be able to tell apart)."""
    torch.set_num_threads(1)
    x, y = common.load_train(str(common.REPO / "data"), EXAMPLES)
    model = common.make_model(0)
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(ROUNDS):
        acc = {k: torch.zeros_like(v) for k, v in glob.items()}
        total = 0
        for c in range(CLIENTS):
            idx = common.shard(len(y), CLIENTS, c, 0)
            model.load_state_dict(glob)
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
            xb, yb = common.to_batch(x, y, np.sort(idx))
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            w = len(idx) if weighted else 1
            for k, v in model.state_dict().items():
                acc[k] += w * (v - glob[k])
            total += w
        glob = {k: glob[k] + acc[k] / total for k in glob}
    return glob


def rel_l2(a, b, base):
    """||a - b|| / ||b - base|| over all tensors."""
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b).sqrt()
    den = sum(((b[k] - base[k]) ** 2).sum() for k in b).sqrt()
    return (num / den).item()


# AdamW's first step is lr * g / (|g| + eps): for entries whose gradient is pure rounding noise
# (the key biases of attention, whose true gradient is 0) it moves by up to lr either way with
# the summation order, so the check compares whole updates in L2, not entries.
TOL = 1e-2


def main():
    ref = reference()
    init = common.make_model(0).state_dict()
    unweighted = rel_l2(reference(weighted=False), ref, init)
    print(json.dumps({"reference": "unweighted mean instead of weighted", "rel_l2": unweighted}))
    py = sys.executable
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, script in [("flower", "flower_bench.py"), ("pfl", "pfl_bench.py")]:
            out = Path(tmp) / f"{name}.pt"
            cmd = [py, str(HERE / script), "--clients", str(CLIENTS), "--per-round", str(CLIENTS),
                   "--rounds", str(ROUNDS), "--local-steps", "1", "--batch-size", str(BATCH),
                   "--examples", str(EXAMPLES), "--save-model", str(out)]
            if name == "pfl":
                cmd += ["--threads", "1"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0 or not out.exists():
                print(f"{name}: run failed (rc {p.returncode})\n{p.stderr[-3000:]}")
                ok = False
                continue
            got = torch.load(out)
            err = rel_l2(got, ref, init)
            good = err < TOL
            ok &= good
            print(json.dumps({"framework": name, "rel_l2": err, "tolerance": TOL, "ok": good}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Shared pieces of the peer benchmarks (Flower, pfl): the job's arguments, Fashion-MNIST, IID
shards as index slices into one shared array, the model, the local update, and measuring.

The job is mjpfl's cross-device scale job (issue 16): N registered clients with an IID shard of
the 60,000 Fashion-MNIST training images each, a cohort of K sampled per round, R rounds, S local
AdamW steps (lr 2e-3, weight decay 0, fresh optimiser state each round) of batch B, the weight
delta uploaded, FedAvg on the server (mean weighted by example count, server lr 1), no
evaluation. The model is bench/reference_train_step.py's ViT, preset vit-micro-28.

Pixels: uint8 kept as they are in one shared array (47 MB), each batch scaled to [0, 1] and then
normalised with (x - 0.2860) / 0.3530 (Fashion-MNIST's mean and std). Normalisation costs nothing
measurable and does not change the timing.
"""
import argparse
import gzip
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

MEAN, STD = 0.2860, 0.3530


def parse_args(framework, extra=None):
    ap = argparse.ArgumentParser(description=f"mjpfl's cross-device scale job in {framework}")
    ap.add_argument("--clients", type=int, default=100, help="registered clients N")
    ap.add_argument("--per-round", type=int, default=100, help="cohort K sampled per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3, help="client AdamW learning rate")
    ap.add_argument("--data-dir", default=os.environ.get("MJPFL_DATA", str(REPO / "data")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="free text copied into the JSON line")
    ap.add_argument("--examples", type=int, default=0,
                    help="use only the first M training images (0 = all 60,000; for checks)")
    ap.add_argument("--save-model", default="",
                    help="write the final global state dict here (torch.save; for checks)")
    if extra:
        extra(ap)
    a = ap.parse_args()
    if a.per_round > a.clients:
        ap.error("--per-round must not exceed --clients")
    return a


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


_DATA = None


def load_train(data_dir, examples=0):
    """Fashion-MNIST's training split as (uint8 [60000, 1, 28, 28], int64 [60000]) (the first
    `examples` of it when > 0); loaded once per process."""
    global _DATA
    if _DATA is None:
        d = Path(data_dir) / "fashion-mnist"
        x = _read_idx(d / "train-images-idx3-ubyte.gz").reshape(-1, 1, 28, 28)
        y = _read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64)
        if examples > 0:
            x, y = x[:examples], y[:examples]
        _DATA = (x, y)
    return _DATA


_PERM = {}


def shard(n_examples, n_clients, client, seed=0):
    """Client `client`'s IID shard: a strided view of one shared permutation (no copy), dealt out
    round-robin like mjpfl's IID partition (client i gets positions i, i + N, i + 2N, ...)."""
    key = (n_examples, seed)
    if key not in _PERM:
        _PERM[key] = np.random.default_rng(seed).permutation(n_examples)
    return _PERM[key][client::n_clients]


def make_model(seed=0):
    import torch
    from reference_train_step import PRESETS, Vit

    torch.manual_seed(seed)
    return Vit(**PRESETS["vit-micro-28"])


def to_batch(x_u8, y, idx):
    import torch

    xb = torch.from_numpy(x_u8[idx].astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD)
    return xb, torch.from_numpy(y[idx])


def local_update(model, x_u8, y, idx, steps, batch_size, lr, rng):
    """mjpfl's FedAvg local update: batch = min(B, shard size), the shard in a shuffled order,
    step s takes the next `batch` positions (wrapping), a fresh AdamW each round; returns the
    trained parameters (the caller takes the delta) and the number of examples (= shard size, the
    FedAvg weight)."""
    import torch
    import torch.nn.functional as F

    b = min(batch_size, len(idx))
    order = idx[rng.permutation(len(idx))]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for s in range(steps):
        start = (s * b) % len(order)
        pos = [(start + k) % len(order) for k in range(b)]
        xb, yb = to_batch(x_u8, y, order[pos])
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return len(idx)


def _mem(pid):
    """(RSS, PSS) of one process in bytes, read together from /proc/PID/smaps_rollup (PSS splits
    each shared page among the processes that map it); None when unreadable."""
    rss = pss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        return None
    return None if rss is None or pss is None else (rss, pss)


def tree_mem(root, psutil, pss=True):
    """Summed (RSS, PSS, process count) of `root` (a psutil.Process) and its descendants. PSS
    needs the kernel to walk each process's page tables (~1-6 ms for a torch or Ray process), so
    samplers ask for it only every few samples (PSS is then 0); RSS costs ~0.02 ms."""
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0, 0, 0
    rss_sum = pss_sum = n = 0
    for p in procs:
        m = _mem(p.pid) if pss else None
        if m is None:
            try:
                m = (p.memory_info().rss, 0)
            except psutil.Error:
                continue
        rss_sum += m[0]
        pss_sum += m[1]
        n += 1
    return rss_sum, pss_sum, n


# measure.py sets this for the command it runs: it samples the whole tree itself, so the scripts
# leave their own sampler off (two samplers would cost twice the CPU on a 2-core machine).
OUTER_ENV = "MJPFL_PEERS_OUTER_MEASURE"
PSS_EVERY = 5  # samples: PSS every 1 s at the default 0.2 s


class TreeRss:
    """Peak memory of this process and all its descendants, sampled every `every` s with psutil:
    the peak of the summed RSS (the usual figure; it counts pages shared between
    processes, such as torch's libraries or Ray's object store in /dev/shm, once per process)
    and the peak of the summed PSS (each shared page split among its users, so the sum is the
    tree's real footprint; sampled every PSS_EVERY-th time, as it costs more). getrusage's
    per-process maxima are reported beside them. Off (peaks 0) when measure.py measures from
    outside."""

    def __init__(self, every=0.2):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.every = every
        self.peak = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self.enabled = not os.environ.get(OUTER_ENV)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self):
        rss, pss, n = tree_mem(self.me, self.psutil, pss=self.samples % PSS_EVERY == 0)
        self.peak = max(self.peak, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, n)
        self.samples += 1

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def start(self):
        if self.enabled:
            self._t.start()
        return self

    def stop(self):
        if not self.enabled:
            return 0
        self._stop.set()
        self._t.join()
        self.sample()
        return self.peak


def rusage_mb():
    """ru_maxrss (KiB on Linux) of this process and of the largest waited-for child, MB."""
    s = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    c = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(s, 1), round(c, 1)


def report(framework, a, wall, secs_per_round, peak_bytes, **extra):
    for i, s in enumerate(secs_per_round, 1):
        print(f"round {i}: {s:.2f} s")
    print(f"total wall: {wall:.2f} s")
    rec = {
        "framework": framework,
        "clients": a.clients,
        "per_round": a.per_round,
        "rounds": a.rounds,
        "local_steps": a.local_steps,
        "batch_size": a.batch_size,
        "wall_s": round(wall, 3),
        "secs_per_round": [round(s, 3) for s in secs_per_round],
        # None when measure.py measured the tree from outside (its record has the peak)
        "peak_rss_mb": round(peak_bytes / 1e6, 1) if peak_bytes else None,
    }
    if a.label:
        rec["label"] = a.label
    rec.update(extra)
    print(json.dumps(rec), flush=True)

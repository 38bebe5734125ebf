#!/usr/bin/env python3
"""Runs a command and measures it the same way whatever framework it is: wall seconds, and the
peak over time of the summed RSS of the command's whole process tree (Ray's GCS, raylet and
worker processes are descendants of Flower's driver), sampled every 0.2 s with psutil, and of
the summed PSS, sampled every 1 s (it costs the kernel a page-table walk per process, so it
may miss a short peak). The command runs with MJPFL_PEERS_OUTER_MEASURE=1, which turns the
peer scripts' own sampler off, in its own process group, ended whole on SIGTERM or Ctrl-C.

    measure.py --out FILE -- CMD [ARGS...]     # CMD's output passes through; FILE gets one JSON line

FILE: {"rc": .., "wall_s": .., "peak_rss_mb": .., "peak_pss_mb": .., "peak_procs": .., "maxrss_mb": ..}
where maxrss_mb is getrusage(RUSAGE_CHILDREN).ru_maxrss: the largest single process, what
`/usr/bin/time -v` calls "Maximum resident set size".
"""
import argparse
import contextlib
import json
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTER_ENV, PSS_EVERY, tree_mem  # noqa: E402
import os  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--every", type=float, default=0.2)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command")
    import psutil

    peak = {"rss": 0, "pss": 0, "procs": 0, "samples": 0}
    stop = threading.Event()
    t0 = time.perf_counter()
    # Its own process group, so that a timeout or Ctrl-C here ends the whole tree (Ray's too).
    child = subprocess.Popen(cmd, env={**os.environ, OUTER_ENV: "1"}, start_new_session=True)
    root = psutil.Process(child.pid)

    def end_tree(signum, _frame):
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            procs = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(OSError):
                os.killpg(child.pid, sig)
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            _, alive = psutil.wait_procs(procs, timeout=10)
            if not alive:
                break
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, end_tree)
    signal.signal(signal.SIGINT, end_tree)

    def sample():
        rss, pss, n = tree_mem(root, psutil, pss=peak["samples"] % PSS_EVERY == 0)
        peak["samples"] += 1
        peak["rss"] = max(peak["rss"], rss)
        peak["pss"] = max(peak["pss"], pss)
        peak["procs"] = max(peak["procs"], n)

    def loop():
        while not stop.is_set():
            sample()
            stop.wait(a.every)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    rc = child.wait()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    rec = {
        "rc": rc,
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(peak["rss"] / 1e6, 1),
        "peak_pss_mb": round(peak["pss"] / 1e6, 1),
        "peak_procs": peak["procs"],
        "samples": peak["samples"],
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }
    Path(a.out).write_text(json.dumps(rec) + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()

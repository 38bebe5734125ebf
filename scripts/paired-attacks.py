#!/usr/bin/env python3
"""Paired comparison of `mjpfl attack` runs over the same clients (standard library only).

Usage: scripts/paired-attacks.py [--attack fedavg-ig] REFERENCE_RUN RUN [RUN ...]

Each RUN is the directory `mjpfl attack` wrote (the one holding `attacks/round-*/case-*.json`).
Runs of the same images, client size and seed hold the same clients in the same order, so the
attack's mean PSNR per client can be differenced client by client: against the mean image of
the same client, and against the reference run's attack. Prints one row per run with the mean
and the 95% confidence interval (Student's t) of each paired difference; "resolved" where the
interval excludes zero.
"""

import argparse
import glob
import json
import math
import os
import sys

# Two-sided 95% quantiles of Student's t, by degrees of freedom.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086]


def per_client(run, attack):
    """{case id: (attack's mean PSNR, mean image's mean PSNR, label accuracy)}."""
    out = {}
    cases = sorted(glob.glob(os.path.join(run, "attacks", "round-*", "case-*.json")))
    if not cases:
        sys.exit(f"{run}: no attacks/round-*/case-*.json")
    for path in cases:
        with open(path) as f:
            case = json.load(f)
        psnr = {}
        for a in case["attacks"]:
            scores = (a.get("scores") or {}).get("vs_original") or []
            if scores:
                psnr[a["attack"]] = sum(s["psnr"] for s in scores) / len(scores)
        if attack not in psnr or "mean-image" not in psnr:
            sys.exit(f"{path}: no scored {attack} and mean-image")
        key = os.path.relpath(path, run)
        out[key] = (psnr[attack], psnr["mean-image"], case.get("label_accuracy"))
    return out


def ci(diffs):
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    t = T95[min(n - 2, len(T95) - 1)]
    return mean, t * sd / math.sqrt(n)


def fmt(mean, half):
    verdict = " (resolved)" if not math.isnan(half) and abs(mean) > half else ""
    return f"{mean:+.2f} ± {half:.2f}{verdict}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attack", default="fedavg-ig")
    p.add_argument("reference")
    p.add_argument("runs", nargs="+")
    args = p.parse_args()
    ref = per_client(args.reference, args.attack)
    print(f"| run | clients | {args.attack} mean PSNR (dB) | - mean image (dB) | "
          f"- {os.path.basename(os.path.normpath(args.reference))} (dB) | labels |")
    print("|---|---:|---:|---:|---:|---:|")
    for run in [args.reference] + args.runs:
        cur = per_client(run, args.attack)
        keys = sorted(set(cur) & set(ref))
        if len(keys) != len(cur):
            sys.exit(f"{run}: clients differ from the reference's")
        attack = [cur[k][0] for k in keys]
        vs_mean = [cur[k][0] - cur[k][1] for k in keys]
        vs_ref = [cur[k][0] - ref[k][0] for k in keys]
        labels = [cur[k][2] for k in keys if cur[k][2] is not None]
        label = f"{100 * sum(labels) / len(labels):.1f}%" if labels else "-"
        row_ref = "-" if run == args.reference else fmt(*ci(vs_ref))
        print(f"| {os.path.basename(os.path.normpath(run))} | {len(keys)} | "
              f"{sum(attack) / len(attack):.2f} | {fmt(*ci(vs_mean))} | {row_ref} | {label} |")


if __name__ == "__main__":
    main()

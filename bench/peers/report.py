#!/usr/bin/env python3
"""Turns the runs of run.sh into records and a table.

    report.py mjpfl RUN_DIR MEASURE_JSON --job NAME --clients N --per-round K --rounds R \
        --local-steps S --batch-size B         # one JSON line from mjpfl's rounds.jsonl
    report.py peer LOG MEASURE_JSON --job NAME  # the peer script's JSON line + measure.py's
    report.py table RESULTS_JSONL               # seconds per round and ratios to mjpfl

Every record gets `outer`: what measure.py saw of the whole process tree (wall seconds including
start-up, peak summed RSS and PSS), the same measurement for the three frameworks.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path


def mean(xs):
    return statistics.mean(xs) if xs else float("nan")


def last_json_line(path):
    for line in reversed(Path(path).read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{") and '"framework"' in line:
            return json.loads(line)
    raise SystemExit(f"{path}: no JSON result line (the run failed? see the log)")


def cmd_mjpfl(a):
    rounds = [json.loads(line) for line in
              (Path(a.run_dir) / "rounds.jsonl").read_text().splitlines() if line.strip()]
    # A retried round appears once per attempt; keep each round's last (committed) record.
    by_round = {}
    for r in rounds:
        by_round[r["round"]] = r
    recs = [by_round[k] for k in sorted(by_round)]
    outer = json.loads(Path(a.measure).read_text())
    rec = {
        "framework": "mjpfl",
        "job": a.job,
        "clients": a.clients,
        "per_round": a.per_round,
        "rounds": a.rounds,
        "local_steps": a.local_steps,
        "batch_size": a.batch_size,
        "wall_s": outer["wall_s"],
        # Round 1: open to commit (start-up excluded, as the peers' first round callback does
        # not include theirs either); later rounds: commit to commit, so whatever happens between
        # rounds (sampling, waking every waiting client, the next round's first task) counts.
        "secs_per_round": [round(recs[0]["wall_seconds"], 3)] + [
            round((b["committed_unix_ms"] - a["committed_unix_ms"]) / 1000.0, 3)
            for a, b in zip(recs, recs[1:])
        ] if recs else [],
        "open_to_commit_s": [round(r["wall_seconds"], 3) for r in recs],
        "aggregated_per_round": [len(r.get("aggregated", [])) for r in recs],
        "attempts": [r.get("attempt", 1) for r in recs],
        "peak_rss_mb": outer["peak_rss_mb"],
        "outer": outer,
    }
    if len(recs) != a.rounds:
        rec["error"] = f"{len(recs)} of {a.rounds} rounds in rounds.jsonl"
    print(json.dumps(rec))


def cmd_peer(a):
    rec = last_json_line(a.log)
    rec["job"] = a.job
    rec["outer"] = json.loads(Path(a.measure).read_text())
    if rec.get("peak_rss_mb") is None:  # the script's own sampler was off under measure.py
        rec["peak_rss_mb"] = rec["outer"]["peak_rss_mb"]
    print(json.dumps(rec))


def cmd_table(a):
    recs = [json.loads(line) for line in Path(a.results).read_text().splitlines() if line.strip()]
    jobs = {}
    for r in recs:
        key = (r.get("job", ""), r["clients"], r["per_round"], r["rounds"], r["local_steps"],
               r["batch_size"])
        jobs.setdefault(key, []).append(r)
    hdr = (f"{'job':<13} {'N':>6} {'fw':<7} {'s/round':>8} {'s/rnd 2+':>8} {'x mjpfl':>8} "
           f"{'x (2+)':>7} {'wall s':>7} {'RSS MB':>7} {'PSS MB':>7}  rounds (s)")
    print(hdr)
    print("-" * len(hdr))
    for key, rs in jobs.items():
        job, n, k, rounds, steps, batch = key
        base = next((r for r in rs if r["framework"] == "mjpfl" and "error" not in r), None)
        b_all = mean(base["secs_per_round"]) if base else None
        b_warm = mean(base["secs_per_round"][1:]) if base else None
        for r in rs:
            s = r["secs_per_round"]
            m_all, m_warm = mean(s), mean(s[1:])
            x_all = f"{m_all / b_all:.2f}" if b_all else "-"
            x_warm = f"{m_warm / b_warm:.2f}" if b_warm else "-"
            o = r.get("outer", {})
            print(f"{job:<13} {n:>6} {r['framework']:<7} {m_all:>8.2f} {m_warm:>8.2f} "
                  f"{x_all:>8} {x_warm:>7} {o.get('wall_s', r['wall_s']):>7.1f} "
                  f"{o.get('peak_rss_mb', r['peak_rss_mb']):>7.0f} "
                  f"{o.get('peak_pss_mb', float('nan')):>7.0f}  "
                  + " ".join(f"{x:.2f}" for x in s)
                  + (f"  ERROR {r['error']}" if "error" in r else ""))
        print(f"{'':<13} (cohort {k} of {n}, {rounds} rounds, {steps} local step(s) of batch "
              f"{batch})")
    print("x mjpfl: the peer's mean seconds per round / mjpfl's (x (2+): rounds 2.. only, without "
          "start-up in round 1). RSS/PSS: peak of the summed process tree (measure.py).")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mjpfl")
    m.add_argument("run_dir")
    m.add_argument("measure")
    m.add_argument("--job", required=True)
    for f in ("clients", "per_round", "rounds", "local_steps", "batch_size"):
        m.add_argument("--" + f.replace("_", "-"), type=int, required=True)
    p = sub.add_parser("peer")
    p.add_argument("log")
    p.add_argument("measure")
    p.add_argument("--job", required=True)
    t = sub.add_parser("table")
    t.add_argument("results")
    a = ap.parse_args()
    {"mjpfl": cmd_mjpfl, "peer": cmd_peer, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""mjpfl's cross-device scale job in Flower 1.42's Simulation Engine (Ray backend).

N virtual SuperNodes (one per registered client) run a message-API ClientApp in Ray actors of
1 CPU each (so 2 train at once on 2 cores, torch.set_num_threads(1) in each); the ServerApp runs
Flower's message-API FedAvg (flwr.serverapp.strategy.FedAvg) over weight deltas: each client
replies with (trained - global) and its shard size, the strategy's weighted mean of the deltas is
added to the global model (server lr 1). No evaluation (fraction_evaluate = 0).

Seconds per round: from configure_train (sampling, messages built) to the end of
aggregate_train. Peak RSS: this process plus every descendant (Ray's GCS, raylet, workers),
summed, sampled every 0.2 s.

    python flower_bench.py --clients 1000 --per-round 100 --rounds 5 --local-steps 1 --batch-size 8
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts bench/ on sys.path for reference_train_step)


def extra_args(ap):
    ap.add_argument("--cpus-per-client", type=float, default=1.0,
                    help="Ray num_cpus per ClientApp actor (1 = two actors on 2 cores)")
    ap.add_argument("--ray-cpus", type=int, default=0,
                    help="CPUs Ray may use (0 = all it detects)")
    ap.add_argument("--verbose", action="store_true", help="Flower's DEBUG logs")


A = common.parse_args("Flower", extra_args)
# The ClientApp reads the job from the environment: actors inherit it from this driver.
os.environ["PEERS_JOB"] = (f"{A.clients},{A.local_steps},{A.batch_size},{A.lr},{A.seed},"
                          f"{A.examples},{A.data_dir}")
# Quieter Ray, and no usage-stats prompt or upload attempt.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MetricRecord,  # noqa: E402
                      RecordDict)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

# ---------------------------------------------------------------- client side (in Ray actors)

_ACTOR = {}


def _actor_state():
    """Per actor process: the job, the shared uint8 training array and one model to load
    weights into (never one copy per client)."""
    if not _ACTOR:
        torch.set_num_threads(1)
        n, steps, batch, lr, seed, examples, data_dir = os.environ["PEERS_JOB"].split(",", 6)
        x, y = common.load_train(data_dir, int(examples))
        _ACTOR.update(n=int(n), steps=int(steps), batch=int(batch), lr=float(lr),
                      seed=int(seed), x=x, y=y, model=common.make_model())
    return _ACTOR


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    s = _actor_state()
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    model = s["model"]
    global_sd = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(global_sd)
    idx = common.shard(len(s["y"]), s["n"], pid, s["seed"])
    rng = np.random.default_rng((s["seed"], rnd, pid))
    n_ex = common.local_update(model, s["x"], s["y"], idx, s["steps"], s["batch"], s["lr"], rng)
    trained = model.state_dict()
    delta = {k: (trained[k] - global_sd[k]).detach() for k in trained}
    content = RecordDict({
        "arrays": ArrayRecord(delta),
        "metrics": MetricRecord({"num-examples": n_ex}),
    })
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------- server side (driver process)

ROUND_SECS = []
FINAL = {}


class DeltaFedAvg(FedAvg):
    """FedAvg over uploaded weight deltas: global += weighted mean of deltas (server lr 1)."""

    def configure_train(self, server_round, arrays, config, grid):
        self._t0 = time.perf_counter()
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        mean_delta, metrics = super().aggregate_train(server_round, replies)
        if len(replies) != A.per_round:
            print(f"round {server_round}: only {len(replies)} of {A.per_round} replies", flush=True)
        new = None
        if mean_delta is not None:
            g = self._global.to_torch_state_dict()
            d = mean_delta.to_torch_state_dict()
            new = ArrayRecord({k: g[k] + d[k] for k in g})
        ROUND_SECS.append(time.perf_counter() - self._t0)
        print(f"round {server_round}: {ROUND_SECS[-1]:.2f} s ({len(replies)} updates)", flush=True)
        return new, metrics


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    model = common.make_model(A.seed)
    strategy = DeltaFedAvg(
        fraction_train=A.per_round / A.clients,
        min_train_nodes=A.per_round,
        min_available_nodes=A.clients,
        fraction_evaluate=0.0,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=A.rounds,
        train_config=ConfigRecord({}),
        timeout=3600,
    )
    if A.save_model and result.arrays is not None:
        torch.save(result.arrays.to_torch_state_dict(), A.save_model)


def run():
    rss = common.TreeRss().start()
    t0 = time.perf_counter()
    init_args = {"include_dashboard": False, "log_to_driver": True}
    if A.ray_cpus > 0:
        init_args["num_cpus"] = A.ray_cpus
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=A.clients,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": A.cpus_per_client, "num_gpus": 0.0},
            "init_args": init_args,
        },
        verbose_logging=A.verbose,
    )
    wall = time.perf_counter() - t0
    peak = rss.stop()
    self_mb, child_mb = common.rusage_mb()
    if len(ROUND_SECS) != A.rounds:
        print(f"error: {len(ROUND_SECS)} of {A.rounds} rounds completed", file=sys.stderr)
        sys.exit(1)
    import flwr
    import ray

    common.report("flower", A, wall, ROUND_SECS, peak,
                  versions={"flwr": flwr.__version__, "ray": ray.__version__,
                            "torch": torch.__version__},
                  maxrss_self_mb=self_mb, maxrss_children_mb=child_mb,
                  peak_pss_mb=round(rss.peak_pss / 1e6, 1) if rss.enabled else None,
                  peak_procs=rss.peak_procs,
                  rss_samples=rss.samples)


if __name__ == "__main__":
    run()

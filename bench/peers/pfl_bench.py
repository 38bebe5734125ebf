#!/usr/bin/env python3
"""mjpfl's cross-device scale job in Apple's pfl-research 0.6 (in-process simulation, PyTorch).

pfl.algorithm.FederatedAveraging over a pfl.data.FederatedDataset of N users: each user is only an
id until it is sampled; its pfl.data.Dataset is then built from its slice of indices into the one
shared uint8 training array (a few dozen images). A cohort of K distinct users per round (a
without-replacement user sampler: pfl's 'random' sampler draws with replacement and
'minimize_reuse' walks the ids in order), S local AdamW steps (PyTorchModel's
local_optimizer_create, a fresh optimiser per user), the model difference uploaded, weighted by
the user's number of datapoints (WeightByDatapoints), averaged, and applied with a central SGD of
lr 1 (FedAvg). No evaluation: pfl evaluates every user before and after local training in
iterations where `iteration % evaluation_frequency == 0`, which includes iteration 0 whatever the
frequency, so the algorithm below turns do_evaluation off.

One process, users trained one after another, torch with all cores (--threads 0) like mjpfl's
default --train-concurrency 1.

    python pfl_bench.py --clients 1000 --per-round 100 --rounds 5 --local-steps 1 --batch-size 8
"""
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def extra_args(ap):
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")


A = common.parse_args("pfl", extra_args)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.aggregate.weighting import WeightByDatapoints  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics, Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402


class PflVit(torch.nn.Module):
    """The reference ViT with the `loss` and `metrics` methods PyTorchModel requires."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit(x)

    def loss(self, x, y, eval=False):  # noqa: A002  (pfl's signature)
        self.eval() if eval else self.train()
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=True):  # noqa: A002
        self.eval() if eval else self.train()
        loss = F.cross_entropy(self(x), y, reduction="sum").item()
        return {"loss": Weighted(loss, len(y))}


class CohortSampler:
    """pfl's user-sampler interface (`callable() -> user_id`), drawing each cohort of K users
    without replacement: a new K-of-N draw whenever the previous cohort is used up (every round
    asks for exactly K)."""

    def __init__(self, n, k, seed):
        self.n, self.k = n, k
        self.rng = np.random.default_rng(seed)
        self.queue = []

    def __call__(self):
        if not self.queue:
            self.queue = list(self.rng.choice(self.n, self.k, replace=False))
        return int(self.queue.pop())


class NoEvalFedAvg(FederatedAveraging):
    """FederatedAveraging without the per-user evaluation pfl runs in iteration 0."""

    def get_next_central_contexts(self, *args, **kwargs):
        contexts, model, metrics = super().get_next_central_contexts(*args, **kwargs)
        if contexts is not None:
            contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
        return contexts, model, metrics


class RoundTimer(TrainingProcessCallback):
    def __init__(self):
        self.secs = []
        self.updates = []

    def on_train_begin(self, *, model):
        self.t = time.perf_counter()
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        now = time.perf_counter()
        self.secs.append(now - self.t)
        self.t = now
        print(f"round {central_iteration + 1}: {self.secs[-1]:.2f} s", flush=True)
        return False, Metrics()


def main():
    if A.threads > 0:
        torch.set_num_threads(A.threads)
    rss = common.TreeRss().start()
    t0 = time.perf_counter()
    x, y = common.load_train(A.data_dir, A.examples)
    n_examples = len(y)
    data_rng = np.random.default_rng(A.seed + 1)

    def make_dataset_fn(user_id):
        # The user's shard, in a fresh shuffled order (mjpfl shuffles each round too); pfl's
        # Dataset then yields consecutive batches of local_batch_size.
        idx = common.shard(n_examples, A.clients, int(user_id), A.seed)
        idx = idx[data_rng.permutation(len(idx))]
        xb, yb = common.to_batch(x, y, idx)
        return Dataset((xb, yb), user_id=str(user_id))

    training = FederatedDataset(make_dataset_fn, CohortSampler(A.clients, A.per_round, A.seed))
    backend = SimulatedBackend(training_data=training, val_data=None,
                               postprocessors=[WeightByDatapoints()])
    net = PflVit(common.make_model(A.seed))
    model = PyTorchModel(
        model=net,
        local_optimizer_create=lambda params, lr: torch.optim.AdamW(params, lr=lr,
                                                                    weight_decay=0.0),
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=A.rounds,
        evaluation_frequency=A.rounds + 1,
        train_cohort_size=A.per_round,
        val_cohort_size=0,
    )
    train_params = NNTrainHyperParams(
        local_num_epochs=None,
        local_num_steps=A.local_steps,
        local_learning_rate=A.lr,
        local_batch_size=A.batch_size,
    )
    timer = RoundTimer()
    NoEvalFedAvg().run(
        algorithm_params=algorithm_params,
        backend=backend,
        model=model,
        model_train_params=train_params,
        model_eval_params=NNEvalHyperParams(local_batch_size=None),
        callbacks=[timer],
    )
    wall = time.perf_counter() - t0
    peak = rss.stop()
    if A.save_model:
        torch.save(net.vit.state_dict(), A.save_model)
    self_mb, _ = common.rusage_mb()
    if len(timer.secs) != A.rounds:
        print(f"error: {len(timer.secs)} of {A.rounds} rounds completed", file=sys.stderr)
        sys.exit(1)
    import pfl

    common.report("pfl", A, wall, timer.secs, peak,
                  versions={"pfl": getattr(pfl, "__version__", "0.6"),
                            "torch": torch.__version__},
                  torch_threads=torch.get_num_threads(),
                  maxrss_self_mb=self_mb,
                  peak_pss_mb=round(rss.peak_pss / 1e6, 1) if rss.enabled else None,
                  rss_samples=rss.samples)


if __name__ == "__main__":
    main()

//! Clients training in parallel (issue 16): a run does not depend on how many clients train at
//! once. Two parts make that true, each tested on a real coordinator over loopback gRPC:
//! the coordinator folds accepted updates in client-id order whatever order they arrive in
//! (`training.ordered_fold_mb`), and a client's update is bit-identical whatever the number of
//! workers and threads it trains on. Simulated clients handing their downloads and uploads to
//! the coordinator in process give the same run bit for bit, and meet the same checks.

mod common;

use common::{RawClient, messages, small_config};
use mjp::NamedTensors;
use mjp::layout::RunLayout;
use mjpfl_coordinator::service::FederationService;
use mjpfl_coordinator::{Coordinator, rundir};
use mjpfl_lab::{ClientTransport, SimulationOptions, run_simulation};
use tonic::Code;

fn bits(t: &NamedTensors) -> Vec<u32> {
    t.tensors()
        .iter()
        .flat_map(|x| x.data.iter().map(|v| v.to_bits()))
        .collect()
}

/// One round of three hand-made updates, submitted in `order`; returns the committed model.
async fn fold_in_order(order: [usize; 3], ordered_fold_mb: u64) -> NamedTensors {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(3, 1);
    config.data.skip_eval = true;
    config.training.ordered_fold_mb = Some(ordered_fold_mb);
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    let endpoint = format!("http://{}", coordinator.addr);
    // Joined in the same order each time: the same ids get the same updates.
    let mut raws = Vec::new();
    for _ in 0..3 {
        raws.push(RawClient::join(&endpoint, "mjpfl").await.unwrap());
    }
    let mut tasks = Vec::new();
    for raw in &mut raws {
        tasks.push(raw.train_task().await);
    }
    let global = raws[0].model(tasks[0].model_version).await;
    // Updates of very different magnitudes, so that f32 sums depend on their order.
    let updates: Vec<NamedTensors> = [3e-2f32, -1.1e-6, 7.3e-4]
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let mut u = global.clone();
            for (j, t) in u.tensors_mut().iter_mut().enumerate() {
                for (k, v) in t.data.iter_mut().enumerate() {
                    *v = s * (*v + ((i * 31 + j * 7 + k) % 13) as f32 * 0.01);
                }
            }
            u
        })
        .collect();
    for &i in &order {
        let raw = &mut raws[i];
        let msgs = messages(&raw.token, &tasks[i], &updates[i], |_, _| {});
        let reply = raw
            .client
            .submit_update(tokio_stream::iter(msgs))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.accepted);
    }
    coordinator.run_to_completion().await.unwrap();
    let rounds = rundir::read_rounds(dir.path()).unwrap();
    assert_eq!(rounds[0].aggregated.len(), 3);
    assert_eq!(rounds[0].folded_out_of_order, 0);
    NamedTensors::load(&RunLayout::new(dir.path()).checkpoint(1))
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fold_is_in_client_id_order_whatever_order_updates_arrive_in() {
    let forward = fold_in_order([0, 1, 2], 64).await;
    let backward = fold_in_order([2, 1, 0], 64).await;
    let shuffled = fold_in_order([1, 2, 0], 64).await;
    assert_eq!(bits(&forward), bits(&backward));
    assert_eq!(bits(&forward), bits(&shuffled));
    // The control: folded on arrival, the same updates in another order give another model
    // (so the equality above is not an accident of these values).
    let on_arrival_forward = fold_in_order([0, 1, 2], 0).await;
    let on_arrival_backward = fold_in_order([2, 1, 0], 0).await;
    assert_eq!(
        bits(&on_arrival_forward),
        bits(&forward),
        "in order = on arrival in order"
    );
    let differ = bits(&on_arrival_forward)
        .iter()
        .zip(bits(&on_arrival_backward))
        .filter(|(a, b)| **a != *b)
        .count();
    assert!(
        differ > 0,
        "arrival order changed no value: the control is void"
    );
}

/// One small federation, its clients training `concurrency` at a time and moving models and
/// updates by `transport`; returns the records and the final model.
async fn simulate(
    concurrency: usize,
    transport: ClientTransport,
) -> (Vec<rundir::RoundRecord>, NamedTensors) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(4, 2);
    config.training.local_steps = 4;
    config.data.round_test_limit = 100;
    let options = SimulationOptions {
        audit: false,
        train_concurrency: concurrency,
        adversary: None,
        transport,
        ..Default::default()
    };
    run_simulation(config, dir.path(), options, std::future::pending())
        .await
        .unwrap();
    let rounds = rundir::read_rounds(dir.path()).unwrap();
    let model = NamedTensors::load(&RunLayout::new(dir.path()).checkpoint(2))
        .unwrap()
        .0;
    (rounds, model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_training_in_parallel_give_the_sequential_run_bit_for_bit() {
    // One worker with every core, then four single-threaded workers at once.
    let (seq_rounds, seq_model) = simulate(1, ClientTransport::Grpc).await;
    let (par_rounds, par_model) = simulate(4, ClientTransport::Grpc).await;
    assert_eq!(seq_rounds.len(), 2);
    assert_eq!(bits(&seq_model), bits(&par_model), "final models differ");
    for (a, b) in seq_rounds.iter().zip(&par_rounds) {
        assert_eq!(a.aggregated, b.aggregated);
        assert_eq!(a.folded_out_of_order, 0);
        assert_eq!(b.folded_out_of_order, 0);
        assert_eq!(a.client_metrics, b.client_metrics, "round {}", a.round);
        let acc = |r: &rundir::RoundRecord| r.test.as_ref().map(|t| t.accuracy);
        assert_eq!(acc(a), acc(b), "round {}", a.round);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_clients_give_the_grpc_run_bit_for_bit() {
    let (grpc_rounds, grpc_model) = simulate(2, ClientTransport::Grpc).await;
    let (local_rounds, local_model) = simulate(2, ClientTransport::InProcess).await;
    assert_eq!(bits(&grpc_model), bits(&local_model), "final models differ");
    assert_eq!(grpc_rounds.len(), local_rounds.len());
    for (a, b) in grpc_rounds.iter().zip(&local_rounds) {
        assert_eq!(a.aggregated, b.aggregated);
        assert_eq!(a.rejected, 0);
        assert_eq!(b.rejected, 0);
        assert_eq!(a.client_metrics, b.client_metrics, "round {}", a.round);
        let acc = |r: &rundir::RoundRecord| r.test.as_ref().map(|t| t.accuracy);
        assert_eq!(acc(a), acc(b), "round {}", a.round);
    }
}

/// An update handed over in process meets the checks of one from the network: the session, the
/// round, the manifest and the values; refused ones are counted and change nothing. The round
/// waits for a second client, so the duplicate is refused as a duplicate and not because the
/// round has already been committed (which a one-client round could do at any moment after
/// its one update: the race a CI run hit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_updates_meet_the_network_checks() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(2, 1);
    config.data.skip_eval = true;
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    let endpoint = format!("http://{}", coordinator.addr);
    let mut raw = RawClient::join(&endpoint, "mjpfl").await.unwrap();
    let mut other = RawClient::join(&endpoint, "mjpfl").await.unwrap();
    let task = raw.train_task().await;
    let other_task = other.train_task().await;
    assert_eq!(other_task.round, task.round);
    let service = FederationService::new(coordinator.federation.clone());
    let global = service
        .model_in_process(&raw.token, task.model_version)
        .unwrap();
    assert_eq!(*global, raw.model(task.model_version).await);
    assert_eq!(
        service
            .model_in_process("not-a-token", task.model_version)
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let update = |tensors: NamedTensors, round: u32| mjp::fl::ModelUpdate {
        round,
        model_version: task.model_version,
        kind: mjp::fl::UpdateKind::FedAvg,
        batch_size: 8,
        num_examples: 8,
        local_steps: 1,
        metrics: Default::default(),
        tensors,
    };
    let delta = {
        let mut d = (*global).clone();
        d.scale(1e-3);
        d
    };
    let refused = |r: Result<u32, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        refused(
            service
                .submit_in_process("not-a-token", update(delta.clone(), task.round))
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        refused(
            service
                .submit_in_process(&raw.token, update(delta.clone(), task.round + 1))
                .await
        ),
        Code::FailedPrecondition
    );
    let mut nan = delta.clone();
    nan.tensors_mut()[0].data[0] = f32::NAN;
    assert_eq!(
        refused(
            service
                .submit_in_process(&raw.token, update(nan, task.round))
                .await
        ),
        Code::InvalidArgument
    );
    let mut short = delta.clone().into_tensors();
    short.pop();
    let short = NamedTensors::new(short);
    assert_eq!(
        refused(
            service
                .submit_in_process(&raw.token, update(short, task.round))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        service
            .submit_in_process(&raw.token, update(delta.clone(), task.round))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        refused(
            service
                .submit_in_process(&raw.token, update(delta.clone(), task.round))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        service
            .submit_in_process(&other.token, update(delta, task.round))
            .await
            .unwrap(),
        2
    );
    coordinator.run_to_completion().await.unwrap();
    let rounds = rundir::read_rounds(dir.path()).unwrap();
    assert_eq!(rounds[0].aggregated.len(), 2);
    // The wrong round, the NaN, the missing tensor and the second submission.
    assert_eq!(rounds[0].rejected, 4);
}

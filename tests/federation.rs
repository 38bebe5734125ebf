//! End-to-end tests of the federation: a real tonic coordinator on 127.0.0.1, real clients,
//! real data (the committed Fashion-MNIST fixture), real files on disk.

mod common;

use std::time::{Duration, Instant};

use common::{RawClient, free_port, messages, small_config};
use mjp::NamedTensors;
use mjp::layout::RunLayout;
use mjpfl_attacks::recorder::read_records;
use mjpfl_client::ClientConfig;
use mjpfl_coordinator::{Coordinator, rundir};
use mjpfl_lab::{SimulationOptions, run_simulation};
use mjpfl_proto::v1;
use tokio::sync::watch;
use tonic::Code;

fn client_config(endpoint: &str, i: usize) -> ClientConfig {
    let mut c = ClientConfig::new(endpoint, format!("test-{i}"));
    c.partition_hint = i as i32;
    c.reconnect_for = Duration::from_secs(60);
    c
}

fn accuracy_of(run: &std::path::Path, version: u64) -> f64 {
    let device = mjp::DeviceSpec::Flex.device().unwrap();
    let ck = mjp::checkpoint::Checkpoint::read(&RunLayout::new(run).checkpoint(version)).unwrap();
    let model = ck.into_model(&device).unwrap();
    let test = common::fixture()
        .load(mjp::data::Split::Test, "data".as_ref())
        .unwrap();
    let opts = mjp::train::EvalOptions {
        jigsaw_metrics: false,
        ..Default::default()
    };
    mjp::train::evaluate(&model, &test, &opts).accuracy
}

/// The main job's path end to end (`mjpfl_lab::run_simulation`, as `mjpfl simulate` runs it):
/// a coordinator on loopback, three clients, the adversary on the in-process tap, then the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_federation_trains_is_attacked_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(3, 3);
    config.data.round_test_limit = 50;
    let options = SimulationOptions::default();
    let outcome = run_simulation(config, dir.path(), options, std::future::pending())
        .await
        .unwrap();
    let rounds = rundir::read_rounds(dir.path()).unwrap();
    assert_eq!(
        rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        rounds
            .iter()
            .all(|r| r.aggregated.len() == 3 && r.closed_by == "all-submitted")
    );
    let run = RunLayout::new(dir.path());
    let v0 = NamedTensors::load(&run.checkpoint(0)).unwrap().0;
    let v3 = NamedTensors::load(&run.checkpoint(3)).unwrap().0;
    assert!(
        v3.sub(&v0).unwrap().l2_norm() > 1e-3,
        "global model did not move"
    );
    let (before, after) = (accuracy_of(dir.path(), 0), accuracy_of(dir.path(), 3));
    assert!(
        after > before + 0.15,
        "test accuracy {before:.3} -> {after:.3}"
    );
    assert_eq!(rounds[2].test.as_ref().unwrap().accuracy, after);
    assert_eq!(outcome.final_accuracy, Some(after));
    // Intermediate rounds are evaluated on `round_test_limit` images, the last on all 200.
    let evaluated: Vec<usize> = rounds
        .iter()
        .map(|r| r.test.as_ref().unwrap().examples)
        .collect();
    assert_eq!(evaluated, vec![50, 50, 200]);
    // The adversary attacked every accepted update and scored it against the audit records.
    assert_eq!(outcome.attacked, Some(9));
    let records = read_records(&run.attacks()).unwrap();
    assert_eq!(records.len(), 9);
    for r in &records {
        assert!(run.audit().record(r.round, &r.client_id).exists());
        assert!(run.attacks().picture(r.round, &r.client_id).exists());
        let names: Vec<&str> = r.attacks.iter().map(|a| a.attack.as_str()).collect();
        assert_eq!(names, ["april", "april-mjp", "mean-image"]);
        assert!(r.attacks.iter().all(|a| a.scores.is_some()), "{r:?}");
    }
    let summaries = std::fs::read_to_string(run.attacks().round_summaries()).unwrap();
    assert_eq!(summaries.lines().count(), 3 * 3, "{summaries}");
    mjpfl_lab::report::write_run_report(dir.path()).unwrap();
    let report = std::fs::read_to_string(run.report()).unwrap();
    assert!(report.contains("3 rounds completed"), "{report}");
    assert!(report.contains("| mean-image | 9 |"), "{report}");
}

/// A one-round federation of three clients with `min_fit` 2: two honest clients and a raw one
/// that `misbehave` handles once all three have joined. Returns the round records and how long
/// the federation ran after `misbehave` returned.
async fn two_honest_clients_and<F>(
    configure: impl FnOnce(&mut mjpfl_coordinator::CoordinatorConfig),
    misbehave: impl FnOnce(RawClient) -> F,
) -> (Vec<rundir::RoundRecord>, Duration)
where
    F: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(3, 1);
    config.federation.min_fit = 2;
    configure(&mut config);
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    let endpoint = format!("http://{}", coordinator.addr);
    let raw = RawClient::join(&endpoint, "mjpfl").await.unwrap();
    let (_stop, rx) = watch::channel(false);
    let clients: Vec<_> = (1..3)
        .map(|i| tokio::spawn(mjpfl_client::run(client_config(&endpoint, i), rx.clone())))
        .collect();
    misbehave(raw).await;
    let started = Instant::now();
    coordinator.run_to_completion().await.unwrap();
    let waited = started.elapsed();
    for c in clients {
        c.await.unwrap().unwrap();
    }
    (rundir::read_rounds(dir.path()).unwrap(), waited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_round_does_not_stall_past_the_deadline() {
    // The doomed client receives its task and dies without answering.
    let (rounds, waited) = two_honest_clients_and(
        |c| c.federation.round_deadline_secs = 4.0,
        |mut doomed| async move {
            assert_eq!(doomed.train_task().await.round, 1);
        },
    )
    .await;
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0].aggregated.len(), 2);
    assert_eq!(rounds[0].closed_by, "deadline");
    assert!(
        waited < Duration::from_secs(4 + 10),
        "round took {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_client_that_never_asks_for_its_task_does_not_hold_the_round_to_its_deadline() {
    // A re-joined client's old identity: joined, counted as connected, sampled, never heard
    // from again. The round closes once the clients that took their tasks have submitted and
    // `client_timeout_secs` have passed since it opened, not at the 300 s deadline.
    let (rounds, waited) = two_honest_clients_and(
        |c| {
            c.federation.round_deadline_secs = 300.0;
            c.federation.client_timeout_secs = 3.0;
        },
        |_absent| async {},
    )
    .await;
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0].sampled.len(), 3, "the absent client was sampled");
    assert_eq!(rounds[0].aggregated.len(), 2);
    assert_eq!(rounds[0].closed_by, "absent-clients");
    assert!(waited < Duration::from_secs(60), "round took {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_and_restarted_resumes_without_losing_or_repeating_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut config = small_config(2, 4);
    config.server.listen = format!("127.0.0.1:{port}");
    config.training.local_steps = 3;
    let config_path = dir.path().join("coordinator.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let run = dir.path().join("run");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mjpfl"))
            .args(["coordinator", "--config"])
            .arg(&config_path)
            .arg("--run-dir")
            .arg(&run)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    let endpoint = format!("http://127.0.0.1:{port}");
    let (_stop, rx) = watch::channel(false);
    let clients: Vec<_> = (0..2)
        .map(|i| tokio::spawn(mjpfl_client::run(client_config(&endpoint, i), rx.clone())))
        .collect();
    // Kill (SIGKILL: no chance to clean up) once round 2 is committed.
    let deadline = Instant::now() + Duration::from_secs(240);
    while rundir::read_rounds(&run).map_or(0, |r| r.len()) < 2 {
        assert!(Instant::now() < deadline, "round 2 never committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let committed = rundir::read_rounds(&run).unwrap().len();
    let mut second = spawn();
    let status = tokio::task::spawn_blocking(move || second.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "restarted coordinator failed: {status:?}");
    for c in clients {
        let s = c.await.unwrap().unwrap();
        assert!(s.joins >= 2, "client never re-joined: {s:?}");
    }
    let rounds = rundir::read_rounds(&run).unwrap();
    assert_eq!(
        rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
        vec![1, 2, 3, 4],
        "rounds lost or repeated"
    );
    assert_eq!(
        rounds.iter().map(|r| r.model_version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(committed >= 2);
    // Every version exists and each differs from the one before (each round applied once).
    for v in 1..=4u64 {
        let a = NamedTensors::load(&RunLayout::new(&run).checkpoint(v - 1))
            .unwrap()
            .0;
        let b = NamedTensors::load(&RunLayout::new(&run).checkpoint(v))
            .unwrap()
            .0;
        assert!(b.sub(&a).unwrap().l2_norm() > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_are_refused_with_their_status_and_leave_the_model_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(1, 1);
    config.federation.round_deadline_secs = 120.0;
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    let endpoint = format!("http://{}", coordinator.addr);
    let mut raw = RawClient::join(&endpoint, "mjpfl").await.unwrap();
    let task = raw.train_task().await;
    let before = raw.model(0).await;
    let zeros = {
        let mut z = before.clone();
        z.scale(0.0);
        z
    };
    let token = raw.token.clone();
    let t = &task;
    let cases: Vec<(&str, Code, Vec<v1::UpdateMessage>)> = vec![
        (
            "wrong shape",
            Code::InvalidArgument,
            messages(&token, t, &zeros, |h, _| h.tensors[0].shape = vec![1, 2, 3]),
        ),
        ("NaN", Code::InvalidArgument, {
            let mut bad = zeros.clone();
            bad.tensors_mut()[3].data[5] = f32::NAN;
            messages(&token, t, &bad, |_, _| {})
        }),
        (
            "unknown token",
            Code::Unauthenticated,
            messages("not-a-token", t, &zeros, |_, _| {}),
        ),
        (
            "wrong round",
            Code::FailedPrecondition,
            messages(&token, t, &zeros, |h, _| h.round = 5),
        ),
        (
            "wrong version",
            Code::FailedPrecondition,
            messages(&token, t, &zeros, |h, _| h.model_version = 3),
        ),
        (
            "oversized chunk",
            Code::ResourceExhausted,
            messages(&token, t, &zeros, |_, c| {
                c[0].data = vec![0u8; mjpfl_proto::MAX_CHUNK_BYTES + 4].into();
                c[0].crc32 = crc32fast::hash(&c[0].data);
            }),
        ),
        (
            "corrupted chunk",
            Code::DataLoss,
            messages(&token, t, &zeros, |_, c| {
                let mut d = c[1].data.to_vec();
                d[0] ^= 0x40;
                c[1].data = d.into();
            }),
        ),
        (
            "truncated stream",
            Code::DataLoss,
            messages(&token, t, &zeros, |_, c| {
                c.pop();
            }),
        ),
        (
            "declared size mismatch",
            Code::InvalidArgument,
            messages(&token, t, &zeros, |h, _| h.total_bytes += 4),
        ),
        (
            "wrong update kind",
            Code::InvalidArgument,
            messages(&token, t, &zeros, |h, _| {
                h.kind = v1::UpdateKind::FedsgdGradient as i32;
            }),
        ),
    ];
    for (name, code, msgs) in cases {
        let err = raw
            .client
            .submit_update(tokio_stream::iter(msgs))
            .await
            .expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(!err.message().is_empty(), "{name}: empty message");
    }
    // Nothing was aggregated, no round committed, and the global model is bit-identical.
    let status = raw
        .client
        .status(v1::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.model_version, status.history.len()), (0, 0));
    let after = raw.model(0).await;
    let bits = |t: &NamedTensors| {
        t.tensors()
            .iter()
            .flat_map(|x| x.data.iter().map(|v| v.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&before), bits(&after));
    // The checkpoint on disk too (loaded in the model's order, compared bit for bit).
    let on_disk = NamedTensors::load(&RunLayout::new(dir.path()).checkpoint(0))
        .unwrap()
        .0;
    assert_eq!(bits(&before), bits(&on_disk));
    // A well-formed update is still accepted afterwards (the refusals did not poison the round).
    let ok = raw
        .client
        .submit_update(tokio_stream::iter(messages(&token, t, &zeros, |_, _| {})))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.accepted);
    coordinator.run_to_completion().await.unwrap();
    // Every refusal but the unknown token's counts against the round (calls without a session
    // are counted apart: anyone can make them).
    assert_eq!(rundir::read_rounds(dir.path()).unwrap()[0].rejected, 9);
}

/// Uploads multiplexed on one HTTP/2 connection all complete even when the coordinator decodes
/// one at a time: the uploads waiting for the permit must not take the connection's whole
/// flow-control window from the one being read (that deadlocked before the window was sized).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_multiplexed_on_one_connection_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let clients = 4;
    let mut config = small_config(clients, 1);
    config.server.max_concurrent_uploads = 1;
    // Updates much larger than an HTTP/2 window (vit-tiny-32: 21.5 MB), as real ones are.
    config.model.preset = "vit-tiny-32".into();
    config.model.pe = mjp::PeMode::Learned;
    config.data.skip_eval = true;
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    let endpoint = format!("http://{}", coordinator.addr);
    let channel = mjpfl_client::protocol::connect(&endpoint).await.unwrap();
    let mut raws = Vec::new();
    for _ in 0..clients {
        raws.push(RawClient::join_on(channel.clone(), "mjpfl").await.unwrap());
    }
    let mut zeros = raws[0].model(0).await;
    zeros.scale(0.0);
    assert!(zeros.numel() * 4 > 16 << 20);
    let mut uploads = tokio::task::JoinSet::new();
    for mut raw in raws {
        let task = raw.train_task().await;
        let msgs = messages(&raw.token, &task, &zeros, |_, _| {});
        uploads.spawn(async move { raw.client.submit_update(tokio_stream::iter(msgs)).await });
    }
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = uploads.join_next().await {
            assert!(r.unwrap().unwrap().into_inner().accepted);
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "uploads multiplexed on one connection deadlocked"
    );
    coordinator.run_to_completion().await.unwrap();
    let rounds = rundir::read_rounds(dir.path()).unwrap();
    assert_eq!(rounds[0].aggregated.len(), clients as usize);
}

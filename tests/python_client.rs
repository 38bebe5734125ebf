//! The custom-client path: `examples/python-client/client.py`, written from the published proto
//! alone, against a real coordinator on 127.0.0.1. It needs a Python with the packages of
//! `examples/python-client/requirements.txt`: `$MJPFL_PYTHON` (which `scripts/test.sh`, the
//! README's test command, sets up), or a `python3` that has them. Without either the tests fail
//! and say how to get one: a test that cannot run is never reported as passed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::small_config;
use mjp::NamedTensors;
use mjp::fl::UpdateKind;
use mjp::layout::RunLayout;
use mjpfl_coordinator::{Coordinator, CoordinatorConfig, rundir};

fn python() -> PathBuf {
    let py =
        std::env::var_os("MJPFL_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from);
    let ok = std::process::Command::new(&py)
        .args(["-c", "import grpc_tools, numpy"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} lacks grpcio-tools or numpy: run the tests with scripts/test.sh (it makes a venv with \
         examples/python-client/requirements.txt), or point MJPFL_PYTHON at such a Python",
        py.display()
    );
    py
}

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python-client/client.py")
}

/// One Python client, FedSGD on learned PE (the example client trains without the jigsaw).
fn config(rounds: u32) -> CoordinatorConfig {
    let mut c = small_config(1, rounds);
    c.training.update_kind = UpdateKind::FedSgd;
    c.training.batch_size = 8;
    c.model.pe = mjp::PeMode::Learned;
    c.federation.round_deadline_secs = 120.0;
    c
}

async fn run_client(py: &Path, addr: &str, extra: &[&str]) -> (bool, String) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fashion-mnist-mini");
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(py);
    cmd.arg(client_script())
        .args([
            "--coordinator",
            addr,
            "--secret",
            "mjpfl",
            "--name",
            "py-test",
        ])
        .arg("--data")
        .arg(&fixture)
        .args(["--eval-limit", "50", "--reconnect-for", "10"])
        .args(extra)
        .env("XDG_CACHE_HOME", cache.path())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .expect("python client did not finish within 240 s")
        .expect("python client could not be started");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_trains_two_rounds_against_a_live_coordinator() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(config(2), dir.path()).await.unwrap();
    let addr = coordinator.addr.to_string();
    let client = tokio::spawn(async move { run_client(&py, &addr, &[]).await });
    tokio::time::timeout(Duration::from_secs(240), coordinator.run_to_completion())
        .await
        .expect("federation with the Python client did not finish")
        .unwrap();
    let (ok, out) = client.await.unwrap();
    assert!(ok, "python client failed:\n{out}");
    assert!(out.contains("finished after 2 rounds"), "{out}");
    assert_eq!(out.matches("accepted").count(), 2, "{out}");

    let rounds = rundir::read_rounds(dir.path()).unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| r.aggregated.len() == 1), "{rounds:?}");
    let v0 = NamedTensors::load(&RunLayout::new(dir.path()).checkpoint(0))
        .unwrap()
        .0;
    let v2 = NamedTensors::load(&RunLayout::new(dir.path()).checkpoint(2))
        .unwrap()
        .0;
    assert!(
        v2.sub(&v0).unwrap().l2_norm() > 1e-4,
        "the Python client's gradients did not move the model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_updates_from_the_python_client_are_refused_with_the_documented_status() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(config(1), dir.path()).await.unwrap();
    let addr = coordinator.addr.to_string();
    let before = NamedTensors::load(&RunLayout::new(dir.path()).checkpoint(0))
        .unwrap()
        .0;
    // docs/protocol.md: NaN and wrong shapes are INVALID_ARGUMENT, a bad checksum DATA_LOSS, an
    // unknown session token UNAUTHENTICATED. The client exits 0 only on the expected status.
    let (ok, out) = run_client(&py, &addr, &["--malformed", "nan,shape,crc,token"]).await;
    assert!(ok, "{out}");
    for mode in ["nan", "shape", "crc", "token"] {
        assert!(out.contains(&format!("malformed={mode}: OK")), "{out}");
    }
    coordinator.shutdown().await.unwrap();
    assert!(rundir::read_rounds(dir.path()).unwrap().is_empty());
    let after = NamedTensors::load(&RunLayout::new(dir.path()).checkpoint(0))
        .unwrap()
        .0;
    assert_eq!(before.sub(&after).unwrap().l2_norm(), 0.0);
}

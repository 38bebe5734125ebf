//! A deployment's security, end to end on 127.0.0.1: secrets made by `mjpfl secrets init`'s
//! code, a real coordinator serving mutual TLS with per-client credentials and its own observer
//! and Status tokens, real clients taking identities from the credential pool and training to
//! the end, and everything an outsider or a sybil would try refused.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::small_config;
use mjpfl_client::ClientConfig;
use mjpfl_client::observer::Observer;
use mjpfl_client::protocol::{JoinParams, Protocol};
use mjpfl_client::transport::{ClientTls, Target};
use mjpfl_coordinator::auth::AuthSection;
use mjpfl_coordinator::tls::TlsSection;
use mjpfl_coordinator::{Coordinator, rundir};
use mjpfl_lab::secrets::{SecretsLayout, SecretsPlan, init, take_from_pool};
use tokio::sync::watch;
use tonic::Code;

fn join_params(secret: &str) -> JoinParams {
    JoinParams {
        name: "probe".into(),
        secret: secret.into(),
        device: "test".into(),
        num_examples: 10,
        audit: false,
        partition_hint: -1,
        previous_token: String::new(),
    }
}

fn tls(layout: &SecretsLayout, identity: Option<(&PathBuf, &PathBuf)>) -> ClientTls {
    ClientTls::load(&layout.ca(), identity, Some("localhost".into())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_per_client_credentials_admit_only_their_holders_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    init(&SecretsPlan {
        dir: secrets.clone(),
        clients: 3,
        server_names: vec!["localhost".into(), "127.0.0.1".into()],
        days: 2,
    })
    .unwrap();
    let layout = SecretsLayout::new(&secrets);
    let mut config = small_config(2, 2);
    config.training.local_steps = 3;
    config.partition = mjp::partition::PartitionScheme::Iid {
        count: 3,
        size: None,
    };
    config.auth = AuthSection {
        clients_file: Some(layout.clients_file()),
        observer_token_file: Some(layout.observer_token()),
        status_token_file: Some(layout.status_token()),
        ..AuthSection::default()
    };
    config.server.tls = Some(TlsSection {
        cert: layout.server_cert(),
        key: layout.server_key(),
        client_ca: Some(layout.ca()),
        handshake_timeout_secs: 5.0,
    });
    let run_dir = dir.path().join("run");
    let coordinator = Coordinator::start(config, &run_dir).await.unwrap();
    let port = coordinator.addr.port();
    let endpoint = format!("https://127.0.0.1:{port}");
    let operator = layout.operator();
    let (op_cert, op_key) = (operator.join("cert.pem"), operator.join("key.pem"));
    let operator_target = Target::new(&endpoint, Some(tls(&layout, Some((&op_cert, &op_key)))));

    // Plaintext, and TLS without a client certificate, do not get as far as a gRPC call, even
    // with a valid credential.
    let first = take_from_pool(&layout.pool()).unwrap();
    let valid = first.credential.clone();
    let plain = Protocol::connect(format!("http://127.0.0.1:{port}").as_str()).await;
    let plain_join = match plain {
        Ok(mut p) => p.join(&join_params(valid.trim())).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(plain_join.is_err(), "a plaintext client was served");
    let anonymous = Target::new(&endpoint, Some(tls(&layout, None)));
    let anonymous_join = match Protocol::connect(anonymous).await {
        Ok(mut p) => p.join(&join_params(valid.trim())).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(
        anonymous_join.is_err(),
        "a client without a certificate was served"
    );

    // With a certificate: the shared secret, a forged credential and a swapped one are refused.
    let mut probe = Protocol::connect(&operator_target).await.unwrap();
    let second_secret = std::fs::read_to_string(layout.pool().join("client-001/credential"))
        .unwrap()
        .trim()
        .split_once(':')
        .unwrap()
        .1
        .to_string();
    for secret in [
        "mjpfl".to_string(),
        "client-000:0000".to_string(),
        format!("client-000:{second_secret}"),
        format!("client-999:{second_secret}"),
    ] {
        let err = probe.join(&join_params(&secret)).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::Unauthenticated), "{secret}: {err}");
    }

    // Status needs its token; the observer needs its own.
    let err = probe.status().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    let status_token = std::fs::read_to_string(layout.status_token()).unwrap();
    let observer_token = std::fs::read_to_string(layout.observer_token()).unwrap();
    assert!(probe.status_with(status_token.trim()).await.is_ok());
    let mut wrong = Observer::connect(&operator_target, "observer")
        .await
        .unwrap();
    assert_eq!(
        wrong.watch().await.unwrap_err().code(),
        Some(Code::Unauthenticated)
    );

    // The valid credential itself works over mutual TLS (so the refusals above were TLS's).
    probe.join(&join_params(valid.trim())).await.unwrap();

    // A sybil: one credential joined 25 times is one client, not 25.
    for _ in 0..25 {
        probe.join(&join_params(&first.credential)).await.unwrap();
    }
    let s = probe.status_with(status_token.trim()).await.unwrap();
    assert_eq!(s.connected_clients, 1, "26 joins of one credential");
    drop(first);

    // The observer with its token sees the honest updates.
    let mut observer = Observer::connect(&operator_target, observer_token.trim())
        .await
        .unwrap();
    let mut intercepted = observer.watch().await.unwrap();

    // Two real clients, each with its own identity from the pool, train to the end.
    let (_stop_tx, stop) = watch::channel(false);
    let mut clients = Vec::new();
    let mut held = Vec::new();
    for i in 0..2 {
        let identity = take_from_pool(&layout.pool()).unwrap();
        let (cert, key) = identity.cert_and_key.clone().unwrap();
        let mut c = ClientConfig::new(&endpoint, format!("tls-{i}"));
        c.tls = Some(tls(&layout, Some((&cert, &key))));
        c.join_secret = identity.credential.clone();
        c.data_dir = PathBuf::from("data");
        held.push(identity);
        clients.push(tokio::spawn(mjpfl_client::run(c, stop.clone())));
    }
    tokio::time::timeout(Duration::from_secs(240), coordinator.run_to_completion())
        .await
        .expect("the federation finished in time")
        .unwrap();
    let mut ids = Vec::new();
    for c in clients {
        let summary = c.await.unwrap().unwrap();
        assert!(!summary.finished.is_empty(), "{summary:?}");
        ids.push(summary.client_id);
    }
    ids.sort();
    assert_eq!(
        ids,
        ["client-000", "client-001"],
        "ids are the credentials'"
    );
    let rounds = rundir::read_rounds(&run_dir).unwrap();
    assert_eq!(rounds.len(), 2);
    for r in &rounds {
        assert_eq!(r.aggregated.len(), 2);
    }
    let seen = intercepted
        .recv()
        .await
        .expect("an intercepted update")
        .unwrap();
    assert!(seen.client_id.starts_with("client-00"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_the_built_in_secrets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(1, 1);
    config.server.listen = "0.0.0.0:0".into();
    let err = Coordinator::start(config.clone(), dir.path())
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("built-in federation.join_secret"), "{msg}");
    assert!(msg.contains("observer_token"), "{msg}");
    config.federation.join_secret = "a long deployment secret".into();
    config.federation.observer_token = format!(
        "sha256:{}",
        mjpfl_coordinator::auth::sha256_hex("another secret")
    );
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    coordinator.shutdown().await.unwrap();
}

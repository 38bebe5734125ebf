//! Hostile peers against a real coordinator on 127.0.0.1, crafting uploads by hand from the
//! published protocol: no single client may decide the aggregate by its claimed weight, move
//! the model arbitrarily with a finite update, overflow the running sum, stop the process, or
//! write a value into the run directory that makes it impossible to resume.

mod common;

use common::{RawClient, messages, small_config};
use mjp::NamedTensors;
use mjp::layout::RunLayout;
use mjpfl_coordinator::{Coordinator, rundir};
use mjpfl_proto::v1;
use tonic::Code;

/// Submits `tensors` for `raw`'s task with `num_examples` and `metrics` in the header.
async fn submit(
    raw: &mut RawClient,
    task: &common::Assigned,
    tensors: &NamedTensors,
    num_examples: u64,
    metrics: &[(&str, f64)],
) -> Result<(), tonic::Status> {
    let msgs = messages(&raw.token, task, tensors, |h, _| {
        h.num_examples = num_examples;
        h.metrics = metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    });
    raw.client
        .submit_update(tokio_stream::iter(msgs))
        .await
        .map(|_| ())
}

fn filled(like: &NamedTensors, v: f32) -> NamedTensors {
    let mut t = like.clone();
    for x in t.tensors_mut() {
        x.data.iter_mut().for_each(|d| *d = v);
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_weights_huge_updates_and_absurd_metrics_are_bounded_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    // Two clients, one FedAvg round (server SGD, lr 1: the new model is the old plus the mean).
    let mut config = small_config(2, 1);
    config.federation.round_deadline_secs = 120.0;
    config.data.eval_jigsaw_metrics = false;
    let coordinator = Coordinator::start(config.clone(), dir.path())
        .await
        .unwrap();
    let endpoint = format!("http://{}", coordinator.addr);
    let mut honest = RawClient::join(&endpoint, "mjpfl").await.unwrap();
    let mut hostile = RawClient::join(&endpoint, "mjpfl").await.unwrap();
    let (t_honest, t_hostile) = (honest.train_task().await, hostile.train_task().await);
    let before = honest.model(0).await;
    let bound = 10.0 * before.l2_norm();
    let n = before.numel() as f64;

    // Absurd metrics are refused at the edge (they would sum to infinity in rounds.jsonl).
    let small = filled(&before, 1e-4);
    for metrics in [
        vec![("loss", 1.7e308)],
        vec![("loss", f64::NAN)],
        vec![("line\nINFO forged", 1.0)],
    ] {
        let err = submit(&mut hostile, &t_hostile, &small, 8, &metrics)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{metrics:?}: {err}");
    }
    let many: Vec<(String, f64)> = (0..1000).map(|i| (format!("m{i}"), 1.0)).collect();
    let many: Vec<(&str, f64)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let err = submit(&mut hostile, &t_hostile, &small, 8, &many)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The hostile update: 3e38 everywhere (finite), claiming 10^9 examples. Before, it took
    // 0.9999998 of the weight, and with weight 100 overflowed the f32 sum and killed the process.
    let huge = filled(&before, 3e38);
    submit(&mut hostile, &t_hostile, &huge, 1_000_000_000, &[])
        .await
        .expect("a finite update is admitted, bounded");
    // The honest one: 1e-4 everywhere, 8 examples, an ordinary loss.
    submit(&mut honest, &t_honest, &small, 8, &[("loss", 2.3)])
        .await
        .unwrap();
    coordinator.run_to_completion().await.unwrap();

    let run = RunLayout::new(dir.path());
    let after = NamedTensors::load(&run.checkpoint(1)).unwrap().0;
    after.check_finite().unwrap();
    let delta = after.sub(&before).unwrap();
    // Weights: the fixture's 600 training images in 2 IID partitions, so the hostile client may
    // claim 300; its update is clipped to the norm bound (every value bound / sqrt(n)).
    let (w_hostile, w_honest) = (300.0, 8.0);
    let clipped = bound / n.sqrt();
    let expected = (w_hostile * clipped + w_honest * 1e-4) / (w_hostile + w_honest);
    let got = f64::from(delta.tensors()[0].data[0]);
    assert!(
        (got - expected).abs() <= 1e-3 * expected,
        "each value moved by {got:.6e}, expected {expected:.6e}"
    );
    assert!(
        delta.l2_norm() <= bound * 1.0001,
        "moved {}",
        delta.l2_norm()
    );
    let rounds = rundir::read_rounds(dir.path()).unwrap();
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0].aggregated.len(), 2);
    assert_eq!(rounds[0].client_metrics.get("loss"), Some(&2.3));
    assert!(rounds[0].test.as_ref().unwrap().is_finite());

    // The run directory resumes: one more round on the same directory.
    config.federation.rounds = 2;
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    let endpoint = format!("http://{}", coordinator.addr);
    let mut a = RawClient::join(&endpoint, "mjpfl").await.unwrap();
    let mut b = RawClient::join(&endpoint, "mjpfl").await.unwrap();
    let (ta, tb) = (a.train_task().await, b.train_task().await);
    assert_eq!((ta.round, ta.model_version), (2, 1));
    // Requests for an older version share one copy while any of them holds it.
    let fed = coordinator.federation.clone();
    let (old1, old2) = (fed.model(0).unwrap(), fed.model(0).unwrap());
    assert!(std::sync::Arc::ptr_eq(&old1, &old2));
    drop((old1, old2, fed));
    let zero = filled(&before, 0.0);
    submit(&mut a, &ta, &zero, 8, &[]).await.unwrap();
    submit(&mut b, &tb, &zero, 8, &[]).await.unwrap();
    coordinator.run_to_completion().await.unwrap();
    assert_eq!(rundir::read_rounds(dir.path()).unwrap().len(), 2);
}

/// Opens an upload that sends its header and then nothing, holding the stream open.
async fn silent_upload(
    raw: &RawClient,
    task: &common::Assigned,
    like: &NamedTensors,
) -> (
    tokio::sync::mpsc::Sender<v1::UpdateMessage>,
    tokio::task::JoinHandle<Result<tonic::Response<v1::SubmitUpdateResponse>, tonic::Status>>,
) {
    let header = messages(&raw.token, task, like, |_, _| {}).remove(0);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header).await.unwrap();
    let mut client = raw.client.clone();
    let call = tokio::spawn(async move {
        client
            .submit_update(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    (tx, call)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_followed_by_silence_holds_no_slot_and_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(2, 1);
    config.federation.round_deadline_secs = 60.0;
    config.server.max_concurrent_uploads = 1;
    config.server.upload_idle_timeout_secs = 2.0;
    config.data.eval_jigsaw_metrics = false;
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    let endpoint = format!("http://{}", coordinator.addr);
    let mut slow = RawClient::join(&endpoint, "mjpfl").await.unwrap();
    let mut honest = RawClient::join(&endpoint, "mjpfl").await.unwrap();
    let (t_slow, t_honest) = (slow.train_task().await, honest.train_task().await);
    let zero = filled(&honest.model(0).await, 0.0);
    let started = std::time::Instant::now();
    // The slow client's header-only stream (its sender kept alive) holds no decoding slot...
    let (_keep_open, stalled) = silent_upload(&slow, &t_slow, &zero).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // ...so the honest upload gets the only one at once, and a session cannot open a second.
    submit(&mut honest, &t_honest, &zero, 8, &[]).await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    let err = submit(&mut slow, &t_slow, &zero, 8, &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    // The silent stream is cut off after the idle timeout; its client may then upload.
    let cut = stalled.await.unwrap().unwrap_err();
    assert_eq!(cut.code(), Code::DeadlineExceeded, "{cut}");
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1900)
            && waited < std::time::Duration::from_secs(10),
        "{waited:?}"
    );
    submit(&mut slow, &t_slow, &zero, 8, &[]).await.unwrap();
    coordinator.run_to_completion().await.unwrap();
    let rounds = rundir::read_rounds(dir.path()).unwrap();
    assert_eq!(rounds[0].aggregated.len(), 2);
    assert_eq!(rounds[0].closed_by, "all-submitted");
}

/// Connections the server side has accepted on `port`: this process's socket descriptors whose
/// TCP entry has `port` as its local port and is not the listener (Linux `/proc`).
fn accepted_on(port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect();
    let mut n = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // f[3] is the state (0A: listening), f[9] the inode.
            if local_port == Some(port) && f[3] != "0A" && inodes.contains(f[9]) {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_and_closed_and_clients_get_through() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(1, 1);
    config.federation.round_deadline_secs = 60.0;
    config.server.max_connections = 8;
    // Sockets that never send a byte lose their slot at the first-byte timeout, long before
    // the idle timeout of connections that have spoken.
    config.server.connection_idle_timeout_secs = 60.0;
    config.server.first_byte_timeout_secs = 1.5;
    config.data.eval_jigsaw_metrics = false;
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    let addr = coordinator.addr;
    // 40 connections that never speak HTTP/2 (nor anything else), kept open by this test.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The coordinator holds a descriptor for at most 8 of them; the rest wait in the backlog.
    let held = accepted_on(addr.port());
    assert!(
        (1..=8).contains(&held),
        "the coordinator accepted {held} of 40 idle connections"
    );
    // A real client gets through once the idle ones in front of it have been cut off.
    let started = std::time::Instant::now();
    let mut raw = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        RawClient::join(&format!("http://{addr}"), "mjpfl"),
    )
    .await
    .expect("a client got through within 30 s")
    .unwrap();
    let task = raw.train_task().await;
    let zero = filled(&raw.model(0).await, 0.0);
    submit(&mut raw, &task, &zero, 8, &[]).await.unwrap();
    coordinator.run_to_completion().await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert_eq!(rundir::read_rounds(dir.path()).unwrap().len(), 1);
    drop(idle);
}

/// A raw HTTP/2 connection to the coordinator, speaking no gRPC library: what a peer without
/// credentials can do to make the coordinator hold bytes.
async fn raw_h2(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send.ready().await.unwrap()
}

/// Begins a gRPC message of `announced` bytes on a new stream of `method` and sends `sent` of
/// them, never finishing; returns the gRPC status the coordinator answers with.
async fn unfinished(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    method: &str,
    announced: u32,
    sent: usize,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://coordinator/mjpfl.v1.Federation/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    *send = send.clone().ready().await.unwrap();
    let (response, mut stream) = send.send_request(request, false).unwrap();
    let mut data = vec![0u8];
    data.extend_from_slice(&announced.to_be_bytes());
    data.resize(5 + sent, 0x42);
    stream.send_data(bytes::Bytes::from(data), false).unwrap();
    (response, stream)
}

/// The gRPC status of a response (trailers-only, as tonic answers a refusal).
async fn grpc_status(response: h2::client::ResponseFuture) -> Option<Code> {
    let response = tokio::time::timeout(std::time::Duration::from_secs(20), response)
        .await
        .ok()?
        .ok()?;
    let code = response.headers().get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(code.parse().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_begun_and_never_finished_are_bounded_in_size_time_and_total() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(1, 1);
    config.server.message_timeout_secs = 3.0;
    config.server.max_pending_message_bytes = 2 * mjpfl_proto::MAX_MESSAGE_BYTES;
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    let addr = coordinator.addr;
    let mut h2 = raw_h2(addr).await;

    // A Join announcing a megabyte is refused before any of it is kept.
    let (r, _s) = unfinished(&mut h2, "Join", 1 << 20, 1000).await;
    assert_eq!(grpc_status(r).await, Some(Code::ResourceExhausted));
    // So is an upload header of 2 MiB.
    let (r, _s) = unfinished(&mut h2, "SubmitUpdate", 2 << 20, 1000).await;
    assert_eq!(grpc_status(r).await, Some(Code::ResourceExhausted));

    // A trickled Join is cut off at the message timeout.
    let started = std::time::Instant::now();
    let (r, _s) = unfinished(&mut h2, "Join", 1000, 10).await;
    assert_eq!(grpc_status(r).await, Some(Code::DeadlineExceeded));
    let waited = started.elapsed().as_secs_f64();
    assert!((2.5..8.0).contains(&waited), "cut off after {waited:.1} s");

    // An honest client joins and has its task and model before the attack starts.
    let mut raw = RawClient::join(&format!("http://{addr}"), "mjpfl")
        .await
        .unwrap();
    let task = raw.train_task().await;
    let zero = filled(&raw.model(0).await, 0.0);

    // Upload headers begun and never finished, over five connections, that fill the budget to
    // the byte (64 x 34,816 bytes of body = 2 x MAX_MESSAGE_BYTES): the 65th is refused at
    // once, the others are cut off at the message timeout.
    let body = 2 * mjpfl_proto::MAX_MESSAGE_BYTES / 64;
    let mut pending = Vec::new();
    for _ in 0..5 {
        let mut c = raw_h2(addr).await;
        for _ in 0..13 {
            pending.push(unfinished(&mut c, "SubmitUpdate", 48 << 10, body).await);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // With the budget full, small calls still go through: a newcomer joins.
    RawClient::join(&format!("http://{addr}"), "mjpfl")
        .await
        .expect("a Join while the budget is full");
    // Meanwhile the honest upload goes through with not a byte of budget left: its header is
    // small (free), and once it names a session its chunks are not charged; chunk bytes that
    // arrive with the header wait for the service to read it instead of being refused.
    submit(&mut raw, &task, &zero, 8, &[]).await.unwrap();
    let mut codes = Vec::new();
    for (r, _s) in pending {
        codes.push(grpc_status(r).await);
    }
    let refused = codes
        .iter()
        .filter(|c| **c == Some(Code::ResourceExhausted))
        .count();
    let cut = codes
        .iter()
        .filter(|c| **c == Some(Code::DeadlineExceeded))
        .count();
    assert_eq!(refused + cut, 65, "{codes:?}");
    assert!(
        refused >= 1,
        "65 x 34,816 bytes within a budget of 64 of them: {codes:?}"
    );
    assert!(cut >= 60, "{codes:?}");
    coordinator.run_to_completion().await.unwrap();
    assert_eq!(rundir::read_rounds(dir.path()).unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holds_one_download_and_an_unread_one_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(1, 1);
    config.server.upload_idle_timeout_secs = 1.5;
    config.server.max_chunk_bytes = 16 << 10;
    let coordinator = Coordinator::start(config, dir.path()).await.unwrap();
    let addr = coordinator.addr;
    // A reader with small HTTP/2 windows, so that an unread download backs up to the server.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut raw = RawClient::join_on(channel, "mjpfl").await.unwrap();
    let request = || v1::DownloadModelRequest {
        session_token: raw.token.clone(),
        model_version: 0,
    };
    // A download read for one message and then left alone.
    let mut abandoned = raw
        .client
        .download_model(request())
        .await
        .unwrap()
        .into_inner();
    abandoned.message().await.unwrap().expect("a first chunk");
    // A second download of the same session is refused while the first is in flight.
    let second = raw.client.clone().download_model(request()).await;
    assert_eq!(second.unwrap_err().code(), Code::AlreadyExists);
    // Unread for the idle timeout, the first is cut off: its reader finds the end after what
    // was already in flight, and the session may download again.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut ended = None;
    for _ in 0..10_000 {
        match abandoned.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => {
                ended = Some(Code::Ok);
                break;
            }
            Err(s) => {
                ended = Some(s.code());
                break;
            }
        }
    }
    assert_eq!(ended, Some(Code::DeadlineExceeded));
    let model = raw.model(0).await;
    assert!(!model.manifest().is_empty());
    coordinator.shutdown().await.unwrap();
}

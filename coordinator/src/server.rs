//! Serving a federation: bind, run the gRPC services and the round driver side by side, stop
//! both cleanly on shutdown (an open round is abandoned, never half-applied).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mjpfl_proto::v1::federation_server::FederationServer;
use mjpfl_proto::v1::observer_server::ObserverServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::federation::Federation;
use crate::listener::{self, Limits};
use crate::service::{FederationService, ObserverService};
use crate::wire_limits::{Budget, WireLimits};

/// HTTP/2 flow control. Each stream may hold this many unread bytes (one wire chunk).
const STREAM_WINDOW: u32 = 1 << 20;
/// The largest HTTP/2 frame peers may send. h2's default, 16 KiB, cut every 1 MiB upload chunk
/// into 64 frames, each parsed, flow-controlled and handed through the body layers on its own:
/// `bench aggregate` 0.79-0.81 GB/s at 16 KiB, 1.30-1.35 GB/s at 256 KiB, 1.17 at 1 MiB. What
/// a connection holds stays bounded by the stream and connection windows below.
const MAX_FRAME: u32 = 256 << 10;
/// Streams one connection may have open at once (a client needs about three: a task long-poll,
/// a download, an upload).
const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// The connection window covers every stream's window: an upload waiting for a decode permit
/// holds at most its own window, so it can never starve the upload being read on the same
/// connection (with a 1 MiB connection window, a few waiting uploads multiplexed on one
/// connection used to take all of it and deadlock against the permit holder). Worst case a
/// connection parks `MAX_STREAMS_PER_CONNECTION` MiB of unread data in the coordinator.
const CONNECTION_WINDOW: u32 = STREAM_WINDOW * (MAX_STREAMS_PER_CONNECTION + 1);

/// A running coordinator.
pub struct Coordinator {
    /// The federation state (for in-process observers and status).
    pub federation: Arc<Federation>,
    /// The address it listens on.
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<()>>,
    driver: JoinHandle<Result<()>>,
}

impl Coordinator {
    /// Opens the run directory (resuming if it holds a run), binds and starts serving.
    pub async fn start(config: CoordinatorConfig, run_dir: &Path) -> Result<Self> {
        let listen = config.server.listen.clone();
        let federation = tokio::task::spawn_blocking({
            let run_dir = run_dir.to_path_buf();
            move || Federation::open(config, &run_dir)
        })
        .await
        .map_err(|e| CoordinatorError::task("startup", e))??;
        let bound = TcpListener::bind(&listen).await;
        let listener = bound.map_err(|source| CoordinatorError::Listen {
            addr: listen,
            source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| CoordinatorError::io(run_dir, e))?;
        let server_config = &federation.config().server;
        if !addr.ip().is_loopback() {
            // Beyond loopback anyone who has read the README knows the built-in secrets.
            let built_in = federation.auth().built_in_secrets();
            if !built_in.is_empty() {
                return Err(CoordinatorError::Config(format!(
                    "refusing to serve {addr} with the built-in {}: make per-client credentials \
                     and tokens with `mjpfl secrets init --dir DIR` (or set your own secrets)",
                    built_in.join(" and ")
                )));
            }
            if server_config.tls.is_none() {
                tracing::warn!(
                    "serving {addr} without TLS: credentials and updates cross the network in \
                     the clear (set [server.tls]; `mjpfl secrets init` makes certificates)"
                );
            }
        }
        let tls = server_config
            .tls
            .as_ref()
            .map(|t| t.server_config())
            .transpose()?;
        let wire_limits = WireLimits::new(
            Budget::new(server_config.max_pending_message_bytes),
            Duration::from_secs_f64(server_config.message_timeout_secs),
            mjpfl_proto::MAX_MESSAGE_BYTES,
        );
        let (shutdown, rx) = watch::channel(false);
        let limit = mjpfl_proto::MAX_MESSAGE_BYTES;
        let fed_service = FederationServer::new(FederationService::new(federation.clone()))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let obs_service = ObserverServer::new(ObserverService::new(federation.clone()))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let mut server_rx = rx.clone();
        let limits = Limits {
            max_connections: federation.config().server.max_connections,
            idle: Duration::from_secs_f64(federation.config().server.connection_idle_timeout_secs),
            first_byte: Duration::from_secs_f64(federation.config().server.first_byte_timeout_secs),
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls)
                .map_err(|e| CoordinatorError::Config(format!("server.tls: {e}")))?;
        }
        let server = tokio::spawn(async move {
            builder
                .layer(wire_limits)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .max_frame_size(MAX_FRAME)
                // Pings keep honest connections talking, so only silent ones hit the idle cut.
                .http2_keepalive_interval(Some(limits.idle / 3))
                .http2_keepalive_timeout(Some(limits.idle / 3))
                .add_service(fed_service)
                .add_service(obs_service)
                .serve_with_incoming_shutdown(listener::incoming(listener, limits), async move {
                    let _ = server_rx.wait_for(|s| *s).await;
                })
                .await
                .map_err(CoordinatorError::from)
        });
        let driver = tokio::spawn(federation.clone().drive(rx));
        tracing::info!(
            "coordinator listening on {addr}{}, run directory {}",
            match &federation.config().server.tls {
                Some(t) if t.mutual() => " (mutual TLS)",
                Some(_) => " (TLS)",
                None => "",
            },
            run_dir.display()
        );
        Ok(Self {
            federation,
            addr,
            shutdown,
            server,
            driver,
        })
    }

    /// Waits until all rounds are done (or the driver fails), then stops serving.
    pub async fn run_to_completion(self) -> Result<()> {
        let Self {
            driver,
            shutdown,
            server,
            federation,
            ..
        } = self;
        let outcome = driver
            .await
            .map_err(|e| CoordinatorError::task("round driver", e))?;
        // Give clients a moment to hear "finished" before the listener closes; end the observer
        // streams so the server's graceful shutdown does not wait on them.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        federation.tap().close();
        let _ = shutdown.send(true);
        let _ = server.await;
        outcome
    }

    /// Stops now: the open round (if any) is abandoned; committed rounds are on disk.
    pub async fn shutdown(self) -> Result<()> {
        self.federation.tap().close();
        let _ = self.shutdown.send(true);
        let driver = self.driver.await;
        let _ = self.server.await;
        driver.map_err(|e| CoordinatorError::task("round driver", e))?
    }

    /// Runs until completion or until `signal` resolves (Ctrl-C, SIGTERM), whichever is first.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) -> Result<()> {
        let shutdown = self.shutdown.clone();
        let finished = self.federation.clone();
        let mut changes = finished.watch();
        tokio::select! {
            _ = signal => {
                tracing::info!("signal received: stopping (committed rounds are kept)");
                self.shutdown().await
            }
            _ = async {
                loop {
                    if finished.status().phase == crate::federation::Phase::Finished { break; }
                    if changes.changed().await.is_err() { break; }
                }
            } => {
                let _ = &shutdown;
                self.run_to_completion().await
            }
        }
    }
}

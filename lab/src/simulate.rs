//! A whole federation in this process: a coordinator on 127.0.0.1, N clients and (optionally)
//! the adversary, with progress per round. The clients join and poll for tasks over real gRPC on
//! loopback; their downloads and uploads go over it too ([`ClientTransport::Grpc`], what the
//! end-to-end tests run) or are handed to the coordinator in process
//! ([`ClientTransport::InProcess`], what `mjpfl simulate` and `mjpfl sweep` do by default),
//! through the same checks, fold and tap. What `mjpfl simulate`, every sweep cell and the
//! end-to-end tests run.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mjp::DeviceSpec;
use mjp::layout::RunLayout;
use mjpfl_attacks::{AdversaryConfig, AdversarySettings};
use mjpfl_client::ClientConfig;
use mjpfl_client::shared::{InProcessLink, SharedClients};
use mjpfl_client::workers::TrainingWorkers;
use mjpfl_coordinator::service::FederationService;
use mjpfl_coordinator::{Coordinator, CoordinatorConfig, Federation};
use tokio::sync::watch;

use crate::error::{LabError, Result};
use crate::feed::{AttackWorker, InProcess, public_mean_image};
use crate::runtime::progress_bar;

/// Simulated clients per shared HTTP/2 connection.
const CLIENTS_PER_CONNECTION: usize = 8;

/// Memory the coordinator of a simulation may hold accepted updates in while they wait for their
/// turn in the client-id-ordered fold (unless the configuration sets `ordered_fold_mb`).
pub const SIMULATION_ORDERED_FOLD_MB: u64 = 1024;

/// How simulated clients move models and updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientTransport {
    /// Downloads and uploads stream over gRPC on loopback, as an external client's do.
    #[default]
    Grpc,
    /// Downloads and uploads are handed to the coordinator in process: the same checks, fold
    /// and tap, no serialisation (the same values, so the same results).
    InProcess,
}

impl std::str::FromStr for ClientTransport {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "grpc" => Ok(Self::Grpc),
            "in-process" => Ok(Self::InProcess),
            other => Err(format!(
                "unknown client transport {other:?} (expected grpc or in-process)"
            )),
        }
    }
}

impl std::fmt::Display for ClientTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Grpc => "grpc",
            Self::InProcess => "in-process",
        })
    }
}

/// The coordinator's service, called directly by the simulated clients of this process.
struct Link(FederationService);

impl InProcessLink for Link {
    fn model(
        &self,
        token: &str,
        version: u64,
    ) -> std::result::Result<Arc<mjp::params::NamedTensors>, tonic::Status> {
        self.0.model_in_process(token, version)
    }

    fn submit<'a>(
        &'a self,
        token: &'a str,
        update: mjp::fl::ModelUpdate,
    ) -> Pin<Box<dyn Future<Output = std::result::Result<u32, tonic::Status>> + Send + 'a>> {
        Box::pin(self.0.submit_in_process(token, update))
    }
}

/// How a simulation runs, beside the coordinator's configuration.
#[derive(Clone, Debug)]
pub struct SimulationOptions {
    /// Simulated clients write their private batches to `audit/` (so attacks can be scored).
    pub audit: bool,
    /// Clients training at the same time, the machine's cores split between them (0: one per
    /// core, at most the round's cohort).
    pub train_concurrency: usize,
    /// The adversary, if one attacks the updates.
    pub adversary: Option<AdversarySettings>,
    /// Where clients train and the adversary computes.
    pub device: DeviceSpec,
    /// How the simulated clients' downloads and uploads reach the coordinator (gRPC by default:
    /// the path external clients take).
    pub transport: ClientTransport,
}

impl Default for SimulationOptions {
    fn default() -> Self {
        Self {
            audit: true,
            train_concurrency: 0,
            adversary: Some(AdversarySettings::default()),
            device: DeviceSpec::Flex,
            transport: ClientTransport::Grpc,
        }
    }
}

/// What a simulation produced.
#[derive(Clone, Debug)]
pub struct SimulationOutcome {
    /// Wall time.
    pub wall: Duration,
    /// Final global test accuracy.
    pub final_accuracy: Option<f64>,
    /// Updates the adversary attacked.
    pub attacked: Option<usize>,
}

/// Runs a whole federation until it finishes or `shutdown` resolves; resumes if `out` holds a
/// run. The report is not written here (see [`crate::report::write_run_report`]).
pub async fn run_simulation(
    config: CoordinatorConfig,
    out: &Path,
    options: SimulationOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<SimulationOutcome> {
    let started = Instant::now();
    let n = config
        .federation
        .min_clients
        .max(config.federation.clients_per_round);
    let rounds = config.federation.rounds;
    let cohort = config.federation.clients_per_round as usize;
    let data_dir = config.data.data_dir.clone();
    let dataset = config.data.dataset.clone();
    let run = RunLayout::new(out);
    // The simulated clients share connections (8 each); the loopback coordinator must accept
    // all of them whatever the deployment's cap.
    let mut config = config;
    let connections = (n as usize).div_ceil(CLIENTS_PER_CONNECTION) + 64;
    config.server.max_connections = config.server.max_connections.max(connections);
    // Updates are folded in client-id order whatever order they arrive in, so the run does not
    // depend on how many clients train at once.
    config
        .training
        .ordered_fold_mb
        .get_or_insert(SIMULATION_ORDERED_FOLD_MB);
    let coordinator = Coordinator::start(config, out).await?;
    let endpoint = format!("http://{}", coordinator.addr);
    let federation = coordinator.federation.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    // The adversary subscribes before any client joins: it sees every update.
    let adversary = match options.adversary {
        Some(settings) => {
            let vit = federation.vit().clone();
            let config = AdversaryConfig {
                settings,
                run: run.clone(),
                mean_image: public_mean_image(&dataset, &data_dir, &vit),
                device: options.device,
            };
            let worker = AttackWorker::spawn(vit, config)?;
            let source = InProcess::subscribe(federation.clone());
            let mut stop = stop_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            Some(tokio::spawn(worker.feed(source, stopped)))
        }
        None => None,
    };
    let workers = TrainingWorkers::split_cores(options.train_concurrency, cohort)?;
    tracing::info!(
        "clients train on {} workers of {} threads; models and updates move by {}",
        workers.workers(),
        workers.threads(),
        options.transport
    );
    let shared = match options.transport {
        ClientTransport::Grpc => SharedClients::new(CLIENTS_PER_CONNECTION),
        ClientTransport::InProcess => SharedClients::in_process(
            CLIENTS_PER_CONNECTION,
            Arc::new(Link(FederationService::new(federation.clone()))),
        ),
    };
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut c = ClientConfig::new(endpoint.clone(), format!("sim-{i:02}"));
        c.partition_hint = i as i32;
        c.data_dir = data_dir.clone();
        c.device = options.device;
        c.audit_dir = options.audit.then(|| run.audit().dir().to_path_buf());
        c.workers = Some(workers.clone());
        c.shared = Some(shared.clone());
        c.join_secret = federation.config().federation.join_secret.clone();
        // Reproducible defense noise; the adversary never reads this seed (a real client's
        // comes from the operating system).
        c.noise_seed = Some(
            mjp::Seed(federation.config().federation.seed)
                .child("client-noise", i as u64)
                .0,
        );
        clients.spawn(mjpfl_client::run(c, stop_rx.clone()));
    }
    let progress = tokio::spawn(show_progress(federation.clone(), rounds));
    let outcome = coordinator.run_until(shutdown).await;
    let _ = stop_tx.send(true);
    while let Some(c) = clients.join_next().await {
        match c {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("client ended with: {e}"),
            Err(e) => tracing::warn!("client task failed: {e}"),
        }
    }
    progress.abort();
    let mut attacked = None;
    if let Some(feeder) = adversary {
        match feeder.await {
            Ok(Ok(n)) => {
                println!("adversary attacked {n} updates");
                attacked = Some(n);
            }
            Ok(Err(e)) => tracing::warn!("adversary failed: {e}"),
            Err(e) => tracing::warn!("adversary task failed: {e}"),
        }
    }
    outcome?;
    let status = federation.status();
    if let Some(f) = status.failure {
        return Err(LabError::Message(format!("federation stopped early: {f}")));
    }
    Ok(SimulationOutcome {
        wall: started.elapsed(),
        final_accuracy: status
            .history
            .last()
            .and_then(|r| r.test.as_ref())
            .map(|t| t.accuracy),
        attacked,
    })
}

/// Prints a line per committed round (and a bar on a terminal) until the federation ends.
async fn show_progress(fed: Arc<Federation>, rounds: u32) {
    let bar = progress_bar(
        u64::from(rounds),
        "rounds [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
    );
    let mut changes = fed.watch();
    let mut printed = fed.status().history.len();
    bar.set_position(printed as u64);
    loop {
        let s = fed.status();
        for r in &s.history[printed.min(s.history.len())..] {
            let acc = r
                .test
                .as_ref()
                .map_or("-".into(), |t| format!("{:.4}", t.accuracy));
            bar.println(format!(
                "round {:>3}/{rounds}: {} updates, shuffle ratio {:.2}, test accuracy {acc}, client loss {:.3}, {:.1}s",
                r.round,
                r.aggregated.len(),
                r.shuffle_ratio,
                r.client_metrics.get("loss").copied().unwrap_or(f64::NAN),
                r.wall_seconds
            ));
            if bar.is_hidden() {
                println!(
                    "round {:>3}/{rounds}: {} updates, shuffle ratio {:.2}, test accuracy {acc}, {:.1}s",
                    r.round,
                    r.aggregated.len(),
                    r.shuffle_ratio,
                    r.wall_seconds
                );
            }
        }
        printed = s.history.len();
        bar.set_position(printed as u64);
        bar.set_message(format!("{} clients, {}", s.connected, s.phase.name()));
        if changes.changed().await.is_err() {
            return;
        }
    }
}

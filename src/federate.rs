//! `mjpfl coordinator`, `mjpfl client` and `mjpfl simulate`: a federation over real gRPC.
//!
//! `simulate` starts a coordinator on 127.0.0.1, N clients (and the adversary) in this process,
//! all talking gRPC over loopback, shows progress per round, and leaves a run directory with a
//! report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mjp::data::DataSource;
use mjp::fl::UpdateKind;
use mjp::{DeviceSpec, PeMode};
use mjpfl_client::ClientConfig;
use mjpfl_coordinator::{Coordinator, CoordinatorConfig, ShuffleSchedule};
use tokio::sync::{Semaphore, watch};

use crate::common::progress_bar;

/// Overrides of the coordinator configuration shared by `coordinator` and `simulate`.
#[derive(Args, Debug, Clone, Default)]
pub struct FederationOverrides {
    /// Coordinator configuration file (TOML; see examples/coordinator.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Rounds.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Clients in the federation (sets min_clients and the number of data partitions).
    #[arg(long)]
    pub clients: Option<u32>,
    /// Clients sampled per round.
    #[arg(long)]
    pub per_round: Option<u32>,
    /// Updates needed to close a round.
    #[arg(long)]
    pub min_fit: Option<u32>,
    /// Round deadline in seconds.
    #[arg(long)]
    pub deadline: Option<f64>,
    /// Position-embedding mode.
    #[arg(long)]
    pub pe: Option<PeMode>,
    /// Model preset.
    #[arg(long)]
    pub preset: Option<String>,
    /// Constant MJP shuffle ratio (for schedules use the config file).
    #[arg(long)]
    pub ratio: Option<f64>,
    /// fedsgd or fedavg.
    #[arg(long)]
    pub update_kind: Option<UpdateKind>,
    /// Local steps per round (FedAvg).
    #[arg(long)]
    pub local_steps: Option<u32>,
    /// Local batch size.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Client learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Local jigsaw probability.
    #[arg(long)]
    pub jigsaw_prob: Option<f64>,
    /// Dirichlet label skew alpha (default: IID).
    #[arg(long)]
    pub dirichlet_alpha: Option<f64>,
    /// Dataset.
    #[arg(long)]
    pub data: Option<DataSource>,
    /// Data directory.
    #[arg(long, env = "MJPFL_DATA")]
    pub data_dir: Option<PathBuf>,
    /// Evaluate on the first N test images (0 = all).
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Run seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Listen address of the coordinator.
    #[arg(long)]
    pub listen: Option<String>,
    /// Shared secret clients present to join.
    #[arg(long, env = "MJPFL_JOIN_SECRET")]
    pub join_secret: Option<String>,
    /// Token of the observer (adversary) endpoint.
    #[arg(long, env = "MJPFL_OBSERVER_TOKEN")]
    pub observer_token: Option<String>,
}

impl FederationOverrides {
    /// The configuration file (or defaults) with these overrides applied.
    pub fn resolve(&self) -> Result<CoordinatorConfig> {
        let mut c = match &self.config {
            Some(p) => CoordinatorConfig::load(p)?,
            None => CoordinatorConfig::default(),
        };
        let f = &mut c.federation;
        if let Some(v) = self.rounds {
            f.rounds = v;
        }
        if let Some(n) = self.clients {
            f.min_clients = n;
            f.clients_per_round = f.clients_per_round.min(n);
            f.min_fit = f.min_fit.min(f.clients_per_round);
            c.partition = match c.partition {
                mjpfl_client::partition::PartitionScheme::Iid { .. } => {
                    mjpfl_client::partition::PartitionScheme::Iid { count: n }
                }
                mjpfl_client::partition::PartitionScheme::Dirichlet { alpha, .. } => {
                    mjpfl_client::partition::PartitionScheme::Dirichlet { count: n, alpha }
                }
                mjpfl_client::partition::PartitionScheme::Shards {
                    shards_per_client, ..
                } => mjpfl_client::partition::PartitionScheme::Shards {
                    count: n,
                    shards_per_client,
                },
            };
        }
        if let Some(k) = self.per_round {
            c.federation.clients_per_round = k;
            c.federation.min_fit = c.federation.min_fit.min(k);
        }
        if let Some(v) = self.min_fit {
            c.federation.min_fit = v;
        }
        if let Some(v) = self.deadline {
            c.federation.round_deadline_secs = v;
        }
        if let Some(v) = self.seed {
            c.federation.seed = v;
        }
        if let Some(alpha) = self.dirichlet_alpha {
            c.partition = mjpfl_client::partition::PartitionScheme::Dirichlet {
                count: c.partition.count(),
                alpha,
            };
        }
        if let Some(v) = self.pe {
            c.model.pe = v;
        }
        if let Some(v) = &self.preset {
            c.model.preset = v.clone();
        }
        if let Some(r) = self.ratio {
            c.shuffle = ShuffleSchedule::Constant { ratio: r };
        }
        let t = &mut c.training;
        if let Some(v) = self.update_kind {
            t.update_kind = v;
        }
        if let Some(v) = self.local_steps {
            t.local_steps = v;
        }
        if let Some(v) = self.batch_size {
            t.batch_size = v;
        }
        if let Some(v) = self.lr {
            t.learning_rate = v;
        }
        if let Some(v) = self.jigsaw_prob {
            t.jigsaw_probability = v;
        }
        if let Some(v) = &self.data {
            c.data.dataset = v.clone();
        }
        if let Some(v) = &self.data_dir {
            c.data.data_dir = v.clone();
        }
        if let Some(v) = self.test_limit {
            c.data.test_limit = v;
        }
        if let Some(v) = &self.listen {
            c.server.listen = v.clone();
        }
        if let Some(v) = &self.join_secret {
            c.federation.join_secret = v.clone();
        }
        if let Some(v) = &self.observer_token {
            c.federation.observer_token = v.clone();
        }
        c.validate()?;
        Ok(c)
    }
}

/// Arguments of `mjpfl coordinator`.
#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    overrides: FederationOverrides,
    /// Run directory (restarting on the same directory resumes after the last completed round).
    #[arg(long, default_value = "runs/federation")]
    run_dir: PathBuf,
}

/// Arguments of `mjpfl client`.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Coordinator address.
    #[arg(
        long,
        env = "MJPFL_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// Client name.
    #[arg(long, env = "MJPFL_CLIENT_NAME", default_value = "client")]
    name: String,
    /// Join secret.
    #[arg(long, env = "MJPFL_JOIN_SECRET", default_value = "mjpfl")]
    join_secret: String,
    /// Data partition to ask for (-1: assigned).
    #[arg(long, env = "MJPFL_PARTITION", default_value_t = -1, allow_hyphen_values = true)]
    partition: i32,
    /// Dataset override.
    #[arg(long)]
    data: Option<DataSource>,
    /// Data directory.
    #[arg(long, env = "MJPFL_DATA", default_value = "data")]
    data_dir: PathBuf,
    /// Compute device.
    #[arg(long, default_value = "flex")]
    device: DeviceSpec,
    /// Write private batches here for scoring (simulated clients only).
    #[arg(long)]
    audit_dir: Option<PathBuf>,
    /// Give up after the coordinator is unreachable this many seconds.
    #[arg(long, default_value_t = 120.0)]
    reconnect_for: f64,
}

pub async fn ctrl_c_or_term() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("starting the async runtime")
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    let config = args.overrides.resolve()?;
    let run_dir = args.run_dir.clone();
    runtime()?.block_on(async move {
        let coordinator = Coordinator::start(config, &run_dir).await?;
        println!("coordinator listening on {}", coordinator.addr);
        coordinator.run_until(ctrl_c_or_term()).await?;
        Ok::<(), anyhow::Error>(())
    })?;
    // Whether finished or stopped, the report reflects what is committed on disk.
    crate::report::write_run_report(&args.run_dir)?;
    println!("report {}", args.run_dir.join("report.md").display());
    Ok(())
}

/// Arguments of `mjpfl status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Coordinator address.
    #[arg(
        long,
        env = "MJPFL_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
}

/// `mjpfl status`: one Status call; exit status 0 when the coordinator answers (healthchecks).
pub fn status(args: StatusArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let channel = mjpfl_client::connection::connect(&args.coordinator).await?;
        let s = mjpfl_client::connection::federation_client(channel)
            .status(mjpfl_proto::v1::StatusRequest {})
            .await
            .map_err(|e| anyhow::anyhow!("Status: {e}"))?
            .into_inner();
        let last = s.history.last();
        println!(
            "{}: round {}/{}, model version {}, {} clients connected{}",
            s.phase,
            s.round,
            s.total_rounds,
            s.model_version,
            s.connected_clients,
            last.map_or(String::new(), |r| format!(
                ", last test accuracy {:.4}",
                r.test_accuracy
            ))
        );
        Ok(())
    })
}

pub fn client(args: ClientArgs) -> Result<()> {
    let config = ClientConfig {
        endpoint: args.coordinator,
        name: args.name,
        join_secret: args.join_secret,
        partition_hint: args.partition,
        data: args.data,
        data_dir: args.data_dir,
        device: args.device,
        audit_dir: args.audit_dir,
        reconnect_for: Duration::from_secs_f64(args.reconnect_for),
        training_permits: None,
    };
    runtime()?.block_on(async move {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            ctrl_c_or_term().await;
            let _ = tx.send(true);
        });
        let summary = mjpfl_client::run(config, rx).await?;
        println!(
            "{}: {} updates accepted, {} refused, {} joins; finished: {}",
            summary.client_id,
            summary.updates_accepted,
            summary.updates_refused,
            summary.joins,
            summary.finished
        );
        Ok(())
    })
}

/// Arguments of `mjpfl simulate`.
#[derive(Args, Debug)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub overrides: FederationOverrides,
    /// Run directory (default runs/simulate-<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Do not write the clients' private batches (the scorer then cannot score attacks).
    #[arg(long)]
    pub no_audit: bool,
    /// Clients training at the same time (each uses all cores for its gradient).
    #[arg(long, default_value_t = 1)]
    pub train_concurrency: usize,
    #[command(flatten)]
    pub attacks: crate::adversary::AttackArgs,
}

/// A UTC timestamp for default directory names.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn simulate(args: SimulateArgs) -> Result<()> {
    let mut config = args.overrides.resolve()?;
    if args.overrides.listen.is_none() {
        config.server.listen = "127.0.0.1:0".into();
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/simulate-{}", timestamp())));
    let adversary = (!args.attacks.no_adversary).then(|| args.attacks.clone());
    let outcome = runtime()?.block_on(run_simulation(
        config,
        &out,
        !args.no_audit,
        args.train_concurrency,
        adversary,
    ))?;
    crate::report::write_run_report(&out)?;
    println!(
        "done in {:.1} min: final test accuracy {}; report {}",
        outcome.wall.as_secs_f64() / 60.0,
        outcome
            .final_accuracy
            .map_or("-".into(), |a| format!("{a:.4}")),
        out.join("report.md").display()
    );
    Ok(())
}

/// What a simulation produced.
pub struct SimulationOutcome {
    /// Wall time.
    pub wall: Duration,
    /// Final global test accuracy.
    pub final_accuracy: Option<f64>,
}

/// Runs a whole federation in-process over loopback gRPC; resumes if `out` holds a run.
pub async fn run_simulation(
    config: CoordinatorConfig,
    out: &Path,
    audit: bool,
    concurrency: usize,
    adversary: Option<crate::adversary::AttackArgs>,
) -> Result<SimulationOutcome> {
    let started = Instant::now();
    let n = config
        .federation
        .min_clients
        .max(config.federation.clients_per_round);
    let rounds = config.federation.rounds;
    let data_dir = config.data.data_dir.clone();
    let dataset = config.data.dataset.clone();
    let coordinator = Coordinator::start(config, out).await?;
    let endpoint = format!("http://{}", coordinator.addr);
    let federation = coordinator.federation.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    // The adversary subscribes before any client joins: it sees every update.
    let adversary = match adversary {
        Some(args) => {
            let vit = federation.vit().clone();
            let mean = crate::adversary::public_mean_image(&dataset, &data_dir, &vit);
            let (queue, worker) = crate::adversary::spawn_worker(vit, args.config(out, mean)?);
            let feeder = tokio::spawn(crate::adversary::feed_in_process(
                federation.clone(),
                federation.tap().subscribe(),
                queue,
                stop_rx.clone(),
            ));
            Some((feeder, worker))
        }
        None => None,
    };
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut clients = Vec::new();
    for i in 0..n {
        let mut c = ClientConfig::new(endpoint.clone(), format!("sim-{i:02}"));
        c.partition_hint = i as i32;
        c.data_dir = data_dir.clone();
        c.audit_dir = audit.then(|| out.join("audit"));
        c.training_permits = Some(permits.clone());
        c.join_secret = federation.config().federation.join_secret.clone();
        clients.push(tokio::spawn(mjpfl_client::run(c, stop_rx.clone())));
    }
    let progress = tokio::spawn(show_progress(federation.clone(), rounds));
    let outcome = coordinator.run_until(ctrl_c_or_term()).await;
    let _ = stop_tx.send(true);
    for c in clients {
        match c.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("client ended with: {e}"),
            Err(e) => tracing::warn!("client task failed: {e}"),
        }
    }
    progress.abort();
    if let Some((feeder, worker)) = adversary {
        let _ = feeder.await;
        match tokio::task::spawn_blocking(move || worker.join()).await {
            Ok(Ok(Ok(n))) => println!("adversary attacked {n} updates"),
            Ok(Ok(Err(e))) => tracing::warn!("adversary failed: {e:#}"),
            _ => tracing::warn!("adversary worker panicked"),
        }
    }
    outcome?;
    let status = federation.status();
    if let Some(f) = status.failure {
        bail!("federation stopped early: {f}");
    }
    Ok(SimulationOutcome {
        wall: started.elapsed(),
        final_accuracy: status
            .history
            .last()
            .and_then(|r| r.test.as_ref())
            .map(|t| t.accuracy),
    })
}

async fn show_progress(fed: Arc<mjpfl_coordinator::Federation>, rounds: u32) {
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

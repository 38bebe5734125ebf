//! `mjpfl coordinator`, `mjpfl client`, `mjpfl status` and `mjpfl simulate`: arguments, their
//! conversion into the coordinator's and clients' configurations, and printing.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use mjp::data::DataSource;
use mjp::fl::UpdateKind;
use mjp::layout::RunLayout;
use mjp::partition::PartitionScheme;
use mjp::{DeviceSpec, PeMode};
use mjpfl_client::ClientConfig;
use mjpfl_client::protocol::Protocol;
use mjpfl_coordinator::{Coordinator, CoordinatorConfig, ShuffleSchedule};
use mjpfl_lab::runtime::{ctrl_c_or_term, runtime, timestamp};
use mjpfl_lab::{SimulationOptions, run_simulation};

use crate::common::{ConnectArgs, read_secret};
use tokio::sync::watch;

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
    /// Client defense: prune this fraction of each tensor's smallest entries before upload
    /// (for schedules use `[defense]` in the config file).
    #[arg(long)]
    pub prune: Option<f64>,
    /// Client defense: clip each update to this L2 norm before upload.
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Client defense: add Gaussian noise of this multiple of --clip-norm (local DP).
    #[arg(long)]
    pub noise_multiplier: Option<f64>,
    /// The adversary sees only each round's sum of updates (the secure-aggregation view).
    #[arg(long)]
    pub secure_aggregation: bool,
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
    /// IID partitions of exactly this many examples each (the cross-device regime, e.g. 50).
    #[arg(long, conflicts_with = "dirichlet_alpha")]
    pub client_size: Option<usize>,
    /// Local epochs per round (FedAvg; replaces --local-steps).
    #[arg(long)]
    pub local_epochs: Option<u32>,
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
            c.partition = c.partition.with_count(n);
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
        if let Some(size) = self.client_size {
            c.partition = PartitionScheme::Iid {
                count: c.partition.count(),
                size: Some(size),
            };
        }
        if let Some(alpha) = self.dirichlet_alpha {
            c.partition = PartitionScheme::Dirichlet {
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
        if let Some(v) = self.prune {
            c.defense.prune_fraction = v;
        }
        if let Some(v) = self.clip_norm {
            c.defense.clip_norm = v;
        }
        if let Some(v) = self.noise_multiplier {
            c.defense.noise_multiplier = v;
        }
        if self.secure_aggregation {
            c.defense.secure_aggregation = true;
        }
        let t = &mut c.training;
        if let Some(v) = self.update_kind {
            t.update_kind = v;
        }
        if let Some(v) = self.local_steps {
            t.local_steps = v;
        }
        if let Some(v) = self.local_epochs {
            t.local_epochs = v;
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
    #[command(flatten)]
    connect: ConnectArgs,
    /// Client name.
    #[arg(long, env = "MJPFL_CLIENT_NAME", default_value = "client")]
    name: String,
    /// Join secret: the federation's shared secret, or this client's own credential
    /// `<id>:<secret>` when the coordinator has per-client credentials.
    #[arg(long, env = "MJPFL_JOIN_SECRET", default_value = "mjpfl")]
    join_secret: String,
    /// Read the credential (or shared secret) from this file instead.
    #[arg(
        long,
        env = "MJPFL_CREDENTIAL_FILE",
        conflicts_with = "credential_pool"
    )]
    credential_file: Option<PathBuf>,
    /// Take the first free identity (credential, and certificate for mutual TLS) from this
    /// directory, as `mjpfl secrets init` lays it out (`DIR/clients`); it stays taken while
    /// this client runs.
    #[arg(long, env = "MJPFL_CREDENTIAL_POOL")]
    credential_pool: Option<PathBuf>,
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

/// `mjpfl coordinator`: serve until the federation finishes or a signal arrives.
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
    mjpfl_lab::report::write_run_report(&args.run_dir)?;
    println!(
        "report {}",
        RunLayout::new(&args.run_dir).report().display()
    );
    Ok(())
}

/// Arguments of `mjpfl status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The coordinator's status token, when it requires one (`[auth] status_token_file`).
    #[arg(long, env = "MJPFL_STATUS_TOKEN_FILE")]
    status_token_file: Option<PathBuf>,
}

/// `mjpfl status`: one Status call; exit status 0 when the coordinator answers (healthchecks).
pub fn status(args: StatusArgs) -> Result<()> {
    let token = match &args.status_token_file {
        Some(p) => read_secret(p)?,
        None => String::new(),
    };
    let target = args.connect.target(None)?;
    runtime()?.block_on(async move {
        let s = Protocol::connect(target).await?.status_with(&token).await?;
        println!(
            "{}: round {}/{}, model version {}, {} clients connected{}",
            s.phase,
            s.round,
            s.total_rounds,
            s.model_version,
            s.connected_clients,
            s.last_test_accuracy
                .map_or(String::new(), |a| format!(", last test accuracy {a:.4}"))
        );
        Ok(())
    })
}

/// `mjpfl client`: train for a coordinator until the federation finishes.
pub fn client(args: ClientArgs) -> Result<()> {
    // Held (with its lock) for the whole run.
    let pooled = args
        .credential_pool
        .as_deref()
        .map(mjpfl_lab::secrets::take_from_pool)
        .transpose()?;
    let join_secret = match (&pooled, &args.credential_file) {
        (Some(identity), _) => identity.credential.clone(),
        (None, Some(path)) => read_secret(path)?,
        (None, None) => args.join_secret,
    };
    let target = args
        .connect
        .target(pooled.as_ref().and_then(|p| p.cert_and_key.as_ref()))?;
    if let Some(p) = &pooled {
        let id = p.credential.split(':').next().unwrap_or_default();
        println!("client: using credential {id} from the pool");
    }
    let config = ClientConfig {
        endpoint: target.endpoint,
        tls: target.tls,
        name: args.name,
        join_secret,
        partition_hint: args.partition,
        data: args.data,
        data_dir: args.data_dir,
        device: args.device,
        audit_dir: args.audit_dir,
        reconnect_for: Duration::from_secs_f64(args.reconnect_for),
        workers: None,
        shared: None,
        noise_seed: None,
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
    /// Clients training at the same time, each on its own share of the cores (0: one per core,
    /// at most the round's cohort). Results do not depend on it: updates are folded in
    /// client-id order.
    #[arg(long, default_value_t = 0)]
    pub train_concurrency: usize,
    #[command(flatten)]
    pub attacks: crate::adversary::AttackArgs,
    /// Where clients train and the adversary computes.
    #[arg(long, default_value = "flex")]
    pub device: DeviceSpec,
    /// How the simulated clients' models and updates reach the coordinator: `in-process`
    /// (handed over through the same checks, fold and tap as from the network, without
    /// serialisation) or `grpc` (streamed over loopback like an external client's). Joins and
    /// task polls always go over gRPC; results are the same either way.
    #[arg(long, default_value = "in-process")]
    pub transport: mjpfl_lab::ClientTransport,
}

/// `mjpfl simulate`: the main job.
pub fn simulate(args: SimulateArgs) -> Result<()> {
    let mut config = args.overrides.resolve()?;
    if args.overrides.listen.is_none() {
        config.server.listen = "127.0.0.1:0".into();
    }
    config.server.device = args.device;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/simulate-{}", timestamp())));
    let options = SimulationOptions {
        audit: !args.no_audit,
        train_concurrency: args.train_concurrency,
        adversary: args.attacks.settings(),
        device: args.device,
        transport: args.transport,
    };
    let outcome = runtime()?.block_on(run_simulation(config, &out, options, ctrl_c_or_term()))?;
    mjpfl_lab::report::write_run_report(&out)?;
    println!(
        "done in {:.1} min: final test accuracy {}; report {}",
        outcome.wall.as_secs_f64() / 60.0,
        outcome
            .final_accuracy
            .map_or("-".into(), |a| format!("{a:.4}")),
        RunLayout::new(&out).report().display()
    );
    Ok(())
}

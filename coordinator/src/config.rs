//! The coordinator's configuration: one TOML file (every key optional, defaults are the README's
//! main job), overridable from the command line. The resolved configuration is written to the run
//! directory as `config.toml`.

use std::path::{Path, PathBuf};

use mjp::data::DataSource;
use mjp::fl::UpdateKind;
use mjp::partition::PartitionScheme;
use mjp::train::OptimizerKind;
use mjp::{DalKind, DeviceSpec, PeMode, VitConfig};
use serde::{Deserialize, Serialize};

use crate::admission::AdmissionSection;
use crate::aggregate::{AggregatorKind, ServerOptimizer};
use crate::auth::{AuthSection, DEFAULT_JOIN_SECRET, DEFAULT_OBSERVER_TOKEN};
use crate::error::{CoordinatorError, Result};
use crate::schedule::{DefenseSchedule, ShuffleSchedule};

/// The longest duration a configuration may give, seconds (about 31 years).
const MAX_SECS: f64 = 1e9;

/// Complete coordinator configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Membership, rounds, sampling, deadlines, secrets.
    pub federation: FederationSection,
    /// The model.
    pub model: ModelSection,
    /// Data for evaluation and for simulated clients.
    pub data: DataSection,
    /// Local training recipe and aggregation.
    pub training: TrainingSection,
    /// MJP shuffle-ratio schedule.
    pub shuffle: ShuffleSchedule,
    /// Client defenses and the secure-aggregation view, per round.
    pub defense: DefenseSchedule,
    /// How simulated clients split the training set.
    pub partition: PartitionScheme,
    /// Network and resources.
    pub server: ServerSection,
    /// What one update may weigh and move.
    pub admission: AdmissionSection,
    /// Per-client credentials and the observer's and Status's tokens.
    pub auth: AuthSection,
}

/// `[federation]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationSection {
    /// Rounds to run.
    pub rounds: u32,
    /// Live clients needed before each round opens.
    pub min_clients: u32,
    /// Clients sampled per round (a cap when `sample_fraction` is set).
    pub clients_per_round: u32,
    /// If > 0, sample `ceil(fraction * connected)` clients instead.
    pub sample_fraction: f64,
    /// Updates needed to close a round; fewer at the deadline and the round is retried.
    pub min_fit: u32,
    /// Seconds a round stays open.
    pub round_deadline_secs: f64,
    /// Retries of a round that missed `min_fit` before the federation stops.
    pub max_round_retries: u32,
    /// Run seed.
    pub seed: u64,
    /// Shared secret clients present to join (in the clear or `sha256:<hex>`); unused when
    /// `[auth] clients_file` gives each client its own credential.
    pub join_secret: String,
    /// Token of the observer (adversary) endpoint (in the clear or `sha256:<hex>`).
    pub observer_token: String,
    /// A client that has not called for this long is not sampled.
    pub client_timeout_secs: f64,
}

impl Default for FederationSection {
    fn default() -> Self {
        Self {
            rounds: 20,
            min_clients: 10,
            clients_per_round: 2,
            sample_fraction: 0.0,
            min_fit: 2,
            round_deadline_secs: 300.0,
            max_round_retries: 3,
            seed: 0,
            join_secret: DEFAULT_JOIN_SECRET.into(),
            observer_token: DEFAULT_OBSERVER_TOKEN.into(),
            client_timeout_secs: 60.0,
        }
    }
}

/// `[model]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Architecture preset.
    pub preset: String,
    /// Position-embedding mode.
    pub pe: PeMode,
    /// DAL head.
    pub dal: DalKind,
    /// Optional initial weights (an mjpfl checkpoint).
    pub init_checkpoint: Option<PathBuf>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: "vit-micro-28".into(),
            pe: PeMode::Mjp,
            dal: DalKind::Nonlinear,
            init_checkpoint: None,
        }
    }
}

impl ModelSection {
    /// The architecture.
    pub fn vit(&self) -> Result<VitConfig> {
        let mut c = VitConfig::preset(&self.preset)?.with_pe(self.pe);
        c.dal = self.dal;
        c.validate()?;
        Ok(c)
    }
}

/// `[data]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Dataset (simulated clients train on its training split, the coordinator evaluates on
    /// its test split).
    pub dataset: DataSource,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Evaluate on the first N test images (0 = all).
    pub test_limit: usize,
    /// Evaluate intermediate rounds on the first N of those (0 = all of them); the last round
    /// is always evaluated on all of them, so the final accuracy is on the whole test set.
    pub round_test_limit: usize,
    /// Also report jigsaw accuracy and consistency every round.
    pub eval_jigsaw_metrics: bool,
    /// Measure the jigsaw metrics on the first N test images (0 = all); clean accuracy always
    /// uses the whole test set (or `test_limit`).
    pub eval_jigsaw_limit: usize,
    /// Evaluate the global model every n-th round (and always after the first and the last);
    /// 1 = every round.
    pub eval_every: u32,
    /// Skip evaluation (benchmarks).
    pub skip_eval: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            dataset: DataSource::FashionMnist,
            data_dir: PathBuf::from("data"),
            test_limit: 0,
            round_test_limit: 2000,
            eval_jigsaw_metrics: true,
            eval_jigsaw_limit: 500,
            eval_every: 1,
            skip_eval: false,
        }
    }
}

/// `[training]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSection {
    /// fedsgd (one step, gradient) or fedavg (several steps, weight delta).
    pub update_kind: UpdateKind,
    /// Local steps per round (FedAvg when `local_epochs` = 0).
    pub local_steps: u32,
    /// Local epochs per round (FedAvg; 0 = use local_steps).
    pub local_epochs: u32,
    /// Client learning rate (of round 1).
    pub learning_rate: f64,
    /// Client learning rate over rounds: "constant", or "cosine" (decays to 10% by the last
    /// round).
    pub learning_rate_schedule: LrSchedule,
    /// Local batch size.
    pub batch_size: u32,
    /// Probability that a local step uses the jigsaw. 1.0 protects every gradient that leaves a
    /// client; the reference's 0.5 is a centralised-training choice.
    pub jigsaw_probability: f64,
    /// One jigsaw per sample instead of per batch.
    pub per_sample_jigsaw: bool,
    /// DAL loss weight.
    pub dal_lambda: f64,
    /// FedProx proximal weight (0 disables).
    pub fedprox_mu: f64,
    /// Local optimiser of FedAvg steps.
    pub local_optimizer: OptimizerKind,
    /// How updates are combined.
    pub aggregator: AggregatorKind,
    /// Server optimiser (default: SGD lr 1 for FedAvg, Adam 1e-3 for FedSGD).
    pub server_optimizer: Option<ServerOptimizer>,
    /// Memory (MB) that accepted updates may wait in to be folded in client-id order, so a
    /// round's aggregate does not depend on the order its updates arrive in (f32 sums are not
    /// associative). When it is full, the next update is folded out of order and the round's
    /// record says how many were. Unset: 0 for `mjpfl coordinator` (fold on arrival: memory
    /// O(model) whatever the cohort), 1024 for `simulate` and `sweep` (reproducible whatever the
    /// number of clients training at once).
    pub ordered_fold_mb: Option<u64>,
}

/// The most `training.ordered_fold_mb` may be.
pub const MAX_ORDERED_FOLD_MB: u64 = 1 << 20;

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            update_kind: UpdateKind::FedAvg,
            local_steps: 120,
            local_epochs: 0,
            learning_rate: 2e-3,
            learning_rate_schedule: LrSchedule::Cosine,
            batch_size: 32,
            jigsaw_probability: 1.0,
            per_sample_jigsaw: false,
            dal_lambda: 0.01,
            fedprox_mu: 0.0,
            local_optimizer: OptimizerKind::AdamW { weight_decay: 0.0 },
            aggregator: AggregatorKind::Mean,
            server_optimizer: None,
            ordered_fold_mb: None,
        }
    }
}

/// Client learning rate as a function of the round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// The same every round.
    Constant,
    /// Half-cosine from the base rate (round 1) to 10% of it (last round).
    #[default]
    Cosine,
}

impl TrainingSection {
    /// The client learning rate of `round` out of `total`.
    pub fn learning_rate_at(&self, round: u32, total: u32) -> f64 {
        match self.learning_rate_schedule {
            LrSchedule::Constant => self.learning_rate,
            LrSchedule::Cosine => {
                let t = if total <= 1 {
                    0.0
                } else {
                    f64::from(round.saturating_sub(1)) / f64::from(total - 1)
                };
                let min = 0.1 * self.learning_rate;
                min + 0.5
                    * (self.learning_rate - min)
                    * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
            }
        }
    }

    /// The server optimiser in effect.
    pub fn server_optimizer(&self) -> ServerOptimizer {
        self.server_optimizer
            .unwrap_or_else(|| ServerOptimizer::default_for(self.update_kind))
    }
}

/// `[server]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on (port 0 picks a free one).
    pub listen: String,
    /// Updates decoded at the same time (each holds one model's worth of memory).
    pub max_concurrent_uploads: usize,
    /// Intercepted updates queued per observer before new ones are dropped.
    pub tap_queue: usize,
    /// Largest tensor chunk accepted, bytes.
    pub max_chunk_bytes: usize,
    /// An upload that sends nothing for this long is cut off (and its decoding slot freed), and
    /// so is a download nobody reads for this long (and its session's download slot freed).
    pub upload_idle_timeout_secs: f64,
    /// Connections open at once; more wait in the kernel's backlog. Keep it well below the
    /// process's file-descriptor limit (`ulimit -n`): the run directory needs descriptors too.
    pub max_connections: usize,
    /// A connection that sends nothing (not even a keep-alive ping's answer) for this long is
    /// closed.
    pub connection_idle_timeout_secs: f64,
    /// A new connection that sends no byte for this long is closed (honest clients speak at
    /// once; this frees the slots of sockets opened only to hold them).
    pub first_byte_timeout_secs: f64,
    /// Where the coordinator builds the initial model and evaluates the global one (`flex`,
    /// `tch-cpu`, `tch-cuda:N`). Written to `config.toml` only when it is not `flex`, so the
    /// resolved configuration of a default run reads as it did before the key existed.
    #[serde(skip_serializing_if = "is_flex")]
    pub device: DeviceSpec,
    /// TLS (and optionally mutual TLS) on the gRPC server; unset: plaintext, for loopback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::TlsSection>,
    /// Bytes of gRPC messages begun but not yet complete, over all requests at once; a request
    /// whose message would go beyond is refused with RESOURCE_EXHAUSTED. Bounds what peers
    /// without credentials can make the coordinator hold by never finishing a message.
    pub max_pending_message_bytes: usize,
    /// A gRPC message begun must be complete within this many seconds (trickled messages are
    /// cut off).
    pub message_timeout_secs: f64,
}

fn is_flex(device: &DeviceSpec) -> bool {
    *device == DeviceSpec::Flex
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            max_concurrent_uploads: 2,
            tap_queue: 256,
            max_chunk_bytes: mjpfl_proto::MAX_CHUNK_BYTES,
            upload_idle_timeout_secs: 30.0,
            max_connections: 512,
            connection_idle_timeout_secs: 60.0,
            first_byte_timeout_secs: 5.0,
            device: DeviceSpec::Flex,
            tls: None,
            max_pending_message_bytes: 64 << 20,
            message_timeout_secs: 15.0,
        }
    }
}

impl CoordinatorConfig {
    /// Reads a TOML file (unknown keys are errors, so typos do not pass silently).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CoordinatorError::io(path, e))?;
        toml::from_str(&text).map_err(|e| CoordinatorError::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// The resolved configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoordinatorError::Config(m));
        let f = &self.federation;
        let t = &self.training;
        self.model.vit()?;
        self.shuffle.validate()?;
        self.defense.validate()?;
        self.admission
            .validate()
            .map_err(CoordinatorError::Config)?;
        if f.rounds == 0 {
            return bad("federation.rounds must be >= 1".into());
        }
        if f.min_clients == 0 || f.clients_per_round == 0 || f.min_fit == 0 {
            return bad("min_clients, clients_per_round and min_fit must be >= 1".into());
        }
        if f.min_fit > f.clients_per_round {
            return bad(format!(
                "min_fit ({}) cannot exceed clients_per_round ({})",
                f.min_fit, f.clients_per_round
            ));
        }
        if f.min_fit > f.min_clients {
            return bad(format!(
                "min_fit ({}) cannot exceed min_clients ({}): a round could never close",
                f.min_fit, f.min_clients
            ));
        }
        if !(0.0..=1.0).contains(&f.sample_fraction) {
            return bad("sample_fraction must be in [0, 1]".into());
        }
        if t.batch_size == 0 || !t.learning_rate.is_finite() || t.learning_rate <= 0.0 {
            return bad("training.batch_size and training.learning_rate must be positive".into());
        }
        if !(0.0..=1.0).contains(&t.jigsaw_probability) {
            return bad("training.jigsaw_probability must be in [0, 1]".into());
        }
        if t.update_kind == UpdateKind::FedAvg && t.local_steps == 0 && t.local_epochs == 0 {
            return bad("fedavg needs local_steps or local_epochs >= 1".into());
        }
        if let AggregatorKind::TrimmedMean { fraction } = t.aggregator
            && !(0.0..0.5).contains(&fraction)
        {
            return bad("trimmed-mean fraction must be in [0, 0.5)".into());
        }
        // Durations become `Duration`s: positive, finite and at most ~31 years (anything
        // beyond 1.8e19 s would panic in the conversion).
        for (name, v) in [
            ("federation.round_deadline_secs", f.round_deadline_secs),
            ("federation.client_timeout_secs", f.client_timeout_secs),
            (
                "server.upload_idle_timeout_secs",
                self.server.upload_idle_timeout_secs,
            ),
            (
                "server.connection_idle_timeout_secs",
                self.server.connection_idle_timeout_secs,
            ),
            (
                "server.message_timeout_secs",
                self.server.message_timeout_secs,
            ),
            (
                "server.first_byte_timeout_secs",
                self.server.first_byte_timeout_secs,
            ),
        ]
        .into_iter()
        .chain(self.server.tls.as_ref().map(|t| {
            (
                "server.tls.handshake_timeout_secs",
                t.handshake_timeout_secs,
            )
        })) {
            if !(v > 0.0 && v <= MAX_SECS) {
                return bad(format!(
                    "{name} must be in (0, {MAX_SECS:e}] seconds, not {v}"
                ));
            }
        }
        if t.ordered_fold_mb.is_some_and(|mb| mb > MAX_ORDERED_FOLD_MB) {
            return bad(format!(
                "training.ordered_fold_mb must be at most {MAX_ORDERED_FOLD_MB}"
            ));
        }
        // Every other float: finite (NaN would pass range checks and break the round trip).
        let mut floats = vec![
            ("training.dal_lambda", t.dal_lambda, 0.0, f64::MAX),
            ("training.fedprox_mu", t.fedprox_mu, 0.0, f64::MAX),
        ];
        match t.local_optimizer {
            OptimizerKind::AdamW { weight_decay } => floats.push((
                "training.local_optimizer.weight_decay",
                weight_decay,
                0.0,
                f64::MAX,
            )),
            OptimizerKind::Sgd { momentum } => floats.push((
                "training.local_optimizer.momentum",
                momentum,
                0.0,
                0.999_999,
            )),
        }
        match t.server_optimizer {
            Some(ServerOptimizer::Sgd { lr }) => floats.push((
                "training.server_optimizer.lr",
                lr,
                f64::MIN_POSITIVE,
                f64::MAX,
            )),
            Some(ServerOptimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            }) => floats.extend([
                (
                    "training.server_optimizer.lr",
                    lr,
                    f64::MIN_POSITIVE,
                    f64::MAX,
                ),
                ("training.server_optimizer.beta1", beta1, 0.0, 0.999_999),
                ("training.server_optimizer.beta2", beta2, 0.0, 0.999_999_999),
                (
                    "training.server_optimizer.eps",
                    eps,
                    f64::MIN_POSITIVE,
                    f64::MAX,
                ),
            ]),
            None => {}
        }
        for (name, v, lo, hi) in floats {
            if !(v.is_finite() && v >= lo && v <= hi) {
                return bad(format!(
                    "{name} must be a finite number in [{lo}, {hi}], not {v}"
                ));
            }
        }
        if self.server.max_pending_message_bytes < 2 * mjpfl_proto::MAX_MESSAGE_BYTES {
            return bad(format!(
                "server.max_pending_message_bytes must be >= {} (two whole messages)",
                2 * mjpfl_proto::MAX_MESSAGE_BYTES
            ));
        }
        if self.auth.max_sessions == 0 {
            return bad("auth.max_sessions must be >= 1".into());
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections must be >= 1".into());
        }
        if self.server.max_chunk_bytes < 1024
            || self.server.max_chunk_bytes > mjpfl_proto::MAX_CHUNK_BYTES
        {
            return bad(format!(
                "server.max_chunk_bytes must be in 1024..={}",
                mjpfl_proto::MAX_CHUNK_BYTES
            ));
        }
        self.partition
            .validate()
            .map_err(|e| CoordinatorError::Config(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip() {
        let c = CoordinatorConfig::default();
        c.validate().unwrap();
        let back: CoordinatorConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn server_device_defaults_to_flex_and_is_recorded_otherwise() {
        let old: CoordinatorConfig = toml::from_str("[server]\ntap_queue = 8").unwrap();
        assert_eq!(old.server.device, DeviceSpec::Flex);
        assert!(!CoordinatorConfig::default().to_toml().contains("device"));
        let mut c = CoordinatorConfig::default();
        c.server.device = DeviceSpec::TchCuda(1);
        let back: CoordinatorConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back.server.device, DeviceSpec::TchCuda(1));
    }

    #[test]
    fn durations_and_floats_that_would_panic_or_not_round_trip_are_errors() {
        // Found by the config_loader fuzz target: each passed validation and then panicked in
        // Duration::from_secs_f64 or failed the TOML round trip (NaN != NaN).
        for text in [
            "[federation]\nclient_timeout_secs = -6",
            "[federation]\nclient_timeout_secs = nan",
            "[federation]\nround_deadline_secs = 1e20",
            "[server]\nmessage_timeout_secs = inf",
            "[server]\nconnection_idle_timeout_secs = 1e20",
            "[server.tls]\ncert = \"c\"\nkey = \"k\"\nhandshake_timeout_secs = 1e300",
            "[training]\ndal_lambda = nan",
            "[training]\nfedprox_mu = inf",
            "[training]\nlocal_optimizer = { kind = \"sgd\", momentum = nan }",
            "[training]\nserver_optimizer = { kind = \"adam\", lr = 1e-3, beta1 = nan, beta2 = 0.999, eps = 1e-8 }",
            "[training]\nserver_optimizer = { kind = \"sgd\", lr = -1 }",
        ] {
            let c: CoordinatorConfig =
                toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(c.validate().is_err(), "{text} validated");
        }
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(toml::from_str::<CoordinatorConfig>("[federation]\nroundz = 3").is_err());
        let c: CoordinatorConfig =
            toml::from_str("[federation]\nmin_fit = 20\nclients_per_round = 5").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("min_fit"));
        let c: CoordinatorConfig =
            toml::from_str("[shuffle]\nkind = \"constant\"\nratio = 2.0").unwrap();
        assert!(c.validate().is_err());
    }
}

//! The federation's state machine: membership, round opening with seeded sampling, update
//! admission, round closing (aggregate, server optimiser, evaluation, checkpoint, record), and
//! resume from the run directory. Knows nothing of gRPC; `service` translates at the edge.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mjp::data::{Dataset, Split};
use mjp::fl::{ModelUpdate, ObservedUpdate, RoundConfig, UpdateKind};
use mjp::params::{Manifest, NamedTensors};
use mjp::train::{EvalOptions, EvalReport, evaluate};
use mjp::{Seed, Vit, VitConfig};
use rand::seq::SliceRandom;
use tokio::sync::{Semaphore, watch};

use crate::aggregate::{Aggregator, ServerState, apply};
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::rundir::{RoundRecord, RunDir};
use crate::tap::Tap;

/// Why a request was refused; `service` maps each kind to one gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown or stale session token, wrong join or observer secret.
    Unauthenticated(String),
    /// Wrong round or model version, round closed, client not sampled, federation finished.
    FailedPrecondition(String),
    /// Malformed update: names, shapes, dtype, sizes, non-finite values, missing fields.
    InvalidArgument(String),
    /// A second update from the same client in the same round.
    AlreadyExists(String),
    /// A model version that is not stored.
    NotFound(String),
    /// Over a size limit.
    ResourceExhausted(String),
    /// Bytes lost or damaged.
    DataLoss(String),
    /// The coordinator failed.
    Internal(String),
}

/// Phase of the federation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for enough clients.
    Waiting,
    /// A round is open or being closed.
    Training,
    /// All rounds done (or stopped).
    Finished,
}

impl Phase {
    /// Lower-case name for the Status call.
    pub fn name(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Training => "training",
            Self::Finished => "finished",
        }
    }
}

/// A joined client.
#[derive(Clone, Debug)]
pub struct ClientEntry {
    /// Id.
    pub id: String,
    /// Name it gave.
    pub name: String,
    /// Data partition it was assigned.
    pub partition: u32,
    /// Examples it reported.
    pub num_examples: u64,
    /// Last call.
    pub last_seen: Instant,
}

/// What a client gets back from Join.
#[derive(Clone, Debug)]
pub struct Joined {
    /// Its id.
    pub client_id: String,
    /// Its session token.
    pub token: String,
    /// Its partition.
    pub partition: u32,
}

/// What a polling client should do.
#[derive(Clone, Debug)]
pub enum TaskDecision {
    /// Train on `model_version` for `round`.
    Train {
        /// Round.
        round: u32,
        /// Model version to start from.
        model_version: u64,
        /// The recipe (with this client's seed).
        config: RoundConfig,
    },
    /// Ask again later.
    Wait(String),
    /// Exit.
    Finished {
        /// Why.
        reason: String,
        /// Rounds completed.
        rounds: u32,
    },
}

/// Admission ticket for an update whose header passed validation.
#[derive(Clone, Debug)]
pub struct UploadTicket {
    /// Sender.
    pub client_id: String,
    /// Round.
    pub round: u32,
    /// Attempt of the round.
    pub attempt: u32,
    /// The round's recipe for this client.
    pub config: RoundConfig,
}

/// A snapshot for the Status call.
#[derive(Clone, Debug)]
pub struct StatusSnapshot {
    /// Round in progress or last completed.
    pub round: u32,
    /// Current model version.
    pub model_version: u64,
    /// Clients seen recently.
    pub connected: u32,
    /// Rounds planned.
    pub total_rounds: u32,
    /// Phase.
    pub phase: Phase,
    /// Completed rounds.
    pub history: Vec<RoundRecord>,
    /// Set when the federation stopped early.
    pub failure: Option<String>,
}

struct OpenRound {
    round: u32,
    attempt: u32,
    version: u64,
    ratio: f64,
    sampled: BTreeSet<String>,
    submitted: BTreeSet<String>,
    aggregator: Aggregator,
    metrics: BTreeMap<String, (f64, u32)>,
    rejected: u32,
    opened: Instant,
    deadline: Instant,
    deadline_unix_ms: u64,
}

struct State {
    phase: Phase,
    global: Arc<NamedTensors>,
    completed: u32,
    server: ServerState,
    clients: BTreeMap<String, ClientEntry>,
    tokens: HashMap<String, String>,
    next_client: u64,
    round: Option<OpenRound>,
    history: Vec<RoundRecord>,
    failure: Option<String>,
    attempt: u32,
}

/// The federation: shared by the gRPC services and the round driver.
pub struct Federation {
    config: CoordinatorConfig,
    vit: VitConfig,
    manifest: Manifest,
    run_dir: RunDir,
    id: String,
    tap: Tap,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    upload_permits: Arc<Semaphore>,
    test_data: Option<Dataset>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn new_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..4)
        .map(|_| format!("{:08x}", rng.random::<u32>()))
        .collect()
}

impl Federation {
    /// Opens the run directory, resuming the last committed round if there is one, else starting
    /// from a fresh (or given) initial model.
    pub fn open(config: CoordinatorConfig, run_dir: &std::path::Path) -> Result<Arc<Self>> {
        config.validate()?;
        let vit = config.model.vit()?;
        let run_dir = RunDir::open(run_dir)?;
        let device = mjp::DeviceSpec::Flex.device()?;
        let (global, completed, history, server) = match run_dir.state()? {
            Some(state) => {
                let global = run_dir.load_model(u64::from(state.completed_rounds))?;
                let history = run_dir.rounds()?;
                tracing::info!(
                    "resuming {} after round {} (model version {})",
                    run_dir.root().display(),
                    state.completed_rounds,
                    state.completed_rounds
                );
                (
                    global,
                    state.completed_rounds,
                    history,
                    run_dir.load_server_state()?,
                )
            }
            None => {
                let model = match &config.model.init_checkpoint {
                    Some(p) => {
                        let ck = mjp::checkpoint::Checkpoint::read(p)?;
                        if ck.config != vit {
                            return Err(CoordinatorError::Config(format!(
                                "{} holds a different architecture than [model]",
                                p.display()
                            )));
                        }
                        ck.into_model(&device)?
                    }
                    None => Vit::new(
                        &vit,
                        Seed(config.federation.seed).child("global-init", 0),
                        &device,
                    ),
                };
                let global = NamedTensors::from_module(&model);
                run_dir.write_config(&config.to_toml())?;
                run_dir.save_model(0, &global, &vit)?;
                (global, 0, Vec::new(), ServerState::default())
            }
        };
        let test_data = if config.data.skip_eval {
            None
        } else {
            let ds = config
                .data
                .dataset
                .load(Split::Test, &config.data.data_dir)?;
            let ds = if config.data.test_limit > 0 {
                ds.take(config.data.test_limit)
            } else {
                ds
            };
            Some(ds.conform(vit.channels, vit.image_size)?)
        };
        let manifest = global.manifest();
        let id = run_dir
            .root()
            .file_name()
            .map_or_else(|| "federation".into(), |n| n.to_string_lossy().into_owned());
        let phase = if completed >= config.federation.rounds {
            Phase::Finished
        } else {
            Phase::Waiting
        };
        let (changed, _) = watch::channel(0);
        Ok(Arc::new(Self {
            upload_permits: Arc::new(Semaphore::new(config.server.max_concurrent_uploads.max(1))),
            tap: Tap::new(config.server.tap_queue),
            config,
            vit,
            manifest,
            run_dir,
            id,
            state: Mutex::new(State {
                phase,
                global: Arc::new(global),
                completed,
                server,
                clients: BTreeMap::new(),
                tokens: HashMap::new(),
                next_client: 0,
                round: None,
                history,
                failure: None,
                attempt: 1,
            }),
            changed,
            test_data,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("federation state lock poisoned")
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever the federation's state does (for long-polls).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The architecture.
    pub fn vit(&self) -> &VitConfig {
        &self.vit
    }

    /// Tensor names and shapes of the model.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The run directory.
    pub fn run_dir(&self) -> &RunDir {
        &self.run_dir
    }

    /// The federation's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The interception tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Limits concurrent update decoding.
    pub fn upload_permits(&self) -> Arc<Semaphore> {
        self.upload_permits.clone()
    }

    /// Registers a client. A `previous_token` (re-join after a connection problem) retires the
    /// session it names, so no ghost of the same client is sampled or waited for.
    pub fn join(
        &self,
        name: &str,
        secret: &str,
        num_examples: u64,
        partition_hint: i32,
        previous_token: &str,
    ) -> Result<Joined, Refusal> {
        if secret != self.config.federation.join_secret {
            return Err(Refusal::Unauthenticated("wrong join secret".into()));
        }
        let count = self.config.partition.count();
        let mut s = self.lock();
        if let Some(old) = s.tokens.remove(previous_token) {
            s.clients.remove(&old);
            if let Some(r) = s.round.as_mut()
                && !r.submitted.contains(&old)
            {
                r.sampled.remove(&old);
            }
            tracing::info!("{old} re-joined: its previous session is retired");
        }
        let taken: BTreeSet<u32> = s.clients.values().map(|c| c.partition).collect();
        let partition = if partition_hint >= 0 && (partition_hint as u32) < count {
            partition_hint as u32
        } else {
            (0..count)
                .find(|p| !taken.contains(p))
                .unwrap_or((s.next_client % u64::from(count)) as u32)
        };
        // Ids follow the data partition, so the same client keeps its name across coordinator
        // restarts and sweep cells (a second client on the same partition gets a suffix).
        let base = format!("client-{partition:03}");
        let id = if s.clients.contains_key(&base) {
            format!("{base}-{}", s.next_client)
        } else {
            base
        };
        s.next_client += 1;
        let token = new_token();
        s.tokens.insert(token.clone(), id.clone());
        s.clients.insert(
            id.clone(),
            ClientEntry {
                id: id.clone(),
                name: name.to_string(),
                partition,
                num_examples,
                last_seen: Instant::now(),
            },
        );
        drop(s);
        tracing::info!("{id} ({name}) joined, partition {partition}");
        self.notify();
        Ok(Joined {
            client_id: id,
            token,
            partition,
        })
    }

    /// The client behind a session token (and marks it alive).
    pub fn authenticate(&self, token: &str) -> Result<String, Refusal> {
        let mut s = self.lock();
        let id = s.tokens.get(token).cloned().ok_or_else(|| {
            Refusal::Unauthenticated(
                "unknown session token (coordinator restarted? join again)".into(),
            )
        })?;
        if let Some(c) = s.clients.get_mut(&id) {
            c.last_seen = Instant::now();
        }
        Ok(id)
    }

    fn round_config(
        &self,
        round: u32,
        attempt: u32,
        partition: u32,
        ratio: f64,
        deadline_unix_ms: u64,
    ) -> RoundConfig {
        let t = &self.config.training;
        let seed = Seed(self.config.federation.seed)
            .child("round", u64::from(round) * 1000 + u64::from(attempt))
            .child("partition", u64::from(partition));
        RoundConfig {
            update_kind: t.update_kind,
            local_steps: match t.update_kind {
                UpdateKind::FedSgd => 1,
                UpdateKind::FedAvg => t.local_steps,
            },
            local_epochs: t.local_epochs,
            learning_rate: t.learning_rate_at(round, self.config.federation.rounds),
            batch_size: t.batch_size,
            shuffle_ratio: ratio,
            jigsaw_probability: t.jigsaw_probability,
            per_sample_jigsaw: t.per_sample_jigsaw,
            dal_lambda: t.dal_lambda,
            fedprox_mu: t.fedprox_mu,
            seed: seed.0,
            deadline_unix_ms,
            local_optimizer: t.local_optimizer,
        }
    }

    /// What client `id` should do now.
    pub fn task_for(&self, id: &str) -> TaskDecision {
        let s = self.lock();
        if s.phase == Phase::Finished {
            return TaskDecision::Finished {
                reason: s
                    .failure
                    .clone()
                    .unwrap_or_else(|| "all rounds completed".into()),
                rounds: s.completed,
            };
        }
        match &s.round {
            Some(r) if r.sampled.contains(id) && !r.submitted.contains(id) => {
                let partition = s.clients.get(id).map_or(0, |c| c.partition);
                TaskDecision::Train {
                    round: r.round,
                    model_version: r.version,
                    config: self.round_config(
                        r.round,
                        r.attempt,
                        partition,
                        r.ratio,
                        r.deadline_unix_ms,
                    ),
                }
            }
            Some(r) if r.submitted.contains(id) => {
                TaskDecision::Wait(format!("update for round {} received", r.round))
            }
            Some(r) => TaskDecision::Wait(format!("not sampled in round {}", r.round)),
            None => TaskDecision::Wait(format!(
                "waiting for clients ({} connected, {} needed)",
                self.connected(&s),
                self.config.federation.min_clients
            )),
        }
    }

    fn connected(&self, s: &State) -> u32 {
        let timeout = Duration::from_secs_f64(self.config.federation.client_timeout_secs);
        s.clients
            .values()
            .filter(|c| c.last_seen.elapsed() < timeout)
            .count() as u32
    }

    /// A stored model version: the current one from memory, older ones from their checkpoint.
    pub fn model(&self, version: u64) -> Result<Arc<NamedTensors>, Refusal> {
        let (current, completed) = {
            let s = self.lock();
            (
                (u64::from(s.completed) == version).then(|| s.global.clone()),
                u64::from(s.completed),
            )
        };
        if version > completed {
            return Err(Refusal::NotFound(format!(
                "model version {version} is not committed (current version {completed})"
            )));
        }
        match current {
            Some(g) => Ok(g),
            None => {
                let path = self.run_dir.checkpoint_path(version);
                if !path.exists() {
                    return Err(Refusal::NotFound(format!(
                        "model version {version} is not stored"
                    )));
                }
                self.run_dir
                    .load_model(version)
                    .map(Arc::new)
                    .map_err(|e| Refusal::Internal(format!("reading model version {version}: {e}")))
            }
        }
    }

    /// Validates an update's header before any of its bytes are read.
    pub fn admit(
        &self,
        client_id: &str,
        round: u32,
        model_version: u64,
        kind: Option<UpdateKind>,
    ) -> Result<UploadTicket, Refusal> {
        let s = self.lock();
        let Some(r) = &s.round else {
            return Err(Refusal::FailedPrecondition(format!(
                "round {round} is not open"
            )));
        };
        if round != r.round {
            return Err(Refusal::FailedPrecondition(format!(
                "update for round {round}, the open round is {}",
                r.round
            )));
        }
        if model_version != r.version {
            return Err(Refusal::FailedPrecondition(format!(
                "update computed from model version {model_version}, round {} trains version {}",
                r.round, r.version
            )));
        }
        match kind {
            None => return Err(Refusal::InvalidArgument("update kind not set".into())),
            Some(k) if k != self.config.training.update_kind => {
                return Err(Refusal::InvalidArgument(format!(
                    "update kind {k}, this federation expects {}",
                    self.config.training.update_kind
                )));
            }
            _ => {}
        }
        if !r.sampled.contains(client_id) {
            return Err(Refusal::FailedPrecondition(format!(
                "{client_id} was not sampled in round {}",
                r.round
            )));
        }
        if r.submitted.contains(client_id) {
            return Err(Refusal::AlreadyExists(format!(
                "{client_id} already submitted for round {}",
                r.round
            )));
        }
        if Instant::now() > r.deadline {
            return Err(Refusal::FailedPrecondition(format!(
                "round {} passed its deadline",
                r.round
            )));
        }
        let partition = s.clients.get(client_id).map_or(0, |c| c.partition);
        Ok(UploadTicket {
            client_id: client_id.to_string(),
            round: r.round,
            attempt: r.attempt,
            config: self.round_config(r.round, r.attempt, partition, r.ratio, r.deadline_unix_ms),
        })
    }

    /// Counts a refused update against the open round (if one is open).
    pub fn note_rejection(&self) {
        if let Some(r) = self.lock().round.as_mut() {
            r.rejected += 1;
        }
    }

    /// Folds a fully received, validated update into the open round; publishes it on the tap.
    pub fn accept(&self, ticket: UploadTicket, update: ModelUpdate) -> Result<u32, Refusal> {
        if let Err(e) = update
            .tensors
            .check_manifest(&self.manifest)
            .and_then(|_| update.tensors.check_finite())
        {
            return Err(Refusal::InvalidArgument(e.to_string()));
        }
        if update.num_examples == 0 {
            return Err(Refusal::InvalidArgument("num_examples must be >= 1".into()));
        }
        // Sequence numbers are taken only for updates that reach the tap: a gap means a drop.
        let observed = |accepted: bool, update: ModelUpdate| ObservedUpdate {
            sequence: self.tap.next_sequence(),
            client_id: ticket.client_id.clone(),
            accepted,
            dropped_before: 0,
            config: ticket.config.clone(),
            update: Arc::new(update),
        };
        let mut s = self.lock();
        let open = s.round.as_mut().filter(|r| {
            r.round == ticket.round && r.attempt == ticket.attempt && Instant::now() <= r.deadline
        });
        let Some(r) = open else {
            drop(s);
            self.tap.publish(observed(false, update));
            return Err(Refusal::FailedPrecondition(format!(
                "round {} closed before the update finished arriving (deadline)",
                ticket.round
            )));
        };
        if !r.submitted.insert(ticket.client_id.clone()) {
            return Err(Refusal::AlreadyExists(format!(
                "{} already submitted for round {}",
                ticket.client_id, r.round
            )));
        }
        for (k, v) in &update.metrics {
            if v.is_finite() {
                let e = r.metrics.entry(k.clone()).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
        // The tap gets the update exactly as received; the mean folds it without a copy.
        r.aggregator
            .fold(&update.tensors, update.num_examples as f64);
        let received = r.submitted.len() as u32;
        drop(s);
        self.tap.publish(observed(true, update));
        self.notify();
        Ok(received)
    }

    /// A status snapshot.
    pub fn status(&self) -> StatusSnapshot {
        let s = self.lock();
        StatusSnapshot {
            round: s.round.as_ref().map_or(s.completed, |r| r.round),
            model_version: u64::from(s.completed),
            connected: self.connected(&s),
            total_rounds: self.config.federation.rounds,
            phase: s.phase,
            history: s.history.clone(),
            failure: s.failure.clone(),
        }
    }

    /// Runs rounds until all are done, too many retries fail, or `shutdown` flips to true.
    pub async fn drive(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let f = &self.config.federation;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let (completed, attempt) = {
                let s = self.lock();
                (s.completed, s.attempt)
            };
            if completed >= f.rounds {
                self.lock().phase = Phase::Finished;
                self.notify();
                tracing::info!("federation finished: {completed} rounds");
                return Ok(());
            }
            let round = completed + 1;
            // Wait for enough live clients.
            loop {
                let n = self.connected(&self.lock());
                if n >= f.min_clients {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
            self.open_round(round, attempt);
            // Wait for every sampled client, or the deadline.
            let deadline = self
                .lock()
                .round
                .as_ref()
                .map(|r| r.deadline)
                .expect("round just opened");
            let mut changes = self.watch();
            let closed_by = loop {
                let done = self
                    .lock()
                    .round
                    .as_ref()
                    .is_some_and(|r| r.submitted.len() == r.sampled.len());
                if done {
                    break "all-submitted";
                }
                if Instant::now() >= deadline {
                    break "deadline";
                }
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                    _ = shutdown.changed() => {
                        self.lock().round = None;
                        tracing::info!("shutdown: round {round} abandoned (it reruns on restart)");
                        return Ok(());
                    }
                }
            };
            let open = self.lock().round.take().expect("round open");
            self.notify();
            let count = open.aggregator.count() as u32;
            if count < f.min_fit {
                let mut s = self.lock();
                s.attempt += 1;
                tracing::warn!(
                    "round {round} closed by {closed_by} with {count} of {} needed updates; global model unchanged, retrying",
                    f.min_fit
                );
                if s.attempt > f.max_round_retries + 1 {
                    s.failure = Some(format!(
                        "round {round} failed {} times to collect {} updates",
                        s.attempt - 1,
                        f.min_fit
                    ));
                    s.phase = Phase::Finished;
                    drop(s);
                    self.notify();
                    return Err(CoordinatorError::Config(format!(
                        "round {round} could not collect min_fit={} updates after {} attempts",
                        f.min_fit,
                        f.max_round_retries + 1
                    )));
                }
                continue;
            }
            let me = self.clone();
            let committed = tokio::task::spawn_blocking(move || me.commit(open, closed_by))
                .await
                .map_err(|e| CoordinatorError::Config(format!("round commit task failed: {e}")))
                .and_then(|r| r);
            let record = match committed {
                Ok(record) => record,
                Err(e) => {
                    // The global model did not move; stop so clients exit with the reason and a
                    // restart resumes from the last committed round.
                    let mut s = self.lock();
                    s.failure = Some(format!("round {round} could not be committed: {e}"));
                    s.phase = Phase::Finished;
                    drop(s);
                    self.notify();
                    return Err(e);
                }
            };
            tracing::info!(
                "round {} committed: {} updates, shuffle ratio {:.2}, test accuracy {}",
                record.round,
                record.aggregated.len(),
                record.shuffle_ratio,
                record
                    .test
                    .as_ref()
                    .map_or("-".into(), |t| format!("{:.4}", t.accuracy))
            );
        }
    }

    fn open_round(&self, round: u32, attempt: u32) {
        let f = &self.config.federation;
        let mut s = self.lock();
        let timeout = Duration::from_secs_f64(f.client_timeout_secs);
        let mut live: Vec<String> = s
            .clients
            .values()
            .filter(|c| c.last_seen.elapsed() < timeout)
            .map(|c| c.id.clone())
            .collect();
        live.sort();
        let k = if f.sample_fraction > 0.0 {
            ((f.sample_fraction * live.len() as f64).ceil() as usize)
                .max(1)
                .min(f.clients_per_round as usize)
        } else {
            f.clients_per_round as usize
        }
        .min(live.len());
        let mut rng = Seed(f.seed)
            .child("sample", u64::from(round) * 1000 + u64::from(attempt))
            .rng();
        live.shuffle(&mut rng);
        let sampled: BTreeSet<String> = live.into_iter().take(k).collect();
        // The schedule drives MJP; naive shuffling always permutes every patch; learned and none
        // never shuffle (the records say so rather than echoing an unused schedule).
        let ratio = match self.vit.pe {
            mjp::PeMode::Mjp => self.config.shuffle.ratio_at(round, f.rounds),
            mjp::PeMode::NaiveShuffle => 1.0,
            mjp::PeMode::Learned | mjp::PeMode::None => 0.0,
        };
        let deadline_in = Duration::from_secs_f64(f.round_deadline_secs);
        tracing::info!(
            "round {round} (attempt {attempt}) open: {} clients sampled, shuffle ratio {ratio:.3}",
            sampled.len()
        );
        s.round = Some(OpenRound {
            round,
            attempt,
            version: u64::from(s.completed),
            ratio,
            sampled,
            submitted: BTreeSet::new(),
            aggregator: Aggregator::new(self.config.training.aggregator, &self.manifest),
            metrics: BTreeMap::new(),
            rejected: 0,
            opened: Instant::now(),
            deadline: Instant::now() + deadline_in,
            deadline_unix_ms: unix_ms(SystemTime::now() + deadline_in),
        });
        s.phase = Phase::Training;
        drop(s);
        self.notify();
    }

    /// Aggregates, moves the global model, evaluates, checkpoints and records a closed round.
    fn commit(&self, open: OpenRound, closed_by: &str) -> Result<RoundRecord> {
        // The server optimiser's state is moved out, not copied (for Adam it is two models). A
        // commit that fails stops the federation (see `drive`); a restart resumes from the last
        // committed round's state on disk, so nothing half-applied is ever used.
        let (global, mut server) = {
            let mut s = self.lock();
            (s.global.clone(), std::mem::take(&mut s.server))
        };
        let aggregated = open.submitted.iter().cloned().collect();
        let update = open.aggregator.finish().expect("min_fit >= 1 updates");
        let kind = self.config.training.update_kind;
        let new_global = apply(
            &self.config.training.server_optimizer(),
            &mut server,
            &global,
            update,
            kind,
        );
        drop(global);
        new_global.check_finite().map_err(|e| {
            CoordinatorError::Config(format!(
                "round {}: aggregated model is not finite ({e}); lower the learning rates",
                open.round
            ))
        })?;
        let every = self.config.data.eval_every.max(1);
        let due = open.round == 1
            || open.round.is_multiple_of(every)
            || open.round >= self.config.federation.rounds;
        let test = if due {
            self.evaluate(&new_global, open.round >= self.config.federation.rounds)?
        } else {
            None
        };
        let version = open.version + 1;
        self.run_dir.save_model(version, &new_global, &self.vit)?;
        let record = RoundRecord {
            round: open.round,
            attempt: open.attempt,
            model_version: version,
            update_kind: kind.to_string(),
            shuffle_ratio: open.ratio,
            sampled: open.sampled.into_iter().collect(),
            aggregated,
            rejected: open.rejected,
            closed_by: closed_by.to_string(),
            client_metrics: open
                .metrics
                .into_iter()
                .map(|(k, (sum, n))| (k, sum / f64::from(n.max(1))))
                .collect(),
            test,
            wall_seconds: open.opened.elapsed().as_secs_f64(),
            committed_unix_ms: unix_ms(SystemTime::now()),
        };
        self.run_dir.commit_round(&record, &server)?;
        let mut s = self.lock();
        s.global = Arc::new(new_global);
        s.server = server;
        s.completed = open.round;
        s.attempt = 1;
        s.history.push(record.clone());
        s.phase = if s.completed >= self.config.federation.rounds {
            Phase::Finished
        } else {
            Phase::Waiting
        };
        drop(s);
        self.notify();
        Ok(record)
    }

    /// Evaluates on the test set: all of it for the last round, `round_test_limit` images before.
    fn evaluate(&self, params: &NamedTensors, last: bool) -> Result<Option<EvalReport>> {
        let Some(test) = &self.test_data else {
            return Ok(None);
        };
        let device = mjp::DeviceSpec::Flex.device()?;
        let model = mjp::checkpoint::model_from_params(&self.vit, params, &device)?;
        let options = EvalOptions {
            jigsaw_metrics: self.config.data.eval_jigsaw_metrics,
            jigsaw_limit: (self.config.data.eval_jigsaw_limit > 0)
                .then_some(self.config.data.eval_jigsaw_limit),
            seed: Seed(self.config.federation.seed).child("eval", 0),
            limit: (!last && self.config.data.round_test_limit > 0)
                .then_some(self.config.data.round_test_limit),
            ..EvalOptions::default()
        };
        Ok(Some(evaluate(&model, test, &options)))
    }
}

//! The federation's state machine, shared by the gRPC services and the round driver: the state
//! behind one lock, resume from the run directory, model versions and status. Knows nothing of
//! gRPC; `service` translates at the edge. Its behaviour is spread by concern:
//!
//! - `membership`: join, session tokens, authentication, who counts as connected;
//! - `round`: seeded sampling, per-client round configs, task decisions, update admission and
//!   acceptance into the open round;
//! - `driver`: the round loop (wait for clients, open, close), commit (aggregate, server
//!   optimiser, checkpoint, record) and evaluation.

mod driver;
mod membership;
mod round;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mjp::data::{Dataset, Split};
use mjp::fl::{ModelUpdate, ObservedUpdate, UpdateKind};
use mjp::params::{Manifest, NamedTensors};
use mjp::{Seed, Vit, VitConfig};
use tokio::sync::{Semaphore, watch};

use crate::admission::Admission;
use crate::aggregate::{Aggregator, ServerState};
use crate::auth::Auth;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::rundir::{RoundRecord, RunDir};
use crate::tap::Tap;

pub use membership::{ClientEntry, Joined};
pub use round::{TaskDecision, Transfer, TransferGuard, UploadTicket};

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

/// The round being trained: who was sampled, who has submitted, and the running aggregate.
struct OpenRound {
    round: u32,
    attempt: u32,
    version: u64,
    ratio: f64,
    sampled: BTreeSet<String>,
    /// Sampled clients that have been handed their `Train` task.
    started: BTreeSet<String>,
    submitted: BTreeSet<String>,
    aggregator: Aggregator,
    /// The L2 bound of this round's updates (from the global model they start from).
    norm_bound: f64,
    /// An upper bound of any value of the running sum (sum of weight x scale x max |value|).
    magnitude: f64,
    metrics: BTreeMap<String, (f64, u32)>,
    rejected: u32,
    opened: Instant,
    deadline: Instant,
    deadline_unix_ms: u64,
    /// Under the secure-aggregation view: the sum of the accepted updates, which the tap gets
    /// instead of the updates themselves.
    secure: Option<SecureSum>,
    /// The ordered fold: accepted updates waiting for the clients before them in id order.
    fold: OrderedFold,
}

/// Accepted updates are folded in client-id order (f32 sums depend on their order), each as soon
/// as every sampled client before it has been folded or has not sent anything yet and memory
/// allows waiting; at most `budget` bytes wait (0: fold on arrival).
#[derive(Default)]
struct OrderedFold {
    pending: BTreeMap<String, Pending>,
    pending_bytes: usize,
    budget: usize,
    /// The last client folded in order.
    cursor: Option<String>,
    /// Updates folded out of order because the budget was full.
    out_of_order: u32,
}

/// An accepted update waiting for its turn.
struct Pending {
    config: mjp::fl::RoundConfig,
    update: Arc<ModelUpdate>,
    weight: f64,
    scale: f64,
}

impl OpenRound {
    /// Folds one accepted update into the aggregate, the metrics and the secure sum.
    fn fold_now(&mut self, client_id: &str, p: &Pending) {
        // Metric values are finite and bounded (admission), so their sums are too.
        for (k, v) in &p.update.metrics {
            let e = self.metrics.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
        self.aggregator.fold(&p.update.tensors, p.weight, p.scale);
        if let Some(sum) = &mut self.secure {
            sum.add(client_id, &p.config, &p.update);
        }
    }

    /// Takes an accepted update (already in `submitted`) and folds every update whose turn has
    /// come.
    fn enqueue(&mut self, client_id: String, p: Pending) {
        if self.fold.budget == 0 {
            self.fold_now(&client_id, &p);
            return;
        }
        self.fold.pending_bytes += p.update.tensors.numel() * 4;
        self.fold.pending.insert(client_id, p);
        loop {
            // The first sampled client after the cursor not folded yet.
            let after = match &self.fold.cursor {
                Some(c) => (
                    std::ops::Bound::Excluded(c.clone()),
                    std::ops::Bound::Unbounded,
                ),
                None => (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded),
            };
            let next = self
                .sampled
                .range::<String, _>(after)
                .find(|c| !self.submitted.contains(*c) || self.fold.pending.contains_key(*c))
                .cloned();
            let Some(next) = next else { break };
            let Some(p) = self.fold.pending.remove(&next) else {
                break;
            };
            self.fold.pending_bytes -= p.update.tensors.numel() * 4;
            self.fold_now(&next, &p);
            self.fold.cursor = Some(next);
        }
        while self.fold.pending_bytes > self.fold.budget {
            let Some((id, p)) = self.fold.pending.pop_first() else {
                break;
            };
            self.fold.pending_bytes -= p.update.tensors.numel() * 4;
            self.fold_now(&id, &p);
            self.fold.out_of_order += 1;
        }
    }

    /// Folds every waiting update, in client-id order (the round has closed).
    fn flush(&mut self) {
        while let Some((id, p)) = self.fold.pending.pop_first() {
            self.fold_now(&id, &p);
        }
        self.fold.pending_bytes = 0;
        if self.fold.out_of_order > 0 {
            tracing::warn!(
                "round {}: {} updates folded out of client-id order (training.ordered_fold_mb is full); the aggregate depends on their arrival order",
                self.round,
                self.fold.out_of_order
            );
        }
    }
}

/// The secure-aggregation view of one round: what secure aggregation reveals to the server (the
/// participants and the sum of their updates as sent), built as the updates arrive.
#[derive(Default)]
struct SecureSum {
    sum: Option<NamedTensors>,
    contributors: Vec<String>,
    config: Option<mjp::fl::RoundConfig>,
    batch_size: u32,
    num_examples: u64,
    local_steps: u32,
}

impl SecureSum {
    fn add(&mut self, client_id: &str, config: &mjp::fl::RoundConfig, update: &ModelUpdate) {
        self.sum = Some(match self.sum.take() {
            None => update.tensors.clone(),
            Some(s) => s
                .add(&update.tensors)
                .expect("updates checked against the manifest"),
        });
        self.contributors.push(client_id.to_string());
        self.config.get_or_insert_with(|| config.clone());
        self.batch_size = self.batch_size.saturating_add(update.batch_size);
        self.num_examples = self.num_examples.saturating_add(update.num_examples);
        self.local_steps = self.local_steps.max(update.local_steps);
    }

    /// The sum as the tap shows it (`None` when nothing was accepted).
    fn observed(
        self,
        round: u32,
        version: u64,
        kind: UpdateKind,
        sequence: u64,
    ) -> Option<ObservedUpdate> {
        let (sum, config) = (self.sum?, self.config?);
        Some(ObservedUpdate {
            sequence,
            client_id: format!("secagg-round-{round:04}"),
            accepted: true,
            dropped_before: 0,
            config,
            update: Arc::new(ModelUpdate {
                round,
                model_version: version,
                kind,
                batch_size: self.batch_size,
                num_examples: self.num_examples,
                local_steps: self.local_steps,
                metrics: BTreeMap::new(),
                tensors: sum,
            }),
            contributors: self.contributors,
        })
    }
}

/// Everything that changes while the federation runs, behind `Federation::state`.
struct State {
    phase: Phase,
    global: Arc<NamedTensors>,
    completed: u32,
    server: ServerState,
    clients: BTreeMap<String, ClientEntry>,
    tokens: HashMap<String, String>,
    /// Sessions with an upload in flight (at most one each).
    in_flight: BTreeSet<(String, round::Transfer)>,
    /// Refused calls that presented no valid session (counted apart from the round's).
    unauthenticated: u64,
    next_client: u64,
    round: Option<OpenRound>,
    history: Vec<RoundRecord>,
    failure: Option<String>,
    attempt: u32,
    /// When the connected clients were last counted for a waiting long-poll, and how many.
    connected_hint: Option<(std::time::Instant, u32)>,
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
    /// Round-level changes (a round opened, closed or was committed, the federation finished):
    /// what task long-polls and progress displays wait on.
    changed: watch::Sender<u64>,
    /// An update was accepted: what the round driver waits on (thousands of long-polling
    /// clients need not wake for each of a round's uploads, nor for every join).
    submitted: watch::Sender<u64>,
    upload_permits: Arc<Semaphore>,
    /// Value buffers of folded updates nobody else holds, for the next uploads to decode into
    /// (at most one set per decoding permit, so the peak memory is what the permits allow
    /// already): the coordinator returns freed memory to the OS at once, and decoding into
    /// fresh memory faulted a model's worth of zeroed pages in for every update.
    decode_buffers: Mutex<Vec<Vec<Vec<f32>>>>,
    test_data: Option<Dataset>,
    admission: Admission,
    auth: Auth,
    /// Older versions being served, shared by every download of the same version (200
    /// abandoned downloads of one old version held 200 copies of it).
    served: Mutex<HashMap<u64, Weak<NamedTensors>>>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Federation {
    /// Opens the run directory, resuming the last committed round if there is one, else starting
    /// from a fresh (or given) initial model.
    pub fn open(config: CoordinatorConfig, run_dir: &std::path::Path) -> Result<Arc<Self>> {
        config.validate()?;
        let auth = Auth::load(
            &config.federation.join_secret,
            &config.federation.observer_token,
            &config.auth,
        )?;
        let vit = config.model.vit()?;
        let run_dir = RunDir::open(run_dir)?;
        let device = config.server.device.device()?;
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
                    run_dir.load_server_state(u64::from(state.completed_rounds))?,
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
        let (submitted, _) = watch::channel(0);
        let admission = Admission::new(
            &config.admission,
            &config.data.dataset,
            &config.data.data_dir,
            &config.partition,
            config.federation.seed,
        );
        Ok(Arc::new(Self {
            admission,
            auth,
            served: Mutex::new(HashMap::new()),
            upload_permits: Arc::new(Semaphore::new(config.server.max_concurrent_uploads.max(1))),
            decode_buffers: Mutex::new(Vec::new()),
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
                in_flight: BTreeSet::new(),
                unauthenticated: 0,
                next_client: 0,
                round: None,
                history,
                failure: None,
                attempt: 1,
                connected_hint: None,
            }),
            changed,
            submitted,
            test_data,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("federation state lock poisoned")
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever a round opens, closes or commits, or the federation
    /// finishes (for long-polls).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify_submission(&self) {
        self.submitted.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever the open round accepts an update (for the driver).
    fn watch_submissions(&self) -> watch::Receiver<u64> {
        self.submitted.subscribe()
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

    /// Who may join, observe and see the status.
    pub fn auth(&self) -> &Auth {
        &self.auth
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

    /// Value buffers for an upload holding a decoding permit to decode into (empty when none is
    /// free: the assembler then allocates).
    pub fn decode_buffers(&self) -> Vec<Vec<f32>> {
        self.decode_buffers
            .lock()
            .expect("decode buffer lock")
            .pop()
            .unwrap_or_default()
    }

    /// Keeps a folded update's value buffers for the next upload, unless an observer or the
    /// ordered fold still holds the update (or enough sets are kept already).
    fn recycle(&self, update: Arc<ModelUpdate>) {
        if let Ok(update) = Arc::try_unwrap(update) {
            let mut kept = self.decode_buffers.lock().expect("decode buffer lock");
            if kept.len() < self.config.server.max_concurrent_uploads.max(1) {
                kept.push(update.tensors.into_buffers());
            }
        }
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
        if let Some(g) = current {
            return Ok(g);
        }
        // Held while loading, so concurrent requests for one version read it once.
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        served.retain(|_, w| w.strong_count() > 0);
        if let Some(g) = served.get(&version).and_then(Weak::upgrade) {
            return Ok(g);
        }
        let path = self.run_dir.checkpoint_path(version);
        if !path.exists() {
            return Err(Refusal::NotFound(format!(
                "model version {version} is not stored"
            )));
        }
        let g = self
            .run_dir
            .load_model(version)
            .map(Arc::new)
            .map_err(|e| Refusal::Internal(format!("reading model version {version}: {e}")))?;
        served.insert(version, Arc::downgrade(&g));
        Ok(g)
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
}

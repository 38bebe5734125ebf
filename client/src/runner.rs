//! The training client's loop: join, poll for tasks, download (cached by version), train locally,
//! upload; back off and re-join when the coordinator goes away or restarts; exit when the
//! federation finishes. It speaks to the coordinator only through [`Protocol`] (domain types), and
//! retries only what the coordinator or the wire got wrong: a local failure ends the client.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mjp::data::{DataSource, Dataset};
use mjp::fl::{AuditRecord, RoundConfig, local_update};
use mjp::layout::AuditLayout;
use mjp::{DeviceSpec, Vit, VitConfig};
use tokio::sync::watch;
use tonic::Code;

use crate::error::{ClientError, Result};
use crate::protocol::{ClientTls, JoinParams, Joined, PartitionInfo, Protocol, Target, Task};
use crate::shared::SharedClients;
use crate::workers::TrainingWorkers;

/// How a client runs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Coordinator address, e.g. `http://127.0.0.1:50051`.
    pub endpoint: String,
    /// TLS to the coordinator (`None`: plaintext).
    pub tls: Option<ClientTls>,
    /// Name shown in logs.
    pub name: String,
    /// The federation's join secret.
    pub join_secret: String,
    /// Preferred data partition (-1: let the coordinator assign).
    pub partition_hint: i32,
    /// Dataset override (default: the federation's dataset).
    pub data: Option<DataSource>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Compute device.
    pub device: DeviceSpec,
    /// Where to write the private batches for scoring (simulated clients, opt-in).
    pub audit_dir: Option<PathBuf>,
    /// Give up after the coordinator has been unreachable this long.
    pub reconnect_for: Duration,
    /// Workers that in-process clients train on, one client per worker at a time (simulate;
    /// `None`: train on the calling thread with the global thread pool).
    pub workers: Option<Arc<TrainingWorkers>>,
    /// Data and connections shared with the other clients of this process (simulate).
    pub shared: Option<Arc<SharedClients>>,
    /// Private seed of the client's defense noise (simulated clients, for reproducible runs;
    /// `None`: the operating system's randomness). Never sent to the coordinator.
    pub noise_seed: Option<u64>,
}

impl ClientConfig {
    /// Defaults for a client of `endpoint`.
    pub fn new(endpoint: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            tls: None,
            name: name.into(),
            join_secret: "mjpfl".into(),
            partition_hint: -1,
            data: None,
            data_dir: PathBuf::from("data"),
            device: DeviceSpec::Flex,
            audit_dir: None,
            reconnect_for: Duration::from_secs(120),
            workers: None,
            shared: None,
            noise_seed: None,
        }
    }
}

/// What a client did.
#[derive(Clone, Debug, Default)]
pub struct ClientSummary {
    /// Last id it had.
    pub client_id: String,
    /// Updates it had accepted.
    pub updates_accepted: u32,
    /// Updates refused.
    pub updates_refused: u32,
    /// Times it (re)joined.
    pub joins: u32,
    /// Why it stopped.
    pub finished: String,
}

/// A joined session: the connection it was made on and what the join returned.
struct Session {
    protocol: Protocol,
    joined: Joined,
}

/// Local state that survives re-joins: the partition and the model cache.
struct Local {
    data: Option<(u32, Arc<Dataset>)>,
    model: Option<(u64, Vit)>,
}

/// Runs a client until the federation finishes, `shutdown` flips, or the coordinator stays
/// unreachable for `reconnect_for`.
pub async fn run(
    config: ClientConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<ClientSummary> {
    let mut summary = ClientSummary::default();
    let mut local = Local {
        data: None,
        model: None,
    };
    let mut session: Option<Session> = None;
    // Token of the last session, sent on re-join so the coordinator retires it.
    let mut previous_token = String::new();
    let mut backoff = Backoff::new(config.reconnect_for);
    // This client's slot among the shared connections, kept across re-joins.
    let mut channel = None;
    loop {
        if *shutdown.borrow() {
            summary.finished = "shutdown".into();
            return Ok(summary);
        }
        let s = match session.as_mut() {
            Some(s) => s,
            None => match join(&config, &mut local, &previous_token, &mut channel).await {
                Ok(s) => {
                    summary.joins += 1;
                    summary.client_id = s.joined.client_id.clone();
                    previous_token = s.joined.token.clone();
                    backoff.reset();
                    session.insert(s)
                }
                Err(e) if e.code() == Some(Code::Unauthenticated) => return Err(e),
                Err(e @ (ClientError::Unreachable { .. } | ClientError::Refused { .. })) => {
                    backoff.wait(&config.name, e, &mut shutdown).await?;
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        let task = tokio::select! {
            t = s.protocol.task(&s.joined.token) => t,
            _ = shutdown.changed() => continue,
        };
        let task = match task {
            Ok(t) => {
                backoff.reset();
                t
            }
            Err(e) if e.code() == Some(Code::Unauthenticated) => {
                // The coordinator restarted and forgot this session: join again.
                tracing::info!(
                    "{}: session unknown to the coordinator; re-joining",
                    config.name
                );
                session = None;
                continue;
            }
            Err(e @ ClientError::Refused { .. }) => {
                // Transient (coordinator restarting, network): keep the session, retry.
                backoff.wait(&config.name, e, &mut shutdown).await?;
                continue;
            }
            Err(e) if e.is_protocol_damage() => {
                // The coordinator answered, with a task this client cannot read (no recipe, an
                // unknown update kind): drop the cached model and ask again.
                backoff.reset();
                tracing::warn!("{}: {e}; retrying the task", config.name);
                local.model = None;
                continue;
            }
            Err(e) => return Err(e),
        };
        match task {
            Task::Train {
                round,
                model_version,
                config: round_config,
            } => {
                let trained =
                    train_and_submit(&config, s, &mut local, round, model_version, round_config)
                        .await;
                match trained {
                    Ok(()) => summary.updates_accepted += 1,
                    Err(e) => match e.code() {
                        Some(Code::Unauthenticated) => {
                            tracing::info!("{}: {e}; re-joining", config.name);
                            session = None;
                        }
                        Some(Code::Unavailable | Code::Unknown | Code::Cancelled) => {
                            tracing::info!("{}: {e}; retrying", config.name);
                        }
                        Some(_) => {
                            summary.updates_refused += 1;
                            tracing::warn!("{}: {e}", config.name);
                        }
                        // A damaged download or a malformed reply: drop the cached model and ask
                        // for the task again rather than exit.
                        None if e.is_protocol_damage() => {
                            tracing::warn!("{}: {e}; retrying the task", config.name);
                            local.model = None;
                        }
                        // Local failures (a panicked training task, a model that does not build,
                        // an audit write): retrying would repeat them.
                        None => return Err(e),
                    },
                }
            }
            Task::Wait(pause) => {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => {}
                }
            }
            Task::Finished(reason) => {
                summary.finished = reason;
                return Ok(summary);
            }
        }
    }
}

/// Exponential backoff that gives up after the coordinator stayed unreachable for `limit`.
struct Backoff {
    limit: Duration,
    delay: Duration,
    since: Option<Instant>,
}

impl Backoff {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            delay: Duration::from_millis(200),
            since: None,
        }
    }

    fn reset(&mut self) {
        self.delay = Duration::from_millis(200);
        self.since = None;
    }

    async fn wait(
        &mut self,
        name: &str,
        cause: ClientError,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > self.limit {
            return Err(cause);
        }
        tracing::debug!("{name}: {cause}; retrying in {:?}", self.delay);
        tokio::select! {
            _ = tokio::time::sleep(self.delay) => {}
            _ = shutdown.changed() => {}
        }
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        Ok(())
    }
}

async fn join(
    config: &ClientConfig,
    local: &mut Local,
    previous_token: &str,
    channel: &mut Option<tonic::transport::Channel>,
) -> Result<Session> {
    let target = Target::new(config.endpoint.clone(), config.tls.clone());
    if channel.is_none()
        && let Some(shared) = &config.shared
    {
        *channel = shared.channel(&target)?;
    }
    let mut protocol = match channel {
        Some(c) => Protocol::on(c.clone()),
        None => Protocol::connect(target).await?,
    };
    let joined = protocol
        .join(&JoinParams {
            name: config.name.clone(),
            secret: config.join_secret.clone(),
            device: config.device.to_string(),
            num_examples: local.data.as_ref().map_or(0, |(_, d)| d.len() as u64),
            audit: config.audit_dir.is_some(),
            partition_hint: local
                .data
                .as_ref()
                .map_or(config.partition_hint, |(p, _)| *p as i32),
            previous_token: previous_token.to_string(),
        })
        .await?;
    let partition = &joined.partition;
    if local
        .data
        .as_ref()
        .is_none_or(|(p, _)| *p != partition.index)
    {
        let data = load_partition(config, partition, &joined.vit).await?;
        tracing::info!(
            "{} joined as {}: partition {} of {} ({} examples)",
            config.name,
            joined.client_id,
            partition.index,
            partition.count,
            data.len()
        );
        local.data = Some((partition.index, Arc::new(data)));
    }
    Ok(Session { protocol, joined })
}

async fn load_partition(
    config: &ClientConfig,
    partition: &PartitionInfo,
    vit: &VitConfig,
) -> Result<Dataset> {
    let source: DataSource = match &config.data {
        Some(d) => d.clone(),
        None => partition.dataset.parse()?,
    };
    let (data_dir, scheme, seed, index, vit) = (
        config.data_dir.clone(),
        partition.scheme.clone(),
        partition.seed,
        partition.index as usize,
        vit.clone(),
    );
    // A client on its own decodes the split for itself (and lets it go once it has its part).
    let own;
    let shared = match &config.shared {
        Some(s) => s,
        None => {
            own = SharedClients::new(0);
            &own
        }
    };
    shared
        .partition(&source, &data_dir, &vit, &scheme, seed, index)
        .await
}

async fn train_and_submit(
    config: &ClientConfig,
    s: &mut Session,
    local: &mut Local,
    round: u32,
    version: u64,
    round_config: RoundConfig,
) -> Result<()> {
    let device = config.device.device()?.autodiff();
    let link = config.shared.as_ref().and_then(|sh| sh.link()).cloned();
    if local.model.as_ref().is_none_or(|(v, _)| *v != version) {
        let model = match &link {
            Some(link) => {
                let params = link
                    .model(&s.joined.token, version)
                    .map_err(|st| ClientError::refused("DownloadModel", st))?;
                mjp::checkpoint::model_from_params(&s.joined.vit, &params, &device)?
            }
            None => {
                let params = s.protocol.download(&s.joined.token, version).await?;
                mjp::checkpoint::model_from_params(&s.joined.vit, &params, &device)?
            }
        };
        local.model = Some((version, model));
    }
    let (_, model) = local.model.as_ref().expect("model cached above");
    let data = local
        .data
        .as_ref()
        .expect("joined clients have data")
        .1
        .clone();
    let worker = match &config.workers {
        Some(w) => Some(w.acquire().await?),
        None => None,
    };
    let (model, client_id) = (model.clone(), s.joined.client_id.clone());
    let noise_seed = config.noise_seed;
    let result = tokio::task::spawn_blocking(move || {
        let train = || {
            local_update(
                &model,
                &data,
                round,
                version,
                &client_id,
                &round_config,
                &device,
            )
        };
        let mut result = match &worker {
            Some(w) => w.install(train),
            None => train(),
        }?;
        drop(worker);
        // The round's defense, before anything leaves the client.
        let defense = round_config.defense;
        if defense.is_active() {
            let mut noise = mjp::defense::noise_rng(noise_seed, round_config.seed);
            let applied = mjp::defense::apply(&defense, &mut result.update.tensors, &mut noise);
            tracing::debug!(
                "{client_id}: round {round} defense {}: {applied:?}",
                defense.label()
            );
        }
        Ok::<_, mjp::MjpError>(result)
    })
    .await
    .map_err(|e| ClientError::task("training", e))??;
    if let Some(dir) = &config.audit_dir {
        write_audit(&AuditLayout::new(dir), &result.audit)?;
    }
    let (round, received) = match &link {
        Some(link) => {
            let received = link
                .submit(&s.joined.token, result.update)
                .await
                .map_err(|st| ClientError::refused("SubmitUpdate", st))?;
            (round, received)
        }
        None => {
            let reply = s
                .protocol
                .submit(&s.joined.token, &result.update, s.joined.max_chunk)
                .await?;
            (reply.round, reply.received)
        }
    };
    tracing::debug!(
        "{}: round {round} update accepted ({received} received)",
        config.name,
    );
    // The next task trains a newer version: a client between rounds holds no model.
    local.model = None;
    Ok(())
}

/// Writes the ground truth of one update for the scorer (never read by the attacker).
pub fn write_audit(audit: &AuditLayout, record: &AuditRecord) -> Result<()> {
    let path = audit.record(record.round, &record.client_id);
    let json =
        serde_json::to_vec(record).map_err(|e| ClientError::Local(format!("audit record: {e}")))?;
    mjp::fsutil::write_atomic(&path, &json)?;
    Ok(())
}

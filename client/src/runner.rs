//! The training client's loop: join, poll for tasks, download (cached by version), train locally,
//! upload; back off and re-join when the coordinator goes away or restarts; exit when the
//! federation finishes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mjp::data::{DataSource, Dataset, Split};
use mjp::fl::{AuditRecord, local_update};
use mjp::params::NamedTensors;
use mjp::{DeviceSpec, Seed, Vit, VitConfig};
use mjpfl_proto::{convert, v1};
use tokio::sync::{Semaphore, watch};
use tonic::Code;
use tonic::transport::Channel;

use crate::connection::{self, federation_client};
use crate::error::{ClientError, Result};
use crate::partition::PartitionScheme;

/// How a client runs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Coordinator address, e.g. `http://127.0.0.1:50051`.
    pub endpoint: String,
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
    /// Limits concurrent local training across in-process clients (simulate).
    pub training_permits: Option<Arc<Semaphore>>,
}

impl ClientConfig {
    /// Defaults for a client of `endpoint`.
    pub fn new(endpoint: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            name: name.into(),
            join_secret: "mjpfl".into(),
            partition_hint: -1,
            data: None,
            data_dir: PathBuf::from("data"),
            device: DeviceSpec::Flex,
            audit_dir: None,
            reconnect_for: Duration::from_secs(120),
            training_permits: None,
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

struct Session {
    client: v1::federation_client::FederationClient<Channel>,
    client_id: String,
    token: String,
    vit: VitConfig,
    max_chunk: usize,
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
    loop {
        if *shutdown.borrow() {
            summary.finished = "shutdown".into();
            return Ok(summary);
        }
        let s = match session.as_mut() {
            Some(s) => s,
            None => match join(&config, &mut local, &previous_token).await {
                Ok(s) => {
                    summary.joins += 1;
                    summary.client_id = s.client_id.clone();
                    previous_token = s.token.clone();
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
            t = s.client.get_task(v1::GetTaskRequest { session_token: s.token.clone() }) => t,
            _ = shutdown.changed() => continue,
        };
        let task = match task {
            Ok(t) => {
                backoff.reset();
                t.into_inner()
            }
            Err(status) if status.code() == Code::Unauthenticated => {
                // The coordinator restarted and forgot this session: join again.
                tracing::info!(
                    "{}: session unknown to the coordinator; re-joining",
                    config.name
                );
                session = None;
                continue;
            }
            Err(status) => {
                // Transient (coordinator restarting, network): keep the session, retry.
                backoff
                    .wait(
                        &config.name,
                        ClientError::refused("GetTask", status),
                        &mut shutdown,
                    )
                    .await?;
                continue;
            }
        };
        match task.kind {
            Some(v1::task::Kind::Train(t)) => {
                match train_and_submit(&config, s, &mut local, t).await {
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
                        None if matches!(e, ClientError::Wire(_) | ClientError::Protocol(_)) => {
                            tracing::warn!("{}: {e}; retrying the task", config.name);
                            local.model = None;
                        }
                        None => return Err(e),
                    },
                }
            }
            Some(v1::task::Kind::Wait(w)) => {
                let pause = Duration::from_millis(u64::from(w.retry_after_ms.clamp(10, 30_000)));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => {}
                }
            }
            Some(v1::task::Kind::Finished(f)) => {
                summary.finished = f.reason;
                return Ok(summary);
            }
            // A task kind newer than this client: treat it as "not now".
            None => tokio::time::sleep(Duration::from_secs(1)).await,
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

async fn join(config: &ClientConfig, local: &mut Local, previous_token: &str) -> Result<Session> {
    let mut client = federation_client(connection::connect(&config.endpoint).await?);
    let examples = local.data.as_ref().map_or(0, |(_, d)| d.len() as u64);
    let reply = client
        .join(v1::JoinRequest {
            client_name: config.name.clone(),
            capabilities: Some(v1::Capabilities {
                device: config.device.to_string(),
                num_examples: examples,
                audit: config.audit_dir.is_some(),
            }),
            join_secret: config.join_secret.clone(),
            partition_hint: local
                .data
                .as_ref()
                .map_or(config.partition_hint, |(p, _)| *p as i32),
            previous_session_token: previous_token.to_string(),
        })
        .await
        .map_err(|s| ClientError::refused("Join", s))?
        .into_inner();
    let info = reply
        .federation
        .ok_or_else(|| ClientError::Protocol("Join reply without federation info".into()))?;
    let vit: VitConfig = serde_json::from_str(&info.model_config_json)
        .map_err(|e| ClientError::Protocol(format!("bad model config from coordinator: {e}")))?;
    if local
        .data
        .as_ref()
        .is_none_or(|(p, _)| *p != info.partition_index)
    {
        let data = load_partition(config, &info, &vit).await?;
        tracing::info!(
            "{} joined as {}: partition {} of {} ({} examples)",
            config.name,
            reply.client_id,
            info.partition_index,
            info.num_partitions,
            data.len()
        );
        local.data = Some((info.partition_index, Arc::new(data)));
    }
    Ok(Session {
        client,
        client_id: reply.client_id,
        token: reply.session_token,
        vit,
        max_chunk: (info.max_chunk_bytes as usize).clamp(4, mjpfl_proto::MAX_CHUNK_BYTES),
    })
}

async fn load_partition(
    config: &ClientConfig,
    info: &v1::FederationInfo,
    vit: &VitConfig,
) -> Result<Dataset> {
    let source: DataSource = match &config.data {
        Some(d) => d.clone(),
        None => info.dataset.parse()?,
    };
    let scheme: PartitionScheme = serde_json::from_str(&info.partition_json).map_err(|e| {
        ClientError::Protocol(format!("bad partition scheme from coordinator: {e}"))
    })?;
    let (data_dir, seed, index, vit) = (
        config.data_dir.clone(),
        info.seed,
        info.partition_index as usize,
        vit.clone(),
    );
    tokio::task::spawn_blocking(move || -> Result<Dataset> {
        let train = source
            .load(Split::Train, &data_dir)?
            .conform(vit.channels, vit.image_size)?;
        let parts = scheme.split(
            &train.labels,
            train.num_classes,
            Seed(seed).child("federation-data", 0),
        )?;
        let mine = parts.get(index).ok_or_else(|| {
            ClientError::Protocol(format!("partition {index} of {}", parts.len()))
        })?;
        Ok(train.subset(mine))
    })
    .await
    .map_err(|e| ClientError::Protocol(format!("data loading task failed: {e}")))?
}

async fn train_and_submit(
    config: &ClientConfig,
    s: &mut Session,
    local: &mut Local,
    task: v1::TrainTask,
) -> Result<()> {
    let round_config = convert::round_config_from_wire(
        task.config
            .as_ref()
            .ok_or_else(|| ClientError::Protocol("train task without config".into()))?,
    )?;
    let device = config.device.device()?.autodiff();
    if local
        .model
        .as_ref()
        .is_none_or(|(v, _)| *v != task.model_version)
    {
        let stream = s
            .client
            .download_model(v1::DownloadModelRequest {
                session_token: s.token.clone(),
                model_version: task.model_version,
            })
            .await
            .map_err(|st| ClientError::refused("DownloadModel", st))?
            .into_inner();
        let params: NamedTensors = connection::receive_model(stream, task.model_version).await?;
        let model = mjp::checkpoint::model_from_params(&s.vit, &params, &device)?;
        local.model = Some((task.model_version, model));
    }
    let (_, model) = local.model.as_ref().expect("model cached above");
    let data = local
        .data
        .as_ref()
        .expect("joined clients have data")
        .1
        .clone();
    let _permit = match &config.training_permits {
        Some(p) => Some(
            p.clone()
                .acquire_owned()
                .await
                .map_err(|_| ClientError::Protocol("shutting down".into()))?,
        ),
        None => None,
    };
    let (model, client_id, round, version) = (
        model.clone(),
        s.client_id.clone(),
        task.round,
        task.model_version,
    );
    let result = tokio::task::spawn_blocking(move || {
        local_update(
            &model,
            &data,
            round,
            version,
            &client_id,
            &round_config,
            &device,
        )
    })
    .await
    .map_err(|e| ClientError::Protocol(format!("training task failed: {e}")))??;
    drop(_permit);
    if let Some(dir) = &config.audit_dir {
        write_audit(dir, &result.audit)?;
    }
    let messages = connection::update_messages(&result.update, &s.token, s.max_chunk);
    let reply = connection::submit(&mut s.client, messages).await?;
    tracing::debug!(
        "{}: round {} update accepted ({} received)",
        config.name,
        reply.round,
        reply.received
    );
    Ok(())
}

/// Writes the ground truth of one update for the scorer (never read by the attacker).
pub fn write_audit(dir: &std::path::Path, record: &AuditRecord) -> Result<()> {
    let path = dir
        .join(format!("round-{:04}", record.round))
        .join(format!("{}.json", record.client_id));
    let json = serde_json::to_vec(record).map_err(|e| ClientError::Protocol(e.to_string()))?;
    mjp::fsutil::write_atomic(&path, &json)?;
    Ok(())
}

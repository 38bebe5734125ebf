//! The client side of the Federation protocol, in one place: connecting (with the protocol's
//! message-size limits), joining, polling for a task, downloading a model version, submitting an
//! update and asking for the federation's status. Every reply is converted once, here, into a
//! domain value ([`Joined`], [`Task`], [`NamedTensors`], [`Submitted`], [`FederationStatus`]);
//! the training loop never sees a wire type. The observer reuses the channel helpers.

use std::time::Duration;

use mjp::VitConfig;
use mjp::fl::{ModelUpdate, RoundConfig};
use mjp::params::{Manifest, NamedTensors};
use mjp::partition::PartitionScheme;
use mjpfl_proto::convert::{self, Assembler};
use mjpfl_proto::v1;
use tonic::transport::Channel;

use crate::error::{ClientError, Result};

pub use crate::transport::{ClientTls, Target, connect};

/// A Federation client with the protocol's message-size limits.
pub fn federation_client(channel: Channel) -> v1::federation_client::FederationClient<Channel> {
    v1::federation_client::FederationClient::new(channel)
        .max_decoding_message_size(mjpfl_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(mjpfl_proto::MAX_MESSAGE_BYTES)
}

/// An Observer client with the protocol's message-size limits.
pub fn observer_client(channel: Channel) -> v1::observer_client::ObserverClient<Channel> {
    v1::observer_client::ObserverClient::new(channel)
        .max_decoding_message_size(mjpfl_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(mjpfl_proto::MAX_MESSAGE_BYTES)
}

/// Reads a model download stream into tensors (manifest first, then chunks).
pub async fn receive_model(
    stream: tonic::Streaming<v1::ModelChunk>,
    version: u64,
) -> Result<NamedTensors> {
    Ok(receive_model_with_config(stream, version).await?.0)
}

/// Like [`receive_model`], also returning the architecture the stream announced.
pub async fn receive_model_with_config(
    mut stream: tonic::Streaming<v1::ModelChunk>,
    version: u64,
) -> Result<(NamedTensors, Option<VitConfig>)> {
    let mut assembler: Option<Assembler> = None;
    let mut config = None;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| ClientError::refused("DownloadModel", s))?
    {
        if msg.model_version != version {
            return Err(ClientError::Protocol(format!(
                "asked for version {version}, got {}",
                msg.model_version
            )));
        }
        if !msg.model_config_json.is_empty() {
            config = Some(serde_json::from_str(&msg.model_config_json).map_err(|e| {
                ClientError::Protocol(format!("bad model config in download: {e}"))
            })?);
        }
        if let Some(manifest) = msg.manifest {
            let dtypes = manifest
                .tensors
                .iter()
                .map(|s| {
                    v1::Dtype::try_from(s.dtype)
                        .map_err(|_| ClientError::Protocol(format!("unknown dtype {}", s.dtype)))
                })
                .collect::<Result<Vec<_>>>()?;
            assembler = Some(Assembler::new(
                &manifest.tensors,
                &dtypes,
                mjpfl_proto::MAX_CHUNK_BYTES,
            ));
        }
        let a = assembler.as_mut().ok_or_else(|| {
            ClientError::Protocol("model stream did not start with a manifest".into())
        })?;
        if let Some(chunk) = msg.chunk {
            a.push(&chunk)?;
        }
    }
    let tensors = assembler
        .ok_or_else(|| ClientError::Protocol("empty model stream".into()))?
        .finish()?;
    Ok((tensors, config))
}

/// The SubmitUpdate messages of an update: header, then chunks.
pub fn update_messages(
    update: &ModelUpdate,
    token: &str,
    max_chunk: usize,
) -> Vec<v1::UpdateMessage> {
    use v1::update_message::Kind;
    std::iter::once(Kind::Header(convert::update_header(update, token)))
        .chain(
            convert::chunk_tensors(&update.tensors, max_chunk)
                .into_iter()
                .map(Kind::Chunk),
        )
        .map(|k| v1::UpdateMessage { kind: Some(k) })
        .collect()
}

/// What a client tells the coordinator when it joins.
#[derive(Clone, Debug)]
pub struct JoinParams {
    /// Name shown in logs and reports.
    pub name: String,
    /// The federation's join secret.
    pub secret: String,
    /// Device it trains on (informational).
    pub device: String,
    /// Local examples it holds (0 before its partition is loaded).
    pub num_examples: u64,
    /// Whether it writes audit records.
    pub audit: bool,
    /// Preferred partition (-1: let the coordinator assign one).
    pub partition_hint: i32,
    /// Token of the session held before a re-join (empty on the first join), so the coordinator
    /// retires it.
    pub previous_token: String,
}

/// This client's share of the training set, as the coordinator assigned it.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionInfo {
    /// Partition index.
    pub index: u32,
    /// Number of partitions.
    pub count: u32,
    /// Run seed (the split derives its seed from it).
    pub seed: u64,
    /// The federation's dataset, as named on the wire (parsed only when the client uses it).
    pub dataset: String,
    /// How the training set is split.
    pub scheme: PartitionScheme,
}

/// A successful join.
#[derive(Clone, Debug)]
pub struct Joined {
    /// This client's id.
    pub client_id: String,
    /// Session token for every later call.
    pub token: String,
    /// The architecture.
    pub vit: VitConfig,
    /// Its data partition.
    pub partition: PartitionInfo,
    /// Largest tensor chunk to send, bytes (within the protocol's bounds).
    pub max_chunk: usize,
    /// The model's tensors.
    pub manifest: Manifest,
}

/// What the coordinator asks of a polling client.
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    /// Train on `model_version` and submit the update for `round`.
    Train {
        /// Round (1-based).
        round: u32,
        /// Global model version to train from.
        model_version: u64,
        /// The round's recipe.
        config: RoundConfig,
    },
    /// Poll again after this long.
    Wait(Duration),
    /// The federation is over, for this reason.
    Finished(String),
}

/// The coordinator's answer to an accepted update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// Round the update was counted in.
    pub round: u32,
    /// Updates received this round so far, this one included.
    pub received: u32,
}

/// Where the federation stands (the Status call).
#[derive(Clone, Debug, PartialEq)]
pub struct FederationStatus {
    /// "waiting", "training" or "finished".
    pub phase: String,
    /// Round in progress, or the last completed one.
    pub round: u32,
    /// Rounds planned.
    pub total_rounds: u32,
    /// Current global model version.
    pub model_version: u64,
    /// Clients seen recently.
    pub connected_clients: u32,
    /// Test accuracy after the last completed round (NaN when that round was not evaluated;
    /// `None` before the first round completes).
    pub last_test_accuracy: Option<f64>,
}

/// A connection to a coordinator's Federation service.
#[derive(Clone)]
pub struct Protocol {
    client: v1::federation_client::FederationClient<Channel>,
}

impl Protocol {
    /// Connects to a coordinator (`"http://host:port"`, `"host:port"`, or a [`Target`] with
    /// TLS).
    pub async fn connect(target: impl Into<Target>) -> Result<Self> {
        Ok(Self::on(connect(target).await?))
    }

    /// Speaks the protocol over an open channel (several clients may share one connection).
    pub fn on(channel: Channel) -> Self {
        Self {
            client: federation_client(channel),
        }
    }

    /// Joins the federation.
    pub async fn join(&mut self, params: &JoinParams) -> Result<Joined> {
        let reply = self
            .client
            .join(v1::JoinRequest {
                client_name: params.name.clone(),
                capabilities: Some(v1::Capabilities {
                    device: params.device.clone(),
                    num_examples: params.num_examples,
                    audit: params.audit,
                }),
                join_secret: params.secret.clone(),
                partition_hint: params.partition_hint,
                previous_session_token: params.previous_token.clone(),
            })
            .await
            .map_err(|s| ClientError::refused("Join", s))?
            .into_inner();
        joined_from_wire(reply)
    }

    /// Long-polls for work.
    pub async fn task(&mut self, token: &str) -> Result<Task> {
        let task = self
            .client
            .get_task(v1::GetTaskRequest {
                session_token: token.to_string(),
            })
            .await
            .map_err(|s| ClientError::refused("GetTask", s))?
            .into_inner();
        task_from_wire(task)
    }

    /// Downloads global model `version`.
    pub async fn download(&mut self, token: &str, version: u64) -> Result<NamedTensors> {
        let stream = self
            .client
            .download_model(v1::DownloadModelRequest {
                session_token: token.to_string(),
                model_version: version,
            })
            .await
            .map_err(|s| ClientError::refused("DownloadModel", s))?
            .into_inner();
        receive_model(stream, version).await
    }

    /// Streams `update` in chunks of at most `max_chunk` bytes.
    pub async fn submit(
        &mut self,
        token: &str,
        update: &ModelUpdate,
        max_chunk: usize,
    ) -> Result<Submitted> {
        let messages = update_messages(update, token, max_chunk);
        let reply = self
            .client
            .submit_update(tokio_stream::iter(messages))
            .await
            .map_err(|s| ClientError::refused("SubmitUpdate", s))?
            .into_inner();
        Ok(Submitted {
            round: reply.round,
            received: reply.received,
        })
    }

    /// Where the federation stands (a coordinator without a status token).
    pub async fn status(&mut self) -> Result<FederationStatus> {
        self.status_with("").await
    }

    /// Where the federation stands, presenting the coordinator's status token.
    pub async fn status_with(&mut self, status_token: &str) -> Result<FederationStatus> {
        let s = self
            .client
            .status(v1::StatusRequest {
                status_token: status_token.to_string(),
            })
            .await
            .map_err(|s| ClientError::refused("Status", s))?
            .into_inner();
        Ok(FederationStatus {
            last_test_accuracy: s.history.last().map(|r| r.test_accuracy),
            phase: s.phase,
            round: s.round,
            total_rounds: s.total_rounds,
            model_version: s.model_version,
            connected_clients: s.connected_clients,
        })
    }
}

fn joined_from_wire(reply: v1::JoinResponse) -> Result<Joined> {
    let info = reply
        .federation
        .ok_or_else(|| ClientError::Protocol("Join reply without federation info".into()))?;
    let vit: VitConfig = serde_json::from_str(&info.model_config_json)
        .map_err(|e| ClientError::Protocol(format!("bad model config from coordinator: {e}")))?;
    let scheme: PartitionScheme = serde_json::from_str(&info.partition_json).map_err(|e| {
        ClientError::Protocol(format!("bad partition scheme from coordinator: {e}"))
    })?;
    let manifest = reply
        .manifest
        .as_ref()
        .map(convert::manifest_from_wire)
        .ok_or_else(|| ClientError::Protocol("Join reply without model manifest".into()))?;
    Ok(Joined {
        client_id: reply.client_id,
        token: reply.session_token,
        vit,
        partition: PartitionInfo {
            index: info.partition_index,
            count: info.num_partitions,
            seed: info.seed,
            dataset: info.dataset,
            scheme,
        },
        // A coordinator cannot make this client send chunks larger than the protocol allows
        // (or so small that every element is its own message).
        max_chunk: (info.max_chunk_bytes as usize).clamp(4, mjpfl_proto::MAX_CHUNK_BYTES),
        manifest,
    })
}

/// How long to wait before asking again when the coordinator sends a task kind newer than this
/// client.
const UNKNOWN_TASK_PAUSE: Duration = Duration::from_secs(1);

fn task_from_wire(task: v1::Task) -> Result<Task> {
    Ok(match task.kind {
        Some(v1::task::Kind::Train(t)) => Task::Train {
            round: t.round,
            model_version: t.model_version,
            config: convert::round_config_from_wire(
                t.config
                    .as_ref()
                    .ok_or_else(|| ClientError::Protocol("train task without config".into()))?,
            )?,
        },
        // Bounded both ways: a coordinator can neither make this client spin nor park it.
        Some(v1::task::Kind::Wait(w)) => Task::Wait(Duration::from_millis(u64::from(
            w.retry_after_ms.clamp(10, 30_000),
        ))),
        Some(v1::task::Kind::Finished(f)) => Task::Finished(f.reason),
        // A task kind newer than this client: treat it as "not now".
        None => Task::Wait(UNKNOWN_TASK_PAUSE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_convert_with_bounded_waits() {
        let wait = |ms| v1::Task {
            kind: Some(v1::task::Kind::Wait(v1::Wait {
                retry_after_ms: ms,
                reason: String::new(),
            })),
        };
        assert_eq!(
            task_from_wire(wait(0)).unwrap(),
            Task::Wait(Duration::from_millis(10))
        );
        assert_eq!(
            task_from_wire(wait(u32::MAX)).unwrap(),
            Task::Wait(Duration::from_secs(30))
        );
        assert_eq!(
            task_from_wire(v1::Task { kind: None }).unwrap(),
            Task::Wait(UNKNOWN_TASK_PAUSE)
        );
        let no_config = v1::Task {
            kind: Some(v1::task::Kind::Train(v1::TrainTask {
                round: 1,
                model_version: 0,
                config: None,
            })),
        };
        assert!(matches!(
            task_from_wire(no_config),
            Err(ClientError::Protocol(_))
        ));
        let config = RoundConfig::fedsgd(4, 0.25, 0.0, 9);
        let train = v1::Task {
            kind: Some(v1::task::Kind::Train(v1::TrainTask {
                round: 2,
                model_version: 1,
                config: Some(convert::round_config_to_wire(&config)),
            })),
        };
        assert_eq!(
            task_from_wire(train).unwrap(),
            Task::Train {
                round: 2,
                model_version: 1,
                config
            }
        );
    }

    #[test]
    fn join_reply_needs_federation_info_and_clamps_the_chunk_size() {
        let scheme = PartitionScheme::Iid {
            count: 3,
            size: None,
        };
        let vit = VitConfig::preset("vit-micro-28").unwrap();
        let reply = |max_chunk_bytes| v1::JoinResponse {
            client_id: "client-001".into(),
            session_token: "t".into(),
            federation: Some(v1::FederationInfo {
                model_config_json: serde_json::to_string(&vit).unwrap(),
                dataset: "fashion-mnist".into(),
                seed: 7,
                partition_index: 1,
                num_partitions: 3,
                partition_json: serde_json::to_string(&scheme).unwrap(),
                max_chunk_bytes,
                ..Default::default()
            }),
            manifest: Some(v1::ModelManifest {
                tensors: vec![v1::TensorSpec {
                    name: "w".into(),
                    shape: vec![2, 3],
                    dtype: v1::Dtype::F32 as i32,
                }],
            }),
        };
        let j = joined_from_wire(reply(u64::MAX)).unwrap();
        assert_eq!(j.max_chunk, mjpfl_proto::MAX_CHUNK_BYTES);
        assert_eq!(j.manifest, vec![("w".to_string(), vec![2, 3])]);
        assert_eq!(
            j.partition,
            PartitionInfo {
                index: 1,
                count: 3,
                seed: 7,
                dataset: "fashion-mnist".into(),
                scheme: scheme.clone(),
            }
        );
        assert_eq!(j.vit, vit);
        assert_eq!(joined_from_wire(reply(0)).unwrap().max_chunk, 4);
        let mut bare = reply(1024);
        bare.federation = None;
        assert!(matches!(
            joined_from_wire(bare),
            Err(ClientError::Protocol(_))
        ));
    }
}

//! Talking to a coordinator: connecting with message-size limits, downloading a model version,
//! streaming an update. Shared by training clients and the observer.

use std::time::Duration;

use mjp::fl::ModelUpdate;
use mjp::params::NamedTensors;
use mjpfl_proto::convert::{self, Assembler};
use mjpfl_proto::v1;
use tonic::transport::{Channel, Endpoint};

use crate::error::{ClientError, Result};

/// Opens a channel to `endpoint` (`http://host:port`, or `host:port`).
pub async fn connect(endpoint: &str) -> Result<Channel> {
    let uri = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let unreachable = |reason: String| ClientError::Unreachable {
        endpoint: uri.clone(),
        reason,
    };
    Endpoint::from_shared(uri.clone())
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| unreachable(format!("{e}: is the coordinator running?")))
}

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
) -> Result<(NamedTensors, Option<mjp::VitConfig>)> {
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

/// Streams `messages` as one SubmitUpdate call.
pub async fn submit(
    client: &mut v1::federation_client::FederationClient<Channel>,
    messages: Vec<v1::UpdateMessage>,
) -> Result<v1::SubmitUpdateResponse> {
    client
        .submit_update(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| ClientError::refused("SubmitUpdate", s))
}

//! The adversary's connection: the Observer service's stream of intercepted updates, reassembled
//! into domain [`ObservedUpdate`]s, and the stored model versions they were computed from.

use mjp::fl::{ModelUpdate, ObservedUpdate};
use mjp::params::NamedTensors;
use mjpfl_proto::convert::{self, Assembler};
use mjpfl_proto::v1;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::error::{ClientError, Result};
use crate::protocol::{Target, connect, observer_client, receive_model_with_config};

/// A connection to a coordinator's Observer endpoint.
#[derive(Clone)]
pub struct Observer {
    client: v1::observer_client::ObserverClient<Channel>,
    token: String,
}

impl Observer {
    /// Connects with the observer token.
    pub async fn connect(target: impl Into<Target>, token: &str) -> Result<Self> {
        Ok(Self {
            client: observer_client(connect(target).await?),
            token: token.to_string(),
        })
    }

    /// Model version `version` as stored by the coordinator, with its architecture.
    pub async fn model(&mut self, version: u64) -> Result<(NamedTensors, Option<mjp::VitConfig>)> {
        let stream = self
            .client
            .download_model(v1::ObserverModelRequest {
                observer_token: self.token.clone(),
                model_version: version,
            })
            .await
            .map_err(|s| ClientError::refused("Observer.DownloadModel", s))?
            .into_inner();
        receive_model_with_config(stream, version).await
    }

    /// Subscribes to intercepted updates; the receiver ends when the coordinator does.
    pub async fn watch(&mut self) -> Result<mpsc::Receiver<Result<ObservedUpdate>>> {
        let mut stream = self
            .client
            .watch(v1::WatchRequest {
                observer_token: self.token.clone(),
            })
            .await
            .map_err(|s| ClientError::refused("Observer.Watch", s))?
            .into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut current: Option<(v1::InterceptHeader, Assembler)> = None;
            loop {
                let msg = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(s) => {
                        let _ = tx
                            .send(Err(ClientError::refused("Observer.Watch", s)))
                            .await;
                        return;
                    }
                };
                let out = match msg.kind {
                    Some(v1::intercepted_message::Kind::Header(h)) => {
                        let dtypes: Vec<v1::Dtype> = h
                            .tensors
                            .iter()
                            .map(|s| v1::Dtype::try_from(s.dtype).unwrap_or(v1::Dtype::F32))
                            .collect();
                        let a = Assembler::new(&h.tensors, &dtypes, mjpfl_proto::MAX_CHUNK_BYTES);
                        current = Some((h, a));
                        None
                    }
                    Some(v1::intercepted_message::Kind::Chunk(c)) => match current.as_mut() {
                        Some((_, a)) => a.push(&c).err().map(|e| Err(e.into())),
                        None => Some(Err(ClientError::Protocol(
                            "chunk before header on the tap".into(),
                        ))),
                    },
                    Some(v1::intercepted_message::Kind::End(_)) => {
                        current.take().map(|(h, a)| finish(h, a))
                    }
                    None => None,
                };
                if let Some(item) = out
                    && tx.send(item).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

/// The most contributors an intercepted sum may name (a round's cohort).
const MAX_CONTRIBUTORS: usize = 1 << 20;

fn finish(h: v1::InterceptHeader, a: Assembler) -> Result<ObservedUpdate> {
    let tensors = a.finish()?;
    let config =
        convert::round_config_from_wire(h.config.as_ref().ok_or_else(|| {
            ClientError::Protocol("intercepted update without round config".into())
        })?)?;
    if h.contributors.len() > MAX_CONTRIBUTORS || h.contributors.iter().any(|c| c.len() > 256) {
        return Err(ClientError::Protocol(format!(
            "intercepted sum names {} contributors (at most {MAX_CONTRIBUTORS} ids of <= 256 bytes)",
            h.contributors.len()
        )));
    }
    Ok(ObservedUpdate {
        sequence: h.sequence,
        client_id: h.client_id,
        accepted: h.accepted,
        dropped_before: h.dropped_before,
        contributors: h.contributors,
        config,
        update: std::sync::Arc::new(ModelUpdate {
            round: h.round,
            model_version: h.model_version,
            kind: convert::kind_from_wire(h.kind)
                .ok_or_else(|| ClientError::Protocol("update kind not set".into()))?,
            batch_size: h.batch_size,
            num_examples: h.num_examples,
            local_steps: h.local_steps,
            metrics: Default::default(),
            tensors,
        }),
    })
}

//! Helpers shared by the end-to-end tests: configurations on the committed real-data fixture,
//! free loopback ports, and a raw protocol client for crafting updates by hand.

#![allow(dead_code)]

use std::path::PathBuf;

use mjp::NamedTensors;
use mjp::data::DataSource;
use mjp::fl::UpdateKind;
use mjpfl_client::ClientError;
use mjpfl_client::protocol::{JoinParams, Protocol, Task};
use mjpfl_coordinator::CoordinatorConfig;
use mjpfl_proto::v1;
use tonic::transport::Channel;

/// The committed Fashion-MNIST fixture (600 train / 200 test real images).
pub fn fixture() -> DataSource {
    DataSource::Idx(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fashion-mnist-mini"),
    )
}

/// A small federation on the fixture: vit-micro-28, `clients` clients, FedAvg.
pub fn small_config(clients: u32, rounds: u32) -> CoordinatorConfig {
    let mut c = CoordinatorConfig::default();
    c.federation.rounds = rounds;
    c.federation.min_clients = clients;
    c.federation.clients_per_round = clients;
    c.federation.min_fit = clients;
    c.federation.round_deadline_secs = 60.0;
    c.federation.seed = 7;
    c.data.dataset = fixture();
    c.data.eval_jigsaw_metrics = false;
    c.partition = mjp::partition::PartitionScheme::Iid {
        count: clients,
        size: None,
    };
    c.training.update_kind = UpdateKind::FedAvg;
    c.training.local_steps = 10;
    c.training.batch_size = 32;
    c.server.listen = "127.0.0.1:0".into();
    c
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The round and version a training task names (what a crafted upload must match).
#[derive(Clone, Copy, Debug)]
pub struct Assigned {
    pub round: u32,
    pub model_version: u64,
}

/// A hand-driven client: the typed protocol (`mjpfl_client::protocol`) for joining, polling and
/// downloading, and the raw gRPC client of the same connection for uploads crafted by hand.
pub struct RawClient {
    pub client: v1::federation_client::FederationClient<Channel>,
    pub protocol: Protocol,
    pub token: String,
}

impl RawClient {
    pub async fn join(endpoint: &str, secret: &str) -> Result<Self, ClientError> {
        let channel = mjpfl_client::protocol::connect(endpoint).await?;
        Self::join_on(channel, secret).await
    }

    /// Joins over an existing connection (several clients can share one HTTP/2 connection).
    pub async fn join_on(channel: Channel, secret: &str) -> Result<Self, ClientError> {
        let mut protocol = Protocol::on(channel.clone());
        let joined = protocol
            .join(&JoinParams {
                name: "raw".into(),
                secret: secret.into(),
                device: "test".into(),
                num_examples: 10,
                audit: false,
                partition_hint: -1,
                previous_token: String::new(),
            })
            .await?;
        Ok(Self {
            client: mjpfl_client::protocol::federation_client(channel),
            protocol,
            token: joined.token,
        })
    }

    /// Polls until a training task arrives.
    pub async fn train_task(&mut self) -> Assigned {
        loop {
            match self.protocol.task(&self.token).await.unwrap() {
                Task::Train {
                    round,
                    model_version,
                    ..
                } => {
                    return Assigned {
                        round,
                        model_version,
                    };
                }
                Task::Wait(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                Task::Finished(why) => panic!("the federation finished: {why}"),
            }
        }
    }

    /// Downloads a model version as raw tensors.
    pub async fn model(&mut self, version: u64) -> NamedTensors {
        self.protocol.download(&self.token, version).await.unwrap()
    }
}

/// Builds the SubmitUpdate messages of `tensors` with a header that may be tweaked.
pub fn messages(
    token: &str,
    task: &Assigned,
    tensors: &NamedTensors,
    tweak: impl FnOnce(&mut v1::UpdateHeader, &mut Vec<v1::TensorChunk>),
) -> Vec<v1::UpdateMessage> {
    let update = mjp::fl::ModelUpdate {
        round: task.round,
        model_version: task.model_version,
        kind: mjp::fl::UpdateKind::FedAvg,
        batch_size: 8,
        num_examples: 8,
        local_steps: 1,
        metrics: Default::default(),
        tensors: tensors.clone(),
    };
    let mut header = mjpfl_proto::convert::update_header(&update, token);
    let mut chunks = mjpfl_proto::convert::chunk_tensors(tensors, 64 * 1024);
    tweak(&mut header, &mut chunks);
    std::iter::once(v1::update_message::Kind::Header(header))
        .chain(chunks.into_iter().map(v1::update_message::Kind::Chunk))
        .map(|k| v1::UpdateMessage { kind: Some(k) })
        .collect()
}

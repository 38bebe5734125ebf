//! What the simulated clients of one process share, so that a registered client that is not
//! training costs almost nothing: the training split is decoded once (not once per client:
//! each simulated client used to decode all 60,000 Fashion-MNIST images when it joined, and 326
//! clients took 13 GB), each partitioning is computed once, and clients speak over a few shared
//! HTTP/2 connections instead of one each. With an [`InProcessLink`] they also skip the
//! serialisation of downloads and uploads (joins and task polls still go over gRPC).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use mjp::data::{DataSource, Dataset, Split};
use mjp::fl::ModelUpdate;
use mjp::params::NamedTensors;
use mjp::partition::PartitionScheme;
use mjp::{Seed, VitConfig};
use tokio::sync::OnceCell;
use tonic::transport::Channel;

use crate::error::{ClientError, Result};
use crate::transport::Target;

/// A training split, decoded and conformed to a model's input, with its partitionings.
struct Split_ {
    train: Dataset,
    partitions: Mutex<HashMap<String, Arc<Vec<Vec<usize>>>>>,
}

type Key = (String, PathBuf, usize, usize);

/// A coordinator in this process that simulated clients hand their downloads and uploads to
/// directly, instead of streaming them over loopback. The coordinator runs the same checks as for
/// an upload from the network (session, round, layout, values, norm) and folds and taps the update
/// the same way; only the encoding to bytes and back is skipped, which changes no value (the wire
/// carries f32s as they are). Refusals come back as the status the gRPC call would have returned,
/// so the client's handling of them is the same too.
pub trait InProcessLink: Send + Sync {
    /// Global model `version`, for the session `token`.
    fn model(
        &self,
        token: &str,
        version: u64,
    ) -> std::result::Result<Arc<NamedTensors>, tonic::Status>;
    /// Submits `update` for the session `token`; the updates received this round so far.
    fn submit<'a>(
        &'a self,
        token: &'a str,
        update: ModelUpdate,
    ) -> Pin<Box<dyn Future<Output = std::result::Result<u32, tonic::Status>> + Send + 'a>>;
}

/// Data and connections shared by in-process clients.
#[derive(Default)]
pub struct SharedClients {
    splits: Mutex<HashMap<Key, Arc<OnceCell<Arc<Split_>>>>>,
    channels: Mutex<Vec<Channel>>,
    /// Clients per shared connection (0: each client connects on its own).
    clients_per_connection: usize,
    handed_out: std::sync::atomic::AtomicUsize,
    in_process: Option<Arc<dyn InProcessLink>>,
}

impl std::fmt::Debug for SharedClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedClients")
            .field("clients_per_connection", &self.clients_per_connection)
            .field("in_process", &self.in_process.is_some())
            .finish_non_exhaustive()
    }
}

impl SharedClients {
    /// Sharing with `clients_per_connection` clients on each HTTP/2 connection (0: a
    /// connection per client). The coordinator allows 16 streams per connection and a client
    /// uses at most two at once (a task long-poll, a download or an upload), so 8 fit.
    pub fn new(clients_per_connection: usize) -> Arc<Self> {
        Arc::new(Self {
            clients_per_connection,
            ..Self::default()
        })
    }

    /// Like [`Self::new`], downloads and uploads going to `link` in process.
    pub fn in_process(clients_per_connection: usize, link: Arc<dyn InProcessLink>) -> Arc<Self> {
        Arc::new(Self {
            clients_per_connection,
            in_process: Some(link),
            ..Self::default()
        })
    }

    /// The in-process coordinator downloads and uploads go to, if any.
    pub fn link(&self) -> Option<&Arc<dyn InProcessLink>> {
        self.in_process.as_ref()
    }

    /// The connection the next client uses, when connections are shared.
    pub fn channel(&self, target: &Target) -> Result<Option<Channel>> {
        if self.clients_per_connection == 0 {
            return Ok(None);
        }
        let i = self
            .handed_out
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            / self.clients_per_connection;
        let mut channels = self.channels.lock().expect("channel pool lock");
        while channels.len() <= i {
            channels.push(crate::transport::lazy_channel(target)?);
        }
        Ok(Some(channels[i].clone()))
    }

    /// Partition `index` of `source`'s training split under `scheme`, decoding the split only
    /// the first time any client asks for it.
    pub async fn partition(
        &self,
        source: &DataSource,
        data_dir: &std::path::Path,
        vit: &VitConfig,
        scheme: &PartitionScheme,
        seed: u64,
        index: usize,
    ) -> Result<Dataset> {
        let key = (
            source.to_string(),
            data_dir.to_path_buf(),
            vit.channels,
            vit.image_size,
        );
        let cell = self
            .splits
            .lock()
            .expect("split cache lock")
            .entry(key)
            .or_default()
            .clone();
        let split = cell
            .get_or_try_init(|| {
                let (source, data_dir, vit) = (source.clone(), data_dir.to_path_buf(), vit.clone());
                async move {
                    tokio::task::spawn_blocking(move || -> Result<Arc<Split_>> {
                        let train = source
                            .load(Split::Train, &data_dir)?
                            .conform(vit.channels, vit.image_size)?;
                        Ok(Arc::new(Split_ {
                            train,
                            partitions: Mutex::new(HashMap::new()),
                        }))
                    })
                    .await
                    .map_err(|e| ClientError::task("data loading", e))?
                }
            })
            .await?
            .clone();
        let split_key = format!(
            "{}/{seed}",
            serde_json::to_string(scheme).expect("scheme serialises")
        );
        let parts = {
            let cached = split
                .partitions
                .lock()
                .expect("partition cache lock")
                .get(&split_key)
                .cloned();
            match cached {
                Some(p) => p,
                None => {
                    let p = Arc::new(scheme.split(
                        &split.train.labels,
                        split.train.num_classes,
                        Seed(seed).child("federation-data", 0),
                    )?);
                    split
                        .partitions
                        .lock()
                        .expect("partition cache lock")
                        .insert(split_key, p.clone());
                    p
                }
            }
        };
        let mine = parts.get(index).ok_or_else(|| {
            ClientError::Protocol(format!("partition {index} of {}", parts.len()))
        })?;
        Ok(split.train.subset(mine))
    }
}

//! The adversary's feed: one loop that takes intercepted updates off a [`ModelSource`] (the
//! in-process tap of a coordinator, or a remote coordinator's Observer service), keeps one cache
//! of the global versions they were computed from, applies the sampling rule as updates arrive,
//! and hands the chosen ones to the attack worker, a thread of its own so that the federation
//! never waits for the attacker.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mjp::VitConfig;
use mjp::data::{DataSource, Split};
use mjp::fl::ObservedUpdate;
use mjp::params::NamedTensors;
use mjpfl_attacks::adversary::{Adversary, AdversaryConfig, Sampler};
use mjpfl_client::observer::Observer;
use mjpfl_client::transport::Target;
use mjpfl_coordinator::Federation;
use mjpfl_coordinator::tap::Subscription;

use crate::error::{Context, LabError, Result};

/// Where intercepted updates and the global versions they name come from.
pub trait ModelSource {
    /// The next intercepted update; `None` when the tap has ended.
    fn next(&mut self) -> impl Future<Output = Option<Result<Arc<ObservedUpdate>>>> + Send;
    /// An update already on the tap, without waiting (what is drained after shutdown).
    fn try_next(&mut self) -> Option<Arc<ObservedUpdate>>;
    /// Global model version `version`.
    fn model(&mut self, version: u64) -> impl Future<Output = Result<Arc<NamedTensors>>> + Send;
    /// Updates the tap dropped because the adversary fell behind.
    fn dropped(&self) -> u64;
}

/// The tap of a coordinator running in this process.
pub struct InProcess {
    federation: Arc<Federation>,
    sub: Subscription,
}

impl InProcess {
    /// Subscribes to `federation`'s tap (do it before any client joins to see every update).
    pub fn subscribe(federation: Arc<Federation>) -> Self {
        let sub = federation.tap().subscribe();
        Self { federation, sub }
    }
}

impl ModelSource for InProcess {
    async fn next(&mut self) -> Option<Result<Arc<ObservedUpdate>>> {
        self.sub.updates.recv().await.map(Ok)
    }

    fn try_next(&mut self) -> Option<Arc<ObservedUpdate>> {
        self.sub.updates.try_recv().ok()
    }

    async fn model(&mut self, version: u64) -> Result<Arc<NamedTensors>> {
        self.federation
            .model(version)
            .map_err(|e| LabError::Message(format!("model version {version}: {e:?}")))
    }

    fn dropped(&self) -> u64 {
        self.sub.dropped.load(Ordering::Relaxed)
    }
}

/// A remote coordinator's Observer service.
pub struct Remote {
    observer: Observer,
    updates: tokio::sync::mpsc::Receiver<mjpfl_client::Result<ObservedUpdate>>,
    /// The first update, read to learn the architecture.
    first: Option<Arc<ObservedUpdate>>,
}

impl Remote {
    /// Connects (retrying while the coordinator comes up, for `reconnect_for`), subscribes, and
    /// waits for the first update, whose global model announces the architecture. `None` when
    /// the coordinator closed the tap before any update.
    pub async fn open(
        target: &Target,
        token: &str,
        reconnect_for: Duration,
    ) -> Result<Option<(Self, VitConfig)>> {
        let started = Instant::now();
        let mut observer = loop {
            match Observer::connect(target, token).await {
                Ok(o) => break o,
                Err(e) if started.elapsed() < reconnect_for => {
                    tracing::debug!("adversary: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut updates = observer
            .watch()
            .await
            .context("subscribing to the observer tap")?;
        let first = match updates.recv().await {
            Some(u) => Arc::new(u?),
            None => return Ok(None),
        };
        let (_, vit) = observer.model(first.update.model_version).await?;
        let vit = vit.context("the coordinator did not announce the architecture")?;
        Ok(Some((
            Self {
                observer,
                updates,
                first: Some(first),
            },
            vit,
        )))
    }
}

impl ModelSource for Remote {
    async fn next(&mut self) -> Option<Result<Arc<ObservedUpdate>>> {
        if let Some(first) = self.first.take() {
            return Some(Ok(first));
        }
        self.updates
            .recv()
            .await
            .map(|u| u.map(Arc::new).map_err(LabError::from))
    }

    fn try_next(&mut self) -> Option<Arc<ObservedUpdate>> {
        self.first.take()
    }

    async fn model(&mut self, version: u64) -> Result<Arc<NamedTensors>> {
        Ok(Arc::new(self.observer.model(version).await?.0))
    }

    fn dropped(&self) -> u64 {
        0
    }
}

/// The per-pixel mean of a dataset's test split (public data: the attacker's free baseline).
pub fn public_mean_image(data: &DataSource, data_dir: &Path, vit: &VitConfig) -> Option<Vec<f32>> {
    let ds = data
        .load(Split::Test, data_dir)
        .ok()?
        .conform(vit.channels, vit.image_size)
        .ok()?;
    Some(ds.mean_image())
}

/// An intercepted update with the global model version it was computed from.
type Work = (Arc<ObservedUpdate>, Arc<NamedTensors>);

/// The attack worker: a thread running the [`Adversary`] on what the feed sends it.
pub struct AttackWorker {
    tx: std::sync::mpsc::SyncSender<Work>,
    handle: std::thread::JoinHandle<Result<usize>>,
    sampler: Sampler<Arc<ObservedUpdate>>,
}

impl AttackWorker {
    /// Starts the worker; fails at once on a bad configuration (an unknown attack name).
    pub fn spawn(vit: VitConfig, config: AdversaryConfig) -> Result<Self> {
        let sampler = Sampler::new(&config.settings);
        let mut adversary = Adversary::new(vit, config)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Work>(4);
        let handle = std::thread::spawn(move || -> Result<usize> {
            let mut attacked = 0;
            for (observed, global) in rx {
                match adversary.attack(&observed, &global) {
                    Ok(record) => {
                        attacked += 1;
                        log_record(&record);
                    }
                    Err(e) => tracing::warn!(
                        "adversary: round {} {}: {e}",
                        observed.update.round,
                        observed.client_id
                    ),
                }
            }
            adversary.finish()?;
            Ok(attacked)
        });
        Ok(Self {
            tx,
            handle,
            sampler,
        })
    }

    /// Queues a chosen update; waits while the worker is busy (the tap, not the federation,
    /// absorbs the wait). False when the worker is gone.
    async fn send(&self, work: Work) -> bool {
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send(work).is_ok())
            .await
            .unwrap_or(false)
    }

    /// Feeds `source` to the worker until the tap ends or `shutdown` resolves (then what is
    /// already on the tap is drained), waits for the worker and returns how many updates it
    /// attacked.
    pub async fn feed<S: ModelSource>(
        mut self,
        mut source: S,
        shutdown: impl Future<Output = ()>,
    ) -> Result<usize> {
        let mut cache = VersionCache::default();
        tokio::pin!(shutdown);
        let mut stopping = false;
        let mut worker_alive = true;
        while worker_alive {
            let next = if stopping {
                source.try_next().map(Ok)
            } else {
                tokio::select! {
                    u = source.next() => u,
                    _ = &mut shutdown => {
                        stopping = true;
                        source.try_next().map(Ok)
                    }
                }
            };
            let chosen = match next {
                Some(Ok(update)) => {
                    // Fetch the global model of a candidate now: the choice is made when its
                    // round is over, and by then a remote coordinator may be gone.
                    let v = update.update.model_version;
                    if update.accepted && self.sampler.is_due(update.update.round) {
                        let _ = cache.get(&mut source, v).await;
                    }
                    self.sampler.offer(update)
                }
                Some(Err(e)) => {
                    tracing::warn!("adversary: {e}");
                    break;
                }
                None => break,
            };
            worker_alive = self.send_all(chosen, &mut source, &mut cache).await;
        }
        if worker_alive {
            let last = self.sampler.flush();
            self.send_all(last, &mut source, &mut cache).await;
        }
        let dropped = source.dropped();
        if dropped > 0 {
            tracing::warn!(
                "adversary: {dropped} intercepted updates dropped (adversary slower than the federation)"
            );
        }
        let Self { tx, handle, .. } = self;
        drop(tx);
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|e| LabError::Message(format!("adversary worker: {e}")))?
            .map_err(|_| LabError::Message("adversary worker panicked".into()))?
    }

    async fn send_all<S: ModelSource>(
        &self,
        chosen: Vec<Arc<ObservedUpdate>>,
        source: &mut S,
        cache: &mut VersionCache,
    ) -> bool {
        for update in chosen {
            let v = update.update.model_version;
            match cache.get(source, v).await {
                Some(global) => {
                    if !self.send((update, global)).await {
                        return false;
                    }
                }
                None => continue,
            }
        }
        true
    }
}

/// The global versions recent updates were computed from (the current and the previous one:
/// an update is never computed from an older version than that).
#[derive(Default)]
struct VersionCache {
    models: HashMap<u64, Arc<NamedTensors>>,
}

impl VersionCache {
    /// Version `v`, fetched on a miss; `None` (logged) when the source cannot serve it.
    async fn get<S: ModelSource>(&mut self, source: &mut S, v: u64) -> Option<Arc<NamedTensors>> {
        if let Some(g) = self.models.get(&v) {
            return Some(g.clone());
        }
        match source.model(v).await {
            Ok(g) => {
                self.models.retain(|k, _| *k + 2 > v);
                self.models.insert(v, g.clone());
                Some(g)
            }
            Err(e) => {
                tracing::warn!("adversary: model version {v} unavailable: {e}");
                None
            }
        }
    }
}

fn log_record(record: &mjpfl_attacks::recorder::UpdateRecord) {
    let summary: Vec<String> = record
        .attacks
        .iter()
        .map(|a| match &a.scores {
            Some(s) => format!("{} {:.1} dB", a.attack, s.mean_psnr),
            None => format!(
                "{} {}",
                a.attack,
                a.skipped.as_deref().map_or("unscored", |_| "skipped")
            ),
        })
        .collect();
    tracing::info!(
        "adversary: round {} {}: labels {:?} ({}) | {}",
        record.round,
        record.client_id,
        record.recovered_labels.iter().take(8).collect::<Vec<_>>(),
        record
            .label_accuracy
            .map_or("unscored".into(), |a| format!("{:.0}% right", 100.0 * a)),
        summary.join(", ")
    );
}

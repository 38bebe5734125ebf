//! `mjpfl adversary` and the adversary of `mjpfl simulate`: consume intercepted updates (over the
//! Observer gRPC service, or the coordinator's in-process tap), fetch the exact global version
//! each was computed from, and attack them on a worker thread so that the federation never
//! waits for the attacker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use mjp::VitConfig;
use mjp::data::{DataSource, Split};
use mjp::fl::ObservedUpdate;
use mjp::params::NamedTensors;
use mjpfl_attacks::adversary::{Adversary, AdversaryConfig, AttackSpec, Sampler};
use tokio::sync::watch;

/// Which attacks the adversary runs, on which updates.
#[derive(Args, Debug, Clone)]
pub struct AttackArgs {
    /// Attacks, comma-separated: april, april-mjp, ig, ig-pe, ig-pe-adaptive, dlg, dlg-pe,
    /// mean-image.
    #[arg(
        long,
        default_value = "april,april-mjp,mean-image",
        value_delimiter = ','
    )]
    pub attacks: Vec<String>,
    /// Iterations of optimisation attacks.
    #[arg(long, default_value_t = 1000)]
    pub attack_iterations: usize,
    /// Learning rate of optimisation attacks (pixel space; default per attack).
    #[arg(long)]
    pub attack_lr: Option<f64>,
    /// Total-variation weight of optimisation attacks (default per attack).
    #[arg(long)]
    pub attack_tv: Option<f64>,
    /// Weight of the PE-gradient term of the `-pe` attacks.
    #[arg(long)]
    pub attack_pe_weight: Option<f64>,
    /// Weight of the patch-embedding-gradient term of the `-pe` attacks.
    #[arg(long)]
    pub attack_embed_weight: Option<f64>,
    /// Restarts of optimisation attacks (best by objective is kept).
    #[arg(long)]
    pub attack_restarts: Option<usize>,
    /// Use plain (not signed) Adam in optimisation attacks.
    #[arg(long)]
    pub attack_unsigned: bool,
    /// Start optimisation attacks from pure noise instead of the public dataset-mean image
    /// plus noise (the default assumes the attacker knows the data's mean image, a public prior).
    #[arg(long)]
    pub attack_init_noise: bool,
    /// Attack at most this many updates per round (0 = all).
    #[arg(long, default_value_t = 0)]
    pub attack_max_per_round: usize,
    /// Attack only every n-th round.
    #[arg(long, default_value_t = 1)]
    pub attack_every: u32,
    /// Save each attacked update as safetensors (for `mjpfl attack`).
    #[arg(long)]
    pub save_updates: bool,
    /// Do not run the adversary.
    #[arg(long)]
    pub no_adversary: bool,
}

impl AttackArgs {
    /// The adversary configuration for a run directory.
    pub fn config(&self, run_dir: &Path, mean_image: Option<Vec<f32>>) -> Result<AdversaryConfig> {
        let attacks = self
            .attacks
            .iter()
            .filter(|a| !a.is_empty())
            .map(|a| AttackSpec::by_name(a.trim(), self.attack_iterations))
            .map(|spec| {
                spec.map(|mut spec| {
                    if let AttackSpec::Optimisation { config, .. } = &mut spec {
                        if let Some(v) = self.attack_lr {
                            config.lr = v;
                        }
                        if let Some(v) = self.attack_tv {
                            config.tv_weight = v;
                        }
                        if let Some(v) = self.attack_pe_weight
                            && config.objective.pe_weight > 0.0
                        {
                            config.objective.pe_weight = v;
                        }
                        if let Some(v) = self.attack_embed_weight
                            && config.objective.pe_weight > 0.0
                        {
                            config.objective.embed_weight = v;
                        }
                        if let Some(v) = self.attack_restarts {
                            config.restarts = v;
                        }
                        if self.attack_unsigned {
                            config.signed = false;
                        }
                        if self.attack_init_noise {
                            config.init_mean_image = false;
                        }
                    }
                    spec
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AdversaryConfig {
            attacks,
            max_per_round: self.attack_max_per_round,
            every_rounds: self.attack_every.max(1),
            out_dir: run_dir.join("attacks"),
            audit_dir: Some(run_dir.join("audit")),
            mean_image,
            save_updates: self.save_updates,
        })
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
pub type Work = (Arc<ObservedUpdate>, Arc<NamedTensors>);

/// The way into the attack worker: the sampling rule, applied as updates come off the tap, and a
/// small queue of the selected updates.
pub struct AttackQueue {
    sampler: Sampler<Arc<ObservedUpdate>>,
    tx: std::sync::mpsc::SyncSender<Work>,
}

impl AttackQueue {
    /// Takes the next update off the tap; returns the updates now chosen for attack.
    pub fn offer(&mut self, observed: Arc<ObservedUpdate>) -> Vec<Arc<ObservedUpdate>> {
        self.sampler.offer(observed)
    }

    /// Whether updates of `round` may be attacked (their global model is worth fetching).
    pub fn is_due(&self, round: u32) -> bool {
        self.sampler.is_due(round)
    }

    /// The last round's choice, when the tap has ended.
    pub fn flush(&mut self) -> Vec<Arc<ObservedUpdate>> {
        self.sampler.flush()
    }

    /// Queues a selected update; waits while the worker is busy (the tap, not the federation,
    /// absorbs the wait). False when the worker is gone.
    pub async fn send(&self, work: Work) -> bool {
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send(work).is_ok())
            .await
            .unwrap_or(false)
    }
}

/// Runs the adversary on a blocking thread; returns its queue and the thread's handle (it ends
/// when the queue is dropped).
pub fn spawn_worker(
    vit: VitConfig,
    config: AdversaryConfig,
) -> (AttackQueue, std::thread::JoinHandle<Result<usize>>) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Work>(4);
    let sampler = Sampler::new(&config);
    let handle = std::thread::spawn(move || -> Result<usize> {
        let mut adversary = Adversary::new(vit, config);
        let mut attacked = 0;
        for (observed, global) in rx {
            match adversary.attack(&observed, &global) {
                Ok(record) => {
                    attacked += 1;
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
    (AttackQueue { sampler, tx }, handle)
}

/// Feeds the in-process tap of a coordinator to a worker until `stop` flips, then drains.
pub async fn feed_in_process(
    federation: Arc<mjpfl_coordinator::Federation>,
    mut sub: mjpfl_coordinator::tap::Subscription,
    mut queue: AttackQueue,
    mut stop: watch::Receiver<bool>,
) {
    let mut cache: HashMap<u64, Arc<NamedTensors>> = HashMap::new();
    loop {
        let next = tokio::select! {
            u = sub.updates.recv() => u,
            _ = stop.wait_for(|s| *s) => sub.updates.try_recv().ok(),
        };
        let ended = next.is_none();
        let chosen = match next {
            Some(update) => queue.offer(update),
            None => queue.flush(),
        };
        for update in chosen {
            let version = update.update.model_version;
            let global = match cache.get(&version) {
                Some(g) => g.clone(),
                None => match federation.model(version) {
                    Ok(g) => {
                        cache.retain(|v, _| *v + 2 > version);
                        cache.insert(version, g.clone());
                        g
                    }
                    Err(e) => {
                        tracing::warn!("adversary: model version {version} unavailable: {e:?}");
                        continue;
                    }
                },
            };
            // The worker's queue is small: waiting here only delays the adversary, never the tap.
            if !queue.send((update, global)).await {
                return;
            }
        }
        if ended {
            break;
        }
    }
    let dropped = sub.dropped.load(std::sync::atomic::Ordering::Relaxed);
    if dropped > 0 {
        tracing::warn!(
            "adversary: {dropped} intercepted updates dropped (adversary slower than the federation)"
        );
    }
}

/// Arguments of `mjpfl adversary`.
#[derive(Args, Debug)]
pub struct AdversaryArgs {
    /// Coordinator address.
    #[arg(
        long,
        env = "MJPFL_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// The coordinator's observer token.
    #[arg(long, env = "MJPFL_OBSERVER_TOKEN", default_value = "observer")]
    observer_token: String,
    /// Run directory to write attacks/ into (and to read audit/ from, for scoring).
    #[arg(long, default_value = "runs/federation")]
    run_dir: PathBuf,
    /// Public dataset for the mean-image baseline.
    #[arg(long, default_value = "fashion-mnist")]
    data: DataSource,
    /// Data directory.
    #[arg(long, env = "MJPFL_DATA", default_value = "data")]
    data_dir: PathBuf,
    /// Give up after the coordinator is unreachable this many seconds.
    #[arg(long, default_value_t = 120.0)]
    reconnect_for: f64,
    #[command(flatten)]
    attacks: AttackArgs,
}

/// `mjpfl adversary`: attack every update a remote coordinator intercepts.
pub fn run(args: AdversaryArgs) -> Result<()> {
    crate::federate::runtime()?.block_on(async move {
        let started = std::time::Instant::now();
        let mut observer = loop {
            match mjpfl_client::observer::Observer::connect(&args.coordinator, &args.observer_token)
                .await
            {
                Ok(o) => break o,
                Err(e) if started.elapsed().as_secs_f64() < args.reconnect_for => {
                    tracing::debug!("adversary: {e}; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut updates = observer
            .watch()
            .await
            .context("subscribing to the observer tap")?;
        // The architecture comes with the first model download.
        let first = match updates.recv().await {
            Some(u) => Arc::new(u?),
            None => {
                println!("adversary: the coordinator closed the tap before any update");
                return Ok(());
            }
        };
        let (global, vit) = observer.model(first.update.model_version).await?;
        let vit = vit.context("the coordinator did not announce the architecture")?;
        let mean = public_mean_image(&args.data, &args.data_dir, &vit);
        let (mut queue, worker) = spawn_worker(vit, args.attacks.config(&args.run_dir, mean)?);
        let mut cache: HashMap<u64, Arc<NamedTensors>> = HashMap::new();
        cache.insert(first.update.model_version, Arc::new(global));
        let mut chosen = queue.offer(first);
        let signal = crate::federate::ctrl_c_or_term();
        tokio::pin!(signal);
        loop {
            for u in chosen.drain(..) {
                let v = u.update.model_version;
                let global = match cache.get(&v) {
                    Some(g) => g.clone(),
                    None => {
                        let g = Arc::new(observer.model(v).await?.0);
                        cache.retain(|k, _| *k + 2 > v);
                        cache.insert(v, g.clone());
                        g
                    }
                };
                queue.send((u, global)).await;
            }
            let next = tokio::select! {
                u = updates.recv() => u,
                _ = &mut signal => {
                    println!("adversary: signal received; finishing the updates already queued");
                    None
                }
            };
            match next {
                Some(Ok(u)) => {
                    // Fetch the global model of a candidate now: the choice is made when its round
                    // is over, and after the last round the coordinator may be gone.
                    let v = u.update.model_version;
                    if u.accepted && queue.is_due(u.update.round) && !cache.contains_key(&v) {
                        let g = Arc::new(observer.model(v).await?.0);
                        cache.retain(|k, _| *k + 2 > v);
                        cache.insert(v, g);
                    }
                    chosen = queue.offer(Arc::new(u));
                }
                Some(Err(e)) => {
                    tracing::warn!("adversary: {e}");
                    break;
                }
                None => break,
            }
        }
        // The last round's choice (the coordinator's model store still serves its version).
        for u in queue.flush() {
            let v = u.update.model_version;
            let global = match cache.get(&v) {
                Some(g) => g.clone(),
                None => match observer.model(v).await {
                    Ok((g, _)) => Arc::new(g),
                    Err(e) => {
                        tracing::warn!("adversary: model version {v} unavailable: {e}");
                        continue;
                    }
                },
            };
            queue.send((u, global)).await;
        }
        drop(queue);
        let attacked = tokio::task::spawn_blocking(move || worker.join())
            .await?
            .map_err(|_| anyhow::anyhow!("adversary worker panicked"))??;
        println!(
            "adversary: attacked {attacked} updates; results in {}",
            args.run_dir.join("attacks").display()
        );
        // The coordinator may have written the report before the last attacks finished.
        if args.run_dir.join("rounds.jsonl").exists() {
            crate::report::write_run_report(&args.run_dir)?;
        }
        Ok(())
    })
}

//! `mjpfl sweep`: a grid of full federations (with the adversary) answering "what does MJP cost
//! and what does it buy, at which shuffle ratio?". Cells run one after another (or several at a
//! time), each in its own run directory; finished cells are skipped on restart, a crashed cell
//! is rerun from scratch, and only finished cells enter the summary.
//!
//! The sweep file (TOML; see docs/results/sweep-fmnist.toml for a commented example):
//! `[base]` is a coordinator configuration applied to every cell, `[adversary]` the attacks,
//! `[grid]` the axes (pe, ratio or schedule, seed, update_kind, clients, alpha, batch_size).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use mjp::PeMode;
use mjp::fl::UpdateKind;
use mjpfl_client::partition::PartitionScheme;
use mjpfl_coordinator::{CoordinatorConfig, ShuffleSchedule};
use serde::{Deserialize, Serialize};

use crate::adversary::AttackArgs;
use crate::common::progress_bar;

/// A sweep file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// Name shown in the report.
    #[serde(default)]
    pub name: String,
    /// Cells running at the same time (CPU budget; 1 on a 2-core machine).
    #[serde(default = "one")]
    pub parallel: usize,
    /// Coordinator configuration shared by every cell.
    #[serde(default)]
    pub base: CoordinatorConfig,
    /// The adversary of every cell.
    #[serde(default)]
    pub adversary: AdversarySettings,
    /// The grid.
    pub grid: Grid,
}

fn one() -> usize {
    1
}

/// Adversary settings of a sweep (the `mjpfl simulate` attack flags, in TOML).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdversarySettings {
    /// Attack names.
    pub attacks: Vec<String>,
    /// Iterations of optimisation attacks.
    pub iterations: usize,
    /// Updates attacked per round (0 = all).
    pub max_per_round: usize,
    /// Attack every n-th round.
    pub every_rounds: u32,
    /// Optimisation learning rate override.
    pub lr: Option<f64>,
    /// TV weight override.
    pub tv: Option<f64>,
    /// PE-term weight override.
    pub pe_weight: Option<f64>,
    /// Restarts override.
    pub restarts: Option<usize>,
}

impl Default for AdversarySettings {
    fn default() -> Self {
        Self {
            attacks: vec!["april".into(), "april-mjp".into(), "mean-image".into()],
            iterations: 1000,
            max_per_round: 0,
            every_rounds: 1,
            lr: None,
            tv: None,
            pe_weight: None,
            restarts: None,
        }
    }
}

impl AdversarySettings {
    fn args(&self) -> AttackArgs {
        AttackArgs {
            attacks: self.attacks.clone(),
            attack_iterations: self.iterations,
            attack_lr: self.lr,
            attack_tv: self.tv,
            attack_pe_weight: self.pe_weight,
            attack_restarts: self.restarts,
            attack_embed_weight: None,
            attack_unsigned: false,
            attack_init_noise: false,
            attack_max_per_round: self.max_per_round,
            attack_every: self.every_rounds,
            save_updates: false,
            no_adversary: self.attacks.is_empty(),
        }
    }
}

/// The axes of the grid; every combination is a cell (ratios and schedules apply to MJP cells;
/// other PE modes get one cell per remaining combination).
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Grid {
    /// Position-embedding modes.
    pub pe: Vec<PeMode>,
    /// Constant MJP shuffle ratios.
    pub ratio: Vec<f64>,
    /// MJP shuffle schedules (in addition to `ratio`).
    pub schedule: Vec<ShuffleSchedule>,
    /// Seeds.
    pub seed: Vec<u64>,
    /// Update kinds.
    pub update_kind: Vec<UpdateKind>,
    /// Numbers of clients.
    pub clients: Vec<u32>,
    /// Dirichlet label-skew alphas (absent: the base partition).
    pub alpha: Vec<f64>,
    /// Local batch sizes.
    pub batch_size: Vec<u32>,
}

/// One cell of the grid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Cell {
    /// Directory name.
    pub id: String,
    /// The setting without the seed (what seeds are aggregated over).
    pub setting: String,
    /// PE mode.
    pub pe: PeMode,
    /// Shuffle schedule label ("-" for non-MJP modes).
    pub schedule: String,
    /// Constant ratio, when the schedule is constant.
    pub ratio: Option<f64>,
    /// Seed.
    pub seed: u64,
    /// Full configuration of the cell.
    pub config: CoordinatorConfig,
}

fn axis<T: Clone>(v: &[T], default: T) -> Vec<T> {
    if v.is_empty() {
        vec![default]
    } else {
        v.to_vec()
    }
}

impl SweepFile {
    /// Reads and checks a sweep file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: SweepFile =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if file.grid.pe.is_empty() {
            bail!("{}: [grid] pe needs at least one mode", path.display());
        }
        for c in file.cells() {
            c.config
                .validate()
                .with_context(|| format!("cell {}", c.id))?;
        }
        Ok(file)
    }

    /// Every cell, in run order.
    pub fn cells(&self) -> Vec<Cell> {
        let g = &self.grid;
        let base = &self.base;
        let mut schedules: Vec<ShuffleSchedule> = g
            .ratio
            .iter()
            .map(|&r| ShuffleSchedule::Constant { ratio: r })
            .collect();
        schedules.extend(g.schedule.iter().cloned());
        if schedules.is_empty() {
            schedules.push(base.shuffle.clone());
        }
        let mut out = Vec::new();
        for &seed in &axis(&g.seed, base.federation.seed) {
            for &kind in &axis(&g.update_kind, base.training.update_kind) {
                for &clients in &axis(&g.clients, base.federation.min_clients) {
                    for alpha in axis(&g.alpha.iter().map(|a| Some(*a)).collect::<Vec<_>>(), None) {
                        for &batch in &axis(&g.batch_size, base.training.batch_size) {
                            for &pe in &g.pe {
                                let scheds = if pe == PeMode::Mjp {
                                    schedules.clone()
                                } else {
                                    vec![ShuffleSchedule::Constant { ratio: 0.0 }]
                                };
                                for sched in scheds {
                                    let mut c = base.clone();
                                    c.model.pe = pe;
                                    c.shuffle = sched.clone();
                                    c.federation.seed = seed;
                                    c.training.update_kind = kind;
                                    c.training.batch_size = batch;
                                    c.federation.min_clients = clients;
                                    c.federation.clients_per_round =
                                        c.federation.clients_per_round.min(clients);
                                    c.federation.min_fit =
                                        c.federation.min_fit.min(c.federation.clients_per_round);
                                    c.partition = match alpha {
                                        Some(alpha) => PartitionScheme::Dirichlet {
                                            count: clients,
                                            alpha,
                                        },
                                        None => match &c.partition {
                                            PartitionScheme::Iid { .. } => {
                                                PartitionScheme::Iid { count: clients }
                                            }
                                            PartitionScheme::Dirichlet { alpha, .. } => {
                                                PartitionScheme::Dirichlet {
                                                    count: clients,
                                                    alpha: *alpha,
                                                }
                                            }
                                            PartitionScheme::Shards {
                                                shards_per_client, ..
                                            } => PartitionScheme::Shards {
                                                count: clients,
                                                shards_per_client: *shards_per_client,
                                            },
                                        },
                                    };
                                    c.server.listen = "127.0.0.1:0".into();
                                    let sched_label = if pe == PeMode::Mjp {
                                        sched.label()
                                    } else {
                                        "-".into()
                                    };
                                    let mut setting = format!("{pe}");
                                    if pe == PeMode::Mjp {
                                        setting.push_str(&format!(" {sched_label}"));
                                    }
                                    if g.update_kind.len() > 1 {
                                        setting.push_str(&format!(" {kind}"));
                                    }
                                    if g.clients.len() > 1 {
                                        setting.push_str(&format!(" K={clients}"));
                                    }
                                    if let Some(a) = alpha {
                                        setting.push_str(&format!(" alpha={a}"));
                                    }
                                    if g.batch_size.len() > 1 {
                                        setting.push_str(&format!(" B={batch}"));
                                    }
                                    let id = format!("{setting} seed={seed}")
                                        .replace(' ', "_")
                                        .replace(['[', ']', ',', '>', '/'], "-")
                                        .replace("--", "-");
                                    out.push(Cell {
                                        id,
                                        setting,
                                        pe,
                                        ratio: match sched {
                                            ShuffleSchedule::Constant { ratio }
                                                if pe == PeMode::Mjp =>
                                            {
                                                Some(ratio)
                                            }
                                            _ => None,
                                        },
                                        schedule: sched_label,
                                        seed,
                                        config: c,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// Arguments of `mjpfl sweep`.
#[derive(Args, Debug)]
pub struct SweepArgs {
    /// The sweep file.
    #[arg(long)]
    config: PathBuf,
    /// Sweep directory (cells, summary, report).
    #[arg(long)]
    out: PathBuf,
    /// Override the file's `parallel`.
    #[arg(long)]
    parallel: Option<usize>,
    /// List the cells and exit.
    #[arg(long)]
    dry_run: bool,
}

/// What the DONE marker of a finished cell holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CellDone {
    /// The cell.
    pub cell: Cell,
    /// Wall time.
    pub seconds: f64,
}

pub fn run(args: SweepArgs) -> Result<()> {
    let file = SweepFile::load(&args.config)?;
    let cells = file.cells();
    println!(
        "sweep {}: {} cells",
        if file.name.is_empty() {
            "-"
        } else {
            &file.name
        },
        cells.len()
    );
    if args.dry_run {
        for c in &cells {
            println!("  {}", c.id);
        }
        return Ok(());
    }
    std::fs::create_dir_all(args.out.join("cells"))?;
    std::fs::copy(&args.config, args.out.join("sweep.toml")).context("copying the sweep file")?;
    let parallel = args.parallel.unwrap_or(file.parallel).max(1);
    let started = Instant::now();
    let todo: Vec<Cell> = cells
        .iter()
        .filter(|c| !args.out.join("cells").join(&c.id).join("DONE").exists())
        .cloned()
        .collect();
    println!(
        "{} finished already, {} to run, {parallel} at a time",
        cells.len() - todo.len(),
        todo.len()
    );
    let bar = progress_bar(
        cells.len() as u64,
        "cells [{bar:30}] {pos}/{len} {msg} (elapsed {elapsed}, eta {eta})",
    );
    bar.set_position((cells.len() - todo.len()) as u64);
    let adversary = file.adversary.args();
    let rt = crate::federate::runtime()?;
    for batch in todo.chunks(parallel) {
        let results = rt.block_on(async {
            let runs = batch.iter().map(|cell| {
                let dir = args.out.join("cells").join(&cell.id);
                let adversary = adversary.clone();
                let cell = cell.clone();
                async move {
                    // A directory without DONE is a crashed cell: start it over.
                    if dir.exists() {
                        std::fs::remove_dir_all(&dir)
                            .with_context(|| format!("clearing crashed cell {}", dir.display()))?;
                    }
                    let t = Instant::now();
                    let adv = (!adversary.no_adversary).then_some(adversary);
                    crate::federate::run_simulation(cell.config.clone(), &dir, true, 1, adv)
                        .await?;
                    crate::report::write_run_report(&dir)?;
                    let done = CellDone {
                        cell,
                        seconds: t.elapsed().as_secs_f64(),
                    };
                    mjp::fsutil::write_atomic(
                        &dir.join("DONE"),
                        serde_json::to_string_pretty(&done)?.as_bytes(),
                    )?;
                    anyhow::Ok(done)
                }
            });
            futures_join_all(runs).await
        });
        for r in results {
            let done = r?;
            bar.inc(1);
            bar.println(format!(
                "cell {} done in {:.1} min",
                done.cell.id,
                done.seconds / 60.0
            ));
            if bar.is_hidden() {
                println!(
                    "cell {} done in {:.1} min ({:.1} min elapsed)",
                    done.cell.id,
                    done.seconds / 60.0,
                    started.elapsed().as_secs_f64() / 60.0
                );
            }
        }
    }
    bar.finish_and_clear();
    crate::report::write_sweep_report(&args.out)?;
    println!(
        "sweep finished in {:.1} min; report {}",
        started.elapsed().as_secs_f64() / 60.0,
        args.out.join("report.md").display()
    );
    Ok(())
}

/// Runs futures concurrently and collects their results in order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut handles = Vec::new();
    for f in futures {
        handles.push(f);
    }
    let mut out = Vec::with_capacity(handles.len());
    // Cells of one batch run concurrently on the runtime's workers.
    let pinned: Vec<_> = handles.into_iter().map(Box::pin).collect();
    let mut pending: Vec<Option<_>> = pinned.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(
        results
            .into_iter()
            .map(|r| r.expect("every future completed")),
    );
    out
}

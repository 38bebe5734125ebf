//! The sweep file and its grid: which federations a sweep runs (one [`Cell`] per combination of
//! the axes), and the DONE marker a finished cell leaves. Read by the sweep runner and by the
//! sweep report.
//!
//! The sweep file (TOML; see docs/results/sweep-fmnist.toml for a commented example):
//! `[base]` is a coordinator configuration applied to every cell, `[adversary]` the attacks,
//! `[grid]` the axes (pe, ratio or schedule, seed, update_kind, clients, alpha, batch_size).

use std::path::Path;

use mjp::PeMode;
use mjp::fl::UpdateKind;
use mjp::partition::PartitionScheme;
use mjpfl_attacks::AdversarySettings;
use mjpfl_coordinator::{CoordinatorConfig, DefenseSchedule, ShuffleSchedule};
use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Context, Result};

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
    /// The adversary of every cell (no attacks: no adversary).
    #[serde(default)]
    pub adversary: AdversarySettings,
    /// The grid.
    pub grid: Grid,
}

fn one() -> usize {
    1
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
    /// Named settings instead of the `pe` x (`ratio`, `schedule`) product: each a PE mode with
    /// its shuffle schedule and defenses (a privacy/utility frontier compares such settings).
    pub settings: Vec<Setting>,
}

/// One named setting of a frontier: a PE mode, its shuffle ratio (or schedule) and defenses.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    /// Shown in tables and plots (and, with the seed, the cell's directory name).
    pub name: String,
    /// Position-embedding mode.
    pub pe: PeMode,
    /// Constant MJP shuffle ratio (MJP only).
    #[serde(default)]
    pub ratio: Option<f64>,
    /// MJP shuffle schedule (MJP only; instead of `ratio`).
    #[serde(default)]
    pub schedule: Option<ShuffleSchedule>,
    /// Defenses (default: the base configuration's).
    #[serde(default)]
    pub defense: Option<DefenseSchedule>,
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
    /// Defenses label (round 1's; "none" without).
    #[serde(default)]
    pub defense: String,
    /// Full configuration of the cell.
    pub config: CoordinatorConfig,
}

/// One (PE mode, schedule, defenses) combination before the other axes are applied.
struct Variant {
    pe: PeMode,
    schedule: ShuffleSchedule,
    defense: DefenseSchedule,
    /// The setting's name, when it has one.
    name: Option<String>,
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
        let g = &file.grid;
        if g.settings.is_empty() && g.pe.is_empty() {
            bail!(
                "{}: [grid] needs `pe` (at least one mode) or `settings`",
                path.display()
            );
        }
        let axes = !g.pe.is_empty() || !g.ratio.is_empty() || !g.schedule.is_empty();
        if !g.settings.is_empty() && axes {
            bail!(
                "{}: [grid] `settings` name their own PE mode and ratio: leave out `pe`, `ratio` \
                 and `schedule`",
                path.display()
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for st in &g.settings {
            if !names.insert(st.name.as_str()) {
                bail!("{}: setting `{}` appears twice", path.display(), st.name);
            }
            if (st.ratio.is_some() || st.schedule.is_some()) && st.pe != PeMode::Mjp {
                bail!(
                    "{}: setting `{}`: a shuffle ratio or schedule needs pe = \"mjp\"",
                    path.display(),
                    st.name
                );
            }
        }
        for c in file.cells() {
            c.config
                .validate()
                .with_context(|| format!("cell {}", c.id))?;
        }
        Ok(file)
    }

    /// The (PE mode, schedule, defenses) combinations: the named settings, or every PE mode
    /// with every schedule (MJP) or none (the others).
    fn variants(&self) -> Vec<Variant> {
        let (g, base) = (&self.grid, &self.base);
        if !g.settings.is_empty() {
            return g
                .settings
                .iter()
                .map(|st| Variant {
                    pe: st.pe,
                    schedule: match (&st.schedule, st.ratio) {
                        (Some(s), _) => s.clone(),
                        (None, Some(ratio)) => ShuffleSchedule::Constant { ratio },
                        (None, None) if st.pe == PeMode::Mjp => base.shuffle.clone(),
                        (None, None) => ShuffleSchedule::Constant { ratio: 0.0 },
                    },
                    defense: st.defense.clone().unwrap_or_else(|| base.defense.clone()),
                    name: Some(st.name.clone()),
                })
                .collect();
        }
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
        for &pe in &g.pe {
            let scheds = if pe == PeMode::Mjp {
                schedules.clone()
            } else {
                vec![ShuffleSchedule::Constant { ratio: 0.0 }]
            };
            for schedule in scheds {
                out.push(Variant {
                    pe,
                    schedule,
                    defense: base.defense.clone(),
                    name: None,
                });
            }
        }
        out
    }

    /// Every cell, in run order.
    pub fn cells(&self) -> Vec<Cell> {
        let g = &self.grid;
        let base = &self.base;
        let variants = self.variants();
        let mut out = Vec::new();
        for &seed in &axis(&g.seed, base.federation.seed) {
            for &kind in &axis(&g.update_kind, base.training.update_kind) {
                for &clients in &axis(&g.clients, base.federation.min_clients) {
                    for alpha in axis(&g.alpha.iter().map(|a| Some(*a)).collect::<Vec<_>>(), None) {
                        for &batch in &axis(&g.batch_size, base.training.batch_size) {
                            for v in &variants {
                                let mut c = base.clone();
                                c.model.pe = v.pe;
                                c.shuffle = v.schedule.clone();
                                c.defense = v.defense.clone();
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
                                    None => c.partition.with_count(clients),
                                };
                                c.server.listen = "127.0.0.1:0".into();
                                let sched_label = if v.pe == PeMode::Mjp {
                                    v.schedule.label()
                                } else {
                                    "-".into()
                                };
                                let mut setting = match &v.name {
                                    Some(name) => name.clone(),
                                    None if v.pe == PeMode::Mjp => {
                                        format!("{} {sched_label}", v.pe)
                                    }
                                    None => v.pe.to_string(),
                                };
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
                                    pe: v.pe,
                                    ratio: match v.schedule {
                                        ShuffleSchedule::Constant { ratio }
                                            if v.pe == PeMode::Mjp =>
                                        {
                                            Some(ratio)
                                        }
                                        _ => None,
                                    },
                                    schedule: sched_label,
                                    seed,
                                    defense: v.defense.at(1).label(),
                                    config: c,
                                });
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// What the DONE marker of a finished cell holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CellDone {
    /// The cell.
    pub cell: Cell,
    /// Wall time.
    pub seconds: f64,
}

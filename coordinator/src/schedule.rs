//! The MJP shuffle-ratio schedule: which shuffle ratio each round's clients train with.
//!
//! In TOML (`[shuffle]` table of the coordinator config, or a sweep cell):
//! ```toml
//! kind = "constant"; ratio = 0.1
//! kind = "list";     ratios = [0.5, 0.5, 0.25, 0.1]      # per round; the last value repeats
//! kind = "linear";   from = 0.75; to = 0.1               # straight line over all rounds
//! kind = "step";     ratios = [0.5, 0.25, 0.1]; every = 5 # change every `every` rounds
//! kind = "cosine";   from = 0.75; to = 0.1               # half cosine over all rounds
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// Shuffle ratio as a function of the round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ShuffleSchedule {
    /// The same ratio every round.
    Constant {
        /// The ratio.
        ratio: f64,
    },
    /// An explicit ratio per round (1-based; the last one repeats).
    List {
        /// Ratios of rounds 1, 2, ...
        ratios: Vec<f64>,
    },
    /// Linear from `from` (round 1) to `to` (last round).
    Linear {
        /// Ratio of round 1.
        from: f64,
        /// Ratio of the last round.
        to: f64,
    },
    /// Piecewise constant: `ratios[k]` for rounds `k*every+1 ..= (k+1)*every` (last repeats).
    Step {
        /// The successive ratios.
        ratios: Vec<f64>,
        /// Rounds per step.
        every: u32,
    },
    /// Half-cosine from `from` (round 1) to `to` (last round).
    Cosine {
        /// Ratio of round 1.
        from: f64,
        /// Ratio of the last round.
        to: f64,
    },
}

impl Default for ShuffleSchedule {
    fn default() -> Self {
        Self::Constant { ratio: 0.1 }
    }
}

impl ShuffleSchedule {
    /// The ratio of `round` (1-based) out of `total` rounds.
    pub fn ratio_at(&self, round: u32, total: u32) -> f64 {
        let t = if total <= 1 {
            0.0
        } else {
            f64::from(round.saturating_sub(1).min(total - 1)) / f64::from(total - 1)
        };
        match self {
            Self::Constant { ratio } => *ratio,
            Self::List { ratios } => pick(ratios, round.saturating_sub(1) as usize),
            Self::Linear { from, to } => from + (to - from) * t,
            Self::Step { ratios, every } => {
                pick(ratios, (round.saturating_sub(1) / (*every).max(1)) as usize)
            }
            Self::Cosine { from, to } => {
                to + 0.5 * (from - to) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    /// Checks that every ratio it can produce lies in [0, 1].
    pub fn validate(&self) -> Result<()> {
        let values: Vec<f64> = match self {
            Self::Constant { ratio } => vec![*ratio],
            Self::List { ratios } | Self::Step { ratios, .. } => {
                if ratios.is_empty() {
                    return Err(CoordinatorError::Config(
                        "shuffle schedule needs at least one ratio".into(),
                    ));
                }
                ratios.clone()
            }
            Self::Linear { from, to } | Self::Cosine { from, to } => vec![*from, *to],
        };
        if let Self::Step { every: 0, .. } = self {
            return Err(CoordinatorError::Config(
                "shuffle schedule step `every` must be >= 1".into(),
            ));
        }
        match values.iter().find(|r| !(0.0..=1.0).contains(*r)) {
            Some(bad) => Err(CoordinatorError::Config(format!(
                "shuffle ratio {bad} in the schedule is outside [0, 1]"
            ))),
            None => Ok(()),
        }
    }

    /// A short label for reports, e.g. `0.1`, `linear 0.75->0.1`.
    pub fn label(&self) -> String {
        match self {
            Self::Constant { ratio } => format!("{ratio}"),
            Self::List { ratios } => format!("list {ratios:?}"),
            Self::Linear { from, to } => format!("linear {from}->{to}"),
            Self::Step { ratios, every } => format!("step {ratios:?}/{every}"),
            Self::Cosine { from, to } => format!("cosine {from}->{to}"),
        }
    }
}

/// The clients' defenses and the server's view, per round (`[defense]` of the coordinator
/// config or a sweep cell). The table gives round 1's settings; each `[[defense.phases]]` entry
/// changes the fields it names from its `from_round` on (later phases win):
/// ```toml
/// [defense]
/// clip_norm = 1.0
/// noise_multiplier = 0.5          # local DP from round 1
/// [[defense.phases]]
/// from_round = 11
/// noise_multiplier = 1.0          # more noise from round 11; clip_norm stays 1.0
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefenseSchedule {
    /// Gradient pruning fraction (see `mjp::defense`).
    pub prune_fraction: f64,
    /// L2 clipping bound of each client's update (0: none).
    pub clip_norm: f64,
    /// Gaussian noise multiplier (local differential privacy; needs `clip_norm`).
    pub noise_multiplier: f64,
    /// The adversary sees only the sum of each round's accepted updates: the information secure
    /// aggregation leaves the server (a model of what it reveals, not the cryptographic protocol).
    pub secure_aggregation: bool,
    /// The delta of the (epsilon, delta) the accountant reports.
    pub delta: f64,
    /// Changes from a given round on.
    pub phases: Vec<DefensePhase>,
}

impl Default for DefenseSchedule {
    fn default() -> Self {
        Self {
            prune_fraction: 0.0,
            clip_norm: 0.0,
            noise_multiplier: 0.0,
            secure_aggregation: false,
            delta: 1e-5,
            phases: Vec::new(),
        }
    }
}

/// One change of [`DefenseSchedule`]: the fields it names, from `from_round` on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefensePhase {
    /// First round (1-based) it applies to.
    pub from_round: u32,
    /// New pruning fraction.
    pub prune_fraction: Option<f64>,
    /// New clipping bound.
    pub clip_norm: Option<f64>,
    /// New noise multiplier.
    pub noise_multiplier: Option<f64>,
    /// Secure-aggregation view on or off.
    pub secure_aggregation: Option<bool>,
}

/// The defenses of one round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundDefense {
    /// What each client does to its update.
    pub client: mjp::Defense,
    /// Whether the adversary sees only the round's sum.
    pub secure_aggregation: bool,
}

impl RoundDefense {
    /// A short label for reports: the client defense, `+ secagg` where it applies.
    pub fn label(&self) -> String {
        match (self.client.is_active(), self.secure_aggregation) {
            (_, false) => self.client.label(),
            (false, true) => "secagg".into(),
            (true, true) => format!("{} + secagg", self.client.label()),
        }
    }
}

impl DefenseSchedule {
    /// The defenses of `round` (1-based).
    pub fn at(&self, round: u32) -> RoundDefense {
        let mut d = RoundDefense {
            client: mjp::Defense {
                prune_fraction: self.prune_fraction,
                clip_norm: self.clip_norm,
                noise_multiplier: self.noise_multiplier,
            },
            secure_aggregation: self.secure_aggregation,
        };
        let mut phases: Vec<&DefensePhase> = self
            .phases
            .iter()
            .filter(|p| p.from_round <= round)
            .collect();
        phases.sort_by_key(|p| p.from_round);
        for p in phases {
            let c = &mut d.client;
            c.prune_fraction = p.prune_fraction.unwrap_or(c.prune_fraction);
            c.clip_norm = p.clip_norm.unwrap_or(c.clip_norm);
            c.noise_multiplier = p.noise_multiplier.unwrap_or(c.noise_multiplier);
            d.secure_aggregation = p.secure_aggregation.unwrap_or(d.secure_aggregation);
        }
        d
    }

    /// Checks every round's defenses, and that phases start at round 1 or later.
    pub fn validate(&self) -> Result<()> {
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(CoordinatorError::Config(format!(
                "[defense] delta must be in (0, 1), got {}",
                self.delta
            )));
        }
        if self.phases.iter().any(|p| p.from_round == 0) {
            return Err(CoordinatorError::Config(
                "[defense] phases start at from_round >= 1".into(),
            ));
        }
        let starts = std::iter::once(1).chain(self.phases.iter().map(|p| p.from_round));
        for round in starts {
            self.at(round).client.validate().map_err(|e| {
                CoordinatorError::Config(format!("[defense] from round {round}: {e}"))
            })?;
        }
        Ok(())
    }

    /// Whether any round has a defense.
    pub fn is_active(&self) -> bool {
        let starts = std::iter::once(1).chain(self.phases.iter().map(|p| p.from_round));
        starts
            .map(|r| self.at(r))
            .any(|d| d.client.is_active() || d.secure_aggregation)
    }
}

fn pick(values: &[f64], i: usize) -> f64 {
    values.get(i).or(values.last()).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(
            ShuffleSchedule::Constant { ratio: 0.3 }.ratio_at(7, 10),
            0.3
        );
        let l = ShuffleSchedule::List {
            ratios: vec![0.5, 0.2],
        };
        assert_eq!(
            (l.ratio_at(1, 5), l.ratio_at(2, 5), l.ratio_at(5, 5)),
            (0.5, 0.2, 0.2)
        );
        let lin = ShuffleSchedule::Linear { from: 0.8, to: 0.0 };
        assert!((lin.ratio_at(1, 5) - 0.8).abs() < 1e-12 && lin.ratio_at(5, 5).abs() < 1e-12);
        assert!((lin.ratio_at(3, 5) - 0.4).abs() < 1e-12);
        let s = ShuffleSchedule::Step {
            ratios: vec![0.5, 0.25],
            every: 2,
        };
        assert_eq!(
            [1, 2, 3, 4, 9].map(|r| s.ratio_at(r, 10)),
            [0.5, 0.5, 0.25, 0.25, 0.25]
        );
        let c = ShuffleSchedule::Cosine { from: 1.0, to: 0.0 };
        assert!((c.ratio_at(1, 11) - 1.0).abs() < 1e-12 && c.ratio_at(11, 11).abs() < 1e-12);
        assert!((c.ratio_at(6, 11) - 0.5).abs() < 1e-12);
        assert!(ShuffleSchedule::Constant { ratio: 1.5 }.validate().is_err());
        assert!(ShuffleSchedule::List { ratios: vec![] }.validate().is_err());
    }

    #[test]
    fn defense_phases_change_only_what_they_name() {
        let d: DefenseSchedule = toml::from_str(
            "clip_norm = 1.0\nnoise_multiplier = 0.5\n\
             [[phases]]\nfrom_round = 11\nnoise_multiplier = 1.0\n\
             [[phases]]\nfrom_round = 5\nsecure_aggregation = true\nprune_fraction = 0.9\n",
        )
        .unwrap();
        d.validate().unwrap();
        let r1 = d.at(1);
        assert_eq!(
            (r1.client.clip_norm, r1.client.noise_multiplier),
            (1.0, 0.5)
        );
        assert!(!r1.secure_aggregation);
        let r7 = d.at(7);
        assert!(r7.secure_aggregation && r7.client.prune_fraction == 0.9);
        assert_eq!(r7.client.noise_multiplier, 0.5);
        let r12 = d.at(12);
        assert_eq!(
            (r12.client.clip_norm, r12.client.noise_multiplier),
            (1.0, 1.0)
        );
        assert_eq!(r12.label(), "prune 0.9 + dp z=1 C=1 + secagg");
        assert!(d.is_active() && !DefenseSchedule::default().is_active());
        // Noise without a clipping bound, in a later phase, is refused.
        let bad: DefenseSchedule =
            toml::from_str("[[phases]]\nfrom_round = 3\nnoise_multiplier = 1.0\n").unwrap();
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<DefenseSchedule>("noise = 1.0").is_err());
    }

    #[test]
    fn parses_from_toml() {
        let s: ShuffleSchedule =
            toml::from_str("kind = \"step\"\nratios = [0.5, 0.1]\nevery = 3").unwrap();
        assert_eq!(
            s,
            ShuffleSchedule::Step {
                ratios: vec![0.5, 0.1],
                every: 3
            }
        );
    }
}

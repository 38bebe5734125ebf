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

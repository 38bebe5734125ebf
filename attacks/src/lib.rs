//! # mjpfl-attacks
//!
//! The honest-but-curious adversary: gradient-inversion attacks on intercepted updates, and the
//! scoring of what they recovered. Split the way breaching splits it:
//! - the pipeline (`adversary`): which updates, labels first, every attack, scoring, recording;
//!   its settings (`settings`) with their defaults written once;
//! - the interface every attack implements (`attack`) and the table of them by name
//!   (`registry`); attacks live in `april` (closed form), `optimise` (Inverting Gradients, DLG),
//!   `fedavg` (the FedAvg-aware attack) and `baseline` (the mean image);
//! - the threat model (`case`): what the server knows about one update;
//! - objectives (`objective`): what is matched; regularisers (`regulariser`): image priors;
//! - optimiser loops (`optimise`) and closed-form solvers (`april`, `labels`);
//! - metrics (`metrics`) and scoring against the audit ground truth (`scoring`), which the
//!   attacks themselves never see; per-attack statistics (`stats`) for every report;
//! - the records (`record`), what the adversary writes and the one reader of it (`recorder`).

pub mod adversary;
pub mod april;
pub mod attack;
pub mod baseline;
pub mod case;
pub mod error;
pub mod fedavg;
pub mod fill;
pub mod labels;
pub mod linalg;
pub mod metrics;
pub mod objective;
pub mod optimise;
pub mod record;
pub mod recorder;
pub mod regime;
pub mod registry;
pub mod regulariser;
pub mod render;
pub mod scoring;
pub mod settings;
pub mod stats;
pub mod victim;

pub use adversary::{Adversary, AdversaryConfig};
pub use attack::{Attack, Knowledge, Reconstruction};
pub use case::AttackCase;
pub use error::{AttackError, Result};
pub use settings::AdversarySettings;

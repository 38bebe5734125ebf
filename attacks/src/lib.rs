//! # mjpfl-attacks
//!
//! The honest-but-curious adversary: gradient-inversion attacks on intercepted updates, and the
//! scoring of what they recovered. Split the way breaching splits it:
//! - the threat model (`case`): what the server knows about one update;
//! - objectives (`objective`): what is matched; regularisers (`regulariser`): image priors;
//! - optimiser loops (`optimise`) and closed-form solvers (`april`, `labels`);
//! - metrics (`metrics`) and scoring against the audit ground truth (`scoring`), which the
//!   attacks themselves never see.

pub mod adversary;
pub mod april;
pub mod case;
pub mod error;
pub mod labels;
pub mod linalg;
pub mod metrics;
pub mod objective;
pub mod optimise;
pub mod regulariser;
pub mod render;
pub mod scoring;
pub mod victim;

pub use case::AttackCase;
pub use error::{AttackError, Result};

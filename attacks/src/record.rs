//! The records the adversary writes (per attacked update, per round), as serde types: written by
//! `recorder`, read back by `recorder::read_records` and summarised by `stats`.

use serde::{Deserialize, Serialize};

use crate::scoring::AttackScores;

/// The outcome of one attack on one update.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttackRecord {
    /// Attack name.
    pub attack: String,
    /// Labels it used (recovered by the attacker).
    pub labels: Vec<u32>,
    /// Seconds spent.
    pub seconds: f64,
    /// Final matching objective (optimisation attacks).
    pub objective: Option<f64>,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
    /// Scores against the audit ground truth (absent without an audit record).
    pub scores: Option<AttackScores>,
}

/// The JSON record of one attacked update.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateRecord {
    /// Round.
    pub round: u32,
    /// Client.
    pub client_id: String,
    /// Position on the tap.
    pub sequence: u64,
    /// fedsgd or fedavg.
    pub update_kind: String,
    /// Whether the attacks worked on a pseudo-gradient (FedAvg).
    pub pseudo_gradient: bool,
    /// Local batch size.
    pub batch_size: u32,
    /// Local steps.
    pub local_steps: u32,
    /// Examples the update covers (0 in records written before it was kept).
    #[serde(default)]
    pub num_examples: u64,
    /// The clients' local optimiser of FedAvg rounds (`sgd`, `sgd-momentum`, `adamw`; empty for
    /// FedSGD and in older records).
    #[serde(default)]
    pub local_optimizer: String,
    /// MJP shuffle ratio of the round.
    pub shuffle_ratio: f64,
    /// What the client did to the update before upload.
    #[serde(default)]
    pub defense: mjp::Defense,
    /// Clients the update sums (1; the round's participants under the secure-aggregation view).
    #[serde(default = "one")]
    pub clients: usize,
    /// PE mode of the model.
    pub pe: String,
    /// Labels recovered from the bias gradient.
    pub recovered_labels: Vec<u32>,
    /// Label recovery accuracy (when scored).
    pub label_accuracy: Option<f64>,
    /// Updates the observer lost before this one.
    pub dropped_before: u64,
    /// Each attack's outcome, in grid column order (after original and seen).
    pub attacks: Vec<AttackRecord>,
}

/// Per-round aggregate of one attack (a line of attacks/rounds.jsonl).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoundAttackSummary {
    /// Round.
    pub round: u32,
    /// Attack.
    pub attack: String,
    /// Updates attacked and scored.
    pub updates: usize,
    /// Mean PSNR vs originals.
    pub mean_psnr: f64,
    /// Median PSNR vs originals, over images.
    pub median_psnr: f64,
    /// Mean SSIM vs originals.
    pub mean_ssim: f64,
    /// Mean PSNR vs what the model saw.
    pub mean_psnr_seen: f64,
    /// Mean label accuracy.
    pub label_accuracy: f64,
    /// MJP shuffle ratio of the round.
    pub shuffle_ratio: f64,
}

fn one() -> usize {
    1
}

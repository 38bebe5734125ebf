//! What the adversary runs and on which updates, as one serialisable type with its defaults
//! written once: the `[adversary]` table of a sweep file deserialises into it, and the command
//! line's attack flags are converted into it.

use serde::{Deserialize, Serialize};

/// The adversary's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdversarySettings {
    /// Attack names (see `registry::ATTACKS`), in output column order.
    pub attacks: Vec<String>,
    /// Iterations of optimisation attacks.
    pub iterations: usize,
    /// Attack at most this many updates per round (0 = all).
    pub max_per_round: usize,
    /// Attack round 1 and every n-th round (1 = every round).
    pub every_rounds: u32,
    /// Learning rate of optimisation attacks (pixel space; default per attack).
    pub lr: Option<f64>,
    /// Total-variation weight of optimisation attacks (default per attack).
    pub tv: Option<f64>,
    /// Weight of the PE-gradient term of the `-pe` attacks.
    pub pe_weight: Option<f64>,
    /// Weight of the patch-embedding-gradient term of the `-pe` attacks.
    pub embed_weight: Option<f64>,
    /// Restarts of optimisation attacks (the best by objective is kept).
    pub restarts: Option<usize>,
    /// Average the restarts' images (matched by the best assignment) instead of keeping the best.
    pub fuse_restarts: bool,
    /// Weight of the Gaussian image prior of optimisation attacks: `w |x - x_0|^2 / pixels`
    /// towards their starting image (the public mean image, or what an earlier stage
    /// recovered); an attack that learns nothing then stays at the mean image.
    pub prior_weight: Option<f64>,
    /// Plain instead of signed Adam in optimisation attacks.
    pub unsigned: bool,
    /// Start optimisation attacks from noise instead of the public mean image plus noise.
    pub init_noise: bool,
    /// Passes of patch-owner refinement after optimisation attacks (`optimise::swap_patches`;
    /// default per attack: none).
    pub patch_swaps: Option<usize>,
    /// Also save each attacked update (safetensors) for `mjpfl attack --update`.
    pub save_updates: bool,
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
            embed_weight: None,
            restarts: None,
            fuse_restarts: false,
            prior_weight: None,
            unsigned: false,
            init_noise: false,
            patch_swaps: None,
            save_updates: false,
        }
    }
}

impl AdversarySettings {
    /// Whether round `round`'s updates are candidates for attack.
    pub fn is_due(&self, round: u32) -> bool {
        round == 1 || round.is_multiple_of(self.every_rounds.max(1))
    }
}

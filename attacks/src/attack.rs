//! The one interface every attack implements (breaching's `reconstruct(server_payload,
//! shared_data)`): given the case (what the server knows about one update) and what the
//! adversary learned before attacking (the recovered labels, public priors), return images.
//! The adversary's pipeline runs every configured attack through this trait and never learns
//! the name of a specific one; `registry` maps names to implementations.

use crate::case::AttackCase;
use crate::error::Result;
use crate::settings::AdversarySettings;

/// What the adversary knows before any reconstruction: recovered in an earlier stage of the
/// pipeline, or public.
#[derive(Clone, Copy, Debug)]
pub struct Knowledge<'a> {
    /// Labels recovered from the update (one per sample of the batch).
    pub labels: &'a [u32],
    /// Per-pixel mean of public data of the same kind (C x H x W), when known.
    pub mean_image: Option<&'a [f32]>,
}

/// What an attack recovered from one update.
#[derive(Clone, Debug)]
pub struct Reconstruction {
    /// Images, B x C x H x W in [0, 1], in the order of [`Knowledge::labels`].
    pub images: Vec<f32>,
    /// The final value of the attack's matching objective (optimisation attacks).
    pub objective: Option<f64>,
}

/// A gradient-inversion attack.
pub trait Attack: Send {
    /// The name in outputs (records, reports, plots).
    fn name(&self) -> &str;

    /// Reconstructs the private inputs behind `case.update`, or says why it does not apply
    /// ([`crate::AttackError::NotApplicable`]).
    fn reconstruct(&self, case: &AttackCase, knowledge: &Knowledge<'_>) -> Result<Reconstruction>;
}

/// How to build one attack from the adversary's settings.
pub struct Registration {
    /// The name users type and outputs show.
    pub name: &'static str,
    /// One line for `--help` and the docs.
    pub about: &'static str,
    /// Builds the attack (the settings carry the optimisation knobs).
    pub build: fn(&AdversarySettings) -> Box<dyn Attack>,
}

//! `april-mjp-ig`: the strongest MJP-aware attack here, for FedSGD gradients of one image.
//!
//! What MJP leaves: the positions it did not select keep their own patch and their own PE row,
//! so the MJP-aware closed form (`april-mjp`) recovers those patches exactly; the selected
//! positions all read the shared `unk` row, and since only the CLS token is read out, shuffling
//! their patches among themselves leaves the gradient *exactly* unchanged. The gradient therefore
//! carries the set of occluded patches but not their arrangement.
//!
//! The attack chains both: (1) the MJP-aware closed form, which places the visible patches and
//! fills the occluded positions with the mean occluded patch; (2) from that image, Inverting
//! Gradients with the PE term in a forward pass that gives the occluded positions the unk row
//! (so it reconstructs patches the model could have seen there), with a total-variation weight
//! (5e-2) strong enough to tie each occluded patch to its neighbours. Stage 2 refines the visible
//! patches too: the closed form models the occluded contribution to the patch-embedding
//! gradient by one mean patch, which is exact only when the occluded patches are alike, so its
//! visible patches carry that error (measured: keeping them fixed scored 8.3 dB against 12.6 dB
//! for refining them, ratio 0.25, 2 images). What remains hidden is the arrangement of the
//! occluded patches, to which the gradient is blind; the prior can only guess it from
//! continuity with the visible patches.

use crate::april::{ClosedFormVariant, closed_form};
use crate::attack::{Attack, Knowledge, Reconstruction, Registration};
use crate::case::AttackCase;
use crate::error::{AttackError, Result};
use crate::optimise::{OptimisationConfig, optimise_from};

/// `april-mjp-ig`.
pub const APRIL_MJP_IG: Registration = Registration {
    name: "april-mjp-ig",
    about: "MJP-aware: the MJP-aware closed form, refined by ig-pe with the unk PE at the \
            occluded positions and TV tying them to their neighbours; batch 1",
    build: |s| {
        Box::new(FillAttack {
            config: OptimisationConfig {
                adaptive: true,
                tv_weight: 5e-2,
                ..OptimisationConfig::inverting_gradients(true)
            }
            .with_settings(s),
        })
    },
};

/// The attack.
pub struct FillAttack {
    /// The optimisation stage's hyper-parameters.
    pub config: OptimisationConfig,
}

impl Attack for FillAttack {
    fn name(&self) -> &str {
        APRIL_MJP_IG.name
    }

    fn reconstruct(&self, case: &AttackCase, knowledge: &Knowledge<'_>) -> Result<Reconstruction> {
        if knowledge.labels.len() != 1 {
            return Err(AttackError::NotApplicable(
                "the closed form needs a gradient of one image".into(),
            ));
        }
        let first = closed_form(case, ClosedFormVariant::MjpAware)?;
        if !first.occluded.iter().any(|&o| o) {
            // Nothing occluded (learned PE, or ratio 0): the closed form is the answer.
            return Ok(Reconstruction {
                images: first.image,
                objective: None,
            });
        }
        optimise_from(
            case,
            knowledge.labels,
            &self.config,
            Some(&first.image),
            |_, _| {},
        )
        .map(|o| Reconstruction {
            images: o.images,
            objective: Some(o.objective),
        })
    }
}

//! The free baseline every attack must beat: the per-pixel mean of public data of the same kind,
//! given for every sample. An attack scoring at or below it has recovered nothing.

use crate::attack::{Attack, Knowledge, Reconstruction, Registration};
use crate::case::AttackCase;
use crate::error::{AttackError, Result};

/// `mean-image`.
pub const MEAN_IMAGE: Registration = Registration {
    name: "mean-image",
    about: "baseline: the public dataset-mean image for every sample",
    build: |_| Box::new(MeanImage),
};

/// The mean-image baseline.
pub struct MeanImage;

impl Attack for MeanImage {
    fn name(&self) -> &str {
        MEAN_IMAGE.name
    }

    fn reconstruct(&self, case: &AttackCase, knowledge: &Knowledge<'_>) -> Result<Reconstruction> {
        let vit = &case.vit;
        let per = vit.channels * vit.image_size * vit.image_size;
        match knowledge.mean_image {
            Some(m) if m.len() == per => Ok(Reconstruction {
                images: m.repeat(knowledge.labels.len()),
                objective: None,
            }),
            _ => Err(AttackError::NotApplicable("no public mean image".into())),
        }
    }
}

//! The threat model, as breaching calls it a "case": what the honest-but-curious server knows
//! about one intercepted update. It knows the architecture, the exact global weights the update
//! was computed from, the round's public recipe and the update itself; it does not know the
//! client's data, mask or permutation. Nothing here can reach the audit directory.

use mjp::VitConfig;
use mjp::fl::{ObservedUpdate, RoundConfig, UpdateKind};
use mjp::params::{NamedTensor, NamedTensors};

use crate::error::{AttackError, Result};

/// The largest local dataset whose every image a FedAvg update's attacks reconstruct (and the
/// audit records); larger clients are attacked for one batch's worth of images.
pub const MAX_FEDAVG_IMAGES: usize = mjp::fl::AUDIT_MAX_IMAGES;

/// One update under attack.
#[derive(Clone, Debug)]
pub struct AttackCase {
    /// Architecture.
    pub vit: VitConfig,
    /// Global weights the update was computed from.
    pub global: NamedTensors,
    /// The round's recipe (public to the server).
    pub config: RoundConfig,
    /// Gradient (FedSGD) or weight delta (FedAvg), exactly as received.
    pub update: NamedTensors,
    /// FedSGD or FedAvg.
    pub kind: UpdateKind,
    /// Local batch size.
    pub batch_size: usize,
    /// Local steps behind the update.
    pub local_steps: u32,
    /// Examples the client says the update covers (FedAvg: its local dataset; the server caps
    /// the weight at the partition it assigned, so it knows this count).
    pub num_examples: usize,
    /// Clients whose updates `update` sums: 1, or the round's participants under the
    /// secure-aggregation view (then batch size and examples are their totals).
    pub clients: usize,
    /// Where the attacker computes (not part of the threat model).
    pub device: mjp::DeviceSpec,
}

impl AttackCase {
    /// Builds the case of an intercepted update, given the global version it names.
    pub fn from_observed(
        vit: VitConfig,
        global: NamedTensors,
        observed: &ObservedUpdate,
        device: mjp::DeviceSpec,
    ) -> Self {
        Self {
            vit,
            global,
            config: observed.config.clone(),
            update: observed.update.tensors.clone(),
            kind: observed.update.kind,
            batch_size: observed.update.batch_size.max(1) as usize,
            local_steps: observed.update.local_steps.max(1),
            num_examples: usize::try_from(observed.update.num_examples)
                .unwrap_or(usize::MAX)
                .max(1),
            clients: observed.contributors.len().max(1),
            device,
        }
    }

    /// The gradient the attacks match: the update itself for FedSGD; for FedAvg the
    /// pseudo-gradient `-(delta) / (lr * steps)` (exact only for one plain SGD step; attacks on
    /// it are reported as pseudo-gradient attacks).
    pub fn target_gradient(&self) -> NamedTensors {
        match self.kind {
            UpdateKind::FedSgd => self.update.clone(),
            UpdateKind::FedAvg => {
                let mut g = self.update.clone();
                let k = -1.0
                    / (self.config.learning_rate.max(1e-12) * f64::from(self.local_steps)) as f32;
                g.scale(k);
                g
            }
        }
    }

    /// How many private images the attacks reconstruct: the batch of a FedSGD gradient; for a
    /// FedAvg delta, every local example when the client holds at most [`MAX_FEDAVG_IMAGES`]
    /// (the cross-device regime), else one batch's worth (the pseudo-gradient baseline's
    /// choice on clients too large to reconstruct whole).
    pub fn images(&self) -> usize {
        match self.kind {
            UpdateKind::FedAvg if self.num_examples <= MAX_FEDAVG_IMAGES => self.num_examples,
            _ => self.batch_size,
        }
    }

    /// Whether attacks treat this update as a pseudo-gradient.
    pub fn is_pseudo_gradient(&self) -> bool {
        self.kind == UpdateKind::FedAvg
    }

    /// A tensor of the target gradient.
    pub fn tensor<'a>(g: &'a NamedTensors, name: &str) -> Result<&'a NamedTensor> {
        g.get(name)
            .ok_or_else(|| AttackError::MissingTensor(name.to_string()))
    }
}

//! Client-side defenses, applied to an update after local training and before upload, so the
//! server (and its adversary) sees exactly what leaves the client.
//!
//! In this order:
//! 1. **Pruning** (gradient pruning, Zhu et al. 2019; top-k sparsification): in every tensor the
//!    `prune_fraction` of entries smallest in magnitude are set to zero.
//! 2. **Clipping** to an L2 bound `clip_norm` over all tensors together.
//! 3. **Gaussian noise** of standard deviation `noise_multiplier * clip_norm` on every entry.
//!
//! Clipping plus noise is the Gaussian mechanism on the client's whole update: local
//! differential privacy at the client level. Any two local datasets give clipped updates at L2
//! distance at most `2 clip_norm`, so that is the sensitivity the accountant uses (it bounds
//! example-level leakage too). The noise must come from randomness the server cannot
//! reproduce: [`apply`] takes the generator, and clients draw it from a private seed or the OS.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::params::NamedTensors;

/// What a client does to its update before upload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Defense {
    /// Fraction of each tensor's entries (smallest magnitude first) zeroed, in [0, 1).
    pub prune_fraction: f64,
    /// L2 bound the whole update is clipped to (0: no clipping).
    pub clip_norm: f64,
    /// Gaussian noise standard deviation as a multiple of `clip_norm` (needs `clip_norm > 0`).
    pub noise_multiplier: f64,
}

/// What [`apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Applied {
    /// Entries set to zero by pruning.
    pub pruned: usize,
    /// L2 norm after pruning, before clipping.
    pub norm: f64,
    /// Whether clipping scaled the update down.
    pub clipped: bool,
}

impl Defense {
    /// No defense.
    pub const NONE: Self = Self {
        prune_fraction: 0.0,
        clip_norm: 0.0,
        noise_multiplier: 0.0,
    };

    /// Whether it changes anything.
    pub fn is_active(&self) -> bool {
        self.prune_fraction > 0.0 || self.clip_norm > 0.0
    }

    /// Whether it adds noise (the only part differential privacy accounts for).
    pub fn is_private(&self) -> bool {
        self.clip_norm > 0.0 && self.noise_multiplier > 0.0
    }

    /// Refuses values no client could apply.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.prune_fraction >= 0.0 && self.prune_fraction < 1.0) {
            return Err(format!(
                "prune_fraction must be in [0, 1), got {}",
                self.prune_fraction
            ));
        }
        if !(self.clip_norm >= 0.0 && self.clip_norm.is_finite()) {
            return Err(format!(
                "clip_norm must be >= 0 and finite, got {}",
                self.clip_norm
            ));
        }
        if !(self.noise_multiplier >= 0.0 && self.noise_multiplier.is_finite()) {
            return Err(format!(
                "noise_multiplier must be >= 0 and finite, got {}",
                self.noise_multiplier
            ));
        }
        if self.noise_multiplier > 0.0 && self.clip_norm == 0.0 {
            return Err(
                "noise_multiplier needs clip_norm > 0 (the noise is relative to it)".into(),
            );
        }
        Ok(())
    }

    /// A short name for tables and plots: `none`, `prune 0.9`, `dp z=1 C=0.5`, `prune 0.5 + clip 1`.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        if self.prune_fraction > 0.0 {
            parts.push(format!("prune {}", self.prune_fraction));
        }
        if self.is_private() {
            parts.push(format!(
                "dp z={} C={}",
                self.noise_multiplier, self.clip_norm
            ));
        } else if self.clip_norm > 0.0 {
            parts.push(format!("clip {}", self.clip_norm));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(" + ")
        }
    }
}

/// Applies `defense` to `update` in place, drawing the noise from `noise`.
pub fn apply(defense: &Defense, update: &mut NamedTensors, noise: &mut impl Rng) -> Applied {
    let mut applied = Applied::default();
    if defense.prune_fraction > 0.0 {
        for t in update.tensors_mut() {
            applied.pruned += prune(&mut t.data, defense.prune_fraction);
        }
    }
    applied.norm = update.l2_norm();
    if defense.clip_norm > 0.0 && applied.norm > defense.clip_norm {
        update.scale((defense.clip_norm / applied.norm) as f32);
        applied.clipped = true;
    }
    if defense.is_private() {
        let sigma = defense.noise_multiplier * defense.clip_norm;
        for t in update.tensors_mut() {
            for v in &mut t.data {
                *v = (f64::from(*v) + sigma * standard_normal(noise)) as f32;
            }
        }
    }
    applied
}

/// Zeroes the `fraction` of `values` smallest in magnitude (ties broken by position); returns
/// how many were zeroed.
fn prune(values: &mut [f32], fraction: f64) -> usize {
    let k = ((values.len() as f64) * fraction).floor() as usize;
    if k == 0 {
        return 0;
    }
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.select_nth_unstable_by(k - 1, |&a, &b| {
        values[a].abs().total_cmp(&values[b].abs()).then(a.cmp(&b))
    });
    for &i in &order[..k] {
        values[i] = 0.0;
    }
    k
}

/// The generator of a client's noise for one round: from the client's private seed and the
/// round's seed where the client has one (simulated clients: reproducible, and the coordinator,
/// which knows only the round seed, cannot regenerate it), else from the operating system.
pub fn noise_rng(private_seed: Option<u64>, round_seed: u64) -> rand_chacha::ChaCha20Rng {
    use rand::SeedableRng;
    match private_seed {
        Some(s) => {
            rand_chacha::ChaCha20Rng::seed_from_u64(crate::Seed(s).child("dp-noise", round_seed).0)
        }
        None => rand_chacha::ChaCha20Rng::from_rng(&mut rand::rng()),
    }
}

/// A standard normal draw (Box-Muller, f64).
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::NamedTensor;

    fn update(values: &[f32]) -> NamedTensors {
        NamedTensors::new(vec![NamedTensor {
            name: "w".into(),
            shape: vec![values.len()],
            data: values.to_vec(),
        }])
    }

    #[test]
    fn pruning_zeroes_the_smallest_magnitudes() {
        let mut u = update(&[0.5, -3.0, 0.1, 2.0, -0.2, 1.0]);
        let d = Defense {
            prune_fraction: 0.5,
            ..Defense::NONE
        };
        let a = apply(&d, &mut u, &mut crate::Seed(1).rng());
        assert_eq!(a.pruned, 3);
        assert_eq!(u.tensors()[0].data, vec![0.0, -3.0, 0.0, 2.0, 0.0, 1.0]);
        assert!(!a.clipped);
    }

    #[test]
    fn clipping_bounds_the_norm_and_noise_has_the_stated_scale() {
        let mut u = update(&[3.0, 4.0]);
        let d = Defense {
            clip_norm: 1.0,
            ..Defense::NONE
        };
        let a = apply(&d, &mut u, &mut crate::Seed(1).rng());
        assert!(a.clipped && (a.norm - 5.0).abs() < 1e-9);
        assert!((u.l2_norm() - 1.0).abs() < 1e-6);
        // Noise: 20k zeros, z = 2, C = 0.5 -> sample std 1.0.
        let mut u = update(&vec![0.0; 20_000]);
        let d = Defense {
            clip_norm: 0.5,
            noise_multiplier: 2.0,
            ..Defense::NONE
        };
        apply(&d, &mut u, &mut crate::Seed(2).rng());
        let v = &u.tensors()[0].data;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var.sqrt() - 1.0).abs() < 0.03, "std {}", var.sqrt());
    }

    #[test]
    fn validation_refuses_what_no_client_can_apply() {
        let bad = [
            Defense {
                prune_fraction: 1.0,
                ..Defense::NONE
            },
            Defense {
                clip_norm: f64::NAN,
                ..Defense::NONE
            },
            Defense {
                noise_multiplier: 1.0,
                ..Defense::NONE
            },
            Defense {
                clip_norm: 1.0,
                noise_multiplier: -1.0,
                ..Defense::NONE
            },
        ];
        for d in bad {
            assert!(d.validate().is_err(), "{d:?}");
        }
        assert!(Defense::NONE.validate().is_ok());
        assert_eq!(Defense::NONE.label(), "none");
        let dp = Defense {
            prune_fraction: 0.9,
            clip_norm: 0.5,
            noise_multiplier: 1.0,
        };
        assert_eq!(dp.label(), "prune 0.9 + dp z=1 C=0.5");
    }
}

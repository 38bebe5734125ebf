//! Aggregation strategies and the server optimiser.
//!
//! `mean` folds each update into a running weighted sum as it arrives: memory is one model's
//! worth of f32 whatever the number of clients. The robust strategies (`median`,
//! `trimmed-mean`) need every update of the round at once, so they hold `k` updates in memory;
//! that is inherent to coordinate-wise statistics and documented as such.

use mjp::fl::UpdateKind;
use mjp::params::{Manifest, NamedTensors};
use serde::{Deserialize, Serialize};

/// How updates of a round are combined.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AggregatorKind {
    /// Weighted mean (weights: examples behind each update). Streaming, O(model) memory.
    #[default]
    Mean,
    /// Coordinate-wise median (unweighted). Holds all updates of the round.
    Median,
    /// Coordinate-wise mean after dropping the `fraction` largest and smallest values.
    TrimmedMean {
        /// Fraction trimmed at each end, in [0, 0.5).
        fraction: f64,
    },
}

/// Combines the updates of one round.
pub struct Aggregator {
    kind: AggregatorKind,
    manifest: Manifest,
    sum: Vec<Vec<f32>>,
    held: Vec<NamedTensors>,
    weight: f64,
    count: usize,
}

impl Aggregator {
    /// An empty aggregator for a model with `manifest`.
    pub fn new(kind: AggregatorKind, manifest: &Manifest) -> Self {
        let sum = match kind {
            AggregatorKind::Mean => manifest
                .iter()
                .map(|(_, s)| vec![0.0; s.iter().product()])
                .collect(),
            _ => Vec::new(),
        };
        Self {
            kind,
            manifest: manifest.clone(),
            sum,
            held: Vec::new(),
            weight: 0.0,
            count: 0,
        }
    }

    /// Folds in one validated update (tensors in manifest order) with its weight, its values
    /// multiplied by `scale` (1, or less for an update clipped to the norm bound).
    pub fn fold(&mut self, update: &NamedTensors, weight: f64, scale: f64) {
        debug_assert_eq!(update.manifest(), self.manifest);
        match self.kind {
            AggregatorKind::Mean => {
                let w = (weight * scale) as f32;
                for (acc, t) in self.sum.iter_mut().zip(update.tensors()) {
                    mjpfl_kernels::cpu::scaled_add(acc, &t.data, w);
                }
            }
            // Robust aggregators need every update at once (O(clients x model) by nature).
            _ => {
                let mut held = update.clone();
                if scale != 1.0 {
                    held.scale(scale as f32);
                }
                self.held.push(held);
            }
        }
        self.weight += weight;
        self.count += 1;
    }

    /// Updates folded so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The aggregated update, or `None` when nothing was folded.
    pub fn finish(self) -> Option<NamedTensors> {
        if self.count == 0 {
            return None;
        }
        let mut out = NamedTensors::new(
            self.manifest
                .iter()
                .map(|(name, shape)| mjp::NamedTensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    data: Vec::new(),
                })
                .collect(),
        );
        match self.kind {
            AggregatorKind::Mean => {
                let inv = (1.0 / self.weight.max(f64::MIN_POSITIVE)) as f32;
                for (t, mut acc) in out.tensors_mut().iter_mut().zip(self.sum) {
                    acc.iter_mut().for_each(|v| *v *= inv);
                    t.data = acc;
                }
            }
            AggregatorKind::Median | AggregatorKind::TrimmedMean { .. } => {
                let k = self.held.len();
                let trim = match self.kind {
                    AggregatorKind::TrimmedMean { fraction } => {
                        ((fraction.clamp(0.0, 0.499) * k as f64).floor() as usize).min((k - 1) / 2)
                    }
                    _ => 0,
                };
                let mut column = vec![0f32; k];
                for (ti, t) in out.tensors_mut().iter_mut().enumerate() {
                    let n = self.held[0].tensors()[ti].data.len();
                    t.data = (0..n)
                        .map(|j| {
                            for (c, u) in column.iter_mut().zip(&self.held) {
                                *c = u.tensors()[ti].data[j];
                            }
                            column.sort_by(f32::total_cmp);
                            match self.kind {
                                AggregatorKind::Median => {
                                    if k % 2 == 1 {
                                        column[k / 2]
                                    } else {
                                        0.5 * (column[k / 2 - 1] + column[k / 2])
                                    }
                                }
                                _ => {
                                    let kept = &column[trim..k - trim];
                                    kept.iter().sum::<f32>() / kept.len() as f32
                                }
                            }
                        })
                        .collect();
                }
            }
        }
        Some(out)
    }
}

/// The server's optimiser, applied to the aggregated update.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ServerOptimizer {
    /// `w += lr * delta` (FedAvg) or `w -= lr * gradient` (FedSGD).
    Sgd {
        /// Server learning rate.
        lr: f64,
    },
    /// Adam on the pseudo-gradient (`-delta` for FedAvg, the gradient for FedSGD).
    Adam {
        /// Server learning rate.
        lr: f64,
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Numerical stabiliser.
        eps: f64,
    },
}

impl ServerOptimizer {
    /// The usual choice per update kind: plain averaging for FedAvg, Adam(1e-3) for FedSGD.
    pub fn default_for(kind: UpdateKind) -> Self {
        match kind {
            UpdateKind::FedAvg => Self::Sgd { lr: 1.0 },
            UpdateKind::FedSgd => Self::Adam {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        }
    }
}

/// Adam moments of the server optimiser (persisted with each checkpoint for resume).
#[derive(Clone, Debug, Default)]
pub struct ServerState {
    /// Steps taken.
    pub step: u64,
    /// First moments.
    pub m: Vec<Vec<f32>>,
    /// Second moments.
    pub v: Vec<Vec<f32>>,
}

/// Applies the aggregated update to the global model, returning the new global. The new values
/// are written over the aggregated update's buffers, so a commit holds two models, not three.
pub fn apply(
    optimizer: &ServerOptimizer,
    state: &mut ServerState,
    global: &NamedTensors,
    aggregated: NamedTensors,
    kind: UpdateKind,
) -> NamedTensors {
    // Pseudo-gradient sign: FedSGD sends gradients, FedAvg sends (local - global).
    let sign: f32 = match kind {
        UpdateKind::FedSgd => 1.0,
        UpdateKind::FedAvg => -1.0,
    };
    debug_assert_eq!(
        global.manifest(),
        aggregated.manifest(),
        "global and update in the same order"
    );
    let mut out = aggregated;
    match *optimizer {
        ServerOptimizer::Sgd { lr } => {
            let step = lr as f32 * sign;
            for (u, w) in out.tensors_mut().iter_mut().zip(global.tensors()) {
                for (a, x) in u.data.iter_mut().zip(&w.data) {
                    *a = x - step * *a;
                }
            }
        }
        ServerOptimizer::Adam {
            lr,
            beta1,
            beta2,
            eps,
        } => {
            if state.m.len() != out.tensors().len() {
                state.m = out
                    .tensors()
                    .iter()
                    .map(|t| vec![0.0; t.data.len()])
                    .collect();
                state.v = state.m.clone();
                state.step = 0;
            }
            state.step += 1;
            let t = state.step as i32;
            let c1 = 1.0 - beta1.powi(t);
            let c2 = 1.0 - beta2.powi(t);
            for (i, (u, w)) in out
                .tensors_mut()
                .iter_mut()
                .zip(global.tensors())
                .enumerate()
            {
                let (m, v) = (&mut state.m[i], &mut state.v[i]);
                for j in 0..u.data.len() {
                    let g = f64::from(sign * u.data[j]);
                    let mj = beta1 * f64::from(m[j]) + (1.0 - beta1) * g;
                    let vj = beta2 * f64::from(v[j]) + (1.0 - beta2) * g * g;
                    m[j] = mj as f32;
                    v[j] = vj as f32;
                    u.data[j] = w.data[j] - (lr * (mj / c1) / ((vj / c2).sqrt() + eps)) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mjp::NamedTensor;

    fn nt(v: &[f32]) -> NamedTensors {
        NamedTensors::new(vec![NamedTensor {
            name: "w".into(),
            shape: vec![v.len()],
            data: v.to_vec(),
        }])
    }

    #[test]
    fn weighted_mean_median_trimmed() {
        let m = nt(&[0.0, 0.0]).manifest();
        let mut a = Aggregator::new(AggregatorKind::Mean, &m);
        a.fold(&nt(&[1.0, 2.0]), 1.0, 1.0);
        a.fold(&nt(&[4.0, 8.0]), 3.0, 1.0);
        assert_eq!(a.finish().unwrap().tensors()[0].data, vec![3.25, 6.5]);
        let mut a = Aggregator::new(AggregatorKind::Median, &m);
        for v in [[1.0, 100.0], [2.0, -5.0], [3.0, 0.0]] {
            a.fold(&nt(&v), 1.0, 1.0);
        }
        assert_eq!(a.finish().unwrap().tensors()[0].data, vec![2.0, 0.0]);
        let mut a = Aggregator::new(AggregatorKind::TrimmedMean { fraction: 0.25 }, &m);
        for v in [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [1000.0, 0.0]] {
            a.fold(&nt(&v), 1.0, 1.0);
        }
        assert_eq!(a.finish().unwrap().tensors()[0].data, vec![2.5, 0.0]);
        assert!(Aggregator::new(AggregatorKind::Mean, &m).finish().is_none());
    }

    #[test]
    fn server_sgd_signs() {
        let g = nt(&[1.0]);
        let mut s = ServerState::default();
        let sgd = ServerOptimizer::Sgd { lr: 0.5 };
        assert_eq!(
            apply(&sgd, &mut s, &nt(&[1.0]), g.clone(), UpdateKind::FedSgd).tensors()[0].data,
            vec![0.5]
        );
        assert_eq!(
            apply(&sgd, &mut s, &nt(&[1.0]), g.clone(), UpdateKind::FedAvg).tensors()[0].data,
            vec![1.5]
        );
        let adam = ServerOptimizer::default_for(UpdateKind::FedSgd);
        let w = apply(&adam, &mut s, &nt(&[1.0]), g, UpdateKind::FedSgd);
        assert!((w.tensors()[0].data[0] - 0.999).abs() < 1e-6);
    }
}

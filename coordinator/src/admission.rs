//! What one update may weigh and move (a peer decides nothing alone): its aggregation weight is
//! bounded by what the server knows, its L2 norm by a bound derived from the model, its metrics
//! are few, short and finite, and what it adds to the running sum can never overflow it. Applied
//! after the update is decoded and validated and before it is folded; the interception tap still
//! sees the update exactly as it was received.

use std::collections::BTreeMap;

use std::path::Path;

use mjp::data::{DataSource, Split};
use mjp::fl::{RoundConfig, UpdateKind};
use mjp::params::NamedTensors;
use mjp::partition::PartitionScheme;
use serde::{Deserialize, Serialize};

/// What happens to an update over a bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OverBound {
    /// Bring it down to the bound (weight capped, update scaled to the norm bound).
    #[default]
    Clip,
    /// Refuse the update (InvalidArgument).
    Refuse,
}

/// `[admission]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionSection {
    /// An update claiming more examples than the server allows (FedAvg: the size of the
    /// partition the server assigned; FedSGD: the round's batch size).
    pub weight: OverBound,
    /// L2 bound of one update (all tensors together); 0 derives it: `norm_factor` times the L2
    /// norm of the global model the update was computed from.
    pub max_update_norm: f64,
    /// Factor of the derived norm bound. Measured on vit-micro-28: the main job's aggregated
    /// FedAvg deltas are 0.37 of the model's norm in round 1 and 0.015 by round 20; FedSGD
    /// batch-1 gradients at initialisation 0.77-0.90 (19.7-23.1 against 25.7). The default 10
    /// leaves honest updates alone and bounds what a hostile one can do.
    pub norm_factor: f64,
    /// An update over the norm bound.
    pub norm: OverBound,
    /// Metrics one update may report.
    pub max_metrics: usize,
    /// Longest metric name (bytes).
    pub max_metric_name: usize,
    /// Largest magnitude of a metric value (larger, or not finite: refused).
    pub max_metric_value: f64,
}

impl Default for AdmissionSection {
    fn default() -> Self {
        Self {
            weight: OverBound::Clip,
            max_update_norm: 0.0,
            norm_factor: 10.0,
            norm: OverBound::Clip,
            max_metrics: 16,
            max_metric_name: 64,
            max_metric_value: 1e9,
        }
    }
}

impl AdmissionSection {
    /// Checks the section.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.max_update_norm >= 0.0 && self.max_update_norm.is_finite()) {
            return Err("[admission] max_update_norm must be >= 0 and finite".into());
        }
        if !(self.norm_factor > 0.0 && self.norm_factor.is_finite()) {
            return Err("[admission] norm_factor must be > 0 and finite".into());
        }
        if !(self.max_metric_value > 0.0 && self.max_metric_value.is_finite()) {
            return Err("[admission] max_metric_value must be > 0 and finite".into());
        }
        Ok(())
    }
}

/// How an admitted update enters the aggregate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Admitted {
    /// Its aggregation weight.
    pub weight: f64,
    /// The factor its values are multiplied by (1, or less when clipped to the norm bound).
    pub scale: f64,
    /// Its L2 norm as received.
    pub norm: f64,
    /// Its largest magnitude as received.
    pub max_abs: f64,
}

/// The admission rules of a federation, with what the server knows to apply them.
#[derive(Clone, Debug)]
pub struct Admission {
    section: AdmissionSection,
    /// Examples in each partition the server assigns, when it could read the training labels.
    partition_sizes: Option<Vec<u64>>,
}

impl Admission {
    /// The rules of `section` for a federation that splits `dataset` (in `data_dir`) by
    /// `partition` with run seed `seed`; reads the training labels (not the images) to learn the
    /// partition sizes it hands out.
    pub fn new(
        section: &AdmissionSection,
        dataset: &DataSource,
        data_dir: &Path,
        partition: &PartitionScheme,
        seed: u64,
    ) -> Self {
        let partition_sizes = match dataset.labels(Split::Train, data_dir).and_then(
            |(labels, classes)| {
                partition.split(
                    &labels,
                    classes,
                    mjp::Seed(seed).child("federation-data", 0),
                )
            },
        ) {
            Ok(parts) => Some(parts.iter().map(|p| p.len() as u64).collect()),
            Err(e) => {
                tracing::warn!(
                    "partition sizes unknown ({e}); FedAvg weights are bounded by local steps x batch size"
                );
                None
            }
        };
        Self {
            section: section.clone(),
            partition_sizes,
        }
    }

    /// The most examples an update of `partition` under `config` may claim.
    pub fn max_weight(&self, partition: u32, config: &RoundConfig) -> u64 {
        let batch = u64::from(config.batch_size.max(1));
        match config.update_kind {
            UpdateKind::FedSgd => batch,
            UpdateKind::FedAvg => self
                .partition_sizes
                .as_ref()
                .and_then(|p| p.get(partition as usize).copied())
                .unwrap_or_else(|| u64::from(config.local_steps.max(1)) * batch),
        }
    }

    /// The norm bound for updates computed from `global`.
    pub fn norm_bound(&self, global: &NamedTensors) -> f64 {
        if self.section.max_update_norm > 0.0 {
            self.section.max_update_norm
        } else {
            self.section.norm_factor * global.l2_norm().max(1.0)
        }
    }

    /// Checks the metrics an update reports.
    pub fn check_metrics(&self, metrics: &BTreeMap<String, f64>) -> Result<(), String> {
        let s = &self.section;
        if metrics.len() > s.max_metrics {
            return Err(format!(
                "{} metrics; at most {} are accepted",
                metrics.len(),
                s.max_metrics
            ));
        }
        for (k, v) in metrics {
            if k.len() > s.max_metric_name || k.chars().any(|c| c.is_control()) {
                return Err(format!(
                    "metric names are at most {} bytes without control characters",
                    s.max_metric_name
                ));
            }
            if !(v.is_finite() && v.abs() <= s.max_metric_value) {
                return Err(format!(
                    "metric `{k}` is {v}; values must be finite and at most {:e} in magnitude",
                    s.max_metric_value
                ));
            }
        }
        Ok(())
    }

    /// Decides the weight and scale of an update that claims `claimed` examples.
    pub fn admit(
        &self,
        update: &NamedTensors,
        claimed: u64,
        max_weight: u64,
        norm_bound: f64,
    ) -> Result<Admitted, String> {
        self.admit_stats(update.value_stats(), claimed, max_weight, norm_bound)
    }

    /// [`Self::admit`] on the update's [`NamedTensors::value_stats`], measured once by the caller.
    pub fn admit_stats(
        &self,
        stats: mjp::params::ValueStats,
        claimed: u64,
        max_weight: u64,
        norm_bound: f64,
    ) -> Result<Admitted, String> {
        if claimed == 0 {
            return Err("num_examples must be >= 1".into());
        }
        let weight = if claimed > max_weight {
            match self.section.weight {
                OverBound::Clip => max_weight,
                OverBound::Refuse => {
                    return Err(format!(
                        "claims {claimed} examples; the server allows {max_weight} for this update"
                    ));
                }
            }
        } else {
            claimed
        };
        let (norm, max_abs) = (stats.sum_sq.sqrt(), stats.max_abs);
        let scale = if norm > norm_bound {
            match self.section.norm {
                OverBound::Clip => norm_bound / norm,
                OverBound::Refuse => {
                    return Err(format!(
                        "update L2 norm {norm:.4e} exceeds the bound {norm_bound:.4e}"
                    ));
                }
            }
        } else {
            1.0
        };
        Ok(Admitted {
            weight: weight as f64,
            scale,
            norm,
            max_abs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mjp::NamedTensor;

    fn rules() -> Admission {
        Admission {
            section: AdmissionSection::default(),
            partition_sizes: Some(vec![300, 200]),
        }
    }

    fn update(v: f32) -> NamedTensors {
        NamedTensors::new(vec![NamedTensor {
            name: "w".into(),
            shape: vec![4],
            data: vec![v; 4],
        }])
    }

    #[test]
    fn weights_are_capped_at_what_the_server_knows() {
        let mut rc = RoundConfig::fedsgd(8, 0.0, 0.0, 0);
        let a = rules();
        assert_eq!(a.max_weight(0, &rc), 8);
        rc.update_kind = UpdateKind::FedAvg;
        assert_eq!(a.max_weight(1, &rc), 200);
        let adm = a.admit(&update(0.1), 1_000_000_000, 200, 10.0).unwrap();
        assert_eq!((adm.weight, adm.scale), (200.0, 1.0));
        let refuse = Admission {
            section: AdmissionSection {
                weight: OverBound::Refuse,
                ..AdmissionSection::default()
            },
            ..rules()
        };
        assert!(refuse.admit(&update(0.1), 201, 200, 10.0).is_err());
        assert!(a.admit(&update(0.1), 0, 200, 10.0).is_err());
    }

    #[test]
    fn large_updates_are_clipped_to_the_norm_bound() {
        let a = rules();
        let adm = a.admit(&update(3e38), 5, 200, 10.0).unwrap();
        assert!((adm.norm - 6e38).abs() / 6e38 < 1e-6, "{adm:?}");
        assert!((adm.scale * adm.norm - 10.0).abs() < 1e-9, "{adm:?}");
        assert_eq!(adm.weight, 5.0);
    }

    #[test]
    fn metrics_must_be_few_short_and_finite() {
        let a = rules();
        let ok = BTreeMap::from([("loss".to_string(), 2.3)]);
        assert!(a.check_metrics(&ok).is_ok());
        let huge = BTreeMap::from([("loss".to_string(), 1.7e308)]);
        assert!(a.check_metrics(&huge).is_err());
        let nan = BTreeMap::from([("loss".to_string(), f64::NAN)]);
        assert!(a.check_metrics(&nan).is_err());
        let forged = BTreeMap::from([("a\nINFO forged".to_string(), 1.0)]);
        assert!(a.check_metrics(&forged).is_err());
        let many: BTreeMap<String, f64> = (0..17).map(|i| (format!("m{i}"), 1.0)).collect();
        assert!(a.check_metrics(&many).is_err());
    }
}

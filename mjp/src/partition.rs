//! Splitting a training set among simulated clients: IID, Dirichlet(alpha) label skew, or label
//! shards (McMahan et al.). Every client computes the same split from the run seed and takes its
//! own part, so no data leaves a client's process.

use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{MjpError, Result};
use crate::seed::Seed;

/// How the training set is split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PartitionScheme {
    /// Uniformly at random, equal sizes.
    Iid {
        /// Number of partitions.
        count: u32,
        /// Examples per partition (the cross-device regime: e.g. 50 each); unset: the whole
        /// set dealt out. `count * size` must not exceed the set; the rest is unused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<usize>,
    },
    /// Per class, proportions drawn from Dirichlet(alpha) over clients (smaller alpha = more
    /// skew).
    Dirichlet {
        /// Number of partitions.
        count: u32,
        /// Concentration.
        alpha: f64,
    },
    /// Sorted by label, cut into `count * shards_per_client` shards, shards dealt at random.
    Shards {
        /// Number of partitions.
        count: u32,
        /// Shards per client.
        shards_per_client: u32,
    },
}

impl Default for PartitionScheme {
    fn default() -> Self {
        Self::Iid {
            count: 10,
            size: None,
        }
    }
}

impl PartitionScheme {
    /// Number of partitions.
    pub fn count(&self) -> u32 {
        match self {
            Self::Iid { count, .. }
            | Self::Dirichlet { count, .. }
            | Self::Shards { count, .. } => *count,
        }
    }

    /// The same scheme over `count` partitions.
    pub fn with_count(&self, count: u32) -> Self {
        match *self {
            Self::Iid { size, .. } => Self::Iid { count, size },
            Self::Dirichlet { alpha, .. } => Self::Dirichlet { count, alpha },
            Self::Shards {
                shards_per_client, ..
            } => Self::Shards {
                count,
                shards_per_client,
            },
        }
    }

    /// Checks parameters.
    pub fn validate(&self) -> Result<()> {
        if self.count() == 0 {
            return Err(MjpError::Partition("count must be >= 1".into()));
        }
        match self {
            Self::Dirichlet { alpha, .. } if !(*alpha > 0.0 && alpha.is_finite()) => Err(
                MjpError::Partition(format!("dirichlet alpha {alpha} must be positive")),
            ),
            Self::Shards {
                shards_per_client: 0,
                ..
            } => Err(MjpError::Partition("shards_per_client must be >= 1".into())),
            Self::Iid { size: Some(0), .. } => {
                Err(MjpError::Partition("iid size must be >= 1".into()))
            }
            _ => Ok(()),
        }
    }

    /// Every partition's indices into the dataset (deterministic in `seed`).
    pub fn split(&self, labels: &[u32], num_classes: usize, seed: Seed) -> Result<Vec<Vec<usize>>> {
        self.validate()?;
        let k = self.count() as usize;
        if labels.len() < k {
            return Err(MjpError::Partition(format!(
                "{} examples cannot fill {k} partitions",
                labels.len()
            )));
        }
        let mut rng = seed.child("partition", 0).rng();
        let mut parts = vec![Vec::new(); k];
        match self {
            Self::Iid { size, .. } => {
                let mut order: Vec<usize> = (0..labels.len()).collect();
                order.shuffle(&mut rng);
                if let Some(n) = size {
                    let needed = k.checked_mul(*n).filter(|&t| t <= labels.len());
                    let Some(needed) = needed else {
                        return Err(MjpError::Partition(format!(
                            "{k} partitions of {n} need more than the {} examples there are",
                            labels.len()
                        )));
                    };
                    order.truncate(needed);
                }
                for (i, idx) in order.into_iter().enumerate() {
                    parts[i % k].push(idx);
                }
            }
            Self::Dirichlet { alpha, .. } => {
                let by_class = by_class(labels, num_classes, &mut rng);
                let min_size = (labels.len() / k / 10).clamp(1, 10);
                for _attempt in 0..100 {
                    parts = vec![Vec::new(); k];
                    for idx in &by_class {
                        let p: Vec<f64> = dirichlet(*alpha, k, &mut rng);
                        let mut start = 0;
                        let mut acc = 0.0;
                        for (client, share) in p.iter().enumerate() {
                            acc += share;
                            let end = if client + 1 == k {
                                idx.len()
                            } else {
                                (acc * idx.len() as f64).round() as usize
                            };
                            let end = end.clamp(start, idx.len());
                            parts[client].extend_from_slice(&idx[start..end]);
                            start = end;
                        }
                    }
                    if parts.iter().all(|p| p.len() >= min_size) {
                        break;
                    }
                }
                if parts.iter().any(Vec::is_empty) {
                    return Err(MjpError::Partition(format!(
                        "dirichlet(alpha={alpha}) left a client without data; raise alpha"
                    )));
                }
            }
            Self::Shards {
                shards_per_client, ..
            } => {
                let mut order: Vec<usize> = (0..labels.len()).collect();
                order.shuffle(&mut rng);
                order.sort_by_key(|&i| labels[i]);
                let shards = k * *shards_per_client as usize;
                let size = labels.len() / shards;
                if size == 0 {
                    return Err(MjpError::Partition(format!(
                        "{} examples cannot fill {shards} shards",
                        labels.len()
                    )));
                }
                let mut ids: Vec<usize> = (0..shards).collect();
                ids.shuffle(&mut rng);
                for (n, shard) in ids.into_iter().enumerate() {
                    parts[n % k].extend_from_slice(&order[shard * size..(shard + 1) * size]);
                }
            }
        }
        for p in &mut parts {
            p.sort_unstable();
        }
        Ok(parts)
    }
}

fn by_class(labels: &[u32], num_classes: usize, rng: &mut impl Rng) -> Vec<Vec<usize>> {
    let mut v = vec![Vec::new(); num_classes.max(1)];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(bucket) = v.get_mut(l as usize) {
            bucket.push(i);
        }
    }
    for b in &mut v {
        b.shuffle(rng);
    }
    v
}

/// One draw from a symmetric Dirichlet(alpha) over `k` outcomes.
fn dirichlet(alpha: f64, k: usize, rng: &mut impl Rng) -> Vec<f64> {
    let g: Vec<f64> = (0..k).map(|_| gamma(alpha, rng)).collect();
    let s: f64 = g.iter().sum();
    if s <= 0.0 {
        return vec![1.0 / k as f64; k];
    }
    g.into_iter().map(|x| x / s).collect()
}

/// Gamma(shape, 1) by Marsaglia and Tsang (with the alpha < 1 boost).
fn gamma(shape: f64, rng: &mut impl Rng) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u32> {
        (0..1000).map(|i| (i % 10) as u32).collect()
    }

    fn check_disjoint_cover(parts: &[Vec<usize>], n: usize, exact: bool) {
        let mut seen = vec![false; n];
        for p in parts {
            for &i in p {
                assert!(!seen[i], "index {i} in two partitions");
                seen[i] = true;
            }
        }
        if exact {
            assert!(seen.iter().all(|&s| s));
        }
    }

    #[test]
    fn iid_is_balanced_and_deterministic() {
        let s = PartitionScheme::Iid {
            count: 7,
            size: None,
        };
        let a = s.split(&labels(), 10, Seed(1)).unwrap();
        assert_eq!(a, s.split(&labels(), 10, Seed(1)).unwrap());
        assert_ne!(a, s.split(&labels(), 10, Seed(2)).unwrap());
        check_disjoint_cover(&a, 1000, true);
        assert!(a.iter().all(|p| p.len() == 142 || p.len() == 143));
    }

    #[test]
    fn iid_with_a_size_gives_every_client_exactly_that_many() {
        let s = PartitionScheme::Iid {
            count: 19,
            size: Some(50),
        };
        let a = s.split(&labels(), 10, Seed(1)).unwrap();
        assert!(a.iter().all(|p| p.len() == 50));
        check_disjoint_cover(&a, 1000, false);
        let too_many = PartitionScheme::Iid {
            count: 21,
            size: Some(50),
        };
        assert!(too_many.split(&labels(), 10, Seed(1)).is_err());
        // Without a size the split is what it always was.
        let old = PartitionScheme::Iid {
            count: 7,
            size: None,
        };
        let text = serde_json::to_string(&old).unwrap();
        assert!(!text.contains("size"), "{text}");
        let parsed: PartitionScheme = serde_json::from_str(r#"{"kind":"iid","count":7}"#).unwrap();
        assert_eq!(parsed, old);
    }

    #[test]
    fn dirichlet_skews_labels() {
        let l = labels();
        let skewed = PartitionScheme::Dirichlet {
            count: 5,
            alpha: 0.1,
        }
        .split(&l, 10, Seed(3))
        .unwrap();
        check_disjoint_cover(&skewed, 1000, true);
        let flat = PartitionScheme::Dirichlet {
            count: 5,
            alpha: 1000.0,
        }
        .split(&l, 10, Seed(3))
        .unwrap();
        let max_share = |parts: &[Vec<usize>]| {
            parts
                .iter()
                .map(|p| {
                    let mut c = [0usize; 10];
                    p.iter().for_each(|&i| c[l[i] as usize] += 1);
                    *c.iter().max().unwrap() as f64 / p.len() as f64
                })
                .sum::<f64>()
                / parts.len() as f64
        };
        assert!(max_share(&skewed) > 0.4, "{}", max_share(&skewed));
        assert!(max_share(&flat) < 0.2, "{}", max_share(&flat));
    }

    #[test]
    fn shards_give_few_labels() {
        let l = labels();
        let parts = PartitionScheme::Shards {
            count: 10,
            shards_per_client: 2,
        }
        .split(&l, 10, Seed(0))
        .unwrap();
        check_disjoint_cover(&parts, 1000, false);
        for p in &parts {
            let mut classes: Vec<u32> = p.iter().map(|&i| l[i]).collect();
            classes.dedup();
            classes.sort();
            classes.dedup();
            assert!(classes.len() <= 2);
        }
    }
}

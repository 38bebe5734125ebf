//! Scoring reconstructions against the ground truth a simulated client wrote to the audit
//! directory: per image MSE, PSNR, SSIM, FFT distance and label accuracy, against the original
//! image and against the shuffled image the model actually saw, with reconstructions matched to
//! originals by the best one-to-one assignment. Only this module reads the audit record.

use mjp::fl::AuditRecord;
use mjp::jigsaw::SamplePlan;
use serde::{Deserialize, Serialize};

use crate::labels::label_accuracy;
use crate::metrics::{ImageScores, best_assignment, mse, score};

/// Ground truth of one update.
#[derive(Clone, Debug)]
pub struct GroundTruth {
    /// Original images (B x C x H x W, [0, 1]).
    pub originals: Vec<f32>,
    /// What the model saw (the originals after the jigsaw shuffle).
    pub seen: Vec<f32>,
    /// True labels.
    pub labels: Vec<u32>,
    /// `[C, H, W]`.
    pub shape: [usize; 3],
}

impl GroundTruth {
    /// From an audit record (patch size needed to replay the shuffle).
    pub fn from_audit(record: &AuditRecord, patch: usize) -> Self {
        let [c, s, _] = record.image_shape;
        let per = c * s * s;
        let b = record.labels.len();
        let first_batch = match record.first_batch {
            0 => b,
            n => n,
        };
        let mut seen = Vec::with_capacity(record.images.len());
        for i in 0..b {
            let img = &record.images[i * per..(i + 1) * per];
            // The jigsaw is recorded for the first step only: images beyond it (FedAvg) are
            // compared as they are.
            let plan = match record.plan_sources.len() {
                0 => None,
                1 if i < first_batch => Some(0),
                k if i < k.min(first_batch) => Some(i),
                _ => None,
            };
            match plan {
                Some(k) => {
                    let p = SamplePlan {
                        sources: record.plan_sources[k].clone(),
                        occluded: record.plan_occluded[k].clone(),
                    };
                    seen.extend(p.shuffle_image(img, c, s, patch));
                }
                None => seen.extend_from_slice(img),
            }
        }
        Self {
            originals: record.images.clone(),
            seen,
            labels: record.labels.clone(),
            shape: record.image_shape,
        }
    }

    /// The images of several updates as one (the secure-aggregation view's sum), in order;
    /// `None` for no parts or parts of different shapes.
    pub fn concat(parts: Vec<GroundTruth>) -> Option<Self> {
        let shape = parts.first()?.shape;
        if parts.iter().any(|p| p.shape != shape) {
            return None;
        }
        let mut all = Self {
            originals: Vec::new(),
            seen: Vec::new(),
            labels: Vec::new(),
            shape,
        };
        for p in parts {
            all.originals.extend(p.originals);
            all.seen.extend(p.seen);
            all.labels.extend(p.labels);
        }
        Some(all)
    }

    /// Batch size.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Scores of one attack on one update.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AttackScores {
    /// Per reconstruction, against its matched original.
    pub vs_original: Vec<ImageScores>,
    /// Per reconstruction, against its matched "what the model saw".
    pub vs_seen: Vec<ImageScores>,
    /// Matched original index of each reconstruction.
    pub assignment: Vec<usize>,
    /// Label accuracy of the attack's labels.
    pub label_accuracy: f64,
    /// Mean PSNR against the originals.
    pub mean_psnr: f64,
    /// Mean SSIM against the originals.
    pub mean_ssim: f64,
    /// Mean PSNR against what the model saw.
    pub mean_psnr_seen: f64,
}

/// Matches each reconstruction to a distinct reference (fewer reconstructions than references is
/// allowed: the rest of the references stay unmatched).
fn matched(
    recon: &[f32],
    reference: &[f32],
    per: usize,
    c: usize,
    s: usize,
) -> (Vec<usize>, Vec<ImageScores>) {
    let (r, b) = (recon.len() / per, reference.len() / per);
    let n = r.min(b);
    // Square cost matrix: dummy rows (cost 0) absorb the references no reconstruction takes.
    let cost: Vec<Vec<f64>> = (0..b)
        .map(|i| {
            (0..b)
                .map(|j| {
                    if i < n {
                        mse(
                            &recon[i * per..(i + 1) * per],
                            &reference[j * per..(j + 1) * per],
                        )
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    let assignment: Vec<usize> = best_assignment(&cost).into_iter().take(n).collect();
    let scores = assignment
        .iter()
        .enumerate()
        .map(|(i, &j)| {
            score(
                &recon[i * per..(i + 1) * per],
                &reference[j * per..(j + 1) * per],
                c,
                s,
            )
        })
        .collect();
    (assignment, scores)
}

/// Scores reconstructions (and recovered labels) against the truth.
pub fn score_attack(recon: &[f32], labels: &[u32], truth: &GroundTruth) -> AttackScores {
    let [c, s, _] = truth.shape;
    let per = c * s * s;
    let (assignment, vs_original) = matched(recon, &truth.originals, per, c, s);
    let (_, vs_seen) = matched(recon, &truth.seen, per, c, s);
    let mean = |v: &[ImageScores], f: fn(&ImageScores) -> f64| {
        v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
    };
    AttackScores {
        mean_psnr: mean(&vs_original, |x| x.psnr),
        mean_ssim: mean(&vs_original, |x| x.ssim),
        mean_psnr_seen: mean(&vs_seen, |x| x.psnr),
        label_accuracy: label_accuracy(labels, &truth.labels),
        vs_original,
        vs_seen,
        assignment,
    }
}

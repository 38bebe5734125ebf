//! Per-attack statistics over attacked-update records, computed in one place for every reader:
//! the per-round summaries the adversary appends, a run's report, a sweep's tables and
//! `mjpfl attack`'s table.

use crate::record::UpdateRecord;

/// One attack's figures over a set of attacked updates.
#[derive(Clone, Debug, PartialEq)]
pub struct AttackStats {
    /// Attack name.
    pub attack: String,
    /// Updates it ran on (scored or not).
    pub attacked: usize,
    /// Updates scored against the audit ground truth.
    pub scored: usize,
    /// Mean over scored updates of their mean PSNR against the originals.
    pub mean_psnr: f64,
    /// Median over scored updates of their mean PSNR.
    pub median_psnr: f64,
    /// Median over every scored image (not update) of its PSNR.
    pub median_image_psnr: f64,
    /// Fraction of scored images recovered above [`RECOVERED_DB`] PSNR.
    pub recovered_fraction: f64,
    /// Mean SSIM against the originals.
    pub mean_ssim: f64,
    /// Mean PSNR against what the model saw.
    pub mean_psnr_seen: f64,
    /// Mean label accuracy of the labels the attack used.
    pub label_accuracy: f64,
    /// Mean seconds per attacked update.
    pub mean_seconds: f64,
    /// Why it did not run, when it was skipped somewhere (the first reason).
    pub skipped: Option<String>,
}

/// The PSNR above which an image counts as recovered (the literature's usual threshold: the
/// subject is recognisable).
pub const RECOVERED_DB: f64 = 20.0;

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for x in v {
        sum += x;
        n += 1;
    }
    sum / n.max(1) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Statistics of every attack in `records`, in the order attacks first appear.
pub fn per_attack(records: &[UpdateRecord]) -> Vec<AttackStats> {
    let mut names: Vec<&str> = Vec::new();
    for r in records {
        for a in &r.attacks {
            if !names.contains(&a.attack.as_str()) {
                names.push(&a.attack);
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let rows: Vec<_> = records
                .iter()
                .flat_map(|r| r.attacks.iter())
                .filter(|a| a.attack == name)
                .collect();
            let scores: Vec<_> = rows.iter().filter_map(|a| a.scores.as_ref()).collect();
            AttackStats {
                attack: name.to_string(),
                attacked: rows.len(),
                scored: scores.len(),
                mean_psnr: mean(scores.iter().map(|s| s.mean_psnr)),
                median_psnr: median(scores.iter().map(|s| s.mean_psnr).collect()),
                median_image_psnr: median(
                    scores
                        .iter()
                        .flat_map(|s| s.vs_original.iter().map(|x| x.psnr))
                        .collect(),
                ),
                recovered_fraction: mean(
                    scores
                        .iter()
                        .flat_map(|s| s.vs_original.iter())
                        .map(|x| f64::from(u8::from(x.psnr > RECOVERED_DB))),
                ),
                mean_ssim: mean(scores.iter().map(|s| s.mean_ssim)),
                mean_psnr_seen: mean(scores.iter().map(|s| s.mean_psnr_seen)),
                label_accuracy: mean(scores.iter().map(|s| s.label_accuracy)),
                mean_seconds: mean(rows.iter().map(|a| a.seconds)),
                skipped: rows.iter().find_map(|a| a.skipped.clone()),
            }
        })
        .collect()
}

/// Mean label-recovery accuracy over the records that were scored (None when none was).
pub fn label_recovery(records: &[UpdateRecord]) -> Option<(f64, usize)> {
    let v: Vec<f64> = records.iter().filter_map(|r| r.label_accuracy).collect();
    (!v.is_empty()).then(|| (mean(v.iter().copied()), v.len()))
}

//! What an attacker can hope for on a given kind of update, written once for every report: the
//! strongest attack the tool has for that regime, and whether it is expected to recover images
//! at all. A report that shows every attack at the mean-image baseline must say whether that is
//! the position embedding's doing or simply an attacker too weak for the regime.

use crate::case::MAX_FEDAVG_IMAGES;
use crate::record::UpdateRecord;
use crate::stats::AttackStats;

/// The largest FedAvg client on which `fedavg-ig` was measured to beat the mean image clearly
/// enough to call it expected to succeed.
const SMALL_CLIENT: u64 = 8;

/// The baseline every attack is compared with.
pub const BASELINE: &str = "mean-image";

/// The attacker's prospects on one kind of update.
#[derive(Clone, Debug, PartialEq)]
pub struct Expectation {
    /// The attacks that are the strongest the tool has for this regime, best first.
    pub strongest: Vec<&'static str>,
    /// Whether the strongest attack is expected to recover images against a learned PE.
    pub expected: bool,
    /// Why, in one or two sentences for a report.
    pub why: String,
}

/// The prospects on updates like `r` (`fedavg_skip`: why `fedavg-ig` did not run on it, if
/// it did not).
pub fn expectation(r: &UpdateRecord, fedavg_skip: Option<&str>) -> Expectation {
    let (b, steps, n) = (r.batch_size.max(1), r.local_steps.max(1), r.num_examples);
    if r.update_kind == "fedsgd" {
        return match b {
            1 => Expectation {
                strongest: vec!["april", "ig-pe"],
                expected: true,
                why: "FedSGD gradients of one image: the closed form (`april`) recovers it \
                      exactly when the position embedding is learned, so any drop below that \
                      is the position embedding's doing."
                    .into(),
            },
            2..=16 => Expectation {
                strongest: vec!["ig-pe", "april-mjp"],
                expected: true,
                why: format!(
                    "FedSGD gradients of a batch of {b}: the closed form no longer applies and \
                     optimisation attacks (`ig-pe`) recover less as the batch grows (see \
                     docs/results, 'Batches in FedSGD')."
                ),
            },
            _ => Expectation {
                strongest: vec!["ig-pe"],
                expected: false,
                why: format!(
                    "FedSGD gradients of a batch of {b}: beyond 16 images per gradient no \
                     attack here is expected to beat the mean-image baseline, whatever the \
                     position embedding."
                ),
            },
        };
    }
    let plain_sgd = matches!(r.local_optimizer.as_str(), "sgd" | "");
    match fedavg_skip {
        None if plain_sgd && n as usize <= MAX_FEDAVG_IMAGES && n > 0 => Expectation {
            strongest: vec!["fedavg-ig", "ig-pe"],
            expected: n <= SMALL_CLIENT,
            why: format!(
                "FedAvg deltas of {steps} local SGD steps of batch {b} over {n} examples (the \
                 cross-device regime): the FedAvg-aware attack (`fedavg-ig`) simulates the \
                 client's local training. Measured against a learned position embedding: 3.4 dB \
                 above the mean image on clients of 4 examples in one batch, 3.75 dB on clients \
                 of 8 in two batches (1.6-2.0 dB with 300 iterations and one descent), 0.5 dB \
                 on clients of 50 (docs/results, 'Attacks per regime'; `--attack-iterations 1000 \
                 --attack-restarts 4 --attack-fuse-restarts --attack-tv 2e-2` for the larger \
                 figures){}",
                if n <= SMALL_CLIENT {
                    "."
                } else {
                    ", so on clients this large a figure near the baseline is not evidence that \
                     the position embedding protected anything."
                }
            ),
        },
        skip => Expectation {
            strongest: vec!["ig-pe"],
            expected: false,
            why: format!(
                "FedAvg deltas of {steps} local {}steps of batch {b}{}: attacks here only match \
                 the delta as one pseudo-gradient{}. **No attack in this tool is expected to \
                 recover images from such updates, so figures at the mean-image baseline say \
                 nothing about what the position embedding protects.** To measure that, run a \
                 regime where attacks work: FedSGD (`--update-kind fedsgd`) or the cross-device \
                 regime (`examples/cross-device.toml`, attacks `fedavg-ig,ig-pe,mean-image`).",
                match r.local_optimizer.as_str() {
                    "adamw" => "AdamW ",
                    "sgd-momentum" => "momentum-SGD ",
                    _ => "",
                },
                if n > 0 {
                    format!(" over {n} examples")
                } else {
                    String::new()
                },
                match skip {
                    Some(why) => format!(", and the FedAvg-aware attack does not apply ({why})"),
                    None if !plain_sgd || n as usize > MAX_FEDAVG_IMAGES => format!(
                        ", and the FedAvg-aware attack (`fedavg-ig`) simulates only plain-SGD \
                         clients of at most {MAX_FEDAVG_IMAGES} examples"
                    ),
                    None => String::new(),
                }
            ),
        },
    }
}

/// The attack with the highest mean PSNR among those scored (the baseline excluded), and the
/// baseline's statistics when present.
pub fn strongest(stats: &[AttackStats]) -> (Option<&AttackStats>, Option<&AttackStats>) {
    let best = stats
        .iter()
        .filter(|s| s.scored > 0 && s.attack != BASELINE)
        .max_by(|a, b| a.mean_psnr.total_cmp(&b.mean_psnr));
    let baseline = stats.iter().find(|s| s.attack == BASELINE && s.scored > 0);
    (best, baseline)
}

/// The paragraph a report prints under its attack table.
pub fn verdict(records: &[UpdateRecord], stats: &[AttackStats]) -> Option<String> {
    let first = records.first()?;
    let skip = first
        .attacks
        .iter()
        .find(|a| a.attack == "fedavg-ig")
        .and_then(|a| a.skipped.as_deref());
    let e = expectation(first, skip);
    let (best, baseline) = strongest(stats);
    let mut out = String::new();
    match (best, baseline) {
        (Some(b), Some(m)) => out.push_str(&format!(
            "**Strongest attack on these updates: `{}`, {:.2} dB mean PSNR against {:.2} dB for \
             the mean-image baseline ({:+.2} dB); {:.0}% of images above 20 dB.** ",
            b.attack,
            b.mean_psnr,
            m.mean_psnr,
            b.mean_psnr - m.mean_psnr,
            100.0 * b.recovered_fraction
        )),
        (Some(b), None) => out.push_str(&format!(
            "**Strongest attack on these updates: `{}`, {:.2} dB mean PSNR** (no mean-image \
             baseline was run). ",
            b.attack, b.mean_psnr
        )),
        _ => {}
    }
    out.push_str(&e.why);
    if first.clients > 1 {
        out.push_str(&format!(
            " The adversary saw only the sum of {} clients' updates (the secure-aggregation \
             view), attacked as one update of all their examples.",
            first.clients
        ));
    }
    if first.defense.is_active() {
        out.push_str(&format!(
            " Clients applied a defense before upload ({}): the expectation above is for \
             undefended updates, so a shortfall is the defense's doing as much as the position \
             embedding's.",
            first.defense.label()
        ));
    }
    let ran: Vec<&str> = stats.iter().map(|s| s.attack.as_str()).collect();
    let missing: Vec<&str> = e
        .strongest
        .iter()
        .copied()
        .filter(|a| !ran.contains(a))
        .collect();
    if e.expected && !missing.is_empty() {
        out.push_str(&format!(
            " The strongest attacks for this regime were not run here: add {} to `--attacks`.",
            missing
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: &str, batch: u32, steps: u32, n: u64) -> UpdateRecord {
        UpdateRecord {
            round: 1,
            client_id: "c".into(),
            sequence: 0,
            update_kind: kind.into(),
            pseudo_gradient: kind == "fedavg",
            batch_size: batch,
            local_steps: steps,
            num_examples: n,
            local_optimizer: if kind == "fedavg" {
                "sgd".into()
            } else {
                String::new()
            },
            shuffle_ratio: 0.1,
            defense: mjp::Defense::NONE,
            clients: 1,
            pe: "mjp".into(),
            recovered_labels: vec![],
            label_accuracy: None,
            dropped_before: 0,
            attacks: vec![],
        }
    }

    #[test]
    fn the_main_jobs_regime_is_said_to_be_out_of_reach() {
        let mut main_job = record("fedavg", 32, 120, 6000);
        main_job.local_optimizer = "adamw".into();
        for skip in [None, Some("the clients train with AdamW")] {
            let e = expectation(&main_job, skip);
            assert!(!e.expected);
            assert!(
                e.why.contains("No attack in this tool is expected"),
                "{}",
                e.why
            );
            assert!(
                e.why.contains("AdamW") && e.why.contains("6000"),
                "{}",
                e.why
            );
        }
    }

    #[test]
    fn small_clients_and_fedsgd_name_their_strongest_attack() {
        let e = expectation(&record("fedavg", 10, 5, 50), None);
        assert!(!e.expected && e.strongest[0] == "fedavg-ig");
        assert!(e.why.contains("not evidence"), "{}", e.why);
        assert!(expectation(&record("fedavg", 4, 4, 8), None).expected);
        assert_eq!(
            expectation(&record("fedsgd", 1, 1, 1), None).strongest[0],
            "april"
        );
        assert!(!expectation(&record("fedsgd", 64, 1, 64), None).expected);
    }
}

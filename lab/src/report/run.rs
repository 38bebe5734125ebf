//! `report.md` of a run directory: the round-by-round accuracy of the global model and, when the
//! adversary ran, what it recovered.

use std::fmt::Write as _;
use std::path::Path;

use mjp::layout::{AttacksLayout, RunLayout};
use mjpfl_attacks::recorder::read_records;
use mjpfl_attacks::stats::{label_recovery, per_attack};

use crate::error::Result;

/// Writes `<run>/report.md` from `rounds.jsonl` (and attack records when present).
pub fn write_run_report(run: &Path) -> Result<()> {
    let layout = RunLayout::new(run);
    let rounds = mjpfl_coordinator::rundir::read_rounds(run)?;
    let config = std::fs::read_to_string(layout.config()).unwrap_or_default();
    let mut md = String::new();
    writeln!(md, "# Federation report: {}\n", run.display())?;
    match rounds.last() {
        Some(last) => {
            let acc = last
                .test
                .as_ref()
                .map_or("-".into(), |t| format!("{:.2}%", 100.0 * t.accuracy));
            writeln!(
                md,
                "{} rounds completed; final global test accuracy **{acc}** ({} test images; \
                 intermediate rounds are evaluated on `round_test_limit` of them).\n",
                last.round,
                last.test.as_ref().map_or(0, |t| t.examples)
            )?;
        }
        None => writeln!(md, "No round completed yet.\n")?,
    }
    write_privacy_section(&rounds, &mut md)?;
    writeln!(md, "## Rounds\n")?;
    writeln!(
        md,
        "| round | updates | shuffle ratio | defense | epsilon max | test acc | test images | jigsaw acc | consistency | client loss | seconds |"
    )?;
    writeln!(
        md,
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v));
    // Long runs: only the rounds the global model was evaluated after (`eval_every`).
    for r in rounds
        .iter()
        .filter(|r| rounds.len() <= 50 || r.test.is_some())
    {
        let t = r.test.as_ref();
        writeln!(
            md,
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {:.3} | {:.1} |",
            r.round,
            r.aggregated.len(),
            r.shuffle_ratio,
            r.defense.label(),
            r.privacy
                .as_ref()
                .map_or("-".into(), |p| match p.epsilon_max {
                    Some(e) => format!("{e:.2}"),
                    None => "inf".into(),
                }),
            pct(t.map(|t| t.accuracy)),
            t.map_or("-".into(), |t| t.examples.to_string()),
            pct(t.and_then(|t| t.jigsaw_accuracy)),
            pct(t.and_then(|t| t.consistency_agreement)),
            r.client_metrics.get("loss").copied().unwrap_or(f64::NAN),
            r.wall_seconds
        )?;
    }
    write_attack_section(&layout, &mut md)?;
    writeln!(md, "\n## Configuration\n\n```toml\n{config}```")?;
    mjp::fsutil::write_atomic(&layout.report(), md.as_bytes())?;
    Ok(())
}

/// What the clients did to their updates, and (local DP) the accountant's verdict per client.
fn write_privacy_section(
    rounds: &[mjpfl_coordinator::rundir::RoundRecord],
    md: &mut String,
) -> Result<()> {
    use mjpfl_coordinator::privacy::{Ledger, epsilon};
    if !rounds
        .iter()
        .any(|r| r.defense.client.is_active() || r.defense.secure_aggregation)
    {
        return Ok(());
    }
    writeln!(md, "## Defenses\n")?;
    let mut labels: Vec<String> = rounds.iter().map(|r| r.defense.label()).collect();
    labels.dedup();
    writeln!(
        md,
        "Per round (see the table below): {}. Clients apply pruning, clipping and noise to their \
         update before upload, so the adversary attacks exactly what left them. `secagg` is the \
         secure-aggregation view: the adversary receives only the round's sum of updates (a \
         model of the information secure aggregation leaves the server, not the cryptographic \
         protocol).\n",
        labels.join(" / ")
    )?;
    let delta = rounds
        .iter()
        .find_map(|r| r.privacy.as_ref().map(|p| p.delta));
    if let Some(delta) = delta {
        let ledger = Ledger::from_records(rounds);
        let mut eps: Vec<(f64, u32)> = ledger
            .clients()
            .filter_map(|(_, l)| epsilon(l, delta).map(|e| (e, l.releases)))
            .collect();
        let unprotected = ledger.clients().filter(|(_, l)| l.unprotected > 0).count();
        eps.sort_by(|a, b| a.0.total_cmp(&b.0));
        if eps.is_empty() {
            writeln!(
                md,
                "**Local differential privacy:** every client also sent updates without noise \
                 in some round, so none has a finite epsilon.\n"
            )?;
        }
        if let (Some(lo), Some(hi)) = (eps.first(), eps.last()) {
            let median = eps[eps.len() / 2];
            writeln!(
                md,
                "**Local differential privacy, per client over the rounds it was sampled in** \
                 (zCDP composition, converted by opendp; sensitivity 2C, no amplification by \
                 sampling): at delta = {delta:e}, epsilon is **{:.2}** at most ({} releases), \
                 {:.2} median, {:.2} least, over {} clients.{}\n",
                hi.0,
                hi.1,
                median.0,
                lo.0,
                eps.len(),
                if unprotected > 0 {
                    format!(
                        " {unprotected} clients also sent updates without noise: they have no \
                         finite epsilon."
                    )
                } else {
                    String::new()
                }
            )?;
        }
    }
    Ok(())
}

fn write_attack_section(run: &RunLayout, md: &mut String) -> Result<()> {
    let records = read_records(&run.attacks())?;
    writeln!(md, "\n## What the honest-but-curious server recovered\n")?;
    if records.is_empty() {
        writeln!(md, "No attacked updates in this run.")?;
        return Ok(());
    }
    let pseudo = records.iter().any(|r| r.pseudo_gradient);
    let fedavg_aware = records
        .iter()
        .flat_map(|r| &r.attacks)
        .any(|a| a.attack == "fedavg-ig");
    writeln!(
        md,
        "{} updates attacked{}. PSNR/SSIM are against the original private image (and, in the last \
         column, against the shuffled image the model actually saw); higher = more leakage.\n",
        records.len(),
        match (pseudo, fedavg_aware) {
            (true, true) => {
                " (FedAvg weight deltas: `fedavg-ig` simulates the client's local steps, the \
                 other attacks match the pseudo-gradient -delta / (lr x steps), exact only for \
                 one step)"
            }
            (true, false) => {
                " (FedAvg weight deltas, matched as the pseudo-gradient -delta / (lr x steps), \
                 exact only for one step)"
            }
            _ => "",
        }
    )?;
    if let Some((accuracy, n)) = label_recovery(&records) {
        writeln!(
            md,
            "Label recovery accuracy: **{:.1}%** over {n} updates.\n",
            100.0 * accuracy
        )?;
    }
    writeln!(
        md,
        "| attack | updates scored | mean PSNR (dB) | median PSNR | images > 20 dB | mean SSIM | PSNR vs what the model saw |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
    let stats = per_attack(&records);
    for s in stats.iter().cloned() {
        if s.scored == 0 {
            let why = s.skipped.unwrap_or_else(|| "no audit record".into());
            writeln!(md, "| {} | 0 | - | - | - | - | - ({why}) |", s.attack)?;
            continue;
        }
        writeln!(
            md,
            "| {} | {} | {:.2} | {:.2} | {:.0}% | {:.3} | {:.2} |",
            s.attack,
            s.scored,
            s.mean_psnr,
            s.median_psnr,
            100.0 * s.recovered_fraction,
            s.mean_ssim,
            s.mean_psnr_seen,
        )?;
    }
    if let Some(verdict) = mjpfl_attacks::regime::verdict(&records, &stats) {
        writeln!(md, "\n{verdict}")?;
    }
    if let Some(first) = records.first() {
        let png = AttacksLayout::picture_link(first.round, &first.client_id);
        let columns: Vec<&str> = first.attacks.iter().map(|a| a.attack.as_str()).collect();
        writeln!(
            md,
            "\nExample (round {}, {}): columns are original | what the model saw | {}.\n\n![reconstructions]({png})",
            first.round,
            first.client_id,
            columns.join(" | ")
        )?;
    }
    Ok(())
}

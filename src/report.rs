//! `report.md` of a run directory: the round-by-round accuracy of the global model (and, when the
//! adversary ran, what it recovered), regenerated from what is on disk.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

/// Writes `<run>/report.md` from `rounds.jsonl` (and attack records when present).
pub fn write_run_report(run: &Path) -> Result<()> {
    let rounds = mjpfl_coordinator::rundir::read_rounds(run)?;
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap_or_default();
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
                "{} rounds completed; final global test accuracy **{acc}**.\n",
                last.round
            )?;
        }
        None => writeln!(md, "No round completed yet.\n")?,
    }
    writeln!(md, "## Rounds\n")?;
    writeln!(
        md,
        "| round | updates | shuffle ratio | test acc | jigsaw acc | consistency | client loss | seconds |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v));
    for r in &rounds {
        let t = r.test.as_ref();
        writeln!(
            md,
            "| {} | {} | {:.2} | {} | {} | {} | {:.3} | {:.1} |",
            r.round,
            r.aggregated.len(),
            r.shuffle_ratio,
            pct(t.map(|t| t.accuracy)),
            pct(t.and_then(|t| t.jigsaw_accuracy)),
            pct(t.and_then(|t| t.consistency_agreement)),
            r.client_metrics.get("loss").copied().unwrap_or(f64::NAN),
            r.wall_seconds
        )?;
    }
    write_attack_section(run, &mut md)?;
    writeln!(md, "\n## Configuration\n\n```toml\n{config}```")?;
    mjp::fsutil::write_atomic(&run.join("report.md"), md.as_bytes())?;
    Ok(())
}

/// Reads every per-update attack record of a run.
pub fn read_attack_records(run: &Path) -> Result<Vec<mjpfl_attacks::adversary::UpdateRecord>> {
    let mut out = Vec::new();
    let dir = run.join("attacks");
    let Ok(rounds) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    let mut round_dirs: Vec<_> = rounds
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    round_dirs.sort();
    for rd in round_dirs {
        let mut files: Vec<_> = std::fs::read_dir(&rd)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for f in files {
            let bytes = std::fs::read(&f)?;
            match serde_json::from_slice(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!("skipping {}: {e}", f.display()),
            }
        }
    }
    Ok(out)
}

fn write_attack_section(run: &Path, md: &mut String) -> Result<()> {
    let records = read_attack_records(run)?;
    writeln!(md, "\n## What the honest-but-curious server recovered\n")?;
    if records.is_empty() {
        writeln!(md, "No attacked updates in this run.")?;
        return Ok(());
    }
    let pseudo = records.iter().any(|r| r.pseudo_gradient);
    writeln!(
        md,
        "{} updates attacked{}. PSNR/SSIM are against the original private image (and, in the last \
         column, against the shuffled image the model actually saw); higher = more leakage.\n",
        records.len(),
        if pseudo {
            " (FedAvg weight deltas, attacked as pseudo-gradients: -delta / (lr x steps); the \
             closed-form and optimisation attacks are exact only for single-step gradients)"
        } else {
            ""
        }
    )?;
    let labels: Vec<f64> = records.iter().filter_map(|r| r.label_accuracy).collect();
    if !labels.is_empty() {
        writeln!(
            md,
            "Label recovery accuracy: **{:.1}%** over {} updates.\n",
            100.0 * mean(&labels),
            labels.len()
        )?;
    }
    writeln!(
        md,
        "| attack | updates scored | mean PSNR (dB) | median PSNR | mean SSIM | PSNR vs what the model saw |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
    let mut names: Vec<String> = Vec::new();
    for r in &records {
        for a in &r.attacks {
            if !names.contains(&a.attack) {
                names.push(a.attack.clone());
            }
        }
    }
    for name in &names {
        let scores: Vec<&mjpfl_attacks::scoring::AttackScores> = records
            .iter()
            .flat_map(|r| r.attacks.iter())
            .filter(|a| &a.attack == name)
            .filter_map(|a| a.scores.as_ref())
            .collect();
        let skipped = records
            .iter()
            .flat_map(|r| r.attacks.iter())
            .find(|a| &a.attack == name && a.skipped.is_some());
        if scores.is_empty() {
            let why = skipped
                .and_then(|a| a.skipped.clone())
                .unwrap_or_else(|| "no audit record".into());
            writeln!(md, "| {name} | 0 | - | - | - | - ({why}) |")?;
            continue;
        }
        let mut psnr: Vec<f64> = scores.iter().map(|s| s.mean_psnr).collect();
        psnr.sort_by(f64::total_cmp);
        writeln!(
            md,
            "| {name} | {} | {:.2} | {:.2} | {:.3} | {:.2} |",
            scores.len(),
            mean(&psnr),
            psnr[psnr.len() / 2],
            mean(&scores.iter().map(|s| s.mean_ssim).collect::<Vec<_>>()),
            mean(&scores.iter().map(|s| s.mean_psnr_seen).collect::<Vec<_>>()),
        )?;
    }
    if let Some(first) = records.first() {
        let png = format!("attacks/round-{:04}/{}.png", first.round, first.client_id);
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

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

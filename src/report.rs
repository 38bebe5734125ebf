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
                "{} rounds completed; final global test accuracy **{acc}** ({} test images; \
                 intermediate rounds are evaluated on `round_test_limit` of them).\n",
                last.round,
                last.test.as_ref().map_or(0, |t| t.examples)
            )?;
        }
        None => writeln!(md, "No round completed yet.\n")?,
    }
    writeln!(md, "## Rounds\n")?;
    writeln!(
        md,
        "| round | updates | shuffle ratio | test acc | test images | jigsaw acc | consistency | client loss | seconds |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v));
    // Long runs: only the rounds the global model was evaluated after (`eval_every`).
    for r in rounds
        .iter()
        .filter(|r| rounds.len() <= 50 || r.test.is_some())
    {
        let t = r.test.as_ref();
        writeln!(
            md,
            "| {} | {} | {:.2} | {} | {} | {} | {} | {:.3} | {:.1} |",
            r.round,
            r.aggregated.len(),
            r.shuffle_ratio,
            pct(t.map(|t| t.accuracy)),
            t.map_or("-".into(), |t| t.examples.to_string()),
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

/// One row of summary.csv: a cell at a round.
#[derive(serde::Serialize, Clone, Debug)]
pub struct SummaryRow {
    /// Cell id.
    pub cell: String,
    /// Setting (cell without the seed).
    pub setting: String,
    /// PE mode.
    pub pe: String,
    /// Shuffle schedule label.
    pub schedule: String,
    /// Constant ratio, if any.
    pub ratio: Option<f64>,
    /// Seed.
    pub seed: u64,
    /// Round.
    pub round: u32,
    /// Shuffle ratio of that round.
    pub round_ratio: f64,
    /// Clean test accuracy.
    pub accuracy: Option<f64>,
    /// Test loss.
    pub loss: Option<f64>,
    /// Accuracy on the jigsaw.
    pub jigsaw_accuracy: Option<f64>,
    /// Consistency (prediction agreement).
    pub consistency: Option<f64>,
    /// Per attack: mean PSNR / SSIM / label accuracy this round.
    pub attacks: std::collections::BTreeMap<String, AttackRoundStats>,
}

/// Attack statistics of one round of one cell.
#[derive(serde::Serialize, Clone, Debug, Default)]
pub struct AttackRoundStats {
    /// Mean PSNR vs originals.
    pub psnr: f64,
    /// Mean SSIM.
    pub ssim: f64,
    /// Label accuracy.
    pub label_accuracy: f64,
    /// Updates scored.
    pub updates: usize,
}

fn read_attack_rounds(run: &Path) -> Vec<mjpfl_attacks::adversary::RoundAttackSummary> {
    std::fs::read_to_string(run.join("attacks/rounds.jsonl"))
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Per-setting aggregate over seeds.
struct SettingStats {
    setting: String,
    pe: String,
    ratio: Option<f64>,
    seeds: usize,
    acc: Vec<f64>,
    jig: Vec<f64>,
    cons: Vec<f64>,
    /// attack -> per-seed (mean PSNR, median PSNR, SSIM, label acc)
    attacks: std::collections::BTreeMap<String, Vec<(f64, f64, f64, f64)>>,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = mean(v);
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len().max(1) as f64;
    (m, var.sqrt())
}

fn pm(v: &[f64], scale: f64, digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, s) = mean_std(v);
    if v.len() > 1 {
        format!("{:.*} ± {:.*}", digits, m * scale, digits, s * scale)
    } else {
        format!("{:.*}", digits, m * scale)
    }
}

/// One seed's curve: (x, y) points.
type Series = Vec<(f64, f64)>;

/// Writes summary.csv, summary.json, plots/ and report.md of a sweep directory.
pub fn write_sweep_report(dir: &Path) -> Result<()> {
    use crate::sweep::CellDone;
    let mut cells: Vec<CellDone> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("cells")) {
        for e in rd.flatten() {
            if let Ok(bytes) = std::fs::read(e.path().join("DONE"))
                && let Ok(done) = serde_json::from_slice::<CellDone>(&bytes)
            {
                cells.push(done);
            }
        }
    }
    cells.sort_by(|a, b| a.cell.id.cmp(&b.cell.id));
    let mut rows = Vec::new();
    let mut settings: Vec<SettingStats> = Vec::new();
    let mut round_series: std::collections::BTreeMap<String, Vec<Series>> = Default::default();
    let mut psnr_round_series: std::collections::BTreeMap<(String, String), Vec<Series>> =
        Default::default();
    let mut attack_names: Vec<String> = Vec::new();
    for done in &cells {
        let c = &done.cell;
        let run = dir.join("cells").join(&c.id);
        let rounds = mjpfl_coordinator::rundir::read_rounds(&run)?;
        let attack_rounds = read_attack_rounds(&run);
        let records = read_attack_records(&run)?;
        for r in &rounds {
            let attacks = attack_rounds
                .iter()
                .filter(|a| a.round == r.round)
                .map(|a| {
                    (
                        a.attack.clone(),
                        AttackRoundStats {
                            psnr: a.mean_psnr,
                            ssim: a.mean_ssim,
                            label_accuracy: a.label_accuracy,
                            updates: a.updates,
                        },
                    )
                })
                .collect();
            rows.push(SummaryRow {
                cell: c.id.clone(),
                setting: c.setting.clone(),
                pe: c.pe.to_string(),
                schedule: c.schedule.clone(),
                ratio: c.ratio,
                seed: c.seed,
                round: r.round,
                round_ratio: r.shuffle_ratio,
                accuracy: r.test.as_ref().map(|t| t.accuracy),
                loss: r.test.as_ref().map(|t| t.loss),
                jigsaw_accuracy: r.test.as_ref().and_then(|t| t.jigsaw_accuracy),
                consistency: r.test.as_ref().and_then(|t| t.consistency_agreement),
                attacks,
            });
        }
        let idx = match settings.iter().position(|s| s.setting == c.setting) {
            Some(i) => i,
            None => {
                settings.push(SettingStats {
                    setting: c.setting.clone(),
                    pe: c.pe.to_string(),
                    ratio: c.ratio,
                    seeds: 0,
                    acc: vec![],
                    jig: vec![],
                    cons: vec![],
                    attacks: Default::default(),
                });
                settings.len() - 1
            }
        };
        let st = &mut settings[idx];
        st.seeds += 1;
        if let Some(t) = rounds.last().and_then(|r| r.test.as_ref()) {
            st.acc.push(t.accuracy);
            if let Some(j) = t.jigsaw_accuracy {
                st.jig.push(j);
            }
            if let Some(k) = t.consistency_agreement {
                st.cons.push(k);
            }
        }
        round_series.entry(c.setting.clone()).or_default().push(
            rounds
                .iter()
                .filter_map(|r| {
                    r.test
                        .as_ref()
                        .map(|t| (f64::from(r.round), 100.0 * t.accuracy))
                })
                .collect(),
        );
        let mut per_attack: std::collections::BTreeMap<
            String,
            Vec<&mjpfl_attacks::scoring::AttackScores>,
        > = Default::default();
        for rec in &records {
            for a in &rec.attacks {
                if let Some(s) = &a.scores {
                    per_attack.entry(a.attack.clone()).or_default().push(s);
                }
            }
        }
        for (name, scores) in per_attack {
            if !attack_names.contains(&name) {
                attack_names.push(name.clone());
            }
            let mut p: Vec<f64> = scores.iter().map(|s| s.mean_psnr).collect();
            p.sort_by(f64::total_cmp);
            st.attacks.entry(name.clone()).or_default().push((
                mean(&p),
                p[p.len() / 2],
                mean(&scores.iter().map(|s| s.mean_ssim).collect::<Vec<_>>()),
                mean(&scores.iter().map(|s| s.label_accuracy).collect::<Vec<_>>()),
            ));
            psnr_round_series
                .entry((name.clone(), c.setting.clone()))
                .or_default()
                .push(
                    attack_rounds
                        .iter()
                        .filter(|a| a.attack == name)
                        .map(|a| (f64::from(a.round), a.mean_psnr))
                        .collect(),
                );
        }
    }
    // summary.csv / summary.json
    let mut csv = String::from(
        "cell,setting,pe,schedule,ratio,seed,round,round_ratio,accuracy,loss,jigsaw_accuracy,consistency",
    );
    for a in &attack_names {
        write!(csv, ",{a}_psnr,{a}_ssim,{a}_label_accuracy")?;
    }
    csv.push('\n');
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for r in &rows {
        write!(
            csv,
            "{},\"{}\",{},\"{}\",{},{},{},{:.4},{},{},{},{}",
            r.cell,
            r.setting,
            r.pe,
            r.schedule,
            opt(r.ratio),
            r.seed,
            r.round,
            r.round_ratio,
            opt(r.accuracy),
            opt(r.loss),
            opt(r.jigsaw_accuracy),
            opt(r.consistency)
        )?;
        for a in &attack_names {
            match r.attacks.get(a) {
                Some(s) => write!(csv, ",{:.4},{:.4},{:.4}", s.psnr, s.ssim, s.label_accuracy)?,
                None => csv.push_str(",,,"),
            }
        }
        csv.push('\n');
    }
    mjp::fsutil::write_atomic(&dir.join("summary.csv"), csv.as_bytes())?;
    mjp::fsutil::write_atomic(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(&rows)?.as_bytes(),
    )?;

    // Plots.
    let plots = dir.join("plots");
    let average = |runs: &Vec<Vec<(f64, f64)>>| -> Vec<(f64, f64)> {
        let mut by_x: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
        for run in runs {
            for &(x, y) in run {
                by_x.entry(x as i64).or_default().push(y);
            }
        }
        by_x.into_iter()
            .map(|(x, ys)| (x as f64, mean(&ys)))
            .collect()
    };
    let acc_series: Vec<crate::plots::Series> = round_series
        .iter()
        .map(|(k, runs)| crate::plots::Series {
            label: k.clone(),
            points: average(runs),
        })
        .collect();
    crate::plots::chart(
        &plots.join("accuracy_vs_round"),
        "Global test accuracy per round (mean over seeds)",
        "round",
        "accuracy (%)",
        &acc_series,
        true,
    )?;
    let main_attack = attack_names
        .iter()
        .filter(|a| a.as_str() != "mean-image")
        .max_by(|a, b| {
            let best = |n: &str| {
                settings
                    .iter()
                    .filter_map(|s| s.attacks.get(n))
                    .flat_map(|v| v.iter().map(|x| x.0))
                    .fold(f64::MIN, f64::max)
            };
            best(a).total_cmp(&best(b))
        })
        .cloned();
    for attack in &attack_names {
        let series: Vec<crate::plots::Series> = psnr_round_series
            .iter()
            .filter(|((a, _), _)| a == attack)
            .map(|((_, s), runs)| crate::plots::Series {
                label: s.clone(),
                points: average(runs),
            })
            .collect();
        if !series.is_empty() {
            crate::plots::chart(
                &plots.join(format!("psnr_vs_round_{attack}")),
                &format!("{attack}: PSNR of reconstructions per round"),
                "round",
                "PSNR vs original (dB)",
                &series,
                true,
            )?;
        }
    }
    let ratio_series: Vec<crate::plots::Series> = attack_names
        .iter()
        .map(|a| {
            let mut pts: Vec<(f64, f64)> = settings
                .iter()
                .filter(|s| s.pe == "mjp" && s.ratio.is_some())
                .filter_map(|s| {
                    s.attacks.get(a).map(|v| {
                        (
                            s.ratio.unwrap_or(0.0),
                            mean(&v.iter().map(|x| x.0).collect::<Vec<_>>()),
                        )
                    })
                })
                .collect();
            if let Some(l) = settings
                .iter()
                .find(|s| s.pe == "learned")
                .and_then(|s| s.attacks.get(a))
            {
                pts.push((0.0, mean(&l.iter().map(|x| x.0).collect::<Vec<_>>())));
            }
            pts.sort_by(|x, y| x.0.total_cmp(&y.0));
            crate::plots::Series {
                label: a.clone(),
                points: pts,
            }
        })
        .collect();
    crate::plots::chart(
        &plots.join("psnr_vs_ratio"),
        "Attack PSNR vs MJP shuffle ratio (0 = learned PE)",
        "shuffle ratio",
        "mean PSNR (dB)",
        &ratio_series,
        true,
    )?;
    if let Some(main) = &main_attack {
        let pts: Vec<crate::plots::Series> = settings
            .iter()
            .filter_map(|s| {
                let psnr = s
                    .attacks
                    .get(main)
                    .map(|v| mean(&v.iter().map(|x| x.0).collect::<Vec<_>>()))?;
                Some(crate::plots::Series {
                    label: s.setting.clone(),
                    points: vec![(psnr, 100.0 * mean(&s.acc))],
                })
            })
            .collect();
        crate::plots::chart(
            &plots.join("privacy_utility"),
            &format!("Privacy/utility: final accuracy vs {main} PSNR (lower PSNR = more private)"),
            &format!("{main} mean PSNR (dB)"),
            "final accuracy (%)",
            &pts,
            false,
        )?;
    }
    // Montage: the same images (seed, round, client) reconstructed under every setting.
    let first_seed = cells.iter().map(|c| c.cell.seed).min();
    let mut montage_rows = Vec::new();
    if let Some(seed) = first_seed {
        let mut target: Option<(u32, String)> = None;
        for done in cells.iter().filter(|c| c.cell.seed == seed) {
            let run = dir.join("cells").join(&done.cell.id);
            let recs = read_attack_records(&run)?;
            let pick = match &target {
                None => recs.first().map(|r| (r.round, r.client_id.clone())),
                Some(t) => recs
                    .iter()
                    .find(|r| r.round == t.0 && r.client_id == t.1)
                    .map(|r| (r.round, r.client_id.clone())),
            };
            if let Some((round, client)) = pick {
                target.get_or_insert((round, client.clone()));
                montage_rows.push((
                    done.cell.setting.clone(),
                    run.join(format!("attacks/round-{round:04}/{client}.png")),
                ));
            }
        }
    }
    crate::plots::montage(&plots.join("montage.png"), &montage_rows)?;

    // report.md
    let name = std::fs::read_to_string(dir.join("sweep.toml")).unwrap_or_default();
    let mut md = String::new();
    writeln!(md, "# Sweep report: {}\n", dir.display())?;
    writeln!(
        md,
        "{} cells finished ({} settings).\n",
        cells.len(),
        settings.len()
    )?;
    writeln!(md, "## Privacy / utility\n")?;
    write!(
        md,
        "| setting | seeds | final accuracy (%) | jigsaw accuracy (%) | consistency (%) |"
    )?;
    for a in &attack_names {
        write!(md, " {a} PSNR mean (dB) | {a} PSNR median | {a} SSIM |")?;
    }
    writeln!(md, " label acc (%) |")?;
    write!(md, "|---|---:|---:|---:|---:|")?;
    for _ in &attack_names {
        write!(md, "---:|---:|---:|")?;
    }
    writeln!(md, "---:|")?;
    for s in &settings {
        write!(
            md,
            "| {} | {} | {} | {} | {} |",
            s.setting,
            s.seeds,
            pm(&s.acc, 100.0, 2),
            pm(&s.jig, 100.0, 2),
            pm(&s.cons, 100.0, 2)
        )?;
        let mut labels = Vec::new();
        for a in &attack_names {
            match s.attacks.get(a) {
                Some(v) => {
                    let col =
                        |f: fn(&(f64, f64, f64, f64)) -> f64| v.iter().map(f).collect::<Vec<_>>();
                    labels.extend(col(|x| x.3));
                    write!(
                        md,
                        " {} | {} | {} |",
                        pm(&col(|x| x.0), 1.0, 2),
                        pm(&col(|x| x.1), 1.0, 2),
                        pm(&col(|x| x.2), 1.0, 3)
                    )?;
                }
                None => write!(md, " - | - | - |")?,
            }
        }
        writeln!(md, " {} |", pm(&labels, 100.0, 1))?;
    }
    writeln!(
        md,
        "\n± is the standard deviation across seeds. PSNR/SSIM are against the original private image.\n"
    )?;
    writeln!(md, "## Plots\n")?;
    writeln!(md, "![accuracy vs round](plots/accuracy_vs_round.png)\n")?;
    for a in &attack_names {
        if plots.join(format!("psnr_vs_round_{a}.png")).exists() {
            writeln!(md, "![{a} PSNR vs round](plots/psnr_vs_round_{a}.png)\n")?;
        }
    }
    writeln!(md, "![PSNR vs shuffle ratio](plots/psnr_vs_ratio.png)\n")?;
    if main_attack.is_some() {
        writeln!(md, "![privacy/utility](plots/privacy_utility.png)\n")?;
    }
    if !montage_rows.is_empty() {
        writeln!(
            md,
            "Reconstructions of the same private image under each setting (rows; columns: original | what the model saw | each attack):\n\n![montage](plots/montage.png)\n"
        )?;
    }
    writeln!(
        md,
        "SVG versions of every plot are next to the PNGs; per-round numbers are in summary.csv / summary.json.\n"
    )?;
    writeln!(md, "## Sweep file\n\n```toml\n{name}```")?;
    mjp::fsutil::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    Ok(())
}

/// `mjpfl report DIR`: regenerates the report of a run directory or a sweep directory.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// A run directory (rounds.jsonl) or a sweep directory (cells/).
    dir: std::path::PathBuf,
}

pub fn run(args: ReportArgs) -> Result<()> {
    if args.dir.join("cells").is_dir() {
        write_sweep_report(&args.dir)?;
    } else if args.dir.join("rounds.jsonl").exists() || args.dir.join("state.json").exists() {
        write_run_report(&args.dir)?;
    } else {
        anyhow::bail!(
            "{} is neither a run directory (rounds.jsonl) nor a sweep directory (cells/)",
            args.dir.display()
        );
    }
    println!("wrote {}", args.dir.join("report.md").display());
    Ok(())
}

//! The report of a sweep directory, in four steps: [`load`] what every finished cell left on
//! disk, [`aggregate`] it per setting (over seeds), write the tables ([`write_tables`]:
//! summary.csv and summary.json), and draw the plots ([`draw_plots`]); `report.md` ties them
//! together.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use mjp::layout::SweepLayout;
use mjpfl_attacks::recorder::{
    RoundAttackSummary, UpdateRecord, read_records, read_round_summaries,
};
use mjpfl_attacks::stats::per_attack;
use mjpfl_coordinator::rundir::RoundRecord;

use crate::error::Result;
use crate::grid::CellDone;
use crate::plots::{self, Series};
use crate::plots::{ErrPoint, ErrSeries};
use crate::stats::{ci95, mean, plus_minus_ci};

/// What one finished cell left on disk.
pub struct CellResults {
    /// Its DONE marker (the cell and its wall time).
    pub done: CellDone,
    /// Its committed rounds.
    pub rounds: Vec<RoundRecord>,
    /// Its per-round attack summaries.
    pub attack_rounds: Vec<RoundAttackSummary>,
    /// Its attacked-update records.
    pub records: Vec<UpdateRecord>,
}

/// Reads every finished cell of a sweep (cells without DONE are not finished), in id order.
pub fn load(layout: &SweepLayout) -> Result<Vec<CellResults>> {
    let mut done: Vec<CellDone> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(layout.cells()) {
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Ok(bytes) = std::fs::read(layout.done_marker(&id))
                && let Ok(d) = serde_json::from_slice::<CellDone>(&bytes)
            {
                done.push(d);
            }
        }
    }
    done.sort_by(|a, b| a.cell.id.cmp(&b.cell.id));
    done.into_iter()
        .map(|done| {
            let run = layout.cell(&done.cell.id);
            Ok(CellResults {
                rounds: mjpfl_coordinator::rundir::read_rounds(run.root())?,
                attack_rounds: read_round_summaries(&run.attacks()),
                records: read_records(&run.attacks())?,
                done,
            })
        })
        .collect()
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
    pub attacks: BTreeMap<String, AttackRoundStats>,
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

/// One attack's figures in one cell.
#[derive(Clone, Copy, Debug)]
pub struct CellAttack {
    /// Mean PSNR.
    pub mean_psnr: f64,
    /// Median PSNR over updates.
    pub median_psnr: f64,
    /// Mean SSIM.
    pub ssim: f64,
    /// Label accuracy.
    pub label_accuracy: f64,
    /// Fraction of images above 20 dB.
    pub recovered: f64,
}

/// A setting aggregated over its seeds.
pub struct SettingStats {
    /// The setting.
    pub setting: String,
    /// PE mode.
    pub pe: String,
    /// Constant ratio, if any.
    pub ratio: Option<f64>,
    /// The clients' defense of round 1 and whether the adversary saw only sums.
    pub defense: mjpfl_coordinator::RoundDefense,
    /// Seeds finished.
    pub seeds: usize,
    /// Per seed: the largest client epsilon at the end (local DP settings).
    pub epsilon: Vec<f64>,
    /// Per seed: the strongest attack's mean PSNR (the best over attacks other than the
    /// mean-image baseline).
    pub strongest: Vec<f64>,
    /// Per seed: the mean-image baseline's mean PSNR.
    pub baseline: Vec<f64>,
    /// Final accuracies.
    pub acc: Vec<f64>,
    /// Final jigsaw accuracies.
    pub jig: Vec<f64>,
    /// Final consistencies.
    pub cons: Vec<f64>,
    /// Attack -> one entry per seed.
    pub attacks: BTreeMap<String, Vec<CellAttack>>,
    /// Seed -> that seed's figures, for comparisons paired by seed.
    pub per_seed: BTreeMap<u64, SeedFigures>,
}

/// One seed's figures of a setting. Cells of one seed share the initial model, the partition,
/// the sampled clients and so the attacked images, whatever the setting: differences taken
/// seed by seed cancel what the particular images and clients contribute.
#[derive(Clone, Copy, Debug, Default)]
pub struct SeedFigures {
    /// Final accuracy.
    pub accuracy: Option<f64>,
    /// The strongest attack's mean PSNR.
    pub strongest: Option<f64>,
    /// The mean-image baseline's mean PSNR.
    pub baseline: Option<f64>,
}

/// `f(a) - f(b)` over the seeds where both have a value.
fn paired(
    a: &BTreeMap<u64, SeedFigures>,
    b: &BTreeMap<u64, SeedFigures>,
    f: impl Fn(&SeedFigures) -> Option<f64>,
) -> Vec<f64> {
    a.iter()
        .filter_map(|(seed, x)| Some(f(x)? - f(b.get(seed)?)?))
        .collect()
}

/// Which side of zero a paired difference's 95% CI lies on: `Some(true)` above, `Some(false)`
/// below, `None` where the interval holds zero (or there are fewer than two seeds).
fn resolved(diffs: &[f64]) -> Option<bool> {
    let (m, h) = ci95(diffs);
    (diffs.len() > 1 && h.is_finite() && m.abs() > h).then_some(m > 0.0)
}

/// One seed's curve.
type Curve = Vec<(f64, f64)>;

/// A sweep aggregated: the rows of the tables and the series of the plots.
pub struct SweepSummary {
    /// Per cell and round.
    pub rows: Vec<SummaryRow>,
    /// Per setting.
    pub settings: Vec<SettingStats>,
    /// Attack names with scores, in column order.
    pub attacks: Vec<String>,
    /// Setting -> accuracy curve per seed.
    pub accuracy_curves: BTreeMap<String, Vec<Curve>>,
    /// (attack, setting) -> PSNR curve per seed.
    pub psnr_curves: BTreeMap<(String, String), Vec<Curve>>,
}

/// Aggregates the cells per setting.
pub fn aggregate(cells: &[CellResults]) -> SweepSummary {
    let mut s = SweepSummary {
        rows: Vec::new(),
        settings: Vec::new(),
        attacks: Vec::new(),
        accuracy_curves: BTreeMap::new(),
        psnr_curves: BTreeMap::new(),
    };
    for cell in cells {
        let c = &cell.done.cell;
        for r in &cell.rounds {
            let attacks = cell
                .attack_rounds
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
            s.rows.push(SummaryRow {
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
        let idx = match s.settings.iter().position(|x| x.setting == c.setting) {
            Some(i) => i,
            None => {
                s.settings.push(SettingStats {
                    setting: c.setting.clone(),
                    pe: c.pe.to_string(),
                    ratio: c.ratio,
                    defense: c.config.defense.at(1),
                    seeds: 0,
                    epsilon: vec![],
                    strongest: vec![],
                    baseline: vec![],
                    acc: vec![],
                    jig: vec![],
                    cons: vec![],
                    attacks: BTreeMap::new(),
                    per_seed: BTreeMap::new(),
                });
                s.settings.len() - 1
            }
        };
        let st = &mut s.settings[idx];
        st.seeds += 1;
        st.epsilon.extend(
            cell.rounds
                .iter()
                .filter_map(|r| r.privacy.as_ref().and_then(|p| p.epsilon_max))
                .reduce(f64::max),
        );
        if let Some(t) = cell.rounds.last().and_then(|r| r.test.as_ref()) {
            st.acc.push(t.accuracy);
            st.jig.extend(t.jigsaw_accuracy);
            st.cons.extend(t.consistency_agreement);
        }
        s.accuracy_curves
            .entry(c.setting.clone())
            .or_default()
            .push(
                cell.rounds
                    .iter()
                    .filter_map(|r| {
                        r.test
                            .as_ref()
                            .map(|t| (f64::from(r.round), 100.0 * t.accuracy))
                    })
                    .collect(),
            );
        let mut scored: Vec<_> = per_attack(&cell.records)
            .into_iter()
            .filter(|a| a.scored > 0)
            .collect();
        scored.sort_by(|a, b| a.attack.cmp(&b.attack));
        let (best, baseline) = mjpfl_attacks::regime::strongest(&scored);
        st.strongest.extend(best.map(|b| b.mean_psnr));
        st.baseline.extend(baseline.map(|b| b.mean_psnr));
        st.per_seed.insert(
            c.seed,
            SeedFigures {
                accuracy: cell
                    .rounds
                    .last()
                    .and_then(|r| r.test.as_ref())
                    .map(|t| t.accuracy),
                strongest: best.map(|b| b.mean_psnr),
                baseline: baseline.map(|b| b.mean_psnr),
            },
        );
        for a in scored {
            if !s.attacks.contains(&a.attack) {
                s.attacks.push(a.attack.clone());
            }
            st.attacks
                .entry(a.attack.clone())
                .or_default()
                .push(CellAttack {
                    mean_psnr: a.mean_psnr,
                    median_psnr: a.median_psnr,
                    ssim: a.mean_ssim,
                    label_accuracy: a.label_accuracy,
                    recovered: a.recovered_fraction,
                });
            s.psnr_curves
                .entry((a.attack.clone(), c.setting.clone()))
                .or_default()
                .push(
                    cell.attack_rounds
                        .iter()
                        .filter(|r| r.attack == a.attack)
                        .map(|r| (f64::from(r.round), r.mean_psnr))
                        .collect(),
                );
        }
    }
    s
}

/// Writes summary.csv and summary.json.
pub fn write_tables(layout: &SweepLayout, s: &SweepSummary) -> Result<()> {
    let mut csv = String::from(
        "cell,setting,pe,schedule,ratio,seed,round,round_ratio,accuracy,loss,jigsaw_accuracy,consistency",
    );
    for a in &s.attacks {
        write!(csv, ",{a}_psnr,{a}_ssim,{a}_label_accuracy")?;
    }
    csv.push('\n');
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for r in &s.rows {
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
        for a in &s.attacks {
            match r.attacks.get(a) {
                Some(x) => write!(csv, ",{:.4},{:.4},{:.4}", x.psnr, x.ssim, x.label_accuracy)?,
                None => csv.push_str(",,,"),
            }
        }
        csv.push('\n');
    }
    mjp::fsutil::write_atomic(&layout.summary_csv(), csv.as_bytes())?;
    mjp::fsutil::write_atomic(
        &layout.summary_json(),
        serde_json::to_string_pretty(&s.rows)?.as_bytes(),
    )?;
    Ok(())
}

/// What [`draw_plots`] drew that the report links to.
pub struct Drawn {
    /// The attack the privacy/utility plot uses (the strongest by best mean PSNR).
    pub main_attack: Option<String>,
    /// Montage rows: (setting, picture of the same private images under it).
    pub montage: Vec<(String, PathBuf)>,
}

/// Per-round mean over seeds.
fn average(runs: &[Curve]) -> Curve {
    let mut by_x: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for run in runs {
        for &(x, y) in run {
            by_x.entry(x as i64).or_default().push(y);
        }
    }
    by_x.into_iter()
        .map(|(x, ys)| (x as f64, mean(&ys)))
        .collect()
}

fn mean_psnr(v: &[CellAttack]) -> f64 {
    mean(&v.iter().map(|x| x.mean_psnr).collect::<Vec<_>>())
}

/// Draws accuracy and PSNR per round, PSNR against the shuffle ratio, privacy/utility and the
/// montage.
pub fn draw_plots(layout: &SweepLayout, s: &SweepSummary, cells: &[CellResults]) -> Result<Drawn> {
    let dir = layout.plots();
    let acc: Vec<Series> = s
        .accuracy_curves
        .iter()
        .map(|(k, runs)| Series {
            label: k.clone(),
            points: average(runs),
        })
        .collect();
    plots::chart(
        &dir.join("accuracy_vs_round"),
        "Global test accuracy per round (mean over seeds)",
        "round",
        "accuracy (%)",
        &acc,
        true,
    )?;
    let main_attack = s
        .attacks
        .iter()
        .filter(|a| a.as_str() != "mean-image")
        .max_by(|a, b| {
            let best = |n: &str| {
                s.settings
                    .iter()
                    .filter_map(|x| x.attacks.get(n))
                    .flat_map(|v| v.iter().map(|x| x.mean_psnr))
                    .fold(f64::MIN, f64::max)
            };
            best(a).total_cmp(&best(b))
        })
        .cloned();
    for attack in &s.attacks {
        let series: Vec<Series> = s
            .psnr_curves
            .iter()
            .filter(|((a, _), _)| a == attack)
            .map(|((_, setting), runs)| Series {
                label: setting.clone(),
                points: average(runs),
            })
            .collect();
        if !series.is_empty() {
            plots::chart(
                &dir.join(format!("psnr_vs_round_{attack}")),
                &format!("{attack}: PSNR of reconstructions per round"),
                "round",
                "PSNR vs original (dB)",
                &series,
                true,
            )?;
        }
    }
    let by_ratio: Vec<Series> = s
        .attacks
        .iter()
        .map(|a| {
            let mut pts: Vec<(f64, f64)> = s
                .settings
                .iter()
                .filter(|x| x.pe == "mjp")
                .filter_map(|x| Some((x.ratio?, mean_psnr(x.attacks.get(a)?))))
                .collect();
            if let Some(l) = s
                .settings
                .iter()
                .find(|x| x.pe == "learned")
                .and_then(|x| x.attacks.get(a))
            {
                pts.push((0.0, mean_psnr(l)));
            }
            pts.sort_by(|x, y| x.0.total_cmp(&y.0));
            Series {
                label: a.clone(),
                points: pts,
            }
        })
        .collect();
    plots::chart(
        &dir.join("psnr_vs_ratio"),
        "Attack PSNR vs MJP shuffle ratio (0 = learned PE)",
        "shuffle ratio",
        "mean PSNR (dB)",
        &by_ratio,
        true,
    )?;
    if let Some(main) = &main_attack {
        let pts: Vec<Series> = s
            .settings
            .iter()
            .filter_map(|x| {
                let psnr = mean_psnr(x.attacks.get(main)?);
                Some(Series {
                    label: x.setting.clone(),
                    points: vec![(psnr, 100.0 * mean(&x.acc))],
                })
            })
            .collect();
        plots::chart(
            &dir.join("privacy_utility"),
            &format!("Privacy/utility: final accuracy vs {main} PSNR (lower PSNR = more private)"),
            &format!("{main} mean PSNR (dB)"),
            "final accuracy (%)",
            &pts,
            false,
        )?;
    }
    draw_frontier(&dir, s)?;
    // Montage: the same images (seed, round, client) reconstructed under every setting.
    let mut montage = Vec::new();
    if let Some(seed) = cells.iter().map(|c| c.done.cell.seed).min() {
        let mut target: Option<(u32, String)> = None;
        for cell in cells.iter().filter(|c| c.done.cell.seed == seed) {
            let pick = match &target {
                None => cell.records.first(),
                Some((round, client)) => cell
                    .records
                    .iter()
                    .find(|r| r.round == *round && &r.client_id == client),
            };
            if let Some(r) = pick {
                target.get_or_insert((r.round, r.client_id.clone()));
                let run = layout.cell(&cell.done.cell.id);
                montage.push((
                    cell.done.cell.setting.clone(),
                    run.attacks().picture(r.round, &r.client_id),
                ));
            }
        }
    }
    plots::montage(&dir.join("montage.png"), &montage)?;
    Ok(Drawn {
        main_attack,
        montage,
    })
}

/// The privacy/utility frontier: final accuracy against the strongest attack's PSNR, one point
/// per setting with 95% CIs on both axes; MJP's points joined by shuffle ratio, local DP's by
/// noise level; the mean-image baseline as a vertical line.
fn draw_frontier(dir: &Path, s: &SweepSummary) -> Result<()> {
    let point = |x: &SettingStats, label: String| {
        (!x.strongest.is_empty() && !x.acc.is_empty()).then(|| {
            let (a, ah) = ci95(&x.acc);
            ErrPoint {
                x: ci95(&x.strongest),
                y: (100.0 * a, 100.0 * ah),
                label,
            }
        })
    };
    // A setting none of whose attacks applies (fedavg-ig to the secure-aggregation view's sum,
    // say) is drawn at what the attacker can always produce: the mean image.
    let at_baseline = |x: &SettingStats| {
        (x.strongest.is_empty() && !x.baseline.is_empty() && !x.acc.is_empty()).then(|| {
            let (a, ah) = ci95(&x.acc);
            ErrPoint {
                x: ci95(&x.baseline),
                y: (100.0 * a, 100.0 * ah),
                label: String::new(),
            }
        })
    };
    let plain = |x: &SettingStats| !x.defense.client.is_active() && !x.defense.secure_aggregation;
    let mut mjp: Vec<(f64, ErrPoint)> = s
        .settings
        .iter()
        .filter(|x| x.pe == "mjp" && plain(x))
        .filter_map(|x| Some((x.ratio?, point(x, format!(" {}", x.ratio?))?)))
        .collect();
    mjp.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut dp: Vec<(f64, ErrPoint)> = s
        .settings
        .iter()
        .filter(|x| {
            x.pe != "mjp" && x.defense.client.is_private() && x.defense.client.prune_fraction == 0.0
        })
        .filter_map(|x| {
            let z = x.defense.client.noise_multiplier;
            Some((z, point(x, format!(" z={z}"))?))
        })
        .collect();
    dp.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut series = Vec::new();
    if !mjp.is_empty() {
        series.push(ErrSeries {
            label: "MJP (by shuffle ratio)".into(),
            points: mjp.into_iter().map(|(_, p)| p).collect(),
            joined: true,
        });
    }
    if !dp.is_empty() {
        series.push(ErrSeries {
            label: "local DP (by noise multiplier)".into(),
            points: dp.into_iter().map(|(_, p)| p).collect(),
            joined: true,
        });
    }
    for x in &s.settings {
        let in_families = (x.pe == "mjp" && plain(x))
            || (x.pe != "mjp"
                && x.defense.client.is_private()
                && x.defense.client.prune_fraction == 0.0);
        if in_families {
            continue;
        }
        if let Some(p) = point(x, String::new()) {
            series.push(ErrSeries {
                label: x.setting.clone(),
                points: vec![p],
                joined: false,
            });
        } else if let Some(p) = at_baseline(x) {
            series.push(ErrSeries {
                label: format!("{} (no attack applies: at the mean image)", x.setting),
                points: vec![p],
                joined: false,
            });
        }
    }
    if series.is_empty() {
        return Ok(());
    }
    let baselines: Vec<f64> = s
        .settings
        .iter()
        .flat_map(|x| x.baseline.iter().copied())
        .collect();
    let marker = (!baselines.is_empty()).then(|| (mean(&baselines), "mean-image baseline"));
    plots::frontier(
        &dir.join("frontier"),
        "Privacy/utility frontier (95% CI over seeds; left = more private)",
        "strongest attack's mean PSNR (dB)",
        "final test accuracy (%)",
        &series,
        marker,
    )
}

/// Writes summary.csv, summary.json, plots/ and report.md of a sweep directory.
pub fn write_sweep_report(dir: &Path) -> Result<()> {
    let layout = SweepLayout::new(dir);
    let cells = load(&layout)?;
    let summary = aggregate(&cells);
    write_tables(&layout, &summary)?;
    let drawn = draw_plots(&layout, &summary, &cells)?;
    let md = markdown(&layout, &summary, &drawn)?;
    mjp::fsutil::write_atomic(&layout.report(), md.as_bytes())?;
    Ok(())
}

/// The reference of the paired comparisons: the first setting with learned PE and no defense.
fn reference(s: &SweepSummary) -> Option<&SettingStats> {
    s.settings
        .iter()
        .find(|x| x.pe == "learned" && x.defense == mjpfl_coordinator::RoundDefense::default())
}

/// The section of differences paired by seed: each setting's strongest attack against the
/// mean-image baseline on the same images, and its attack PSNR and accuracy against the
/// reference setting's on the same seed.
fn write_paired(md: &mut String, s: &SweepSummary) -> Result<()> {
    let Some(base) = reference(s) else {
        return Ok(());
    };
    if base.per_seed.len() < 2 {
        return Ok(());
    }
    let same_images = s.settings.iter().all(|x| {
        x.per_seed.iter().all(|(seed, f)| {
            match (f.baseline, base.per_seed.get(seed).and_then(|b| b.baseline)) {
                (Some(a), Some(b)) => (a - b).abs() < 1e-9,
                _ => true,
            }
        })
    });
    writeln!(md, "## Paired by seed\n")?;
    writeln!(
        md,
        "Cells of one seed share the initial model, the partition, the sampled clients and the \
         attacked images{}, so differences taken seed by seed cancel what the particular images \
         contribute: far tighter intervals than the table's, which mix that spread in. \
         Reference: `{}`. A verdict needs the 95% CI of the difference to exclude zero.\n",
        if same_images {
            " (the mean-image baseline is the same in every setting, seed by seed)"
        } else {
            " (but the mean-image baseline differs between settings of one seed here: the \
             attacked images are not the same, and these pairs are weaker than they look)"
        },
        base.setting
    )?;
    writeln!(
        md,
        "| setting | seeds | strongest attack - mean image (dB) | | strongest attack - `{0}` (dB) | | accuracy - `{0}` (points) | |",
        base.setting
    )?;
    writeln!(md, "|---|---:|---:|---|---:|---|---:|---|")?;
    for x in &s.settings {
        let vs_mean: Vec<f64> = x
            .per_seed
            .values()
            .filter_map(|f| Some(f.strongest? - f.baseline?))
            .collect();
        let vs_psnr = paired(&x.per_seed, &base.per_seed, |f| f.strongest);
        let vs_acc = paired(&x.per_seed, &base.per_seed, |f| f.accuracy);
        let is_base = std::ptr::eq(x, base);
        let say = |d: &[f64], above: &str, below: &str| match resolved(d) {
            _ if d.is_empty() => "-".to_string(),
            Some(true) => above.to_string(),
            Some(false) => below.to_string(),
            None => "not resolved".to_string(),
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            x.setting,
            x.per_seed.len(),
            plus_minus_ci(&vs_mean, 1.0, 2),
            say(&vs_mean, "above the baseline", "**below the baseline**"),
            if is_base {
                "-".into()
            } else {
                plus_minus_ci(&vs_psnr, 1.0, 2)
            },
            if is_base {
                "-".into()
            } else {
                say(&vs_psnr, "more leaked", "**less leaked**")
            },
            if is_base {
                "-".into()
            } else {
                plus_minus_ci(&vs_acc, 100.0, 2)
            },
            if is_base {
                "-".into()
            } else {
                say(&vs_acc, "more accurate", "less accurate")
            }
        )?;
    }
    writeln!(
        md,
        "\nA setting no attack applied to shows `-` (it is drawn at the baseline). \"not resolved\" \
         is what it says: the sweep's seeds do not tell the two apart.\n"
    )?;
    Ok(())
}

fn markdown(layout: &SweepLayout, s: &SweepSummary, drawn: &Drawn) -> Result<String> {
    let sweep_file = std::fs::read_to_string(layout.sweep_file()).unwrap_or_default();
    let cells: usize = s.settings.iter().map(|x| x.seeds).sum();
    let mut md = String::new();
    writeln!(md, "# Sweep report: {}\n", layout.root().display())?;
    writeln!(
        md,
        "{cells} cells finished ({} settings).\n",
        s.settings.len()
    )?;
    writeln!(md, "## Privacy / utility\n")?;
    write!(
        md,
        "| setting | defense | epsilon | seeds | final accuracy (%) | jigsaw accuracy (%) | consistency (%) | strongest attack PSNR (dB) |"
    )?;
    for a in &s.attacks {
        write!(
            md,
            " {a} PSNR mean (dB) | {a} PSNR median | {a} SSIM | {a} > 20 dB (%) |"
        )?;
    }
    writeln!(md, " label acc (%) |")?;
    write!(md, "|---|---|---:|---:|---:|---:|---:|---:|")?;
    for _ in &s.attacks {
        write!(md, "---:|---:|---:|---:|")?;
    }
    writeln!(md, "---:|")?;
    for x in &s.settings {
        write!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            x.setting,
            x.defense.label(),
            if x.epsilon.is_empty() && x.defense.client.is_private() {
                "no finite value".to_string()
            } else {
                plus_minus_ci(&x.epsilon, 1.0, 2)
            },
            x.seeds,
            plus_minus_ci(&x.acc, 100.0, 2),
            plus_minus_ci(&x.jig, 100.0, 2),
            plus_minus_ci(&x.cons, 100.0, 2),
            plus_minus_ci(&x.strongest, 1.0, 2)
        )?;
        let mut labels = Vec::new();
        for a in &s.attacks {
            match x.attacks.get(a) {
                Some(v) => {
                    let col = |f: fn(&CellAttack) -> f64| v.iter().map(f).collect::<Vec<_>>();
                    // Every attack uses the labels recovered once per update: one column's worth.
                    if labels.is_empty() {
                        labels.extend(col(|c| c.label_accuracy));
                    }
                    write!(
                        md,
                        " {} | {} | {} | {} |",
                        plus_minus_ci(&col(|c| c.mean_psnr), 1.0, 2),
                        plus_minus_ci(&col(|c| c.median_psnr), 1.0, 2),
                        plus_minus_ci(&col(|c| c.ssim), 1.0, 3),
                        plus_minus_ci(&col(|c| c.recovered), 100.0, 0)
                    )?;
                }
                None => write!(md, " - | - | - | - |")?,
            }
        }
        writeln!(md, " {} |", plus_minus_ci(&labels, 100.0, 1))?;
    }
    writeln!(
        md,
        "\n± is the half-width of the 95% confidence interval over seeds (Student's t). PSNR/SSIM \
         are against the original private image; the strongest attack is, per seed, the best \
         mean PSNR of any attack but the mean-image baseline. epsilon: the largest of any \
         client at the end (local DP, delta as configured), `-` without noise, no finite value \
         where the noise is so small that opendp's conversion of the composed zCDP gives none.\n"
    )?;
    let unattacked: Vec<&str> = s
        .settings
        .iter()
        .filter(|x| x.strongest.is_empty() && !x.baseline.is_empty())
        .map(|x| x.setting.as_str())
        .collect();
    if !unattacked.is_empty() {
        writeln!(
            md,
            "No attack of this sweep applied to the updates of {} (a strongest attack of `-`: for \
             example `fedavg-ig` simulates one client, and the secure-aggregation view shows the \
             adversary only the round's sum); the frontier draws them at the mean-image \
             baseline, what an attacker can always produce, which is not evidence that nothing \
             stronger exists.\n",
            unattacked
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    write_paired(&mut md, s)?;
    writeln!(md, "## Plots\n")?;
    writeln!(md, "![accuracy vs round](plots/accuracy_vs_round.png)\n")?;
    for a in &s.attacks {
        if layout
            .plots()
            .join(format!("psnr_vs_round_{a}.png"))
            .exists()
        {
            writeln!(md, "![{a} PSNR vs round](plots/psnr_vs_round_{a}.png)\n")?;
        }
    }
    writeln!(md, "![PSNR vs shuffle ratio](plots/psnr_vs_ratio.png)\n")?;
    if drawn.main_attack.is_some() {
        writeln!(md, "![privacy/utility](plots/privacy_utility.png)\n")?;
    }
    if layout.plots().join("frontier.png").exists() {
        writeln!(
            md,
            "The privacy/utility frontier against the strongest attacker: one point per setting, \
             95% CIs on both axes, MJP joined by shuffle ratio, local DP by noise multiplier.\n\n\
             ![frontier](plots/frontier.png)\n"
        )?;
    }
    if !drawn.montage.is_empty() {
        writeln!(
            md,
            "Reconstructions of the same private image under each setting (rows; columns: original | what the model saw | each attack):\n\n![montage](plots/montage.png)\n"
        )?;
    }
    writeln!(
        md,
        "SVG versions of every plot are next to the PNGs; per-round numbers are in summary.csv / summary.json.\n"
    )?;
    writeln!(md, "## Sweep file\n\n```toml\n{sweep_file}```")?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(name: &str, pe: &str, seeds: &[(u64, f64, f64, f64)]) -> SettingStats {
        SettingStats {
            setting: name.into(),
            pe: pe.into(),
            ratio: None,
            defense: Default::default(),
            seeds: seeds.len(),
            epsilon: vec![],
            strongest: vec![],
            baseline: vec![],
            acc: vec![],
            jig: vec![],
            cons: vec![],
            attacks: BTreeMap::new(),
            per_seed: seeds
                .iter()
                .map(|&(seed, accuracy, strongest, baseline)| {
                    (
                        seed,
                        SeedFigures {
                            accuracy: Some(accuracy),
                            strongest: Some(strongest),
                            baseline: Some(baseline),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn differences_are_paired_by_seed_and_judged_by_their_interval() {
        // Per-seed PSNRs that spread over 3 dB, and a paired gap that barely moves.
        let learned = setting(
            "learned",
            "learned",
            &[
                (1, 0.70, 11.0, 10.0),
                (2, 0.72, 12.0, 10.6),
                (3, 0.68, 14.1, 11.8),
            ],
        );
        let mjp = setting(
            "mjp 0.25",
            "mjp",
            &[
                (1, 0.69, 8.4, 10.0),
                (2, 0.73, 7.9, 10.6),
                (3, 0.66, 9.6, 11.8),
                (4, 0.7, 9.0, 11.0),
            ],
        );
        let d = paired(&mjp.per_seed, &learned.per_seed, |f| f.strongest);
        assert_eq!(d.len(), 3, "seed 4 has no partner");
        assert!((d[0] + 2.6).abs() < 1e-9 && (d[2] + 4.5).abs() < 1e-9);
        assert_eq!(resolved(&d), Some(false));
        assert_eq!(resolved(&[1.0, -1.0, 0.5]), None);
        assert_eq!(resolved(&[2.0]), None, "one seed decides nothing");
        let s = SweepSummary {
            rows: vec![],
            settings: vec![mjp, learned],
            attacks: vec![],
            accuracy_curves: BTreeMap::new(),
            psnr_curves: BTreeMap::new(),
        };
        let mut md = String::new();
        write_paired(&mut md, &s).unwrap();
        assert!(md.contains("Reference: `learned`"), "{md}");
        assert!(md.contains("the same in every setting"), "{md}");
        let row = md.lines().find(|l| l.starts_with("| mjp 0.25 |")).unwrap();
        assert!(
            row.contains("**below the baseline**") && row.contains("**less leaked**"),
            "{row}"
        );
        assert!(
            row.contains("not resolved"),
            "accuracy within the CI: {row}"
        );
    }
}

//! `mjpfl attack`: study single cases offline. Either attack a saved update (from an adversary run
//! with `--save-updates`) against the checkpoint it was computed from, or make FedSGD updates
//! from real images (an image file, or N images of a dataset) with a model and an MJP setting,
//! attack each, score it and print the table.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use mjp::data::{DataSource, Dataset, Split};
use mjp::fl::{AuditRecord, ModelUpdate, ObservedUpdate, RoundConfig, local_update};
use mjp::{NamedTensors, Seed, Vit};
use mjpfl_attacks::adversary::{Adversary, UpdateRecord};

use crate::adversary::AttackArgs;
use crate::common::ModelArgs;

/// Arguments of `mjpfl attack`.
#[derive(Args, Debug)]
pub struct AttackCmdArgs {
    /// A saved update (`attacks/round-N/client.update.safetensors`) to attack.
    #[arg(long, conflicts_with_all = ["image", "images"])]
    update: Option<PathBuf>,
    /// An image file to make a FedSGD update from.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Label of --image (default: class 0).
    #[arg(long, default_value_t = 0)]
    label: u32,
    /// A dataset to take --count images from (e.g. folder:data/attack-targets/cifar10).
    #[arg(long)]
    images: Option<DataSource>,
    /// How many images of --images.
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Split of --images.
    #[arg(long, default_value = "test")]
    split: String,
    /// Data directory.
    #[arg(long, env = "MJPFL_DATA", default_value = "data")]
    data_dir: PathBuf,
    /// Model weights: an mjpfl checkpoint (a run's `checkpoints/round-NNNN.safetensors`);
    /// without it, a fresh model from --preset/--pe (initialisation).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// MJP shuffle ratio of the made updates.
    #[arg(long, default_value_t = 0.1)]
    ratio: f64,
    /// Local batch size of the made updates.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// DAL weight of the made updates.
    #[arg(long, default_value_t = 0.01)]
    dal_lambda: f64,
    /// Seed (model init, jigsaws).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory.
    #[arg(long, default_value = "runs/attack")]
    out: PathBuf,
    #[command(flatten)]
    attacks: AttackArgs,
}

pub fn run(args: AttackCmdArgs) -> Result<()> {
    let device = mjp::DeviceSpec::Flex.device()?.autodiff();
    let model = match &args.checkpoint {
        Some(p) => mjp::checkpoint::Checkpoint::read(p)?.into_model(&device)?,
        None => Vit::new(
            &args.model.config()?,
            Seed(args.seed).child("attack-model", 0),
            &device,
        ),
    };
    let vit = model.config().clone();
    let global = NamedTensors::from_module(&model);
    let mean = crate::adversary::public_mean_image(&DataSource::FashionMnist, &args.data_dir, &vit)
        .filter(|m| m.len() == vit.channels * vit.image_size * vit.image_size);
    let audit_dir = args.out.join("audit");
    let mut config = args.attacks.config(&args.out, mean)?;
    config.audit_dir = Some(audit_dir.clone());
    config.max_per_round = 0;
    config.every_rounds = 1;
    let mut adversary = Adversary::new(vit.clone(), config);
    let mut records = Vec::new();
    if let Some(path) = &args.update {
        let (tensors, meta) = NamedTensors::load(path)?;
        let round_config: RoundConfig = serde_json::from_str(
            meta.get("mjpfl.round_config")
                .context("update file lacks mjpfl.round_config")?,
        )?;
        let get = |k: &str| meta.get(k).and_then(|v| v.parse::<u32>().ok()).unwrap_or(1);
        let observed = ObservedUpdate {
            sequence: 0,
            client_id: path.file_stem().map_or("update".into(), |s| {
                s.to_string_lossy().replace(".update", "")
            }),
            accepted: true,
            dropped_before: 0,
            config: round_config.clone(),
            update: std::sync::Arc::new(ModelUpdate {
                round: 0,
                model_version: 0,
                kind: round_config.update_kind,
                batch_size: get("mjpfl.batch_size"),
                num_examples: u64::from(get("mjpfl.batch_size")),
                local_steps: get("mjpfl.local_steps"),
                metrics: BTreeMap::new(),
                tensors,
            }),
        };
        records.push(adversary.attack(&observed, &global)?);
    } else {
        let data = match (&args.image, &args.images) {
            (Some(p), _) => Dataset {
                name: p.display().to_string(),
                channels: vit.channels,
                size: vit.image_size,
                num_classes: vit.num_classes,
                images: mjp::data::load_image(p, vit.channels, vit.image_size)?,
                labels: vec![args.label],
            },
            (None, Some(src)) => {
                let split = if args.split == "train" {
                    Split::Train
                } else {
                    Split::Test
                };
                src.load(split, &args.data_dir)?
                    .take(args.count)
                    .conform(vit.channels, vit.image_size)?
            }
            (None, None) => bail!("give --update, --image or --images"),
        };
        let b = args.batch.max(1);
        for (k, chunk) in (0..data.len()).collect::<Vec<_>>().chunks(b).enumerate() {
            let part = data.subset(chunk);
            let rc = RoundConfig::fedsgd(
                b as u32,
                args.ratio,
                args.dal_lambda,
                Seed(args.seed).child("attack-case", k as u64).0,
            );
            let client = format!("case-{k:03}");
            let local = local_update(&model, &part, 0, 0, &client, &rc, &device)?;
            let audit = AuditRecord { ..local.audit };
            mjpfl_client::runner::write_audit(&audit_dir, &audit)?;
            let observed = ObservedUpdate {
                sequence: k as u64,
                client_id: client,
                accepted: true,
                dropped_before: 0,
                config: rc,
                update: std::sync::Arc::new(local.update),
            };
            let rec = adversary.attack(&observed, &global)?;
            print_record(&rec);
            records.push(rec);
        }
    }
    adversary.finish()?;
    print_table(&records);
    println!(
        "records and pictures under {}",
        args.out.join("attacks").display()
    );
    Ok(())
}

fn print_record(r: &UpdateRecord) {
    let parts: Vec<String> = r
        .attacks
        .iter()
        .map(|a| match (&a.scores, &a.skipped) {
            (Some(s), _) => format!("{} {:.1} dB", a.attack, s.mean_psnr),
            (None, Some(why)) => format!("{} skipped ({why})", a.attack),
            _ => format!("{} unscored", a.attack),
        })
        .collect();
    println!(
        "{}: labels {:?} ({}) | {}",
        r.client_id,
        r.recovered_labels,
        r.label_accuracy
            .map_or("-".into(), |a| format!("{:.0}%", 100.0 * a)),
        parts.join(", ")
    );
}

/// Mean over records per attack: PSNR vs original, vs seen, SSIM; and label accuracy.
pub fn print_table(records: &[UpdateRecord]) {
    let mut names: Vec<String> = Vec::new();
    for r in records {
        for a in &r.attacks {
            if !names.contains(&a.attack) {
                names.push(a.attack.clone());
            }
        }
    }
    let labels: Vec<f64> = records.iter().filter_map(|r| r.label_accuracy).collect();
    println!(
        "\n{} updates; label recovery accuracy {:.1}%",
        records.len(),
        100.0 * labels.iter().sum::<f64>() / labels.len().max(1) as f64
    );
    println!(
        "{:<16} {:>6} {:>10} {:>10} {:>8} {:>12} {:>8}",
        "attack", "scored", "PSNR mean", "PSNR med", "SSIM", "PSNR (seen)", "s/case"
    );
    for name in names {
        let rows: Vec<_> = records
            .iter()
            .flat_map(|r| r.attacks.iter())
            .filter(|a| a.attack == name)
            .collect();
        let scores: Vec<_> = rows.iter().filter_map(|a| a.scores.as_ref()).collect();
        if scores.is_empty() {
            println!("{name:<16} {:>6}", 0);
            continue;
        }
        let mut p: Vec<f64> = scores.iter().map(|s| s.mean_psnr).collect();
        p.sort_by(f64::total_cmp);
        let n = scores.len() as f64;
        println!(
            "{name:<16} {:>6} {:>10.2} {:>10.2} {:>8.3} {:>12.2} {:>8.1}",
            scores.len(),
            p.iter().sum::<f64>() / n,
            p[p.len() / 2],
            scores.iter().map(|s| s.mean_ssim).sum::<f64>() / n,
            scores.iter().map(|s| s.mean_psnr_seen).sum::<f64>() / n,
            rows.iter().map(|a| a.seconds).sum::<f64>() / rows.len() as f64
        );
    }
}

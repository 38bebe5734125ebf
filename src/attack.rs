//! `mjpfl attack`: arguments of an offline attack (a saved update, or FedSGD or FedAvg updates
//! made from real images; see `mjpfl_lab::offline`) and the printed table.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use mjp::data::{DataSource, Split};
use mjp::layout::RunLayout;
use mjpfl_attacks::recorder::UpdateRecord;
use mjpfl_attacks::stats::{label_recovery, per_attack};
use mjpfl_lab::offline::{ImageSource, OfflineJob, Target, run_offline};

use crate::adversary::AttackArgs;
use crate::common::{DeviceArgs, ModelArgs};

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
    /// Make FedAvg updates instead of FedSGD gradients: each client holds --client-size of the
    /// images and trains this many local epochs of plain SGD (batch --batch, lr --local-lr).
    #[arg(long)]
    fedavg_epochs: Option<u32>,
    /// Images per client of --fedavg-epochs updates.
    #[arg(long, default_value_t = 8)]
    client_size: usize,
    /// Client learning rate of --fedavg-epochs updates.
    #[arg(long, default_value_t = 0.1)]
    local_lr: f64,
    /// DAL weight of the made updates.
    #[arg(long, default_value_t = 0.01)]
    dal_lambda: f64,
    /// Client defense of the made updates: prune this fraction of each tensor's smallest entries.
    #[arg(long, default_value_t = 0.0)]
    prune: f64,
    /// Client defense: clip each made update to this L2 norm (0: none).
    #[arg(long, default_value_t = 0.0)]
    clip_norm: f64,
    /// Client defense: Gaussian noise of this multiple of --clip-norm (local DP).
    #[arg(long, default_value_t = 0.0)]
    noise_multiplier: f64,
    /// Seed (model init, jigsaws).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory.
    #[arg(long, default_value = "runs/attack")]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    attacks: AttackArgs,
}

/// `mjpfl attack`.
pub fn run(args: AttackCmdArgs) -> Result<()> {
    let target = match (&args.update, &args.image, &args.images) {
        (Some(p), _, _) => Target::SavedUpdate(p.clone()),
        (None, Some(p), _) => Target::Images(ImageSource::File {
            path: p.clone(),
            label: args.label,
        }),
        (None, None, Some(src)) => Target::Images(ImageSource::Dataset {
            source: src.clone(),
            split: match args.split.as_str() {
                "train" => Split::Train,
                "test" => Split::Test,
                other => bail!("--split {other}: train or test"),
            },
            count: args.count,
        }),
        (None, None, None) => bail!("give --update, --image or --images"),
    };
    let job = OfflineJob {
        target,
        checkpoint: args.checkpoint.clone(),
        vit: args.model.config()?,
        ratio: args.ratio,
        batch: args.batch,
        fedavg: args
            .fedavg_epochs
            .map(|epochs| mjpfl_lab::offline::LocalTraining {
                client_size: args.client_size,
                epochs,
                lr: args.local_lr,
            }),
        dal_lambda: args.dal_lambda,
        defense: {
            let d = mjp::Defense {
                prune_fraction: args.prune,
                clip_norm: args.clip_norm,
                noise_multiplier: args.noise_multiplier,
            };
            d.validate().map_err(anyhow::Error::msg)?;
            d
        },
        seed: args.seed,
        data_dir: args.data_dir.clone(),
        out: args.out.clone(),
        settings: args.attacks.settings().unwrap_or_default(),
        device: args.device.device,
    };
    let records = run_offline(&job, print_record)?;
    print_table(&records);
    println!(
        "records and pictures under {}",
        RunLayout::new(&args.out).attacks().dir().display()
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

/// Per update where both are scored: the attack's mean PSNR minus the mean-image baseline's on
/// the same images (a paired difference: the images' own spread cancels).
fn against_baseline(records: &[UpdateRecord], attack: &str) -> Vec<f64> {
    let psnr = |r: &UpdateRecord, name: &str| {
        r.attacks
            .iter()
            .find(|a| a.attack == name)
            .and_then(|a| a.scores.as_ref())
            .map(|s| s.mean_psnr)
    };
    records
        .iter()
        .filter_map(|r| Some(psnr(r, attack)? - psnr(r, mjpfl_attacks::regime::BASELINE)?))
        .collect()
}

/// Per attack: updates scored, PSNR mean and median, SSIM, PSNR against what the model saw,
/// seconds per case and the paired difference to the mean-image baseline; then label recovery.
fn print_table(records: &[UpdateRecord]) {
    println!(
        "\n{} updates; label recovery accuracy {:.1}%",
        records.len(),
        label_recovery(records).map_or(0.0, |(a, _)| 100.0 * a)
    );
    println!(
        "{:<16} {:>6} {:>10} {:>10} {:>8} {:>8} {:>12} {:>8}  - mean image, paired (dB, 95% CI)",
        "attack", "scored", "PSNR mean", "PSNR med", ">20 dB", "SSIM", "PSNR (seen)", "s/case"
    );
    for s in per_attack(records) {
        if s.scored == 0 {
            println!("{:<16} {:>6}", s.attack, 0);
            continue;
        }
        let paired = if s.attack == mjpfl_attacks::regime::BASELINE {
            Vec::new()
        } else {
            against_baseline(records, &s.attack)
        };
        println!(
            "{:<16} {:>6} {:>10.2} {:>10.2} {:>7.0}% {:>8.3} {:>12.2} {:>8.1}  {}",
            s.attack,
            s.scored,
            s.mean_psnr,
            s.median_image_psnr,
            100.0 * s.recovered_fraction,
            s.mean_ssim,
            s.mean_psnr_seen,
            s.mean_seconds,
            mjpfl_lab::stats::plus_minus_ci(&paired, 1.0, 2)
        );
    }
}

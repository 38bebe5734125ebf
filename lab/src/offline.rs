//! Single cases studied offline (`mjpfl attack`): attack a saved update (from an adversary run
//! with `save_updates`) against the checkpoint it was computed from, or make updates from real
//! images (an image file, or N images of a dataset) with a model and an MJP setting, and attack
//! each: FedSGD gradients of one batch, or FedAvg deltas of clients of n images training a few
//! local epochs of SGD. Results land in a run-directory layout under the output directory.

use std::path::PathBuf;

use mjp::data::{DataSource, Dataset, Split};
use mjp::fl::{ObservedUpdate, RoundConfig, local_update};
use mjp::layout::RunLayout;
use mjp::{DeviceSpec, NamedTensors, Seed, Vit, VitConfig};
use mjpfl_attacks::recorder::{UpdateRecord, load_update};
use mjpfl_attacks::{Adversary, AdversaryConfig, AdversarySettings};

use crate::error::Result;
use crate::feed::public_mean_image;

/// What to attack.
#[derive(Clone, Debug)]
pub enum Target {
    /// A saved update (`attacks/round-N/<client>.update.safetensors`).
    SavedUpdate(PathBuf),
    /// FedSGD updates made from images.
    Images(ImageSource),
}

/// Where the images of made updates come from.
#[derive(Clone, Debug)]
pub enum ImageSource {
    /// One image file with its label.
    File {
        /// The file.
        path: PathBuf,
        /// Its label.
        label: u32,
    },
    /// The first `count` images of a dataset split.
    Dataset {
        /// The dataset.
        source: DataSource,
        /// Which split.
        split: Split,
        /// How many images.
        count: usize,
    },
}

/// The local training of made FedAvg updates: plain SGD, the regime the FedAvg-aware attack
/// simulates (cross-device clients).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalTraining {
    /// Images per client.
    pub client_size: usize,
    /// Local epochs.
    pub epochs: u32,
    /// Client learning rate.
    pub lr: f64,
}

/// An offline attack job.
#[derive(Clone, Debug)]
pub struct OfflineJob {
    /// What to attack.
    pub target: Target,
    /// Model weights: a run's checkpoint; without it, a fresh model of `vit`.
    pub checkpoint: Option<PathBuf>,
    /// The architecture of a fresh model.
    pub vit: VitConfig,
    /// MJP shuffle ratio of made updates.
    pub ratio: f64,
    /// Batch size of made updates.
    pub batch: usize,
    /// Made updates are FedAvg deltas of clients that train locally (else FedSGD gradients of
    /// one batch each).
    pub fedavg: Option<LocalTraining>,
    /// DAL weight of made updates.
    pub dal_lambda: f64,
    /// What each made update's client does to it before the adversary sees it.
    pub defense: mjp::Defense,
    /// Seed (model init, jigsaws).
    pub seed: u64,
    /// Directory that scripts/fetch-data.sh filled (images and the public mean image).
    pub data_dir: PathBuf,
    /// Output directory (a run-directory layout: attacks/, audit/).
    pub out: PathBuf,
    /// The attacks (every update is attacked).
    pub settings: AdversarySettings,
    /// Where the model and the attacks compute.
    pub device: DeviceSpec,
}

/// Runs the job; `each` sees every record as it is made.
pub fn run_offline(
    job: &OfflineJob,
    mut each: impl FnMut(&UpdateRecord),
) -> Result<Vec<UpdateRecord>> {
    let device = job.device.device()?.autodiff();
    let model = match &job.checkpoint {
        Some(p) => mjp::checkpoint::Checkpoint::read(p)?.into_model(&device)?,
        None => Vit::new(&job.vit, Seed(job.seed).child("attack-model", 0), &device),
    };
    let vit = model.config().clone();
    let global = NamedTensors::from_module(&model);
    let mean = public_mean_image(&DataSource::FashionMnist, &job.data_dir, &vit)
        .filter(|m| m.len() == vit.channels * vit.image_size * vit.image_size);
    let run = RunLayout::new(&job.out);
    let settings = AdversarySettings {
        max_per_round: 0,
        every_rounds: 1,
        ..job.settings.clone()
    };
    let mut adversary = Adversary::new(
        vit.clone(),
        AdversaryConfig {
            settings,
            run: run.clone(),
            mean_image: mean,
            device: job.device,
        },
    )?;
    let mut records = Vec::new();
    match &job.target {
        Target::SavedUpdate(path) => {
            let observed = load_update(path)?;
            let rec = adversary.attack(&observed, &global)?;
            each(&rec);
            records.push(rec);
        }
        Target::Images(source) => {
            let data = match source {
                ImageSource::File { path, label } => Dataset {
                    name: path.display().to_string(),
                    channels: vit.channels,
                    size: vit.image_size,
                    num_classes: vit.num_classes,
                    images: mjp::data::load_image(path, vit.channels, vit.image_size)?,
                    labels: vec![*label],
                },
                ImageSource::Dataset {
                    source,
                    split,
                    count,
                } => source
                    .load(*split, &job.data_dir)?
                    .take(*count)
                    .conform(vit.channels, vit.image_size)?,
            };
            let b = job.batch.max(1);
            let per_client = job.fedavg.map_or(b, |f| f.client_size.max(1));
            if job.fedavg.is_some() && data.len() < per_client {
                return Err(crate::error::LabError::Message(format!(
                    "{} images cannot fill one client of {per_client}",
                    data.len()
                )));
            }
            let audit = run.audit();
            // Whole clients only: a FedAvg client smaller than the others would be another regime.
            let usable = data.len() - data.len() % per_client;
            let indices: Vec<usize> = (0..usable).collect();
            for (k, chunk) in indices.chunks(per_client).enumerate() {
                let part = data.subset(chunk);
                let seed = Seed(job.seed).child("attack-case", k as u64).0;
                let mut rc = RoundConfig::fedsgd(b as u32, job.ratio, job.dal_lambda, seed);
                if let Some(f) = job.fedavg {
                    rc.update_kind = mjp::fl::UpdateKind::FedAvg;
                    rc.local_epochs = f.epochs.max(1);
                    rc.learning_rate = f.lr;
                }
                rc.defense = job.defense;
                let client = format!("case-{k:03}");
                let mut local = local_update(&model, &part, 0, 0, &client, &rc, &device)?;
                // As a client does before upload; the noise seed is the job's, not the case's.
                let mut noise = mjp::defense::noise_rng(Some(job.seed), seed);
                mjp::defense::apply(&rc.defense, &mut local.update.tensors, &mut noise);
                mjpfl_client::runner::write_audit(&audit, &local.audit)?;
                let observed = ObservedUpdate {
                    sequence: k as u64,
                    client_id: client,
                    accepted: true,
                    dropped_before: 0,
                    contributors: Vec::new(),
                    config: rc,
                    update: std::sync::Arc::new(local.update),
                };
                let rec = adversary.attack(&observed, &global)?;
                each(&rec);
                records.push(rec);
            }
        }
    }
    adversary.finish()?;
    Ok(records)
}

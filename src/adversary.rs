//! `mjpfl adversary`, and the attack flags every command with an adversary shares.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use mjp::DeviceSpec;
use mjp::data::DataSource;
use mjp::layout::RunLayout;
use mjpfl_attacks::{AdversaryConfig, AdversarySettings};
use mjpfl_lab::feed::{AttackWorker, Remote, public_mean_image};
use mjpfl_lab::runtime::{ctrl_c_or_term, runtime};

/// Which attacks the adversary runs, on which updates (defaults: `AdversarySettings`).
#[derive(Args, Debug, Clone)]
pub struct AttackArgs {
    /// Attacks, comma-separated: april, april-mjp, april-mjp-ig, ig, ig-pe, ig-pe-adaptive, dlg,
    /// dlg-pe, fedavg-ig, mean-image [default: april,april-mjp,mean-image] (docs/attacks.md says
    /// what each does and where it applies).
    #[arg(long, value_delimiter = ',')]
    pub attacks: Option<Vec<String>>,
    /// Iterations of optimisation attacks [default: 1000].
    #[arg(long)]
    pub attack_iterations: Option<usize>,
    /// Learning rate of optimisation attacks (pixel space; default per attack).
    #[arg(long)]
    pub attack_lr: Option<f64>,
    /// Total-variation weight of optimisation attacks (default per attack).
    #[arg(long)]
    pub attack_tv: Option<f64>,
    /// Weight of the PE-gradient term of the `-pe` attacks.
    #[arg(long)]
    pub attack_pe_weight: Option<f64>,
    /// Weight of the patch-embedding-gradient term of the `-pe` attacks.
    #[arg(long)]
    pub attack_embed_weight: Option<f64>,
    /// Restarts of optimisation attacks (best by objective is kept).
    #[arg(long)]
    pub attack_restarts: Option<usize>,
    /// Average the restarts of optimisation attacks (matched by the best assignment) instead of
    /// keeping the best: group consistency's fusion step.
    #[arg(long)]
    pub attack_fuse_restarts: bool,
    /// Weight of the Gaussian prior towards the starting image (the public mean image) in
    /// optimisation attacks (default per attack).
    #[arg(long)]
    pub attack_prior: Option<f64>,
    /// Use plain (not signed) Adam in optimisation attacks.
    #[arg(long)]
    pub attack_unsigned: bool,
    /// Start optimisation attacks from pure noise instead of the public dataset-mean image
    /// plus noise (the default assumes the attacker knows the data's mean image, a public prior).
    #[arg(long)]
    pub attack_init_noise: bool,
    /// Passes of patch-owner refinement after optimisation attacks: swap the patches of one
    /// position between two images of a batch where that lowers the attack's loss.
    #[arg(long)]
    pub attack_patch_swaps: Option<usize>,
    /// Attack at most this many updates per round (0 = all) [default: 0].
    #[arg(long)]
    pub attack_max_per_round: Option<usize>,
    /// Attack only every n-th round [default: 1].
    #[arg(long)]
    pub attack_every: Option<u32>,
    /// Save each attacked update as safetensors (for `mjpfl attack`).
    #[arg(long)]
    pub save_updates: bool,
    /// Do not run the adversary.
    #[arg(long)]
    pub no_adversary: bool,
}

impl AttackArgs {
    /// The adversary's settings (`None` with `--no-adversary`).
    pub fn settings(&self) -> Option<AdversarySettings> {
        if self.no_adversary {
            return None;
        }
        let d = AdversarySettings::default();
        Some(AdversarySettings {
            attacks: self.attacks.clone().unwrap_or(d.attacks),
            iterations: self.attack_iterations.unwrap_or(d.iterations),
            max_per_round: self.attack_max_per_round.unwrap_or(d.max_per_round),
            every_rounds: self.attack_every.unwrap_or(d.every_rounds),
            lr: self.attack_lr,
            tv: self.attack_tv,
            pe_weight: self.attack_pe_weight,
            embed_weight: self.attack_embed_weight,
            restarts: self.attack_restarts,
            fuse_restarts: self.attack_fuse_restarts,
            prior_weight: self.attack_prior,
            unsigned: self.attack_unsigned,
            init_noise: self.attack_init_noise,
            patch_swaps: self.attack_patch_swaps,
            save_updates: self.save_updates,
        })
    }
}

/// Arguments of `mjpfl adversary`.
#[derive(Args, Debug)]
pub struct AdversaryArgs {
    #[command(flatten)]
    connect: crate::common::ConnectArgs,
    /// The coordinator's observer token.
    #[arg(long, env = "MJPFL_OBSERVER_TOKEN", default_value = "observer")]
    observer_token: String,
    /// Read the observer token from this file instead.
    #[arg(long, env = "MJPFL_OBSERVER_TOKEN_FILE")]
    observer_token_file: Option<PathBuf>,
    /// Run directory to write attacks/ into (and to read audit/ from, for scoring).
    #[arg(long, default_value = "runs/federation")]
    run_dir: PathBuf,
    /// Public dataset for the mean-image baseline.
    #[arg(long, default_value = "fashion-mnist")]
    data: DataSource,
    /// Data directory.
    #[arg(long, env = "MJPFL_DATA", default_value = "data")]
    data_dir: PathBuf,
    /// Where the attacks compute.
    #[arg(long, default_value = "flex")]
    device: DeviceSpec,
    /// Give up after the coordinator is unreachable this many seconds.
    #[arg(long, default_value_t = 120.0)]
    reconnect_for: f64,
    #[command(flatten)]
    attacks: AttackArgs,
}

/// `mjpfl adversary`: attack every update a remote coordinator intercepts.
pub fn run(args: AdversaryArgs) -> Result<()> {
    let Some(settings) = args.attacks.settings() else {
        println!("adversary: --no-adversary given; nothing to do");
        return Ok(());
    };
    let run = RunLayout::new(&args.run_dir);
    let target = args.connect.target(None)?;
    let token = match &args.observer_token_file {
        Some(p) => crate::common::read_secret(p)?,
        None => args.observer_token.clone(),
    };
    runtime()?.block_on(async {
        let reconnect = Duration::from_secs_f64(args.reconnect_for);
        let Some((source, vit)) = Remote::open(&target, &token, reconnect).await? else {
            println!("adversary: the coordinator closed the tap before any update");
            return Ok(());
        };
        let config = AdversaryConfig {
            mean_image: public_mean_image(&args.data, &args.data_dir, &vit),
            settings,
            run: run.clone(),
            device: args.device,
        };
        let signal = async {
            ctrl_c_or_term().await;
            println!("adversary: signal received; finishing the updates already queued");
        };
        let attacked = AttackWorker::spawn(vit, config)?
            .feed(source, signal)
            .await?;
        println!(
            "adversary: attacked {attacked} updates; results in {}",
            run.attacks().dir().display()
        );
        anyhow::Ok(())
    })?;
    // The coordinator may have written the report before the last attacks finished.
    if run.rounds().exists() {
        mjpfl_lab::report::write_run_report(&args.run_dir)?;
    }
    Ok(())
}

//! `mjpfl sweep` and `mjpfl report`: arguments and printing around `mjpfl_lab::sweep` and
//! `mjpfl_lab::report`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mjpfl_lab::grid::SweepFile;
use mjpfl_lab::runtime::{ctrl_c_or_term, runtime};
use mjpfl_lab::sweep::{CellSelection, SweepOptions, run_sweep};

/// Arguments of `mjpfl sweep`.
#[derive(Args, Debug)]
pub struct SweepArgs {
    /// The sweep file.
    #[arg(long)]
    config: PathBuf,
    /// Sweep directory (cells, summary, report).
    #[arg(long)]
    out: PathBuf,
    /// Override the file's `parallel`.
    #[arg(long)]
    parallel: Option<usize>,
    /// List the cells and exit.
    #[arg(long)]
    dry_run: bool,
    /// Where clients train and the adversary computes.
    #[arg(long, default_value = "flex")]
    device: mjp::DeviceSpec,
    /// Run only cell N (0-based, `--dry-run` order) or shard I/N (cells I, I+N, ...): one
    /// Slurm array task or Kubernetes Indexed Job pod each, on a shared sweep directory; then
    /// `mjpfl report OUT` merges them.
    #[arg(long, value_name = "N|I/N")]
    cell: Option<String>,
    /// How the cells' simulated clients move models and updates (`in-process` or `grpc`, as
    /// in `mjpfl simulate`).
    #[arg(long, default_value = "in-process")]
    transport: mjpfl_lab::ClientTransport,
}

/// `mjpfl sweep`.
pub fn run(args: SweepArgs) -> Result<()> {
    let file = SweepFile::load(&args.config)?;
    let cells = file.cells();
    println!(
        "sweep {}: {} cells",
        if file.name.is_empty() {
            "-"
        } else {
            &file.name
        },
        cells.len()
    );
    if args.dry_run {
        for (i, c) in cells.iter().enumerate() {
            println!("  {i:>3}  {}", c.id);
        }
        return Ok(());
    }
    let options = SweepOptions {
        parallel: args.parallel,
        device: args.device,
        select: args.cell.as_deref().map(CellSelection::parse).transpose()?,
        transport: args.transport,
    };
    let outcome = runtime()?.block_on(run_sweep(
        &file,
        &args.config,
        &args.out,
        &options,
        ctrl_c_or_term(),
    ))?;
    println!(
        "sweep finished in {:.1} min ({} cells run, {} already done); report {}",
        outcome.seconds / 60.0,
        outcome.ran,
        outcome.already_done,
        mjp::layout::SweepLayout::new(&args.out).report().display()
    );
    Ok(())
}

/// `mjpfl report DIR`: regenerates the report of a run directory or a sweep directory.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A run directory (rounds.jsonl) or a sweep directory (cells/).
    dir: PathBuf,
}

/// `mjpfl report`.
pub fn report(args: ReportArgs) -> Result<()> {
    let path = mjpfl_lab::report::write_report(&args.dir)?;
    println!("wrote {}", path.display());
    Ok(())
}

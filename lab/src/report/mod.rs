//! Reports regenerated from what is on disk: `run` for one federation's run directory, `sweep`
//! for a sweep directory (tables, CSV/JSON, plots, montage).

pub mod run;
pub mod sweep;

pub use run::write_run_report;
pub use sweep::write_sweep_report;

use std::path::Path;

use mjp::layout::{RunLayout, SweepLayout};

use crate::bail;
use crate::error::Result;

/// Regenerates the report of `dir`, a run or a sweep directory; returns the report's path.
pub fn write_report(dir: &Path) -> Result<std::path::PathBuf> {
    let sweep = SweepLayout::new(dir);
    let run = RunLayout::new(dir);
    if sweep.is_sweep() {
        write_sweep_report(dir)?;
        Ok(sweep.report())
    } else if run.is_run() {
        write_run_report(dir)?;
        Ok(run.report())
    } else {
        bail!(
            "{} is neither a run directory (rounds.jsonl) nor a sweep directory (cells/)",
            dir.display()
        )
    }
}

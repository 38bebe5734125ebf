//! Running a sweep: a grid of full federations (with the adversary) answering "what does MJP
//! cost and what does it buy, at which shuffle ratio?" (the grid itself: [`crate::grid`]). Each
//! cell runs in its own run directory of the sweep directory; finished cells (with a DONE
//! marker) are skipped on restart, a crashed cell is rerun from scratch, and only finished cells
//! enter the report.

use std::future::Future;
use std::path::Path;
use std::time::Instant;

use mjp::layout::SweepLayout;

use crate::grid::{Cell, CellDone, SweepFile};

use crate::bail;
use crate::error::{Context, LabError, Result};
use crate::runtime::progress_bar;
use crate::simulate::{SimulationOptions, run_simulation};

/// How a sweep runs.
#[derive(Clone, Debug)]
pub struct SweepOptions {
    /// Cells running at the same time (the file's `parallel` when `None`).
    pub parallel: Option<usize>,
    /// Where clients train and the adversary computes.
    pub device: mjp::DeviceSpec,
}

/// What a sweep did.
#[derive(Clone, Debug)]
pub struct SweepOutcome {
    /// Cells in the grid.
    pub cells: usize,
    /// Cells finished before this run.
    pub already_done: usize,
    /// Cells finished by this run.
    pub ran: usize,
    /// Wall time.
    pub seconds: f64,
}

/// Runs every unfinished cell of `file` into `out` (the sweep file at `file_path` is copied
/// there), `parallel` at a time, then writes the report. `shutdown` stops the cells running
/// (their directories stay unfinished and rerun next time) and skips the rest.
pub async fn run_sweep(
    file: &SweepFile,
    file_path: &Path,
    out: &Path,
    options: &SweepOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<SweepOutcome> {
    let layout = SweepLayout::new(out);
    let cells = file.cells();
    std::fs::create_dir_all(layout.cells())
        .with_context(|| format!("creating {}", layout.cells().display()))?;
    std::fs::copy(file_path, layout.sweep_file()).context("copying the sweep file")?;
    let parallel = options.parallel.unwrap_or(file.parallel).max(1);
    let started = Instant::now();
    let todo: Vec<Cell> = cells
        .iter()
        .filter(|c| !layout.done_marker(&c.id).exists())
        .cloned()
        .collect();
    let already_done = cells.len() - todo.len();
    println!(
        "{already_done} finished already, {} to run, {parallel} at a time",
        todo.len()
    );
    let bar = progress_bar(
        cells.len() as u64,
        "cells [{bar:30}] {pos}/{len} {msg} (elapsed {elapsed}, eta {eta})",
    );
    bar.set_position(already_done as u64);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    let mut ran = 0;
    for batch in todo.chunks(parallel) {
        let mut runs = tokio::task::JoinSet::new();
        for mut cell in batch.iter().cloned() {
            cell.config.server.device = options.device;
            let mut stop = stop_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let options = SimulationOptions {
                audit: true,
                train_concurrency: 1,
                adversary: (!file.adversary.attacks.is_empty()).then(|| file.adversary.clone()),
                device: options.device,
            };
            let layout = layout.clone();
            runs.spawn(async move { run_cell(&layout, cell, options, stopped).await });
        }
        let mut results = Vec::new();
        loop {
            tokio::select! {
                next = runs.join_next() => match next {
                    Some(r) => results.push(
                        r.map_err(|e| LabError::Message(format!("sweep cell task: {e}")))??,
                    ),
                    None => break,
                },
                _ = &mut shutdown, if !*stop_tx.borrow() => {
                    println!("signal received: stopping the running cells (they rerun next time)");
                    let _ = stop_tx.send(true);
                }
            }
        }
        if *stop_tx.borrow() {
            bail!("sweep stopped by a signal; run it again to continue");
        }
        results.sort_by(|a: &CellDone, b| a.cell.id.cmp(&b.cell.id));
        for done in results {
            ran += 1;
            bar.inc(1);
            let line = format!(
                "cell {} done in {:.1} min ({:.1} min elapsed)",
                done.cell.id,
                done.seconds / 60.0,
                started.elapsed().as_secs_f64() / 60.0
            );
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
        }
    }
    bar.finish_and_clear();
    crate::report::write_sweep_report(out)?;
    Ok(SweepOutcome {
        cells: cells.len(),
        already_done,
        ran,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Runs one cell from scratch (a directory without DONE is a crashed cell) and marks it done.
async fn run_cell(
    layout: &SweepLayout,
    cell: Cell,
    options: SimulationOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<CellDone> {
    let run = layout.cell(&cell.id);
    if run.root().exists() {
        std::fs::remove_dir_all(run.root())
            .with_context(|| format!("clearing crashed cell {}", run.root().display()))?;
    }
    let t = Instant::now();
    run_simulation(cell.config.clone(), run.root(), options, shutdown).await?;
    crate::report::write_run_report(run.root())?;
    let done = CellDone {
        cell,
        seconds: t.elapsed().as_secs_f64(),
    };
    mjp::fsutil::write_atomic(
        &layout.done_marker(&done.cell.id),
        serde_json::to_string_pretty(&done)?.as_bytes(),
    )?;
    Ok(done)
}

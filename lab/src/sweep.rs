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
    /// Run only these cells (a Slurm array task, a Kubernetes Indexed Job pod, a shard); the
    /// report is then left to `mjpfl report` once every cell is done.
    pub select: Option<CellSelection>,
    /// How the cells' simulated clients move models and updates.
    pub transport: crate::simulate::ClientTransport,
}

/// Which cells of a sweep one process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellSelection {
    /// The cell of this index (0-based, in `mjpfl sweep --dry-run` order).
    Index(usize),
    /// Shard `index` of `count`: the cells whose index is `index` modulo `count`.
    Shard {
        /// This shard (0-based).
        index: usize,
        /// Shards in all.
        count: usize,
    },
}

impl CellSelection {
    /// Parses `N` (one cell) or `I/N` (a shard).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || LabError::Message(format!("cell selection `{s}`: expected N or I/N"));
        match s.split_once('/') {
            None => Ok(Self::Index(s.trim().parse().map_err(|_| bad())?)),
            Some((i, n)) => {
                let (index, count): (usize, usize) = (
                    i.trim().parse().map_err(|_| bad())?,
                    n.trim().parse().map_err(|_| bad())?,
                );
                if count == 0 || index >= count {
                    return Err(LabError::Message(format!("shard `{s}`: need 0 <= I < N")));
                }
                Ok(Self::Shard { index, count })
            }
        }
    }

    /// The indices it picks out of `cells` cells (an index past the end is an error).
    pub fn indices(&self, cells: usize) -> Result<Vec<usize>> {
        match *self {
            Self::Index(i) if i < cells => Ok(vec![i]),
            Self::Index(i) => Err(LabError::Message(format!(
                "cell {i} does not exist: the sweep has {cells} cells (0..{cells})"
            ))),
            Self::Shard { index, count } => Ok((index..cells).step_by(count).collect()),
        }
    }
}

/// What a sweep did.
#[derive(Clone, Debug)]
pub struct SweepOutcome {
    /// Cells this run was given (the whole grid, or its selection).
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
    // Array tasks write it at the same time: atomically, so none reads half a file.
    let text = std::fs::read(file_path).context("reading the sweep file")?;
    mjp::fsutil::write_atomic(&layout.sweep_file(), &text)?;
    let parallel = options.parallel.unwrap_or(file.parallel).max(1);
    let started = Instant::now();
    let mine: Vec<&Cell> = match options.select {
        None => cells.iter().collect(),
        Some(select) => select
            .indices(cells.len())?
            .into_iter()
            .map(|i| &cells[i])
            .collect(),
    };
    let todo: Vec<Cell> = mine
        .iter()
        .filter(|c| !layout.done_marker(&c.id).exists())
        .map(|c| (*c).clone())
        .collect();
    let already_done = mine.len() - todo.len();
    println!(
        "{already_done} finished already, {} to run, {parallel} at a time",
        todo.len()
    );
    let bar = progress_bar(
        mine.len() as u64,
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
                // One cell at a time: its clients share the cores; cells side by side: one
                // client of each at a time, as before.
                train_concurrency: if parallel <= 1 { 0 } else { 1 },
                adversary: (!file.adversary.attacks.is_empty()).then(|| file.adversary.clone()),
                device: options.device,
                transport: options.transport,
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
    let all_done = cells.iter().all(|c| layout.done_marker(&c.id).exists());
    if options.select.is_none() || all_done {
        crate::report::write_sweep_report(out)?;
    } else {
        println!(
            "cells of other tasks still running: `mjpfl report {}` merges them when all are done",
            out.display()
        );
    }
    Ok(SweepOutcome {
        cells: mine.len(),
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

#[cfg(test)]
mod tests {
    use super::CellSelection;

    #[test]
    fn selections_pick_cells_by_index_and_shard() {
        assert_eq!(
            CellSelection::parse("3").unwrap().indices(5).unwrap(),
            vec![3]
        );
        assert!(CellSelection::parse("5").unwrap().indices(5).is_err());
        let shard = CellSelection::parse("1/3").unwrap();
        assert_eq!(shard.indices(8).unwrap(), vec![1, 4, 7]);
        assert_eq!(
            CellSelection::parse("2/3").unwrap().indices(2).unwrap(),
            Vec::<usize>::new()
        );
        for bad in ["", "x", "3/3", "1/0", "-1"] {
            assert!(CellSelection::parse(bad).is_err(), "{bad}");
        }
    }
}

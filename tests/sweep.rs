//! Sweeps end to end (issue 15): named settings with defenses, run one cell at a time the way
//! Slurm array tasks and Kubernetes Indexed Job pods run them (`mjpfl sweep --cell N`) into one
//! sweep directory, and the report that merges the cells (real federations on loopback, real
//! data, real files).

use std::path::Path;

use mjpfl_lab::grid::SweepFile;
use mjpfl_lab::sweep::{CellSelection, SweepOptions, run_sweep};

const TINY: &str = "tests/fixtures/sweep-tiny.toml";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_run_one_by_one_into_one_directory_and_the_report_merges_them() {
    let file = SweepFile::load(Path::new(TINY)).unwrap();
    let cells = file.cells();
    let settings: Vec<&str> = cells.iter().map(|c| c.setting.as_str()).collect();
    assert_eq!(settings, ["learned", "mjp 0.5", "dp z=1"]);
    assert_eq!(cells[2].defense, "dp z=1 C=1");
    assert_eq!(cells[1].ratio, Some(0.5));
    let out = tempfile::tempdir().unwrap();
    let report = out.path().join("report.md");
    let options = |i| SweepOptions {
        parallel: None,
        device: mjp::DeviceSpec::Flex,
        select: Some(CellSelection::Index(i)),
        // What `mjpfl sweep` does by default (the federation tests cover the gRPC path).
        transport: mjpfl_lab::ClientTransport::InProcess,
    };
    // Out of order, as array tasks finish.
    for (k, i) in [2, 0, 1].into_iter().enumerate() {
        let outcome = run_sweep(
            &file,
            Path::new(TINY),
            out.path(),
            &options(i),
            std::future::pending(),
        )
        .await
        .unwrap();
        assert_eq!((outcome.cells, outcome.ran), (1, 1));
        assert_eq!(
            report.exists(),
            k == 2,
            "the report waits for the last cell"
        );
    }
    let md = std::fs::read_to_string(&report).unwrap();
    assert!(md.contains("3 cells finished (3 settings)"), "{md}");
    for row in [
        "| learned | none |",
        "| mjp 0.5 | none |",
        "| dp z=1 | dp z=1 C=1 |",
    ] {
        assert!(md.contains(row), "{row} missing:\n{md}");
    }
    assert!(out.path().join("plots/frontier.png").exists());
    assert!(md.contains("![frontier](plots/frontier.png)"), "{md}");
    // The DP setting reports its clients' epsilon; the others none.
    let dp_row = md.lines().find(|l| l.starts_with("| dp z=1 |")).unwrap();
    let eps: f64 = dp_row.split('|').nth(3).unwrap().trim().parse().unwrap();
    assert!(eps > 0.0 && eps.is_finite(), "{dp_row}");
    // A finished cell is not rerun; an index past the grid is refused.
    let again = run_sweep(
        &file,
        Path::new(TINY),
        out.path(),
        &options(0),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!((again.already_done, again.ran), (1, 0));
    assert!(
        run_sweep(
            &file,
            Path::new(TINY),
            out.path(),
            &options(3),
            std::future::pending()
        )
        .await
        .is_err()
    );
}

//! Client defenses and the secure-aggregation view end to end (issue 15): a real coordinator on
//! loopback whose `[defense]` schedule changes every round, real clients that apply it before
//! upload, and the adversary on the tap, which must see exactly what left the clients.

mod common;

use common::small_config;
use mjp::NamedTensors;
use mjp::fl::UpdateKind;
use mjp::layout::RunLayout;
use mjpfl_attacks::AdversarySettings;
use mjpfl_attacks::recorder::read_records;
use mjpfl_coordinator::privacy::zcdp_to_epsilon;
use mjpfl_coordinator::{DefensePhase, DefenseSchedule, rundir};
use mjpfl_lab::{SimulationOptions, run_simulation};

/// Round 1 clips to 1 and adds noise z = 0.5 (local DP), round 2 prunes 90%, round 3 shows the
/// adversary only the sum (secure-aggregation view).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defenses_change_per_round_apply_before_upload_and_secure_aggregation_shows_only_sums() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(3, 3);
    config.training.update_kind = UpdateKind::FedSgd;
    config.training.batch_size = 1;
    config.data.round_test_limit = 50;
    config.defense = DefenseSchedule {
        clip_norm: 1.0,
        noise_multiplier: 0.5,
        phases: vec![
            DefensePhase {
                from_round: 2,
                prune_fraction: Some(0.9),
                clip_norm: Some(0.0),
                noise_multiplier: Some(0.0),
                ..Default::default()
            },
            DefensePhase {
                from_round: 3,
                prune_fraction: Some(0.0),
                secure_aggregation: Some(true),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let options = SimulationOptions {
        adversary: Some(AdversarySettings {
            attacks: vec!["april".into(), "mean-image".into()],
            save_updates: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    run_simulation(config, dir.path(), options, std::future::pending())
        .await
        .unwrap();
    let rounds = rundir::read_rounds(dir.path()).unwrap();
    assert_eq!(rounds.len(), 3);
    assert!(rounds.iter().all(|r| r.aggregated.len() == 3));
    // rounds.jsonl says what each round did.
    assert_eq!(rounds[0].defense.label(), "dp z=0.5 C=1");
    assert_eq!(rounds[1].defense.label(), "prune 0.9");
    assert_eq!(rounds[2].defense.label(), "secagg");
    assert!(rounds[1].privacy.is_none() && rounds[2].privacy.is_none());
    // One noisy release each: rho = 2 / z^2 = 8, converted by opendp.
    let p = rounds[0].privacy.as_ref().expect("round 1 adds noise");
    assert_eq!((p.releases_max, p.unprotected), (1, 0));
    let expected = zcdp_to_epsilon(8.0, 1e-5).unwrap();
    assert!(
        (p.epsilon_max.unwrap() - expected).abs() < 1e-9,
        "{p:?} vs {expected}"
    );
    assert_eq!(p.epsilon_max, p.epsilon_median);

    let run = RunLayout::new(dir.path());
    let records = read_records(&run.attacks()).unwrap();
    let of_round = |r: u32| records.iter().filter(move |x| x.round == r);
    // Round 2: what the adversary saw is pruned: at least 90% zeros in every tensor.
    assert_eq!(of_round(2).count(), 3);
    for r in of_round(2) {
        assert_eq!(r.defense.prune_fraction, 0.9);
        let (u, _) = NamedTensors::load(&run.attacks().saved_update(2, &r.client_id)).unwrap();
        for t in u.tensors() {
            let zeros = t.data.iter().filter(|v| **v == 0.0).count();
            assert!(
                zeros >= (t.data.len() as f64 * 0.9).floor() as usize,
                "{}: {zeros} zeros of {}",
                t.name,
                t.data.len()
            );
        }
    }
    // Round 1: clipped to 1, then noise of std 0.5 on each of d entries: |u|^2 ~ 0.25 d (+ <= 1).
    assert_eq!(of_round(1).count(), 3);
    for r in of_round(1) {
        assert!(r.defense.is_private());
        let (u, _) = NamedTensors::load(&run.attacks().saved_update(1, &r.client_id)).unwrap();
        let d = u.numel() as f64;
        let sq = u.l2_norm().powi(2);
        assert!(
            sq > 0.25 * d * 0.97 && sq < 0.25 * d * 1.03 + 1.0,
            "|u|^2 = {sq} for d = {d}"
        );
    }
    // Round 3: no single update reached the adversary, one sum of all three did, and it was
    // scored against all three clients' images.
    let sums: Vec<_> = of_round(3).collect();
    assert_eq!(sums.len(), 1, "{sums:?}");
    let sum = sums[0];
    assert_eq!(sum.client_id, "secagg-round-0003");
    assert_eq!((sum.clients, sum.batch_size), (3, 3));
    let mean = sum
        .attacks
        .iter()
        .find(|a| a.attack == "mean-image")
        .unwrap();
    assert_eq!(
        mean.scores.as_ref().unwrap().vs_original.len(),
        3,
        "{mean:?}"
    );

    mjpfl_lab::report::write_run_report(dir.path()).unwrap();
    let report = std::fs::read_to_string(run.report()).unwrap();
    assert!(report.contains("## Defenses"), "{report}");
    assert!(
        report.contains(&format!("| dp z=0.5 C=1 | {expected:.2} |")),
        "{report}"
    );
    // Round 2 sent updates without noise: no client keeps a finite epsilon, and it says so.
    assert!(report.contains("none has a finite epsilon"), "{report}");
}

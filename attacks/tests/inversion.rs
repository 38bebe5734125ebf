//! Attack machinery checks: the Hessian-vector product by parameter-space central differences
//! against finite differences in input space, and the closed-form attack on real images.

use std::path::PathBuf;

use mjp::data::{DataSource, Split};
use mjp::fl::{RoundConfig, UpdateKind};
use mjp::train::OptimizerKind;
use mjp::{NamedTensors, PeMode, Seed, Vit, VitConfig};
use mjpfl_attacks::april::{ClosedFormVariant, closed_form};
use mjpfl_attacks::case::AttackCase;
use mjpfl_attacks::metrics::psnr;
use mjpfl_attacks::objective::{Matching, Objective};
use mjpfl_attacks::optimise::jacobian_transpose_vector;
use mjpfl_attacks::victim::Victim;
use rand::Rng;

fn fixture_images(n: usize) -> (Vec<f32>, Vec<u32>) {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fashion-mnist-mini");
    let ds = DataSource::Idx(dir)
        .load(Split::Test, "data".as_ref())
        .unwrap();
    let idx: Vec<usize> = (0..n).collect();
    ds.batch(&idx, Default::default(), &mut Seed(0).rng())
}

fn round_config(ratio: f64) -> RoundConfig {
    RoundConfig {
        update_kind: UpdateKind::FedSgd,
        local_steps: 1,
        local_epochs: 0,
        learning_rate: 0.1,
        batch_size: 1,
        shuffle_ratio: ratio,
        jigsaw_probability: 1.0,
        per_sample_jigsaw: false,
        dal_lambda: 0.01,
        fedprox_mu: 0.0,
        seed: 3,
        deadline_unix_ms: 0,
        local_optimizer: OptimizerKind::Sgd { momentum: 0.0 },
        defense: mjp::Defense::NONE,
    }
}

/// A FedSGD case built the way a client builds its update.
fn case(vit: &VitConfig, image: &[f32], label: u32, ratio: f64) -> AttackCase {
    let device = mjp::DeviceSpec::Flex.device().unwrap().autodiff();
    let model = Vit::new(vit, Seed(5), &device);
    let global = NamedTensors::from_module(&model);
    let ds = mjp::data::Dataset {
        name: "one".into(),
        channels: vit.channels,
        size: vit.image_size,
        num_classes: vit.num_classes,
        images: image.iter().map(|v| (v * 255.0).round() as u8).collect(),
        labels: vec![label],
    };
    let config = round_config(ratio);
    let local = mjp::fl::local_update(&model, &ds, 1, 0, "c", &config, &device).unwrap();
    AttackCase {
        vit: vit.clone(),
        global,
        config,
        update: local.update.tensors,
        kind: UpdateKind::FedSgd,
        batch_size: 1,
        local_steps: 1,
        num_examples: 1,
        clients: 1,
        device: mjp::DeviceSpec::Flex,
    }
}

#[test]
fn hessian_vector_product_matches_input_space_finite_differences() {
    let vit = VitConfig::preset("vit-micro-28")
        .unwrap()
        .with_pe(PeMode::Learned);
    let (images, labels) = fixture_images(1);
    let device = mjp::DeviceSpec::Flex.device().unwrap();
    let params = NamedTensors::from_module(&Vit::new(&vit, Seed(9), &device));
    let victim = Victim::new(&vit, &params, 0.0, mjp::DeviceSpec::Flex).unwrap();
    // v: a fixed random direction in parameter space.
    let mut rng = Seed(4).rng();
    let mut v = params.clone();
    for t in v.tensors_mut() {
        t.data
            .iter_mut()
            .for_each(|x| *x = rng.random::<f32>() - 0.5);
    }
    let jtv = jacobian_transpose_vector(&victim, &images, &labels, None, &v, 1e-3).unwrap();
    // <v, g(x)> by finite differences in input space, at a few pixels.
    let dot = |x: &[f32]| -> f64 {
        let g = victim.parameter_gradient(x, &labels, None);
        g.tensors()
            .iter()
            .zip(v.tensors())
            .map(|(a, b)| {
                a.data
                    .iter()
                    .zip(&b.data)
                    .map(|(p, q)| f64::from(*p) * f64::from(*q))
                    .sum::<f64>()
            })
            .sum()
    };
    let (mut num, mut den) = (0.0, 0.0);
    for k in [100, 210, 350, 406, 490, 601] {
        let h = 1e-2f32;
        let mut plus = images.clone();
        plus[k] += h;
        let mut minus = images.clone();
        minus[k] -= h;
        let fd = (dot(&plus) - dot(&minus)) / (2.0 * f64::from(h));
        num += (fd - f64::from(jtv[k])).powi(2);
        den += fd.powi(2);
    }
    let rel = (num / den).sqrt();
    println!("J^T v relative error vs input-space finite differences: {rel:.2e}");
    assert!(rel < 2e-2, "relative error {rel}");
}

#[test]
fn closed_form_recovers_learned_pe_images_and_mjp_hides_them() {
    let (images, labels) = fixture_images(3);
    let per = 28 * 28;
    let learned = VitConfig::preset("vit-micro-28")
        .unwrap()
        .with_pe(PeMode::Learned);
    let mjp_cfg = VitConfig::preset("vit-micro-28")
        .unwrap()
        .with_pe(PeMode::Mjp);
    for i in 0..3 {
        let img = &images[i * per..(i + 1) * per];
        let exact = closed_form(
            &case(&learned, img, labels[i], 0.0),
            ClosedFormVariant::Standard,
        )
        .unwrap();
        // The fixture is quantised to bytes: compare against the same quantisation.
        let q: Vec<f32> = img.iter().map(|v| (v * 255.0).round() / 255.0).collect();
        let p = psnr(&exact.image, &q);
        assert!(p > 40.0, "learned PE image {i}: {p:.1} dB");
        let hidden = closed_form(
            &case(&mjp_cfg, img, labels[i], 0.5),
            ClosedFormVariant::Standard,
        )
        .unwrap();
        let ph = psnr(&hidden.image, &q);
        assert!(
            ph < p - 10.0,
            "MJP 0.5 image {i}: {ph:.1} dB vs learned {p:.1}"
        );
        let aware = closed_form(
            &case(&mjp_cfg, img, labels[i], 0.5),
            ClosedFormVariant::MjpAware,
        )
        .unwrap();
        assert!(
            aware.occluded.iter().filter(|&&o| o).count() >= 20,
            "occluded positions not found"
        );
    }
}

#[test]
fn cosine_objective_is_zero_at_the_true_gradient() {
    let vit = VitConfig::preset("vit-micro-28")
        .unwrap()
        .with_pe(PeMode::Learned);
    let (images, labels) = fixture_images(1);
    let c = case(&vit, &images, labels[0], 0.0);
    let victim = Victim::new(&vit, &c.global, 0.01, mjp::DeviceSpec::Flex).unwrap();
    let g = victim.parameter_gradient(
        &images
            .iter()
            .map(|v| (v * 255.0).round() / 255.0)
            .collect::<Vec<_>>(),
        &labels,
        None,
    );
    let (f, _) = Objective {
        matching: Matching::Cosine,
        pe_weight: 1.0,
        embed_weight: 0.0,
    }
    .evaluate(&g, &c.update, 1..50);
    assert!(f < 1e-4, "objective at the true input {f}");
}

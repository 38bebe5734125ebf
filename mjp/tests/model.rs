//! Gradient identities of the MJP-ViT that the paper's method and the closed-form attack rely on.

use mjp::burn::tensor::{Device, Tensor};
use mjp::jigsaw::{JigsawPlan, MaskGenerator, SamplePlan};
use mjp::model::cross_entropy;
use mjp::train::Batch;
use mjp::{PeMode, Seed, Vit, VitConfig};

/// The backend under test: flex, or `MJPFL_TEST_DEVICE` (scripts/check-tch.sh sets tch-cpu).
fn device() -> Device {
    let spec: mjp::DeviceSpec = std::env::var("MJPFL_TEST_DEVICE")
        .unwrap_or_else(|_| "flex".into())
        .parse()
        .unwrap();
    spec.device().unwrap().autodiff()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    mjp::params::tensor_values(&t)
}

fn random_batch(config: &VitConfig, b: usize, seed: u64, device: &Device) -> Batch {
    use rand::Rng;
    let mut rng = Seed(seed).rng();
    let n = b * config.channels * config.image_size * config.image_size;
    let pixels: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    let labels: Vec<u32> = (0..b).map(|i| (i % config.num_classes) as u32).collect();
    Batch::new(pixels, labels, config, device)
}

fn mjp_plan(config: &VitConfig, ratio: f64, seed: u64) -> JigsawPlan {
    let g = MaskGenerator::for_model(config, None);
    let mut rng = Seed(seed).rng();
    let mask = g.generate(g.target_count(ratio), &mut rng);
    JigsawPlan::shared(SamplePlan::masked_shuffle(&mask, true, &mut rng))
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: {x} vs {y} (scale {scale})"
        );
    }
}

#[test]
fn occluded_positions_use_unk_and_pass_their_gradient_sum_to_it() {
    let device = device();
    let config = VitConfig::preset("vit-micro-28").unwrap();
    let model = Vit::new(&config, Seed(1), &device);
    let batch = random_batch(&config, 2, 5, &device);
    let plan = mjp_plan(&config, 0.5, 9);
    let occluded = plan.sample(0).occluded.clone();
    assert!(occluded.iter().filter(|&&o| o).count() >= 10);

    // The PE actually added: unk row at occluded positions, own row elsewhere.
    let table = values(model.pos_embed.as_ref().unwrap().val());
    let d = config.dim;
    let pe = values(model.patch_position_embeddings(2, Some(&plan)).unwrap());
    for (i, &o) in occluded.iter().enumerate() {
        let row = if o { config.unk_row() } else { 1 + i };
        assert_eq!(
            &pe[i * d..(i + 1) * d],
            &table[row * d..(row + 1) * d],
            "position {i}"
        );
    }

    // Gradients, with the DAL term off so only the classification path is involved.
    let z = model
        .embed_patches(batch.images.clone(), Some(&plan))
        .detach()
        .require_grad();
    let out = model.forward_embedded(z.clone(), Some(&plan));
    let grads = cross_entropy(out.logits, batch.labels.clone()).backward();
    let dz = values(z.grad(&grads).unwrap()); // [2, N, D]
    let g_table = values(
        model
            .pos_embed
            .as_ref()
            .unwrap()
            .val()
            .grad(&grads)
            .unwrap(),
    );
    let n = config.num_patches();
    let dz_sum = |i: usize| -> Vec<f32> {
        (0..d)
            .map(|k| dz[i * d + k] + dz[(n + i) * d + k])
            .collect()
    };
    let mut unk_expected = vec![0f32; d];
    for (i, &o) in occluded.iter().enumerate() {
        let row = &g_table[(1 + i) * d..(2 + i) * d];
        if o {
            assert!(
                row.iter().all(|&v| v == 0.0),
                "occluded PE row {i} has a gradient"
            );
            for (u, v) in unk_expected.iter_mut().zip(dz_sum(i)) {
                *u += v;
            }
        } else {
            assert_close(row, &dz_sum(i), 1e-4, &format!("visible row {i}"));
        }
    }
    let unk = &g_table[config.unk_row() * d..(config.unk_row() + 1) * d];
    assert_close(unk, &unk_expected, 1e-4, "unk row");
    assert!(unk.iter().any(|&v| v != 0.0));
}

#[test]
fn dal_gradients_reach_only_visible_pe_rows_and_the_dal_head() {
    let device = device();
    let config = VitConfig::preset("vit-micro-28").unwrap();
    let model = Vit::new(&config, Seed(2), &device);
    let plan = mjp_plan(&config, 0.5, 3);
    let occluded = plan.sample(0).occluded.clone();
    let grads = model.dal_loss(Some(&plan), false).unwrap().backward();
    let d = config.dim;
    let g = values(
        model
            .pos_embed
            .as_ref()
            .unwrap()
            .val()
            .grad(&grads)
            .unwrap(),
    );
    assert!(g[..d].iter().all(|&v| v == 0.0), "cls row");
    assert!(
        g[config.unk_row() * d..].iter().all(|&v| v == 0.0),
        "unk row"
    );
    for (i, &o) in occluded.iter().enumerate() {
        let row = &g[(1 + i) * d..(2 + i) * d];
        if o {
            assert!(row.iter().all(|&v| v == 0.0), "occluded row {i}");
        } else {
            assert!(
                row.iter().any(|&v| v != 0.0),
                "visible row {i} got no DAL gradient"
            );
        }
    }
    let dal = model.dal.as_ref().unwrap();
    assert!(dal.fc1.weight.val().grad(&grads).is_some());
    assert!(
        dal.fc2
            .as_ref()
            .unwrap()
            .weight
            .val()
            .grad(&grads)
            .is_some()
    );
    assert!(model.head.weight.val().grad(&grads).is_none());
    assert!(model.patch_embed.proj.weight.val().grad(&grads).is_none());
    assert!(model.blocks[0].attn.qkv.weight.val().grad(&grads).is_none());
}

#[test]
fn learned_pe_gradient_equals_patch_embedding_output_gradient() {
    let device = device();
    let config = VitConfig::preset("vit-micro-28")
        .unwrap()
        .with_pe(PeMode::Learned);
    let model = Vit::new(&config, Seed(4), &device);
    let batch = random_batch(&config, 1, 11, &device);
    let z = model
        .embed_patches(batch.images.clone(), None)
        .detach()
        .require_grad();
    let out = model.forward_embedded(z.clone(), None);
    let grads = cross_entropy(out.logits, batch.labels.clone()).backward();
    let dz = values(z.grad(&grads).unwrap());
    let g = values(
        model
            .pos_embed
            .as_ref()
            .unwrap()
            .val()
            .grad(&grads)
            .unwrap(),
    );
    let d = config.dim;
    assert_eq!(g.len(), (1 + config.num_patches()) * d);
    assert_close(&g[d..], &dz, 1e-5, "PE rows vs dL/dz");
}

#[test]
fn full_forward_gradient_matches_the_split_forward() {
    // The split forward used above is the same function as the full forward.
    let device = device();
    let config = VitConfig::preset("vit-micro-28").unwrap();
    let model = Vit::new(&config, Seed(6), &device);
    let batch = random_batch(&config, 3, 2, &device);
    let plan = mjp_plan(&config, 0.25, 1);
    let a = values(model.forward(batch.images.clone(), Some(&plan)).logits);
    let z = model.embed_patches(batch.images.clone(), Some(&plan));
    let b = values(model.forward_embedded(z, Some(&plan)).logits);
    assert_close(&a, &b, 1e-6, "logits");
}

#[test]
fn sharded_gradients_equal_the_full_batch_gradient() {
    use mjp::params::NamedTensors;
    use mjp::train::compute_gradients_with_threads;
    let device = device();
    let config = VitConfig::preset("vit-micro-28").unwrap();
    let model = Vit::new(&config, Seed(8), &device);
    let batch = random_batch(&config, 24, 3, &device);
    let plan = mjp_plan(&config, 0.25, 4);
    let one = compute_gradients_with_threads(&model, &batch, Some(plan.clone()), 0.01, false, 1);
    let three = compute_gradients_with_threads(&model, &batch, Some(plan), 0.01, false, 3);
    assert!((one.stats.loss - three.stats.loss).abs() < 1e-5);
    assert_eq!(one.stats.correct, three.stats.correct);
    let a = NamedTensors::gradients_of(&model, &one.grads);
    let b = NamedTensors::gradients_of(&model, &three.grads);
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert_close(&y.data, &x.data, 1e-4, &x.name);
    }
}

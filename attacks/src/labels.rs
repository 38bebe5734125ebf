//! Label recovery from the classifier bias gradient.
//!
//! For cross-entropy, `dL/db_k = mean_i (p_ik - y_ik)`. Batch 1 (iDLG): the only negative entry
//! is the label. Batch B: `count_k ~= B * (p_mean_k - g_k)`, where `p_mean` is the model's mean
//! softmax output, which the server estimates by running its copy of the model on dummy inputs;
//! counts are rounded to a total of B by largest remainders. A FedAvg delta of n local examples
//! (K steps of batch b, E epochs, K b = n E) gives the pseudo-gradient
//! `-delta_b / (lr K) ~= (1/n) sum_i (p_i - y_i)`, so the same rule with B = n counts the
//! client's labels (up to the drift of p over the local steps).

use mjp::VitConfig;
use mjp::params::NamedTensors;

use crate::case::AttackCase;
use crate::error::Result;

/// Labels recovered from one update (a multiset for batches; order carries no meaning).
pub fn recover_labels(case: &AttackCase, mean_probs: &[f64]) -> Result<Vec<u32>> {
    let g = case.target_gradient();
    let bias = &AttackCase::tensor(&g, "head.bias")?.data;
    Ok(labels_from_bias_gradient(bias, case.images(), mean_probs))
}

/// The rule itself, on a bias gradient.
pub fn labels_from_bias_gradient(bias: &[f32], batch: usize, mean_probs: &[f64]) -> Vec<u32> {
    if batch <= 1 {
        let (k, _) = bias
            .iter()
            .enumerate()
            .fold(
                (0, f32::INFINITY),
                |best, (k, &v)| if v < best.1 { (k, v) } else { best },
            );
        return vec![k as u32];
    }
    let b = batch as f64;
    let raw: Vec<f64> = bias
        .iter()
        .enumerate()
        .map(|(k, &g)| (b * (mean_probs.get(k).copied().unwrap_or(0.0) - f64::from(g))).max(0.0))
        .collect();
    let mut counts: Vec<usize> = raw.iter().map(|v| v.floor() as usize).collect();
    let mut assigned: usize = counts.iter().sum();
    let mut order: Vec<usize> = (0..raw.len()).collect();
    order.sort_by(|&i, &j| (raw[j] - raw[j].floor()).total_cmp(&(raw[i] - raw[i].floor())));
    let mut i = 0;
    while assigned < batch && !order.is_empty() {
        counts[order[i % order.len()]] += 1;
        assigned += 1;
        i += 1;
    }
    while assigned > batch {
        let k = (0..counts.len())
            .filter(|&k| counts[k] > 0)
            .min_by(|&x, &y| raw[x].total_cmp(&raw[y]))
            .expect("positive");
        counts[k] -= 1;
        assigned -= 1;
    }
    counts
        .iter()
        .enumerate()
        .flat_map(|(k, &c)| std::iter::repeat_n(k as u32, c))
        .collect()
}

/// Fraction of true labels recovered (multiset overlap / batch).
pub fn label_accuracy(recovered: &[u32], truth: &[u32]) -> f64 {
    let mut left = truth.to_vec();
    let mut hit = 0;
    for r in recovered {
        if let Some(p) = left.iter().position(|t| t == r) {
            left.swap_remove(p);
            hit += 1;
        }
    }
    hit as f64 / truth.len().max(1) as f64
}

/// Mean softmax output of the model on dummy inputs (the server's estimate of `p_mean`).
pub fn mean_probabilities(
    vit: &VitConfig,
    global: &NamedTensors,
    samples: usize,
    device: mjp::DeviceSpec,
) -> Result<Vec<f64>> {
    use rand::Rng;
    let device = device.device()?;
    let model = mjp::checkpoint::model_from_params(vit, global, &device)?;
    let mut rng = mjp::Seed(0).child("label-dummies", 0).rng();
    let n = samples.max(1);
    let pixels: Vec<f32> = (0..n * vit.channels * vit.image_size * vit.image_size)
        .map(|_| rng.random::<f32>())
        .collect();
    let batch = mjp::train::Batch::new(pixels, vec![0; n], vit, &device);
    let logits = model.forward(batch.images, None).logits;
    let probs = mjp::params::tensor_values(&mjp::burn::tensor::activation::softmax(logits, 1));
    let k = vit.num_classes;
    Ok((0..k)
        .map(|c| (0..n).map(|i| f64::from(probs[i * k + c])).sum::<f64>() / n as f64)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idlg_picks_the_negative_entry() {
        assert_eq!(
            labels_from_bias_gradient(&[0.1, 0.2, -0.7, 0.4], 1, &[]),
            vec![2]
        );
    }

    #[test]
    fn counting_rule_recovers_a_batch() {
        // Uniform predictions p = 0.25 over 4 classes, labels {0, 0, 3}.
        let p = [0.25; 4];
        let truth = [0u32, 0, 3];
        let g: Vec<f32> = (0..4)
            .map(|k| (0.25 - truth.iter().filter(|&&t| t == k).count() as f64 / 3.0) as f32)
            .collect();
        let mut r = labels_from_bias_gradient(&g, 3, &p);
        r.sort();
        assert_eq!(r, vec![0, 0, 3]);
        assert_eq!(label_accuracy(&r, &truth), 1.0);
        assert!((label_accuracy(&[1, 0, 3], &truth) - 2.0 / 3.0).abs() < 1e-12);
    }
}

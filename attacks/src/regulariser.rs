//! Image priors (the regulariser of breaching's split): anisotropic total variation on CHW
//! pixels, with its gradient.

/// Total variation `mean |dx| + mean |dy|` per image, summed over the batch, with its gradient.
/// A smooth absolute value (`sqrt(d^2 + eps)`) keeps the gradient defined at 0.
pub fn total_variation(images: &[f32], channels: usize, size: usize) -> (f64, Vec<f32>) {
    let eps = 1e-8f64;
    let per_image = channels * size * size;
    let n_pairs = (channels * size * (size - 1)).max(1) as f64;
    let mut grad = vec![0f32; images.len()];
    let mut value = 0.0;
    for (img, gimg) in images.chunks(per_image).zip(grad.chunks_mut(per_image)) {
        for c in 0..channels {
            let base = c * size * size;
            for y in 0..size {
                for x in 0..size {
                    let k = base + y * size + x;
                    for (dy, dx) in [(0usize, 1usize), (1, 0)] {
                        let (y2, x2) = (y + dy, x + dx);
                        if y2 >= size || x2 >= size {
                            continue;
                        }
                        let k2 = base + y2 * size + x2;
                        let d = f64::from(img[k2]) - f64::from(img[k]);
                        let a = (d * d + eps).sqrt();
                        value += a / n_pairs;
                        let s = (d / a / n_pairs) as f32;
                        gimg[k2] += s;
                        gimg[k] -= s;
                    }
                }
            }
        }
    }
    (value, grad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let img: Vec<f32> = (0..2 * 5 * 5)
            .map(|i| ((i * 37) % 11) as f32 / 11.0)
            .collect();
        let (_, g) = total_variation(&img, 2, 5);
        for k in [0, 7, 24, 33, 49] {
            let h = 1e-3;
            let mut p = img.clone();
            p[k] += h;
            let mut m = img.clone();
            m[k] -= h;
            let fd =
                (total_variation(&p, 2, 5).0 - total_variation(&m, 2, 5).0) / (2.0 * f64::from(h));
            assert!((fd - f64::from(g[k])).abs() < 1e-3, "{k}: {fd} vs {}", g[k]);
        }
        assert!(total_variation(&[0.3; 50], 2, 5).0 < 1e-3);
    }
}

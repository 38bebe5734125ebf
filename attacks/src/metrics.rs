//! Leakage metrics per reconstructed image: MSE, PSNR, SSIM (11x11 Gaussian, sigma 1.5), FFT-2D
//! cosine distance (of magnitude spectra), and the best one-to-one assignment of reconstructions
//! to originals for batches. Images are CHW f32 in [0, 1].

use serde::{Deserialize, Serialize};

/// Scores of one reconstruction against one reference image.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageScores {
    /// Mean squared error.
    pub mse: f64,
    /// Peak signal-to-noise ratio in dB (peak 1.0), capped at 100.
    pub psnr: f64,
    /// Structural similarity (mean over channels).
    pub ssim: f64,
    /// Cosine distance between 2-D FFT magnitude spectra (0 = same spectrum).
    pub fft_cosine_distance: f64,
}

/// Mean squared error.
pub fn mse(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().max(1) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / n
}

/// PSNR in dB for images in [0, 1] (100 dB for an exact match).
pub fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let m = mse(a, b);
    if m <= 1e-10 {
        100.0
    } else {
        (10.0 * (1.0 / m).log10()).min(100.0)
    }
}

fn gaussian_window() -> [[f64; 11]; 11] {
    let mut g = [0f64; 11];
    for (i, v) in g.iter_mut().enumerate() {
        let x = i as f64 - 5.0;
        *v = (-(x * x) / (2.0 * 1.5 * 1.5)).exp();
    }
    let s: f64 = g.iter().sum();
    let mut w = [[0f64; 11]; 11];
    for i in 0..11 {
        for j in 0..11 {
            w[i][j] = g[i] * g[j] / (s * s);
        }
    }
    w
}

/// SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
/// data range 1, valid windows only; mean over channels.
pub fn ssim(a: &[f32], b: &[f32], channels: usize, size: usize) -> f64 {
    let w = gaussian_window();
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    if size < 11 {
        return f64::NAN;
    }
    let plane = size * size;
    let mut total = 0.0;
    for c in 0..channels {
        let (pa, pb) = (
            &a[c * plane..(c + 1) * plane],
            &b[c * plane..(c + 1) * plane],
        );
        let mut acc = 0.0;
        let mut count = 0usize;
        for y in 0..=size - 11 {
            for x in 0..=size - 11 {
                let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for (i, wrow) in w.iter().enumerate() {
                    for (j, &wij) in wrow.iter().enumerate() {
                        let k = (y + i) * size + x + j;
                        let (va, vb) = (f64::from(pa[k]), f64::from(pb[k]));
                        ma += wij * va;
                        mb += wij * vb;
                        saa += wij * va * va;
                        sbb += wij * vb * vb;
                        sab += wij * va * vb;
                    }
                }
                let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
                acc += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                    / ((ma * ma + mb * mb + c1) * (va + vb + c2));
                count += 1;
            }
        }
        total += acc / count as f64;
    }
    total / channels as f64
}

/// Magnitude of the 2-D DFT of each channel, concatenated.
fn fft_magnitude(a: &[f32], channels: usize, size: usize) -> Vec<f64> {
    let n = size;
    let plane = n * n;
    let twiddle: Vec<(f64, f64)> = (0..n)
        .map(|k| {
            let t = -2.0 * std::f64::consts::PI * k as f64 / n as f64;
            (t.cos(), t.sin())
        })
        .collect();
    let mut out = Vec::with_capacity(channels * plane);
    for c in 0..channels {
        let p = &a[c * plane..(c + 1) * plane];
        // Rows, then columns (separable DFT, O(n^3)).
        let mut rows = vec![(0f64, 0f64); plane];
        for y in 0..n {
            for u in 0..n {
                let (mut re, mut im) = (0.0, 0.0);
                for x in 0..n {
                    let (cr, ci) = twiddle[(u * x) % n];
                    let v = f64::from(p[y * n + x]);
                    re += v * cr;
                    im += v * ci;
                }
                rows[y * n + u] = (re, im);
            }
        }
        for v in 0..n {
            for u in 0..n {
                let (mut re, mut im) = (0.0, 0.0);
                for y in 0..n {
                    let (cr, ci) = twiddle[(v * y) % n];
                    let (ar, ai) = rows[y * n + u];
                    re += ar * cr - ai * ci;
                    im += ar * ci + ai * cr;
                }
                out.push((re * re + im * im).sqrt());
            }
        }
    }
    out
}

/// Cosine distance between the images' 2-D FFT magnitude spectra.
pub fn fft_cosine_distance(a: &[f32], b: &[f32], channels: usize, size: usize) -> f64 {
    let (fa, fb) = (
        fft_magnitude(a, channels, size),
        fft_magnitude(b, channels, size),
    );
    let dot: f64 = fa.iter().zip(&fb).map(|(x, y)| x * y).sum();
    let na: f64 = fa.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = fb.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        1.0
    } else {
        1.0 - dot / (na * nb)
    }
}

/// All scores of `recon` against `reference`.
pub fn score(recon: &[f32], reference: &[f32], channels: usize, size: usize) -> ImageScores {
    ImageScores {
        mse: mse(recon, reference),
        psnr: psnr(recon, reference),
        ssim: ssim(recon, reference, channels, size),
        fft_cosine_distance: fft_cosine_distance(recon, reference, channels, size),
    }
}

/// The assignment `recon[i] -> reference[perm[i]]` minimising total cost (Hungarian algorithm).
pub fn best_assignment(cost: &[Vec<f64>]) -> Vec<usize> {
    let n = cost.len();
    if n == 0 {
        return Vec::new();
    }
    // Kuhn-Munkres with potentials, O(n^3); rows = reconstructions, cols = references.
    let inf = f64::INFINITY;
    let (mut u, mut v) = (vec![0.0; n + 1], vec![0.0; n + 1]);
    let (mut p, mut way) = (vec![0usize; n + 1], vec![0usize; n + 1]);
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0;
        let mut minv = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = inf;
            let mut j1 = 0;
            for j in 1..=n {
                if !used[j] {
                    let cur = cost[i0 - 1][j - 1] - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut assignment = vec![0; n];
    for j in 1..=n {
        if p[j] > 0 {
            assignment[p[j] - 1] = j - 1;
        }
    }
    assignment
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(seed: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 1000.0
            })
            .collect()
    }

    #[test]
    fn identical_images_score_perfectly() {
        let a = img(1, 3 * 32 * 32);
        let s = score(&a, &a, 3, 32);
        assert_eq!(s.mse, 0.0);
        assert_eq!(s.psnr, 100.0);
        assert!((s.ssim - 1.0).abs() < 1e-9);
        assert!(s.fft_cosine_distance.abs() < 1e-9);
    }

    #[test]
    fn psnr_and_ssim_known_values() {
        let a = vec![0.5f32; 28 * 28];
        let b = vec![0.6f32; 28 * 28];
        assert!((psnr(&a, &b) - 20.0).abs() < 1e-4);
        let noisy = img(3, 28 * 28);
        assert!(ssim(&a, &noisy, 1, 28) < 0.1);
        assert!(fft_cosine_distance(&a, &noisy, 1, 28) > 0.05);
    }

    #[test]
    fn fft_distance_ignores_circular_shifts() {
        let n = 16;
        let a = img(7, n * n);
        let shifted: Vec<f32> = (0..n * n)
            .map(|i| a[(i / n) * n + (i % n + 3) % n])
            .collect();
        assert!(fft_cosine_distance(&a, &shifted, 1, n) < 1e-9);
        assert!(psnr(&a, &shifted) < 30.0);
    }

    #[test]
    fn hungarian_finds_the_best_assignment() {
        let cost = vec![
            vec![4.0, 1.0, 3.0],
            vec![2.0, 0.0, 5.0],
            vec![3.0, 2.0, 2.0],
        ];
        let a = best_assignment(&cost);
        let total: f64 = a.iter().enumerate().map(|(i, &j)| cost[i][j]).sum();
        assert_eq!(total, 5.0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
    }
}

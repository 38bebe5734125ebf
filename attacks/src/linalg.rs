//! Dense f64 least squares for the closed-form attack (faer thin SVD, minimum-norm solution).

use faer::Mat;

/// Solves `A X = B` in the least-squares sense with the minimum-norm solution, where `a` is
/// `rows x cols` and `b` is `rows x k`, both row-major. Singular values below `rcond * s_max`
/// are treated as zero. Returns `cols x k` row-major.
pub fn lstsq_min_norm(
    a: &[f64],
    rows: usize,
    cols: usize,
    b: &[f64],
    k: usize,
    rcond: f64,
) -> Vec<f64> {
    let am = Mat::<f64>::from_fn(rows, cols, |i, j| a[i * cols + j]);
    let svd = match am.thin_svd() {
        Ok(s) => s,
        Err(_) => return vec![0.0; cols * k],
    };
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let r = s.nrows();
    let smax = (0..r).map(|i| s[i]).fold(0.0f64, f64::max);
    let mut out = vec![0.0; cols * k];
    for t in 0..r {
        let st = s[t];
        if st <= rcond * smax || st == 0.0 {
            continue;
        }
        for c in 0..k {
            // (U^T b)_t / s_t
            let mut dot = 0.0;
            for i in 0..rows {
                dot += u[(i, t)] * b[i * k + c];
            }
            let coef = dot / st;
            for j in 0..cols {
                out[j * k + c] += v[(j, t)] * coef;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_an_overdetermined_system_exactly() {
        // A (4x2) X (2x1) = B
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.0];
        let x = [0.5, -1.5];
        let b: Vec<f64> = (0..4)
            .map(|i| a[2 * i] * x[0] + a[2 * i + 1] * x[1])
            .collect();
        let got = lstsq_min_norm(&a, 4, 2, &b, 1, 1e-12);
        assert!(
            (got[0] - 0.5).abs() < 1e-10 && (got[1] + 1.5).abs() < 1e-10,
            "{got:?}"
        );
    }

    #[test]
    fn rank_deficient_gives_min_norm() {
        // x + y = 2 (twice): min-norm solution (1, 1).
        let got = lstsq_min_norm(&[1.0, 1.0, 1.0, 1.0], 2, 2, &[2.0, 2.0], 1, 1e-12);
        assert!(
            (got[0] - 1.0).abs() < 1e-10 && (got[1] - 1.0).abs() < 1e-10,
            "{got:?}"
        );
    }
}

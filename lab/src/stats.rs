//! Small statistics shared by every report and benchmark.

/// The mean (0 for an empty slice).
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Mean and population standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = mean(v);
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len().max(1) as f64;
    (m, var.sqrt())
}

/// Mean and the half-width of its 95% confidence interval (Student's t with n - 1 degrees of
/// freedom on the sample standard deviation; 0 for fewer than two values).
pub fn ci95(v: &[f64]) -> (f64, f64) {
    let n = v.len();
    let m = mean(v);
    if n < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    (m, t975(n - 1) * (var / n as f64).sqrt())
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom (tabulated to 30, then the
/// normal's 1.96 with the first-order correction).
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => T[df - 1],
        _ => 1.96 + 2.4 / df as f64,
    }
}

/// `mean ± half-width of the 95% CI` of `v * scale` (the mean alone for one value).
pub fn plus_minus_ci(v: &[f64], scale: f64, digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, h) = ci95(v);
    if v.len() > 1 {
        format!("{:.*} ± {:.*}", digits, m * scale, digits, h * scale)
    } else {
        format!("{:.*}", digits, m * scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_intervals_use_students_t() {
        // Three seeds 80, 82, 84: sample sd 2, t(2) = 4.303, half-width 4.303 * 2 / sqrt(3).
        let (m, h) = ci95(&[80.0, 82.0, 84.0]);
        assert!((m - 82.0).abs() < 1e-12 && (h - 4.303 * 2.0 / 3f64.sqrt()).abs() < 1e-9);
        assert_eq!(ci95(&[5.0]), (5.0, 0.0));
        assert_eq!(plus_minus_ci(&[0.5], 100.0, 1), "50.0");
        assert_eq!(plus_minus_ci(&[0.80, 0.82, 0.84], 100.0, 2), "82.00 ± 4.97");
    }

    #[test]
    fn mean_and_std() {
        assert_eq!(mean_std(&[1.0, 3.0]), (2.0, 1.0));
        assert_eq!(plus_minus_ci(&[], 1.0, 1), "-");
        assert_eq!(mean(&[]), 0.0);
    }
}

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

/// `mean ± std` of `v * scale` (just the mean for one value, `-` for none).
pub fn plus_minus(v: &[f64], scale: f64, digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, s) = mean_std(v);
    if v.len() > 1 {
        format!("{:.*} ± {:.*}", digits, m * scale, digits, s * scale)
    } else {
        format!("{:.*}", digits, m * scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_and_plus_minus() {
        assert_eq!(mean_std(&[1.0, 3.0]), (2.0, 1.0));
        assert_eq!(plus_minus(&[0.5, 0.7], 100.0, 1), "60.0 ± 10.0");
        assert_eq!(plus_minus(&[], 1.0, 1), "-");
        assert_eq!(mean(&[]), 0.0);
    }
}

//! Gradient-matching objectives (what is matched): cosine distance (Inverting Gradients) or
//! squared L2 (DLG), optionally plus a cosine term on the position-embedding gradient alone
//! (APRIL-optimisation). Each returns its value and its derivative with respect to the candidate
//! gradient, which the optimiser pulls back to the input through a Hessian-vector product.

use mjp::params::NamedTensors;

/// Which distance between a candidate's gradient and the intercepted one.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Matching {
    /// `1 - cos(g, t)` over all parameters (Inverting Gradients).
    Cosine,
    /// `sum (g - t)^2` (DLG).
    L2,
}

/// The full matching objective.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Objective {
    /// Main term.
    pub matching: Matching,
    /// Weight of the extra `1 - cos` term on the PE gradient of the patch positions (0
    /// disables).
    pub pe_weight: f64,
    /// Weight of an extra `1 - cos` term on the patch-embedding weight gradient
    /// (`sum_i p_i g_i^T`, the other half of the closed-form attack; 0 disables).
    #[serde(default)]
    pub embed_weight: f64,
}

/// Name of the patch-embedding weight in the gradient.
pub const EMBED: &str = "patch_embed.proj.weight";

/// Name of the PE table in the gradient.
pub const PE: &str = "pos_embed";

/// A part of a gradient: one tensor, or a contiguous range of its values.
struct Part {
    tensor: usize,
    range: std::ops::Range<usize>,
}

impl Objective {
    /// Value and `d value / d g` for candidate gradient `g` against target `t`. `patch_rows`
    /// are the rows of the PE table that belong to patch positions (`1..=N`): the cls row
    /// duplicates the cls-token gradient and would dominate the PE term, and the unk row is not
    /// a position.
    pub fn evaluate(
        &self,
        g: &NamedTensors,
        t: &NamedTensors,
        patch_rows: std::ops::Range<usize>,
    ) -> (f64, NamedTensors) {
        let mut dg = g.clone();
        dg.scale(0.0);
        let value = match self.matching {
            Matching::Cosine => {
                let all: Vec<Part> = g
                    .tensors()
                    .iter()
                    .enumerate()
                    .map(|(i, x)| Part {
                        tensor: i,
                        range: 0..x.data.len(),
                    })
                    .collect();
                cosine_term(g, t, &mut dg, &all, 1.0)
            }
            Matching::L2 => {
                let mut v = 0.0;
                for (d, (a, b)) in dg
                    .tensors_mut()
                    .iter_mut()
                    .zip(g.tensors().iter().zip(t.tensors()))
                {
                    for ((dv, x), y) in d.data.iter_mut().zip(&a.data).zip(&b.data) {
                        let diff = f64::from(*x) - f64::from(*y);
                        v += diff * diff;
                        *dv = (2.0 * diff) as f32;
                    }
                }
                v
            }
        };
        let pe = match g.tensors().iter().position(|x| x.name == PE) {
            Some(i) if self.pe_weight > 0.0 => {
                let d = g.tensors()[i].shape.get(1).copied().unwrap_or(1);
                let part = Part {
                    tensor: i,
                    range: patch_rows.start * d..patch_rows.end * d,
                };
                cosine_term(g, t, &mut dg, &[part], self.pe_weight)
            }
            _ => 0.0,
        };
        let embed = match g.tensors().iter().position(|x| x.name == EMBED) {
            Some(i) if self.embed_weight > 0.0 => {
                let part = Part {
                    tensor: i,
                    range: 0..g.tensors()[i].data.len(),
                };
                cosine_term(g, t, &mut dg, &[part], self.embed_weight)
            }
            _ => 0.0,
        };
        (value + pe + embed, dg)
    }
}

/// Adds `w * (1 - cos)` over the selected parts to `dg`; returns its value.
fn cosine_term(
    g: &NamedTensors,
    t: &NamedTensors,
    dg: &mut NamedTensors,
    parts: &[Part],
    w: f64,
) -> f64 {
    let slice = |x: &NamedTensors, p: &Part| -> Vec<f64> {
        x.tensors()[p.tensor].data[p.range.clone()]
            .iter()
            .map(|v| f64::from(*v))
            .collect()
    };
    let gs: Vec<Vec<f64>> = parts.iter().map(|p| slice(g, p)).collect();
    let ts: Vec<Vec<f64>> = parts.iter().map(|p| slice(t, p)).collect();
    let dot: f64 = gs
        .iter()
        .zip(&ts)
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>())
        .sum();
    let gn = gs
        .iter()
        .map(|a| a.iter().map(|x| x * x).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    let tn = ts
        .iter()
        .map(|b| b.iter().map(|x| x * x).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    if gn == 0.0 || tn == 0.0 {
        return w;
    }
    let cos = dot / (gn * tn);
    // d(1 - cos)/dg = -(t / (|g||t|) - cos * g / |g|^2)
    for ((p, a), b) in parts.iter().zip(&gs).zip(&ts) {
        let d = &mut dg.tensors_mut()[p.tensor].data[p.range.clone()];
        for k in 0..a.len() {
            d[k] += (w * -(b[k] / (gn * tn) - cos * a[k] / (gn * gn))) as f32;
        }
    }
    w * (1.0 - cos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mjp::NamedTensor;

    fn nt(a: &[f32], b: &[f32]) -> NamedTensors {
        NamedTensors::new(vec![
            NamedTensor {
                name: EMBED.into(),
                shape: vec![a.len()],
                data: a.to_vec(),
            },
            NamedTensor {
                name: PE.into(),
                shape: vec![b.len()],
                data: b.to_vec(),
            },
        ])
    }

    #[test]
    fn derivatives_match_finite_differences() {
        let g = nt(&[0.3, -0.2, 0.5], &[0.1, 0.7]);
        let t = nt(&[0.1, 0.4, 0.2], &[-0.3, 0.2]);
        for obj in [
            Objective {
                matching: Matching::Cosine,
                pe_weight: 0.0,
                embed_weight: 0.0,
            },
            Objective {
                matching: Matching::Cosine,
                pe_weight: 0.7,
                embed_weight: 0.3,
            },
            Objective {
                matching: Matching::L2,
                pe_weight: 0.5,
                embed_weight: 0.0,
            },
        ] {
            let (_, d) = obj.evaluate(&g, &t, 0..2);
            for ti in 0..2 {
                for k in 0..g.tensors()[ti].data.len() {
                    let h = 1e-3f32;
                    let mut plus = g.clone();
                    plus.tensors_mut()[ti].data[k] += h;
                    let mut minus = g.clone();
                    minus.tensors_mut()[ti].data[k] -= h;
                    let fd = (obj.evaluate(&plus, &t, 0..2).0 - obj.evaluate(&minus, &t, 0..2).0)
                        / (2.0 * f64::from(h));
                    let an = f64::from(d.tensors()[ti].data[k]);
                    assert!(
                        (fd - an).abs() < 1e-3 * (1.0 + fd.abs()),
                        "{obj:?} [{ti}][{k}]: fd {fd} vs {an}"
                    );
                }
            }
        }
    }
}

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
    /// Weight of the extra `1 - cos(g_pe, t_pe)` term (0 disables).
    pub pe_weight: f64,
}

/// Name of the PE table in the gradient.
pub const PE: &str = "pos_embed";

impl Objective {
    /// Value and `d value / d g` for candidate gradient `g` against target `t`.
    pub fn evaluate(&self, g: &NamedTensors, t: &NamedTensors) -> (f64, NamedTensors) {
        let mut dg = g.clone();
        dg.scale(0.0);
        let value = match self.matching {
            Matching::Cosine => {
                let names: Vec<String> = g.tensors().iter().map(|x| x.name.clone()).collect();
                cosine_term(g, t, &mut dg, &names, 1.0)
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
        let pe = if self.pe_weight > 0.0 && g.get(PE).is_some() {
            cosine_term(g, t, &mut dg, &[PE.to_string()], self.pe_weight)
        } else {
            0.0
        };
        (value + pe, dg)
    }
}

/// Adds `w * (1 - cos)` over the tensors named in `names` to `dg`; returns its value.
fn cosine_term(
    g: &NamedTensors,
    t: &NamedTensors,
    dg: &mut NamedTensors,
    names: &[String],
    w: f64,
) -> f64 {
    let pick = |x: &NamedTensors| -> Vec<(usize, Vec<f64>)> {
        x.tensors()
            .iter()
            .enumerate()
            .filter(|(_, n)| names.contains(&n.name))
            .map(|(i, n)| (i, n.data.iter().map(|v| f64::from(*v)).collect()))
            .collect()
    };
    let (gs, ts) = (pick(g), pick(t));
    let dot: f64 = gs
        .iter()
        .zip(&ts)
        .map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>())
        .sum();
    let gn = gs
        .iter()
        .map(|(_, a)| a.iter().map(|x| x * x).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    let tn = ts
        .iter()
        .map(|(_, b)| b.iter().map(|x| x * x).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    if gn == 0.0 || tn == 0.0 {
        return w;
    }
    let cos = dot / (gn * tn);
    // d(1 - cos)/dg = -(t / (|g||t|) - cos * g / |g|^2)
    for ((i, a), (_, b)) in gs.iter().zip(&ts) {
        let d = &mut dg.tensors_mut()[*i].data;
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
                name: "w".into(),
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
            },
            Objective {
                matching: Matching::Cosine,
                pe_weight: 0.7,
            },
            Objective {
                matching: Matching::L2,
                pe_weight: 0.5,
            },
        ] {
            let (_, d) = obj.evaluate(&g, &t);
            for ti in 0..2 {
                for k in 0..g.tensors()[ti].data.len() {
                    let h = 1e-3f32;
                    let mut plus = g.clone();
                    plus.tensors_mut()[ti].data[k] += h;
                    let mut minus = g.clone();
                    minus.tensors_mut()[ti].data[k] -= h;
                    let fd = (obj.evaluate(&plus, &t).0 - obj.evaluate(&minus, &t).0)
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

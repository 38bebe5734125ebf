//! The closed-form position-embedding attack (APRIL family) for batch 1, and its MJP-aware
//! variant.
//!
//! With a learned additive PE right after a linear patch embedding, `z_i = p_i W + b + E_i`, the
//! PE gradient row i is `g_i = dL/dz_i` and `dL/dW = sum_i p_i^T g_i = P^T G`. Solving
//! `G^T P = (dL/dW)^T` in f64 least squares recovers every patch exactly when N <= D.
//!
//! MJP breaks it twice: occluded positions use the shared unk row, so their own rows carry no
//! gradient (only their sum lands on the unk row), and the DAL term adds `lambda dDAL/dE_i` to
//! the visible rows. The MJP-aware variant (a) finds the occluded positions (rows with zero
//! gradient), (b) removes the DAL term, which the server computes from the weights it knows,
//! and (c) models the occluded contribution `sum_j p_j^T g_j` as `p_mean^T u` (u = the unk-row
//! gradient), solving jointly for the visible patches and the mean occluded patch. It recovers
//! the visible patches (exactly when the occluded patches are alike) and only the mean of the
//! occluded ones, whose positions stay hidden by the shuffle.

use mjp::PeMode;
use mjp::jigsaw::{JigsawPlan, SamplePlan};

use crate::attack::{Attack, Knowledge, Reconstruction, Registration};
use crate::case::AttackCase;
use crate::error::{AttackError, Result};
use crate::linalg::lstsq_min_norm;
use crate::victim::Victim;

/// Which closed-form variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClosedFormVariant {
    /// APRIL as published: uses every PE row as it is.
    Standard,
    /// Knows MJP: infers occluded rows, removes DAL, solves for the mean occluded patch.
    MjpAware,
}

/// What a closed-form attack recovered.
#[derive(Clone, Debug)]
pub struct ClosedForm {
    /// The image, CHW in [0, 1].
    pub image: Vec<f32>,
    /// Positions found occluded (MJP-aware only).
    pub occluded: Vec<bool>,
    /// Relative residual of the least-squares solve.
    pub residual: f64,
}

/// Runs the closed-form attack on a case.
pub fn closed_form(case: &AttackCase, variant: ClosedFormVariant) -> Result<ClosedForm> {
    let vit = &case.vit;
    if vit.pe == PeMode::None {
        return Err(AttackError::NotApplicable(
            "the model has no position embedding".into(),
        ));
    }
    let g = case.target_gradient();
    let pe = &AttackCase::tensor(&g, "pos_embed")?.data;
    let dw = &AttackCase::tensor(&g, "patch_embed.proj.weight")?.data;
    let (n, d, p) = (vit.num_patches(), vit.dim, vit.patch_dim());
    let mut rows: Vec<f64> = pe[d..(1 + n) * d].iter().map(|&v| f64::from(v)).collect();
    let norms: Vec<f64> = (0..n)
        .map(|i| {
            rows[i * d..(i + 1) * d]
                .iter()
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let max_norm = norms.iter().copied().fold(0.0, f64::max);
    if max_norm == 0.0 {
        return Err(AttackError::Numerics("the PE gradient is zero".into()));
    }
    let mut occluded = vec![false; n];
    let mut unknowns: Vec<Vec<f64>> = Vec::new(); // one system row per unknown patch
    let mut owner: Vec<Option<usize>> = Vec::new(); // position of each unknown (None: mean occluded patch)
    match variant {
        ClosedFormVariant::Standard => {
            for i in 0..n {
                unknowns.push(rows[i * d..(i + 1) * d].to_vec());
                owner.push(Some(i));
            }
        }
        ClosedFormVariant::MjpAware => {
            for i in 0..n {
                occluded[i] = norms[i] <= 1e-7 * max_norm;
            }
            if vit.has_dal() && case.config.dal_lambda > 0.0 {
                let victim = Victim::new(vit, &case.global, case.config.dal_lambda, case.device)?;
                let plan = JigsawPlan::shared(SamplePlan {
                    sources: (0..n).collect(),
                    occluded: occluded.clone(),
                });
                if let Some(dal) = victim.dal_pe_gradient(Some(&plan)) {
                    // Pseudo-gradients carry the DAL term with the same scale as the gradient.
                    for (r, v) in rows.iter_mut().zip(&dal[d..(1 + n) * d]) {
                        *r -= f64::from(*v);
                    }
                }
            }
            for i in (0..n).filter(|&i| !occluded[i]) {
                unknowns.push(rows[i * d..(i + 1) * d].to_vec());
                owner.push(Some(i));
            }
            if occluded.iter().any(|&o| o) && vit.pe.has_unk() {
                let unk = vit.unk_row();
                unknowns.push(
                    pe[unk * d..(unk + 1) * d]
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect(),
                );
                owner.push(None);
            }
        }
    }
    // A = G^T (d x m), B = dW^T (d x p); X = patches (m x p).
    let m = unknowns.len();
    let mut a = vec![0.0; d * m];
    for (col, row) in unknowns.iter().enumerate() {
        for k in 0..d {
            a[k * m + col] = row[k];
        }
    }
    let mut b = vec![0.0; d * p];
    for r in 0..p {
        for k in 0..d {
            b[k * p + r] = f64::from(dw[r * d + k]);
        }
    }
    let x = lstsq_min_norm(&a, d, m, &b, p, 1e-10);
    let residual = {
        let (mut num, mut den) = (0.0, 0.0);
        for k in 0..d {
            for r in 0..p {
                let fit: f64 = (0..m).map(|c| a[k * m + c] * x[c * p + r]).sum();
                num += (fit - b[k * p + r]).powi(2);
                den += b[k * p + r].powi(2);
            }
        }
        (num / den.max(1e-300)).sqrt()
    };
    let mut patches = vec![vec![0.0f64; p]; n];
    let mean_occluded: Option<Vec<f64>> = owner
        .iter()
        .position(Option::is_none)
        .map(|c| x[c * p..(c + 1) * p].to_vec());
    for (c, o) in owner.iter().enumerate() {
        if let Some(i) = o {
            patches[*i] = x[c * p..(c + 1) * p].to_vec();
        }
    }
    if let Some(mean) = &mean_occluded {
        for i in (0..n).filter(|&i| occluded[i]) {
            patches[i] = mean.clone();
        }
    }
    Ok(ClosedForm {
        image: unpatchify(vit, &patches),
        occluded,
        residual,
    })
}

/// Turns normalised flattened patches (N x C*p*p, (c, y, x) order) back into a CHW image in
/// [0, 1].
pub fn unpatchify(vit: &mjp::VitConfig, patches: &[Vec<f64>]) -> Vec<f32> {
    let (s, ps, c, g) = (vit.image_size, vit.patch_size, vit.channels, vit.grid());
    let mut image = vec![0f32; c * s * s];
    for (i, patch) in patches.iter().enumerate() {
        let (gr, gc) = (i / g, i % g);
        for ch in 0..c {
            for y in 0..ps {
                for x in 0..ps {
                    let v = patch[ch * ps * ps + y * ps + x] * f64::from(vit.std[ch])
                        + f64::from(vit.mean[ch]);
                    image[ch * s * s + (gr * ps + y) * s + gc * ps + x] = v.clamp(0.0, 1.0) as f32;
                }
            }
        }
    }
    image
}

/// `april`: the closed form as published.
pub const APRIL: Registration = Registration {
    name: "april",
    about: "closed-form PE attack (APRIL), batch 1",
    build: |_| {
        Box::new(ClosedFormAttack::new(
            APRIL.name,
            ClosedFormVariant::Standard,
        ))
    },
};

/// `april-mjp`: the closed form that knows MJP.
pub const APRIL_MJP: Registration = Registration {
    name: "april-mjp",
    about: "MJP-aware closed form: occluded rows inferred, DAL removed, mean occluded patch",
    build: |_| {
        Box::new(ClosedFormAttack::new(
            APRIL_MJP.name,
            ClosedFormVariant::MjpAware,
        ))
    },
};

/// A closed-form variant as an [`Attack`].
pub struct ClosedFormAttack {
    name: &'static str,
    variant: ClosedFormVariant,
}

impl ClosedFormAttack {
    /// The attack `variant`, shown as `name`.
    pub fn new(name: &'static str, variant: ClosedFormVariant) -> Self {
        Self { name, variant }
    }
}

impl Attack for ClosedFormAttack {
    fn name(&self) -> &str {
        self.name
    }

    fn reconstruct(&self, case: &AttackCase, _: &Knowledge<'_>) -> Result<Reconstruction> {
        closed_form(case, self.variant).map(|r| Reconstruction {
            images: r.image,
            objective: None,
        })
    }
}

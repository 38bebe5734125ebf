//! The privacy accountant of local differential privacy (`[defense]` clipping plus noise).
//!
//! Each round a client takes part in, it releases its update through the Gaussian mechanism:
//! clipped to L2 norm `C` (so any two local datasets give updates at distance at most `2C`: the
//! sensitivity) plus noise of standard deviation `z C` on every entry. Secure aggregation and
//! client sampling are not credited: the server sees who sent what (or, under the
//! secure-aggregation view, who took part), so there is no amplification to claim. Rounds of a
//! client compose: the ledger keeps, per client, the zero-concentrated DP of its releases so far
//! (`rho = sum_r (2C)^2 / (2 (z_r C)^2) = sum_r 2 / z_r^2`; zCDP composes by adding), and the
//! (epsilon, delta) conversion is opendp's (`make_zCDP_to_approxDP`), not hand-written.
//!
//! Counted as a release: every round a client was **sampled** in, whether or not its update
//! arrived (an upper bound: a sampled client that never uploaded released nothing).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::rundir::RoundRecord;

/// The differential privacy of a round's sampled clients after the round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundPrivacy {
    /// The delta of every epsilon here.
    pub delta: f64,
    /// The largest epsilon of any client sampled in the round (over all its rounds so far), among
    /// those whose every release was noisy (`None` when there is none such).
    pub epsilon_max: Option<f64>,
    /// Their median epsilon.
    pub epsilon_median: Option<f64>,
    /// The most noisy releases any of them has made.
    pub releases_max: u32,
    /// Sampled clients that also released an update without noise in an earlier round: they
    /// have no finite epsilon.
    #[serde(default)]
    pub unprotected: usize,
}

/// One client's privacy loss so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientLoss {
    /// Noisy releases (rounds sampled with noise on).
    pub releases: u32,
    /// Rounds sampled without noise (their updates are not differentially private at all).
    pub unprotected: u32,
    /// zCDP of the releases so far (rho, summed).
    pub rho: f64,
}

/// Per-client privacy losses over a federation's rounds.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    clients: HashMap<String, ClientLoss>,
}

impl Ledger {
    /// The ledger after `records` (a resumed federation rebuilds it from `rounds.jsonl`).
    pub fn from_records(records: &[RoundRecord]) -> Self {
        let mut ledger = Self::default();
        for r in records {
            ledger.add_round(&r.sampled, &r.defense.client);
        }
        ledger
    }

    /// Adds one round: every client in `sampled` released an update under `defense`.
    pub fn add_round(&mut self, sampled: &[String], defense: &mjp::Defense) {
        for id in sampled {
            let loss = self.clients.entry(id.clone()).or_default();
            match rho_of(defense) {
                Some(rho) => {
                    loss.releases += 1;
                    loss.rho += rho;
                }
                None => loss.unprotected += 1,
            }
        }
    }

    /// A client's loss so far.
    pub fn client(&self, id: &str) -> ClientLoss {
        self.clients.get(id).copied().unwrap_or_default()
    }

    /// Every client's loss, by id.
    pub fn clients(&self) -> impl Iterator<Item = (&String, &ClientLoss)> {
        self.clients.iter()
    }

    /// The privacy of `sampled` after their last round, when that round added noise. A client
    /// with any round without noise has no finite epsilon: it is counted apart.
    pub fn round(
        &self,
        sampled: &[String],
        defense: &mjp::Defense,
        delta: f64,
    ) -> Option<RoundPrivacy> {
        rho_of(defense)?;
        let losses: Vec<ClientLoss> = sampled.iter().map(|id| self.client(id)).collect();
        let mut eps: Vec<f64> = losses.iter().filter_map(|l| epsilon(l, delta)).collect();
        eps.sort_by(f64::total_cmp);
        Some(RoundPrivacy {
            delta,
            epsilon_max: eps.last().copied(),
            epsilon_median: eps.get(eps.len() / 2).copied(),
            releases_max: losses.iter().map(|l| l.releases).max().unwrap_or(0),
            unprotected: losses.len() - eps.len(),
        })
    }
}

/// zCDP (rho) of one release under `defense`, or `None` without noise.
pub fn rho_of(defense: &mjp::Defense) -> Option<f64> {
    defense.is_private().then(|| {
        let z = defense.noise_multiplier;
        // sensitivity 2C, sigma zC: rho = (2C)^2 / (2 z^2 C^2).
        2.0 / (z * z)
    })
}

/// The epsilon at `delta` of a client's releases so far (`None` when one was without noise;
/// 0 when it released nothing).
pub fn epsilon(loss: &ClientLoss, delta: f64) -> Option<f64> {
    if loss.unprotected > 0 {
        return None;
    }
    if loss.releases == 0 {
        return Some(0.0);
    }
    zcdp_to_epsilon(loss.rho, delta)
}

/// opendp's conversion of rho-zCDP to (epsilon, delta)-DP.
pub fn zcdp_to_epsilon(rho: f64, delta: f64) -> Option<f64> {
    accountant::zcdp_to_epsilon(rho, delta).ok()
}

mod accountant {
    use opendp::combinators::{make_fix_delta, make_zCDP_to_approxDP};
    use opendp::domains::{AtomDomain, VectorDomain};
    use opendp::measurements::make_gaussian;
    use opendp::measures::ZeroConcentratedDivergence;
    use opendp::metrics::L2Distance;

    fn message(e: opendp::error::Error) -> String {
        format!("{:?}: {}", e.variant, e.message.unwrap_or_default())
    }

    type Gaussian = opendp::core::Measurement<
        VectorDomain<AtomDomain<f64>>,
        L2Distance<f64>,
        ZeroConcentratedDivergence,
        Vec<f64>,
    >;

    /// opendp's Gaussian mechanism on real vectors, noise `sigma`, zCDP output measure.
    fn gaussian(sigma: f64) -> Result<Gaussian, String> {
        make_gaussian::<_, _, ZeroConcentratedDivergence>(
            VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
            L2Distance::<f64>::default(),
            sigma,
            None,
        )
        .map_err(message)
    }

    /// The Gaussian mechanism of sensitivity 1 whose zCDP is `rho` (`sigma = 1 / sqrt(2 rho)`;
    /// rho of releases composes by adding, so this stands for all of them), converted by opendp.
    pub fn zcdp_to_epsilon(rho: f64, delta: f64) -> Result<f64, String> {
        if !(rho > 0.0 && rho.is_finite()) {
            return Err(format!("rho must be > 0 and finite, got {rho}"));
        }
        let approx = make_zCDP_to_approxDP(gaussian(1.0 / (2.0 * rho).sqrt())?).map_err(message)?;
        let fixed = make_fix_delta(&approx, delta).map_err(message)?;
        let (eps, _) = fixed.map(&1.0).map_err(message)?;
        Ok(eps)
    }

    /// opendp's own composition of `k` Gaussian mechanisms of sensitivity `s` and noise `sigma`,
    /// converted (the test checks the ledger's single-mechanism shortcut against it).
    #[cfg(test)]
    pub fn composed_epsilon(s: f64, sigma: f64, k: usize, delta: f64) -> Result<f64, String> {
        use opendp::combinators::make_composition;
        let composed = make_composition(vec![gaussian(sigma)?; k]).map_err(message)?;
        let approx = make_zCDP_to_approxDP(composed).map_err(message)?;
        let fixed = make_fix_delta(&approx, delta).map_err(message)?;
        Ok(fixed.map(&s).map_err(message)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact (epsilon, delta) curve of the Gaussian mechanism (Balle & Wang 2018, Theorem 8;
    /// Dong, Roth & Su's mu-GDP), solved for epsilon: what any valid accountant must not go below.
    fn exact_gaussian_epsilon(mu: f64, delta: f64) -> f64 {
        let phi = |x: f64| 0.5 * erfc(-x / std::f64::consts::SQRT_2);
        let d = |e: f64| phi(-e / mu + mu / 2.0) - e.exp() * phi(-e / mu - mu / 2.0);
        let (mut lo, mut hi) = (0.0, 500.0);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if d(mid) > delta { lo = mid } else { hi = mid }
        }
        hi
    }

    /// erfc to ~1e-7 relative (Numerical Recipes' Chebyshev fit), enough for a bound check.
    fn erfc(x: f64) -> f64 {
        let z = x.abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let r = t
            * (-z * z - 1.265_512_23
                + t * (1.000_023_68
                    + t * (0.374_091_96
                        + t * (0.096_784_18
                            + t * (-0.186_288_06
                                + t * (0.278_868_07
                                    + t * (-1.135_203_98
                                        + t * (1.488_515_87
                                            + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
                .exp();
        if x >= 0.0 { r } else { 2.0 - r }
    }

    #[test]
    fn epsilon_is_valid_and_close_to_the_exact_gaussian_curve() {
        // (sensitivity, sigma, releases) at delta 1e-5. Balle & Wang's analytic Gaussian: sigma
        // 3.73 gives epsilon 1.0 at sensitivity 1 (the classical bound needs 4.84).
        for (s, sigma, k) in [(1.0, 3.73, 1usize), (2.0, 2.0, 10), (2.0, 1.0, 20)] {
            let rho = k as f64 * s * s / (2.0 * sigma * sigma);
            let eps = zcdp_to_epsilon(rho, 1e-5).unwrap();
            let exact = exact_gaussian_epsilon((k as f64).sqrt() * s / sigma, 1e-5);
            let loose = rho + 2.0 * (rho * (1.0f64 / 1e-5).ln()).sqrt(); // Bun & Steinke 2016
            assert!(
                eps >= exact && eps <= 1.10 * exact,
                "{eps} vs exact {exact}"
            );
            assert!(eps <= loose, "{eps} vs {loose}");
            // The shortcut is opendp's composition of the k releases.
            let composed = accountant::composed_epsilon(s, sigma, k, 1e-5).unwrap();
            assert!(
                (eps - composed).abs() <= 1e-6 * composed,
                "{eps} vs {composed}"
            );
        }
        let exact = exact_gaussian_epsilon(1.0 / 3.73, 1e-5);
        assert!(
            (exact - 1.0).abs() < 2e-3,
            "analytic Gaussian at sigma 3.73: {exact}"
        );
    }

    #[test]
    fn the_ledger_composes_rounds_and_refuses_unprotected_ones() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let dp = |z: f64| mjp::Defense {
            clip_norm: 1.0,
            noise_multiplier: z,
            ..mjp::Defense::NONE
        };
        let mut l = Ledger::default();
        l.add_round(&ids(&["a", "b"]), &dp(2.0));
        l.add_round(&ids(&["a"]), &dp(1.0));
        let (a, b) = (l.client("a"), l.client("b"));
        assert_eq!((a.releases, b.releases), (2, 1));
        assert!((a.rho - (0.5 + 2.0)).abs() < 1e-12 && (b.rho - 0.5).abs() < 1e-12);
        let r = l.round(&ids(&["a", "b"]), &dp(1.0), 1e-5).unwrap();
        assert_eq!(r.epsilon_max, epsilon(&a, 1e-5));
        assert!(r.epsilon_max > epsilon(&b, 1e-5));
        assert_eq!((r.releases_max, r.unprotected), (2, 0));
        // A round without noise leaves no finite epsilon for its clients, and is no private round.
        l.add_round(&ids(&["b"]), &mjp::Defense::NONE);
        assert_eq!(epsilon(&l.client("b"), 1e-5), None);
        assert!(l.round(&ids(&["b"]), &mjp::Defense::NONE, 1e-5).is_none());
        let r = l.round(&ids(&["a", "b"]), &dp(1.0), 1e-5).unwrap();
        assert_eq!((r.epsilon_max, r.unprotected), (epsilon(&a, 1e-5), 1));
        assert_eq!(epsilon(&l.client("nobody"), 1e-5), Some(0.0));
    }
}

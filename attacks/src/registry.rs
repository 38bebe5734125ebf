//! The attacks the adversary can run, by name. Adding an attack is one file that implements
//! [`crate::attack::Attack`] and exports a [`Registration`], plus one line in [`ATTACKS`].

use crate::attack::{Attack, Registration};
use crate::error::{AttackError, Result};
use crate::settings::AdversarySettings;
use crate::{april, baseline, fedavg, fill, optimise};

/// Every attack, in the order `--help` lists them.
pub const ATTACKS: &[Registration] = &[
    april::APRIL,
    april::APRIL_MJP,
    fill::APRIL_MJP_IG,
    optimise::IG,
    optimise::IG_PE,
    optimise::IG_PE_ADAPTIVE,
    optimise::DLG,
    optimise::DLG_PE,
    fedavg::FEDAVG_IG,
    baseline::MEAN_IMAGE,
];

/// The registered names, comma-separated (for messages).
pub fn names() -> String {
    ATTACKS
        .iter()
        .map(|r| r.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds the attack called `name`.
pub fn build(name: &str, settings: &AdversarySettings) -> Result<Box<dyn Attack>> {
    ATTACKS
        .iter()
        .find(|r| r.name == name)
        .map(|r| (r.build)(settings))
        .ok_or_else(|| AttackError::UnknownAttack {
            name: name.to_string(),
            known: names(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registration_builds_an_attack_of_its_own_name() {
        let settings = AdversarySettings::default();
        for r in ATTACKS {
            assert_eq!(build(r.name, &settings).unwrap().name(), r.name);
        }
        let err = build("nope", &settings).err().unwrap().to_string();
        assert!(err.contains("nope") && err.contains("april-mjp"), "{err}");
    }
}

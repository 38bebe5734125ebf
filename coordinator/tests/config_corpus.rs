//! The config_loader fuzz target's committed corpus (fuzz/corpus/config_loader), replayed on the
//! stable toolchain in every test run: each file either fails to parse or validate, or is a
//! configuration the coordinator can run whose resolved `config.toml` parses back equal.

use std::path::Path;
use std::time::Duration;

use mjpfl_coordinator::CoordinatorConfig;

#[test]
fn every_corpus_configuration_is_refused_or_round_trips() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/config_loader");
    let mut valid = 0;
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        files += 1;
        let Ok(config) = toml::from_str::<CoordinatorConfig>(&text) else {
            continue;
        };
        if config.validate().is_err() {
            continue;
        }
        valid += 1;
        let back: CoordinatorConfig = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(back, config, "{}", path.display());
        for secs in [
            config.federation.round_deadline_secs,
            config.federation.client_timeout_secs,
            config.server.upload_idle_timeout_secs,
            config.server.connection_idle_timeout_secs,
            config.server.message_timeout_secs,
            config.server.first_byte_timeout_secs,
        ] {
            assert!(
                Duration::try_from_secs_f64(secs).is_ok(),
                "{}",
                path.display()
            );
        }
    }
    assert!(files >= 5, "the committed corpus is in {}", dir.display());
    assert!(valid >= 3, "{valid} of {files} corpus files validate");
}

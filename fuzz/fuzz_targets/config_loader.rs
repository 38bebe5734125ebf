//! Arbitrary UTF-8 as a coordinator configuration file: `toml::from_str::<CoordinatorConfig>`,
//! `validate()`, and for a valid one the resolved-config round trip the run directory relies on
//! (`to_toml()` is written as `config.toml`): it must parse back equal, and still validate.
//! A valid configuration must also be one the coordinator can run: every `*_secs` value it turns
//! into a `Duration` with `Duration::from_secs_f64` (which panics on negative, NaN or over
//! `u64::MAX` seconds) must convert.
//!
//! `MJPFL_FUZZ_WRITE_SEEDS=<dir>`: write the generated seeds to <dir> and exit.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mjpfl_coordinator::CoordinatorConfig;

/// The seconds values the coordinator passes to `Duration::from_secs_f64`, with where.
fn durations(c: &CoordinatorConfig) -> Vec<(&'static str, f64)> {
    let mut d = vec![
        (
            "federation.round_deadline_secs (federation/driver.rs)",
            c.federation.round_deadline_secs,
        ),
        (
            "federation.client_timeout_secs (federation/round.rs, membership.rs)",
            c.federation.client_timeout_secs,
        ),
        (
            "server.upload_idle_timeout_secs (service.rs)",
            c.server.upload_idle_timeout_secs,
        ),
        (
            "server.connection_idle_timeout_secs (server.rs)",
            c.server.connection_idle_timeout_secs,
        ),
        (
            "server.message_timeout_secs (server.rs)",
            c.server.message_timeout_secs,
        ),
        (
            "server.first_byte_timeout_secs (server.rs)",
            c.server.first_byte_timeout_secs,
        ),
    ];
    if let Some(tls) = &c.server.tls {
        d.push((
            "server.tls.handshake_timeout_secs (tls.rs)",
            tls.handshake_timeout_secs,
        ));
    }
    d
}

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("MJPFL_FUZZ_WRITE_SEEDS") {
            for path in mjpfl_fuzz::write_config_seeds(dir.as_ref()).expect("seeds written") {
                println!("wrote {}", path.display());
            }
            std::process::exit(0);
        }
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let Ok(config) = toml::from_str::<CoordinatorConfig>(text) else {
            return;
        };
        if config.validate().is_err() {
            return;
        }
        let written = config.to_toml();
        let back: CoordinatorConfig = match toml::from_str(&written) {
            Ok(c) => c,
            Err(e) => panic!("to_toml() output does not parse back: {e}\n--- written ---\n{written}"),
        };
        assert_eq!(back, config, "to_toml() round trip changed the config\n--- written ---\n{written}");
        assert!(back.validate().is_ok(), "round-tripped config no longer validates");
        for (name, secs) in durations(&config) {
            assert!(
                Duration::try_from_secs_f64(secs).is_ok(),
                "validate() accepts {name} = {secs}, which Duration::from_secs_f64 panics on"
            );
        }
    }
);

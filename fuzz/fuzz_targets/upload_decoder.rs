//! Attacker-controlled bytes through the coordinator's upload decoding path, as a hostile peer's
//! SubmitUpdate body reaches it (input format: `mjpfl_fuzz` crate docs). Must never panic; any
//! refusal is fine. A fully decoded upload must have the model's layout, and then goes through
//! the pure checks of `Federation::accept` (manifest, finiteness, metrics, admission bounds).
//!
//! `MJPFL_FUZZ_WRITE_SEEDS=<dir>`: write the seed corpus to <dir> and exit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mjpfl_fuzz::{decode_upload, model};

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("MJPFL_FUZZ_WRITE_SEEDS") {
            for path in mjpfl_fuzz::write_upload_seeds(dir.as_ref()).expect("seeds written") {
                println!("wrote {}", path.display());
            }
            std::process::exit(0);
        }
        model();
    },
    |data: &[u8]| {
        let m = model();
        let Ok((header, tensors)) = decode_upload(data, &m.manifest) else {
            return;
        };
        assert_eq!(
            tensors.manifest(),
            m.manifest,
            "a finished upload has the model's names and shapes"
        );
        for t in tensors.tensors() {
            assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "tensor {}", t.name);
        }
        assert!(tensors.check_manifest(&m.manifest).is_ok());
        // What `Federation::accept` checks without federation state.
        let Some(kind) = header.kind else {
            return;
        };
        let update = header.into_update(kind, tensors);
        if update.tensors.check_finite().is_err() || m.admission.check_metrics(&update.metrics).is_err() {
            return;
        }
        let max_weight = u64::from(update.batch_size.max(1));
        if let Ok(admitted) =
            m.admission
                .admit(&update.tensors, update.num_examples, max_weight, m.norm_bound)
        {
            assert!(admitted.weight >= 1.0 && admitted.weight <= update.num_examples as f64);
            assert!(admitted.scale > 0.0 && admitted.scale <= 1.0, "scale {}", admitted.scale);
        }
    }
);

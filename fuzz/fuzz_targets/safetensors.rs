//! The safetensors header (JSON, tensor table, offsets) and the reads it allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metauas::io::weights::{WeightFile, WeightLimits};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    // Whatever the first bytes are, take the safetensors path (a zip magic would pick the
    // torch reader, which has its own target).
    match WeightFile::from_bytes(data.to_vec(), "fuzz.safetensors", &WeightLimits::default()) {
        Ok(file) => {
            let _ = file.metadata();
            common::read_every_entry(&file);
        }
        Err(e) => assert!(!e.message().contains('\n'), "{e}"),
    }
});

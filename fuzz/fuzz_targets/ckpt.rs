//! torch.save zip checkpoints: the zip reader, the restricted unpickler, the storage and view
//! checks, and strided reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metauas::io::weights::{WeightFile, WeightLimits};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    match WeightFile::from_bytes(data.to_vec(), "fuzz.ckpt", &WeightLimits::default()) {
        Ok(file) => common::read_every_entry(&file),
        Err(e) => assert!(!e.message().contains('\n'), "{e}"),
    }
});

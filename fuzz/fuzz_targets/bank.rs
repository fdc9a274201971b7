//! Prompt banks: the safetensors reader plus the bank's metadata (format, version, size,
//! count, names, sources) and its per-prompt feature tensors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metauas::io::weights::{WeightFile, WeightLimits};
use metauas::model::PromptBank;

fuzz_target!(|data: &[u8]| {
    let file = match WeightFile::from_bytes(data.to_vec(), "fuzz.bank", &WeightLimits::default()) {
        Ok(file) => file,
        Err(_) => return,
    };
    match PromptBank::from_weight_file(&file) {
        Ok(bank) => {
            assert!(bank.len() <= metauas::model::bank::MAX_BANK_PROMPTS);
            for e in bank.entries() {
                assert_eq!(e.features.size, bank.size());
            }
        }
        Err(e) => assert!(!e.message().contains('\n'), "{e}"),
    }
});

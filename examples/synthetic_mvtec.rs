//! Writes a tiny synthetic MVTec AD layout and synthetic weights to try `metauas eval`:
//!
//! ```sh
//! cargo run --release --example synthetic_mvtec -- /tmp/synth
//! target/release/metauas eval --weights /tmp/synth/weights.safetensors \
//!     --root /tmp/synth/mvtec --layout mvtec --size 64 --out /tmp/synth/eval
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: synthetic_mvtec DIR");
        return ExitCode::from(2);
    };
    let root = dir.join("mvtec");
    let weights = dir.join("weights.safetensors");
    use metauas::synth::mvtec::{write_mvtec_layout_as, ImageFormat};
    // Two PNG classes (as MVTec AD) and a JPEG one (as VisA).
    let classes = [
        ("bottle", ImageFormat::Png),
        ("screw", ImageFormat::Png),
        ("pcb", ImageFormat::Jpeg),
    ];
    let result = write_mvtec_layout_as(&root, &classes, 72, 64)
        .and_then(|_| metauas::synth::mvtec::write_weights(&weights, 11));
    match result {
        Ok(()) => {
            println!("wrote {} and {}", root.display(), weights.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("synthetic_mvtec: {e}");
            ExitCode::FAILURE
        }
    }
}

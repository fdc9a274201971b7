//! Segment every image of a folder against one normal image and write a heatmap per image.
//!
//! ```sh
//! cargo run --release --example segment_folder -- metauas-256.ckpt good.png frames/ out/
//! ```

use std::path::{Path, PathBuf};

use metauas::io::image::decode_image_file;
use metauas::io::output::write_heatmap_png;
use metauas::{Engine, Error, Result};

fn main() {
    if let Err(e) = run() {
        eprintln!("segment_folder: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [weights, prompt, folder, out] = args.as_slice() else {
        return Err(Error::new(
            "usage: segment_folder WEIGHTS PROMPT_IMAGE FOLDER OUT_DIR",
        ));
    };
    let engine = Engine::from_file(weights, 256)?;
    let prompt = engine.encode_prompt(&decode_image_file(prompt)?)?;
    std::fs::create_dir_all(out).map_err(|e| Error::at(out, e))?;
    for path in images_in(folder)? {
        let map = engine.segment(&prompt, &decode_image_file(&path)?)?;
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        write_heatmap_png(
            &out.join(format!("{stem}_heatmap.png")),
            &map.data,
            map.size,
        )?;
        println!("{}\t{:.4}", path.display(), map.score());
    }
    Ok(())
}

/// The folder's PNG and JPEG files, sorted.
fn images_in(folder: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::at(folder, e))?;
    let mut images: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase());
            matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
        })
        .collect();
    images.sort();
    Ok(images)
}

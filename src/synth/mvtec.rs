//! A tiny synthetic MVTec AD layout (and synthetic weights) to try `metauas eval` without
//! downloads: `cargo run --release --example synthetic_mvtec -- DIR`. The images are
//! `synthetic_image` (a smooth pattern plus noise; defects are inverted squares)
//! and every defective image has its square as a ground-truth mask. A class's images are
//! PNG or, as VisA and most camera pipelines ship them, JPEG (masks are always PNG).

use std::path::Path;

use super::{synthetic_image, WeightRecipe};
use crate::error::{Error, Result};
use crate::io::image::RgbImage8;
use crate::io::jpeg::encode_jpeg;

/// Per class: 3 `train/good`, 2 `test/good`, 2 `test/crack` and 1 `test/scratch` images.
pub const DEFECTS: [(&str, usize, (usize, usize, usize)); 3] = [
    ("crack", 0, (10, 12, 14)),
    ("crack", 1, (40, 30, 18)),
    ("scratch", 0, (20, 40, 9)),
];

/// How a synthetic class stores its images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    /// Baseline 4:2:0 at quality 90.
    Jpeg,
}

impl ImageFormat {
    fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
        }
    }
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::at(dir, format!("cannot create directory: {e}")))?;
    }
    Ok(())
}

fn save_image(path: &Path, img: &RgbImage8, format: ImageFormat) -> Result<()> {
    if format == ImageFormat::Png {
        return save(path, &img.data, img.width, img.height, false);
    }
    create_parent(path)?;
    let bytes = encode_jpeg(img, 90).map_err(|e| Error::at(path, format!("cannot encode: {e}")))?;
    std::fs::write(path, bytes).map_err(|e| Error::at(path, format!("cannot write: {e}")))
}

fn save(path: &Path, data: &[u8], width: usize, height: usize, gray: bool) -> Result<()> {
    create_parent(path)?;
    let color = if gray {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    image::save_buffer(path, data, width as u32, height as u32, color)
        .map_err(|e| Error::at(path, format!("cannot write: {e}")))
}

/// Writes the layout for `classes` under `root`, PNG images of `width x height` (at least
/// 60 x 60, so that the defect squares fit).
pub fn write_mvtec_layout(
    root: &Path,
    classes: &[&str],
    width: usize,
    height: usize,
) -> Result<()> {
    let png: Vec<_> = classes.iter().map(|c| (*c, ImageFormat::Png)).collect();
    write_mvtec_layout_as(root, &png, width, height)
}

/// [`write_mvtec_layout`] with each class's image format.
pub fn write_mvtec_layout_as(
    root: &Path,
    classes: &[(&str, ImageFormat)],
    width: usize,
    height: usize,
) -> Result<()> {
    if width < 60 || height < 60 {
        return Err(Error::new("synthetic images must be at least 60 x 60"));
    }
    let mut seed = 100;
    for &(class, format) in classes {
        let c = root.join(class);
        let ext = format.extension();
        for (sub, count) in [("train/good", 3), ("test/good", 2)] {
            for i in 0..count {
                seed += 1;
                let img = synthetic_image(seed, width, height, None);
                save_image(&c.join(format!("{sub}/{i:03}.{ext}")), &img, format)?;
            }
        }
        for (defect, i, square) in DEFECTS {
            seed += 1;
            let img = synthetic_image(seed, width, height, Some(square));
            save_image(&c.join(format!("test/{defect}/{i:03}.{ext}")), &img, format)?;
            let (x0, y0, side) = square;
            let mask: Vec<u8> = (0..width * height)
                .map(|p| {
                    let (y, x) = (p / width, p % width);
                    let inside = x >= x0 && x < x0 + side && y >= y0 && y < y0 + side;
                    if inside {
                        255
                    } else {
                        0
                    }
                })
                .collect();
            let mask_path = c.join(format!("ground_truth/{defect}/{i:03}_mask.png"));
            save(&mask_path, &mask, width, height, true)?;
        }
    }
    Ok(())
}

/// Writes synthetic weights (every official entry; see `docs/SYNTHETIC.md`) as safetensors.
pub fn write_weights(path: &Path, seed: u64) -> Result<()> {
    crate::synth::write_synthetic_safetensors(path, &WeightRecipe::unit(seed), &[])
}

//! Image decode (PNG, JPEG, BMP, TIFF by content) + resize + ImageNet normalization.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metauas::io::image::{decode_image_bytes_with, preprocess, resize_rgb8, ImageLimits};

fuzz_target!(|data: &[u8]| {
    // Lower than the default (100 Mpx) so that one input stays within libFuzzer's memory and
    // time budget; the limit logic itself is the same.
    let limits = ImageLimits {
        max_pixels: 4_000_000,
        ..ImageLimits::default()
    };
    match decode_image_bytes_with(data, "fuzz", &limits) {
        Ok(img) => {
            assert!(img.width > 0 && img.height > 0);
            assert!((img.width * img.height) as u64 <= limits.max_pixels);
            assert_eq!(img.data.len(), img.width * img.height * 3);
            let pre = preprocess(&img, 32);
            assert_eq!(pre.len(), 32 * 32 * 3);
            assert!(pre.iter().all(|v| v.is_finite()));
            let small = resize_rgb8(&img, 7);
            assert_eq!(small.data.len(), 7 * 7 * 3);
        }
        Err(e) => assert!(!e.message().contains('\n'), "{e}"),
    }
});

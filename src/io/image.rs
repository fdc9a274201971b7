//! Image input: decoding (PNG, JPEG, BMP, TIFF, detected by content) to 8-bit RGB, and the
//! MetaUAS pre-processing (x/255, bilinear align_corners resize, ImageNet normalization).
//!
//! Decoded pixels equal Pillow's `Image.open(p).convert('RGB')`, the upstream loader, bit for
//! bit (tests/fixtures/images, made by tools/reference/make_image_fixtures.py): JPEG through
//! libjpeg-turbo as Pillow's wheels do (`super::jpeg`); PNG, BMP and TIFF through the `image`
//! crate, whose samples are then converted with Pillow's rules: gray is replicated, alpha is
//! dropped (not composited), palettes are expanded; 16-bit RGB(A) keeps the high byte
//! (`v >> 8`); 16-bit *gray* is clipped (every value above 255 becomes 255: Pillow opens it
//! as mode `I;16`, and `convert('RGB')` clips), odd as that is for real 16-bit frames.
//! Float TIFFs are clamped to [0, 1] and scaled to 0..255.
//! EXIF orientation is ignored, as Pillow's `Image.open` does.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use super::jpeg::{self, JpegProblem};
use crate::error::{Error, Result};

/// An 8-bit RGB image, row-major, channel fastest (`[y][x][c]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Default of [`ImageLimits::max_pixels`]: the largest image (width * height) we agree to
/// decode; checked from the header, before any pixel buffer is allocated.
pub const MAX_IMAGE_PIXELS: u64 = 100_000_000;
/// Default of [`ImageLimits::max_side`]: the longest side, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 65_535;
/// Environment variable overriding [`ImageLimits::max_pixels`].
pub const ENV_MAX_IMAGE_PIXELS: &str = "METAUAS_MAX_IMAGE_PIXELS";
/// Environment variable overriding [`ImageLimits::max_side`].
pub const ENV_MAX_IMAGE_SIDE: &str = "METAUAS_MAX_IMAGE_SIDE";

/// Bounds on what an image may make the decoder allocate. Width, height and pixel count are
/// checked from the file's header before any pixel buffer exists; the decoders' own
/// allocations are capped by [`ImageLimits::max_alloc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    pub max_pixels: u64,
    pub max_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_pixels: MAX_IMAGE_PIXELS,
            max_side: MAX_IMAGE_SIDE,
        }
    }
}

impl ImageLimits {
    /// The defaults with `METAUAS_MAX_IMAGE_PIXELS` / `METAUAS_MAX_IMAGE_SIDE` applied.
    pub fn from_env() -> Result<ImageLimits> {
        ImageLimits::from_lookup(|key| std::env::var(key).ok())
    }

    /// Like [`ImageLimits::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<ImageLimits> {
        let mut limits = ImageLimits::default();
        if let Some(v) = super::env_limit(&lookup, ENV_MAX_IMAGE_PIXELS)? {
            limits.max_pixels = v;
        }
        if let Some(v) = super::env_limit(&lookup, ENV_MAX_IMAGE_SIDE)? {
            limits.max_side = u32::try_from(v).unwrap_or(u32::MAX);
        }
        Ok(limits)
    }

    /// Decoder memory cap: the largest accepted image as 16-bit RGBA (8 bytes a pixel) plus
    /// room for the decoders' own working buffers.
    pub fn max_alloc(&self) -> u64 {
        self.max_pixels.saturating_mul(8).saturating_add(256 << 20)
    }

    pub(crate) fn check(&self, width: u32, height: u32) -> std::result::Result<(), String> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels == 0 {
            return Err(format!(
                "image is {width} x {height} pixels: it has no pixels"
            ));
        }
        if width.max(height) > self.max_side {
            return Err(format!(
                "image is {width} x {height} pixels, over the limit of {} pixels a side (raise it with {ENV_MAX_IMAGE_SIDE})",
                self.max_side
            ));
        }
        if pixels > self.max_pixels {
            return Err(format!(
                "image is {width} x {height} pixels, over the limit of {} pixels (raise it with {ENV_MAX_IMAGE_PIXELS})",
                self.max_pixels
            ));
        }
        Ok(())
    }
}

/// ImageNet statistics used by MetaUAS.
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Decode an image file (format detected from its content, not its name), under
/// [`ImageLimits::from_env`].
pub fn decode_image_file(path: &Path) -> Result<RgbImage8> {
    decode_image_file_with(path, &ImageLimits::from_env()?)
}

/// [`decode_image_file`] under explicit limits.
pub fn decode_image_file_with(path: &Path, limits: &ImageLimits) -> Result<RgbImage8> {
    let label = path.display().to_string();
    let cannot_read = |e: std::io::Error| Error::at(path, format!("cannot read: {e}"));
    let mut reader = BufReader::new(File::open(path).map_err(cannot_read)?);
    if jpeg::is_jpeg(reader.fill_buf().map_err(cannot_read)?) {
        let bytes = read_capped(reader, limits.max_alloc()).map_err(cannot_read)?;
        return decode_jpeg_labeled(&bytes, &label, limits);
    }
    decode_from_reader(reader, &label, limits)
}

/// The whole stream, refused past `cap` bytes (a JPEG is decoded from memory).
fn read_capped(reader: impl Read, cap: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::other(format!(
            "the file is over {} MiB, more than any image within the pixel limits",
            cap >> 20
        )));
    }
    Ok(bytes)
}

/// [`jpeg::decode_jpeg`] with its problems worded as one error line naming `label`.
fn decode_jpeg_labeled(bytes: &[u8], label: &str, limits: &ImageLimits) -> Result<RgbImage8> {
    jpeg::decode_jpeg(bytes, limits).map_err(|problem| match problem {
        JpegProblem::Undecodable(detail) => Error::new(format!(
            "{label}: not a decodable image (JPEG: {})",
            one_line(&detail)
        )),
        JpegProblem::Limit(detail) => Error::new(format!("{label}: {detail}")),
        JpegProblem::Truncated => Error::new(format!(
            "{label}: JPEG is truncated: the data ends before the image does (a partial file?)"
        )),
    })
}

/// Decode an image held in memory; `label` names it in errors, in place of a path. Under
/// [`ImageLimits::from_env`].
pub fn decode_image_bytes(bytes: &[u8], label: &str) -> Result<RgbImage8> {
    decode_image_bytes_with(bytes, label, &ImageLimits::from_env()?)
}

/// [`decode_image_bytes`] under explicit limits.
pub fn decode_image_bytes_with(
    bytes: &[u8],
    label: &str,
    limits: &ImageLimits,
) -> Result<RgbImage8> {
    if jpeg::is_jpeg(bytes) {
        return decode_jpeg_labeled(bytes, label, limits);
    }
    decode_from_reader(Cursor::new(bytes), label, limits)
}

fn decode_from_reader<R: BufRead + Seek>(
    mut reader: R,
    label: &str,
    image_limits: &ImageLimits,
) -> Result<RgbImage8> {
    let not_decodable = |detail: &dyn std::fmt::Display| {
        Error::new(format!(
            "{label}: not a decodable image ({})",
            one_line(&detail.to_string())
        ))
    };
    let cannot_read = |e: std::io::Error| Error::new(format!("{label}: cannot read: {e}"));
    // The PNG decoder reads up to the first IDAT before it reports the size; check the IHDR
    // ourselves so that an oversized PNG is refused whatever follows its header.
    if let Some((width, height)) = peek_png_dimensions(&mut reader).map_err(cannot_read)? {
        image_limits
            .check(width, height)
            .map_err(|problem| Error::new(format!("{label}: {problem}")))?;
        check_png_palette(&mut reader)
            .map_err(cannot_read)?
            .map_err(|problem| not_decodable(&problem))?;
    }
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(cannot_read)?;
    if reader.format().is_none() {
        return Err(not_decodable(&"unknown or unsupported format"));
    }
    // No dimension limits yet: the header must be read before we can say what is too big,
    // and we want our own message for that.
    let mut limits = Limits::no_limits();
    limits.max_alloc = Some(image_limits.max_alloc());
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder().map_err(|e| not_decodable(&e))?;
    let (width, height) = decoder.dimensions();
    image_limits
        .check(width, height)
        .map_err(|problem| Error::new(format!("{label}: {problem}")))?;
    decoder.set_limits(limits).map_err(|e| not_decodable(&e))?;
    // Defence in depth: a panic inside a third-party decoder (see `check_png_palette`) is an
    // undecodable image, not a dead process.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        DynamicImage::from_decoder(decoder)
    }))
    .map_err(|_| not_decodable(&"the decoder failed internally"))?
    .map_err(|e| not_decodable(&e))?;
    Ok(to_rgb8(decoded))
}

/// Walks a PNG's chunks up to the first IDAT and refuses a PLTE whose length is not a whole
/// number of RGB entries (1 to 256 of them): png 0.18.1 accepts one and then panics expanding
/// it (fuzz finding 3). The stream is left where it was; CRCs are left to the decoder.
fn check_png_palette<R: Read + Seek>(
    reader: &mut R,
) -> std::io::Result<std::result::Result<(), String>> {
    let start = reader.stream_position()?;
    let mut at = start + 8;
    let verdict = loop {
        reader.seek(SeekFrom::Start(at))?;
        let mut head = [0u8; 8];
        if reader.read_exact(&mut head).is_err() {
            break Ok(()); // truncated: the decoder says so
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        match &head[4..8] {
            b"IDAT" | b"IEND" => break Ok(()),
            b"PLTE" if len == 0 || len % 3 != 0 || len > 768 => {
                break Err(format!(
                    "PNG palette of {len} bytes is not 1 to 256 RGB entries"
                ))
            }
            _ => at += 12 + u64::from(len),
        }
    };
    reader.seek(SeekFrom::Start(start))?;
    Ok(verdict)
}

/// A decoder's message on one line: some end in (or contain) newlines.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Width and height from a PNG's IHDR, if the stream starts like a PNG; the stream is left
/// where it was.
fn peek_png_dimensions<R: Read + Seek>(reader: &mut R) -> std::io::Result<Option<(u32, u32)>> {
    let start = reader.stream_position()?;
    let mut head = Vec::with_capacity(24);
    reader.by_ref().take(24).read_to_end(&mut head)?;
    reader.seek(SeekFrom::Start(start))?;
    if head.len() < 24 || &head[..8] != b"\x89PNG\r\n\x1a\n" || &head[12..16] != b"IHDR" {
        return Ok(None);
    }
    let be = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    Ok(Some((be(16), be(20))))
}

/// Convert any decoded layout to 8-bit RGB (see the module comment for the rules).
fn to_rgb8(img: DynamicImage) -> RgbImage8 {
    let width = img.width() as usize;
    let height = img.height() as usize;
    let data = match img {
        DynamicImage::ImageRgb8(buf) => buf.into_raw(),
        DynamicImage::ImageRgba8(buf) => keep_channels(buf.as_raw(), 4, 3, |v| v),
        DynamicImage::ImageLuma8(buf) => replicate_gray(buf.as_raw(), 1, |v| v),
        DynamicImage::ImageLumaA8(buf) => replicate_gray(buf.as_raw(), 2, |v| v),
        DynamicImage::ImageRgb16(buf) => keep_channels(buf.as_raw(), 3, 3, high_byte),
        DynamicImage::ImageRgba16(buf) => keep_channels(buf.as_raw(), 4, 3, high_byte),
        DynamicImage::ImageLuma16(buf) => replicate_gray(buf.as_raw(), 1, clip_to_byte),
        DynamicImage::ImageLumaA16(buf) => replicate_gray(buf.as_raw(), 2, high_byte),
        DynamicImage::ImageRgb32F(buf) => keep_channels(buf.as_raw(), 3, 3, unit_float_to_u8),
        DynamicImage::ImageRgba32F(buf) => keep_channels(buf.as_raw(), 4, 3, unit_float_to_u8),
        // The enum is non-exhaustive; let the crate convert layouts added in later versions.
        other => other.to_rgb8().into_raw(),
    };
    RgbImage8 {
        width,
        height,
        data,
    }
}

fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

/// Pillow's `I;16` -> `RGB`: values above 255 saturate.
fn clip_to_byte(v: u16) -> u8 {
    v.min(255) as u8
}

fn unit_float_to_u8(v: f32) -> u8 {
    // NaN maps to 0 (`as` saturates and sends NaN to 0).
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Take the first `keep` of every `stride` samples (drops alpha).
fn keep_channels<T: Copy>(
    raw: &[T],
    stride: usize,
    keep: usize,
    conv: impl Fn(T) -> u8,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() / stride * keep);
    for px in raw.chunks_exact(stride) {
        out.extend(px[..keep].iter().map(|&v| conv(v)));
    }
    out
}

/// Replicate the first sample of every `stride` samples to three channels.
fn replicate_gray<T: Copy>(raw: &[T], stride: usize, conv: impl Fn(T) -> u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() / stride * 3);
    for px in raw.chunks_exact(stride) {
        let v = conv(px[0]);
        out.extend_from_slice(&[v, v, v]);
    }
    out
}

/// Source taps and weights of a 1-D bilinear align_corners resize, PyTorch's way:
/// `src = scale * dst` with `scale = (in-1)/(out-1)` (0 when out == 1), `i0 = floor(src)`,
/// `i1 = i0 + 1` except at the last input sample, weights `(1 - l, l)` with `l = src - i0`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Tap {
    i0: usize,
    i1: usize,
    w0: f64,
    w1: f64,
}

fn linear_taps(input: usize, output: usize) -> Vec<Tap> {
    let last = input.saturating_sub(1);
    let scale = if output > 1 {
        last as f64 / (output - 1) as f64
    } else {
        0.0
    };
    (0..output)
        .map(|dst| {
            let src = scale * dst as f64;
            let i0 = (src.floor() as usize).min(last);
            let l = (src - i0 as f64).clamp(0.0, 1.0);
            let i1 = if i0 < last { i0 + 1 } else { i0 };
            Tap {
                i0,
                i1,
                w0: 1.0 - l,
                w1: l,
            }
        })
        .collect()
}

/// Bilinear align_corners resize of `img` to `size x size`, handing each output sample (as a
/// float64 in the units of `sample`) to `emit` in `[y][x][c]` order.
fn resize_with(
    img: &RgbImage8,
    size: usize,
    sample: impl Fn(u8) -> f64,
    mut emit: impl FnMut(usize, f64),
) {
    assert!(
        img.width > 0 && img.height > 0 && img.data.len() == img.width * img.height * 3,
        "resize: image {}x{} with {} bytes is not a valid RGB image",
        img.width,
        img.height,
        img.data.len()
    );
    let cols = linear_taps(img.width, size);
    let rows = linear_taps(img.height, size);
    let at = |y: usize, x: usize, c: usize| sample(img.data[(y * img.width + x) * 3 + c]);
    for ty in &rows {
        for tx in &cols {
            for c in 0..3 {
                // Same association as PyTorch's CPU kernel: rows outermost.
                let top = tx.w0 * at(ty.i0, tx.i0, c) + tx.w1 * at(ty.i0, tx.i1, c);
                let bottom = tx.w0 * at(ty.i1, tx.i0, c) + tx.w1 * at(ty.i1, tx.i1, c);
                emit(c, ty.w0 * top + ty.w1 * bottom);
            }
        }
    }
}

/// `v / 255.0` in float64 for every byte, computed once (the same values, without a
/// division per tap: four per output value).
const UNIT_SAMPLES: [f64; 256] = {
    let mut table = [0.0; 256];
    let mut v = 0;
    while v < 256 {
        table[v] = v as f64 / 255.0;
        v += 1;
    }
    table
};

/// MetaUAS pre-processing: x/255, bilinear resize to `size x size` with align_corners=True
/// (no antialias), then ImageNet normalization. All arithmetic in float64, rounded once to
/// float32. Output NHWC (`size * size * 3`).
///
/// Panics if `img` is empty or its `data` length is not `width * height * 3` (decoded images
/// never are).
pub fn preprocess(img: &RgbImage8, size: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(size * size * 3);
    resize_with(
        img,
        size,
        |v| UNIT_SAMPLES[usize::from(v)],
        |c, v| out.push(((v - MEAN[c]) / STD[c]) as f32),
    );
    out
}

/// The same resize on the raw bytes (for overlays), rounded to the nearest byte.
pub fn resize_rgb8(img: &RgbImage8, size: usize) -> RgbImage8 {
    let mut data = Vec::with_capacity(size * size * 3);
    resize_with(img, size, f64::from, |_, v| {
        data.push(v.round().clamp(0.0, 255.0) as u8)
    });
    RgbImage8 {
        width: size,
        height: size,
        data,
    }
}

/// The same bilinear align_corners resize on a binary `width x height` mask (non-zero = 1),
/// to `size x size`; an output pixel is 1 when its interpolated value is above 0 (the
/// MetaUAS evaluation's `mask[mask > 0] = 1` after the resize).
pub fn resize_mask(mask: &[u8], width: usize, height: usize, size: usize) -> Vec<u8> {
    assert!(
        width > 0 && height > 0 && mask.len() == width * height,
        "resize_mask: {} values are not a {width}x{height} mask",
        mask.len()
    );
    let cols = linear_taps(width, size);
    let rows = linear_taps(height, size);
    let at = |y: usize, x: usize| f64::from(u8::from(mask[y * width + x] != 0));
    let mut out = Vec::with_capacity(size * size);
    for ty in &rows {
        for tx in &cols {
            let top = tx.w0 * at(ty.i0, tx.i0) + tx.w1 * at(ty.i0, tx.i1);
            let bottom = tx.w0 * at(ty.i1, tx.i0) + tx.w1 * at(ty.i1, tx.i1);
            out.push(u8::from(ty.w0 * top + ty.w1 * bottom > 0.0));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(width: usize, height: usize, data: Vec<u8>) -> RgbImage8 {
        RgbImage8 {
            width,
            height,
            data,
        }
    }

    /// 2-D bilinear align_corners written directly from its definition, in float64.
    fn naive_resize_f64(img: &RgbImage8, size: usize) -> Vec<f64> {
        let coord = |dst: usize, input: usize| -> f64 {
            if size == 1 {
                0.0
            } else {
                dst as f64 * (input - 1) as f64 / (size - 1) as f64
            }
        };
        let px = |y: usize, x: usize, c: usize| img.data[(y * img.width + x) * 3 + c] as f64;
        let mut out = Vec::new();
        for oy in 0..size {
            let sy = coord(oy, img.height);
            let y0 = sy.floor() as usize;
            let y1 = (y0 + 1).min(img.height - 1);
            let fy = sy - y0 as f64;
            for ox in 0..size {
                let sx = coord(ox, img.width);
                let x0 = sx.floor() as usize;
                let x1 = (x0 + 1).min(img.width - 1);
                let fx = sx - x0 as f64;
                for c in 0..3 {
                    let v = (1.0 - fy) * (1.0 - fx) * px(y0, x0, c)
                        + (1.0 - fy) * fx * px(y0, x1, c)
                        + fy * (1.0 - fx) * px(y1, x0, c)
                        + fy * fx * px(y1, x1, c);
                    out.push(v);
                }
            }
        }
        out
    }

    fn normalized(v255: f64, c: usize) -> f32 {
        ((v255 / 255.0 - [0.485, 0.456, 0.406][c]) / [0.229, 0.224, 0.225][c]) as f32
    }

    fn pseudo_random_image(width: usize, height: usize, seed: u64) -> RgbImage8 {
        let mut s = seed;
        let data = (0..width * height * 3)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect();
        image(width, height, data)
    }

    #[test]
    fn two_by_two_to_three_by_three_gives_exact_midpoints() {
        // Channel 0 carries the interesting values; 1 and 2 are constant.
        let corners = [0u8, 100, 200, 60]; // (0,0) (0,1) (1,0) (1,1) as (y,x)
        let data = corners.iter().flat_map(|&v| [v, 7, 255]).collect();
        let img = image(2, 2, data);
        let expect_c0 = [
            [0.0, 50.0, 100.0],
            [100.0, 90.0, 80.0],
            [200.0, 130.0, 60.0],
        ];
        let bytes = resize_rgb8(&img, 3);
        let pre = preprocess(&img, 3);
        for (y, row) in expect_c0.iter().enumerate() {
            for (x, &want) in row.iter().enumerate() {
                let i = (y * 3 + x) * 3;
                assert_eq!(bytes.data[i], want as u8, "byte at {y},{x}");
                assert_eq!(bytes.data[i + 1], 7);
                assert_eq!(bytes.data[i + 2], 255);
                assert_eq!(pre[i], normalized(want, 0), "value at {y},{x}");
                assert_eq!(pre[i + 1], normalized(7.0, 1));
                assert_eq!(pre[i + 2], normalized(255.0, 2));
            }
        }
    }

    #[test]
    fn rounding_of_bytes_is_half_away_from_zero() {
        // 1x2 -> 1x3: the middle is (1 + 2) / 2 = 1.5 -> 2.
        let img = image(2, 1, vec![1, 1, 1, 2, 2, 2]);
        let out = resize_rgb8(&img, 3);
        // Height 1 -> 3 replicates the single row.
        for y in 0..3 {
            assert_eq!(&out.data[y * 9..y * 9 + 9], &[1, 1, 1, 2, 2, 2, 2, 2, 2]);
        }
    }

    #[test]
    fn one_pixel_input_and_one_pixel_output_do_not_divide_by_zero() {
        let one = image(1, 1, vec![10, 20, 30]);
        let up = resize_rgb8(&one, 4);
        assert!(up.data.chunks(3).all(|p| p == [10, 20, 30]));
        let pre = preprocess(&one, 4);
        assert!(pre.iter().all(|v| v.is_finite()));
        assert_eq!(pre[0], normalized(10.0, 0));

        // align_corners with out == 1 samples the first pixel (scale 0), like PyTorch.
        let img = pseudo_random_image(5, 3, 1);
        let down = resize_rgb8(&img, 1);
        assert_eq!(down.data, img.data[..3].to_vec());
    }

    #[test]
    fn identity_size_is_a_copy() {
        let img = pseudo_random_image(6, 6, 2);
        assert_eq!(resize_rgb8(&img, 6), img);
        let pre = preprocess(&img, 6);
        for (i, &b) in img.data.iter().enumerate() {
            assert_eq!(pre[i], normalized(b as f64, i % 3));
        }
    }

    #[test]
    fn matches_naive_float64_definition_up_and_down() {
        for &(w, h, size, seed) in &[
            (300, 220, 256, 3),
            (280, 240, 64, 4),
            (7, 5, 32, 5),
            (97, 13, 33, 6),
        ] {
            let img = pseudo_random_image(w, h, seed);
            let truth = naive_resize_f64(&img, size);
            let pre = preprocess(&img, size);
            let bytes = resize_rgb8(&img, size);
            assert_eq!(pre.len(), size * size * 3);
            let mut worst = 0.0f64;
            for (i, &t) in truth.iter().enumerate() {
                let c = i % 3;
                let exact = (t / 255.0 - [0.485, 0.456, 0.406][c]) / [0.229, 0.224, 0.225][c];
                // One f32 rounding of the exact value: within half an ulp plus a hair
                // for the differently associated f64 arithmetic.
                let err = (pre[i] as f64 - exact).abs();
                let ulp = (exact.abs() as f32).max(f32::MIN_POSITIVE) as f64 * f32::EPSILON as f64;
                worst = worst.max(err / ulp);
                assert!((bytes.data[i] as f64 - t).abs() <= 0.5 + 1e-9, "byte {i}");
            }
            assert!(worst <= 0.5 + 1e-3, "{w}x{h}->{size}: error {worst} ulp");
        }
    }

    /// PyTorch's `F.interpolate(bilinear, align_corners=True)` in float64 and the
    /// normalization, rounded to float32, should be bit-identical to ours.
    #[test]
    fn matches_pytorch_float64_when_available() {
        let python = Path::new("/opt/refenv/bin/python");
        if !python.exists() {
            eprintln!("note: /opt/refenv/bin/python not found; PyTorch cross-check skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("metauas-resize-torch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = pseudo_random_image(280, 240, 11);
        std::fs::write(dir.join("img.rgb"), &img.data).unwrap();
        let script = "import sys, numpy as np, torch, torch.nn.functional as F\n\
                      d = sys.argv[1]\n\
                      img = np.fromfile(d + '/img.rgb', np.uint8).reshape(240, 280, 3)\n\
                      x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255\n\
                      m = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[None, :, None, None]\n\
                      s = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[None, :, None, None]\n\
                      for n in (256, 64, 1):\n\
                      \x20   y = F.interpolate(x, size=(n, n), mode='bilinear', align_corners=True)\n\
                      \x20   ((y - m) / s)[0].permute(1, 2, 0).numpy().astype('<f4').tofile(d + '/t%d.f32' % n)\n";
        let ran = std::process::Command::new(python)
            .args(["-c", script])
            .arg(&dir)
            .output();
        match ran {
            Ok(out) if out.status.success() => {
                for n in [256usize, 64, 1] {
                    let bytes = std::fs::read(dir.join(format!("t{n}.f32"))).unwrap();
                    let torch: Vec<u32> = bytes
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    let ours: Vec<u32> = preprocess(&img, n).iter().map(|v| v.to_bits()).collect();
                    assert_eq!(ours.len(), torch.len());
                    let differ = ours.iter().zip(&torch).filter(|(a, b)| a != b).count();
                    assert_eq!(
                        differ, 0,
                        "size {n}: {differ} values differ from PyTorch float64"
                    );
                }
            }
            Ok(out) => eprintln!(
                "note: PyTorch cross-check skipped (python failed: {})",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
            Err(e) => eprintln!("note: PyTorch cross-check skipped ({e})"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn taps_cover_the_ends_exactly() {
        let taps = linear_taps(300, 256);
        assert_eq!((taps[0].i0, taps[0].w1), (0, 0.0));
        let last = taps[255];
        // The last output sits on the last input sample (up to rounding of the scale).
        let pos = last.i0 as f64 * last.w0 + last.i1 as f64 * last.w1;
        assert!((pos - 299.0).abs() < 1e-9);
        assert!(taps.iter().all(|t| t.i1 < 300 && t.i0 <= t.i1));
    }

    // ---- decoding ----

    fn encode(img: &DynamicImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).expect("encode test image");
        out.into_inner()
    }

    #[test]
    fn decodes_gray_gray_alpha_and_rgba_pngs() {
        let gray =
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(2, 1, vec![3, 250]).unwrap());
        let out = decode_image_bytes(&encode(&gray, image::ImageFormat::Png), "g").unwrap();
        assert_eq!((out.width, out.height), (2, 1));
        assert_eq!(out.data, vec![3, 3, 3, 250, 250, 250]);

        let la = image::GrayAlphaImage::from_raw(2, 1, vec![9, 0, 200, 128]).unwrap();
        let out = decode_image_bytes(
            &encode(&DynamicImage::ImageLumaA8(la), image::ImageFormat::Png),
            "la",
        )
        .unwrap();
        assert_eq!(
            out.data,
            vec![9, 9, 9, 200, 200, 200],
            "alpha dropped, not composited"
        );

        let rgba = image::RgbaImage::from_raw(1, 2, vec![10, 20, 30, 0, 40, 50, 60, 77]).unwrap();
        let out = decode_image_bytes(
            &encode(&DynamicImage::ImageRgba8(rgba), image::ImageFormat::Png),
            "rgba",
        )
        .unwrap();
        assert_eq!((out.width, out.height), (1, 2));
        assert_eq!(out.data, vec![10, 20, 30, 40, 50, 60]);
    }

    #[test]
    fn sixteen_bit_rgb_keeps_the_high_byte_and_gray_is_clipped() {
        let rgb16 =
            image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![0x12ff, 0xab00, 0xffff])
                .unwrap();
        let out = decode_image_bytes(
            &encode(&DynamicImage::ImageRgb16(rgb16), image::ImageFormat::Png),
            "16",
        )
        .unwrap();
        assert_eq!(out.data, vec![0x12, 0xab, 0xff]);

        let gray16 =
            image::ImageBuffer::<image::Luma<u16>, _>::from_raw(2, 1, vec![0x00c8, 0xfe01])
                .unwrap();
        let out = decode_image_bytes(
            &encode(&DynamicImage::ImageLuma16(gray16), image::ImageFormat::Png),
            "g16",
        )
        .unwrap();
        // Pillow's I;16 -> RGB clips: 200 stays, 0xfe01 becomes 255.
        assert_eq!(out.data, vec![200, 200, 200, 255, 255, 255]);
    }

    #[test]
    fn decodes_bmp_tiff_and_jpeg() {
        let rgb = image::RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([(x * 30) as u8, (y * 30) as u8, 128])
        });
        let dynimg = DynamicImage::ImageRgb8(rgb.clone());
        for format in [image::ImageFormat::Bmp, image::ImageFormat::Tiff] {
            let out = decode_image_bytes(&encode(&dynimg, format), "lossless").unwrap();
            assert_eq!(out.data, rgb.as_raw().clone(), "{format:?}");
        }
        let out = decode_image_bytes(&encode(&dynimg, image::ImageFormat::Jpeg), "jpeg").unwrap();
        assert_eq!((out.width, out.height), (8, 8));
        let worst = out
            .data
            .iter()
            .zip(rgb.as_raw())
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .max()
            .unwrap();
        assert!(worst < 40, "jpeg decoded far from its source: {worst}");
    }

    #[test]
    fn rejects_broken_inputs_with_the_label() {
        let gray =
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(16, 16, vec![77; 256]).unwrap());
        let png = encode(&gray, image::ImageFormat::Png);
        let truncated = &png[..png.len() - 20];
        let err = decode_image_bytes(truncated, "cut.png").unwrap_err();
        assert!(
            err.message()
                .starts_with("cut.png: not a decodable image ("),
            "{err}"
        );

        let err = decode_image_bytes(b"", "empty").unwrap_err();
        assert!(
            err.message().starts_with("empty: not a decodable image"),
            "{err}"
        );

        let err = decode_image_bytes(b"hello, this is text\n", "notes.txt").unwrap_err();
        assert!(
            err.message()
                .starts_with("notes.txt: not a decodable image"),
            "{err}"
        );
    }

    /// A PNG whose IHDR claims `width x height` (8-bit gray), with valid CRCs, an empty
    /// IDAT-less body and IEND.
    fn png_header_only(width: u32, height: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut crc = 0xffff_ffffu32;
            for &b in bytes {
                crc ^= b as u32;
                for _ in 0..8 {
                    crc = if crc & 1 != 0 {
                        (crc >> 1) ^ 0xedb8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], body: &[u8]) {
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            let mut typed = kind.to_vec();
            typed.extend_from_slice(body);
            out.extend_from_slice(&typed);
            out.extend_from_slice(&crc32(&typed).to_be_bytes());
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // depth 8, gray, deflate, filter 0, no interlace
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IEND", &[]);
        png
    }

    #[test]
    fn refuses_a_decompression_bomb_from_its_header() {
        // Sanity: the CRC helper is right, or the error below would be about the CRC.
        assert_eq!(&png_header_only(1, 1)[29..33], &[0x3a, 0x7e, 0x9b, 0x55]);
        let limits = ImageLimits::default();
        let err = decode_image_bytes_with(&png_header_only(60_000, 60_000), "bomb.png", &limits)
            .unwrap_err();
        assert_eq!(
            err.message(),
            "bomb.png: image is 60000 x 60000 pixels, over the limit of 100000000 pixels (raise it with METAUAS_MAX_IMAGE_PIXELS)"
        );
        let err = decode_image_bytes_with(&png_header_only(100_000, 100_000), "bomb.png", &limits)
            .unwrap_err();
        assert_eq!(
            err.message(),
            "bomb.png: image is 100000 x 100000 pixels, over the limit of 65535 pixels a side (raise it with METAUAS_MAX_IMAGE_SIDE)"
        );
        // Just under the limit, the header passes and the missing data is what fails.
        let err = decode_image_bytes_with(&png_header_only(10_000, 10_000), "big.png", &limits)
            .unwrap_err();
        assert!(
            err.message().starts_with("big.png: not a decodable image"),
            "{err}"
        );
    }

    #[test]
    fn file_errors_name_the_path() {
        let dir = std::env::temp_dir().join(format!("metauas-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.png");
        let err = decode_image_file(&missing).unwrap_err();
        assert!(
            err.message()
                .starts_with(&format!("{}: cannot read: ", missing.display())),
            "{err}"
        );
        let text = dir.join("note.png");
        std::fs::write(&text, "not an image").unwrap();
        let err = decode_image_file(&text).unwrap_err();
        assert!(
            err.message()
                .starts_with(&format!("{}: not a decodable image", text.display())),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

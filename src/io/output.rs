//! Map outputs: `.npy` float32 arrays, JET heatmaps (fixed, calibrated or min-max scale) and
//! overlays with region boxes as PNG, gray PNG masks.
//! Every file is written atomically: a temporary file in the same folder, then a rename, so a
//! reader never sees a half-written output.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use image::ExtendedColorType;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::io::image::RgbImage8;

const NPY_MAGIC: &[u8] = b"\x93NUMPY";
/// numpy aligns the start of the data to 64 bytes.
const NPY_ALIGN: usize = 64;
/// A header longer than this is not one we wrote or would want to parse.
const NPY_MAX_HEADER: usize = 64 * 1024;

// ---------------------------------------------------------------- atomic writes

/// Write `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::at(path, "not a file name"))?
        .to_string_lossy();
    let tmp_name = format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let result = (|| -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::at(path, format!("cannot write: {e}"))
    })
}

// ---------------------------------------------------------------- .npy

/// The NPY v1.0 header for a little-endian float32 C-order array, padded (as numpy does) so
/// that the data starts on a 64-byte boundary.
fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    };
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // magic (6) + version (2) + length (2) + dict + padding + '\n'
    let unpadded = NPY_MAGIC.len() + 4 + dict.len() + 1;
    let pad = NPY_ALIGN - unpadded % NPY_ALIGN;
    let header_len = dict.len() + pad + 1;
    let mut out = Vec::with_capacity(unpadded + pad);
    out.extend_from_slice(NPY_MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(out.len() + pad, b' ');
    out.push(b'\n');
    out
}

/// `data` (C order, `shape`) as the bytes of a `.npy` v1.0 file of `<f4`.
pub fn npy_f32_bytes(data: &[f32], shape: &[usize]) -> std::result::Result<Vec<u8>, String> {
    let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if count != Some(data.len()) {
        return Err(format!(
            "shape {shape:?} does not hold {} values",
            data.len()
        ));
    }
    let mut bytes = npy_header(shape);
    bytes.reserve(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Ok(bytes)
}

/// Write `data` (C order, `shape`) as a `.npy` v1.0 file of `<f4`.
pub fn write_npy_f32(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let bytes = npy_f32_bytes(data, shape).map_err(|p| Error::at(path, p))?;
    write_atomic(path, &bytes)
}

/// Read a `.npy` file of little-endian float32 in C order (v1.x or v2.x header). Anything
/// else -- another dtype, Fortran order, a size that does not match the shape -- is an error.
pub fn read_npy_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = fs::read(path).map_err(|e| Error::at(path, format!("cannot read: {e}")))?;
    parse_npy_f32(&bytes).map_err(|problem| Error::at(path, problem))
}

fn parse_npy_f32(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    let (descr, dtype, shape, data) = split_npy(bytes)?;
    if descr != "<f4" {
        return Err(format!(
            "dtype '{descr}' is not little-endian float32 ('<f4')"
        ));
    }
    debug_assert_eq!(dtype, NpyDtype::F32);
    let values = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((shape, values))
}

/// The float dtypes `parse_npy` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    F16,
    F32,
    F64,
}

impl NpyDtype {
    pub fn name(self) -> &'static str {
        match self {
            NpyDtype::F16 => "float16",
            NpyDtype::F32 => "float32",
            NpyDtype::F64 => "float64",
        }
    }

    fn bytes(self) -> usize {
        match self {
            NpyDtype::F16 => 2,
            NpyDtype::F32 => 4,
            NpyDtype::F64 => 8,
        }
    }
}

/// A float array of any byte order read from a `.npy`, widened to float64 (exact).
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub dtype: NpyDtype,
    pub values: Vec<f64>,
}

/// Parse a `.npy` of float16/32/64, either byte order, C order (another engine's output).
/// A truncated or padded file, another dtype or Fortran order is an error.
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    let (descr, dtype, shape, data) = split_npy(bytes)?;
    let big = descr.starts_with('>');
    let word = |b: &[u8], n: usize| -> [u8; 8] {
        let mut w = [0u8; 8];
        w[..n].copy_from_slice(b);
        if big {
            w[..n].reverse();
        }
        w
    };
    let n = dtype.bytes();
    let values = data
        .chunks_exact(n)
        .map(|b| {
            let w = word(b, n);
            match dtype {
                NpyDtype::F16 => half::f16::from_le_bytes([w[0], w[1]]).to_f64(),
                NpyDtype::F32 => f32::from_le_bytes([w[0], w[1], w[2], w[3]]) as f64,
                NpyDtype::F64 => f64::from_le_bytes(w),
            }
        })
        .collect();
    Ok(NpyArray {
        shape,
        dtype,
        values,
    })
}

/// Where the header dict lies: (start, length).
fn npy_header_span(bytes: &[u8]) -> std::result::Result<(usize, usize), String> {
    if bytes.len() < 10 || &bytes[..6] != NPY_MAGIC {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!(".npy version {v}.{} is not supported", bytes[7])),
    };
    if header_len > NPY_MAX_HEADER || header_start + header_len > bytes.len() {
        return Err(format!(
            ".npy header of {header_len} bytes does not fit the file"
        ));
    }
    Ok((header_start, header_len))
}

/// A `.npy` split into its header's `descr`, dtype and shape, and its data bytes.
type NpyParts<'a> = (String, NpyDtype, Vec<usize>, &'a [u8]);

/// The parts of a `.npy`, the data's length checked against the shape.
fn split_npy(bytes: &[u8]) -> std::result::Result<NpyParts<'_>, String> {
    let (start, len) = npy_header_span(bytes)?;
    let header = std::str::from_utf8(&bytes[start..start + len])
        .map_err(|_| ".npy header is not text".to_string())?;
    let (descr, shape) = parse_npy_header(header)?;
    let dtype = match descr.as_str() {
        "<f2" | ">f2" => NpyDtype::F16,
        "<f4" | ">f4" => NpyDtype::F32,
        "<f8" | ">f8" => NpyDtype::F64,
        d => return Err(format!("dtype '{d}' is not float16, float32 or float64")),
    };
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    let data = &bytes[start + len..];
    let want = count.checked_mul(dtype.bytes());
    if Some(data.len()) != want {
        let kind = if want.is_some_and(|w| data.len() < w) {
            "truncated: "
        } else {
            ""
        };
        return Err(format!(
            "{kind}shape {shape:?} needs {count} {} values but the file holds {} bytes of data",
            dtype.name(),
            data.len()
        ));
    }
    Ok((descr, dtype, shape, data))
}

/// Parse `{'descr': '<f4', 'fortran_order': False, 'shape': (..), }` (keys in any order,
/// each exactly once) and return the shape.
fn parse_npy_header(header: &str) -> std::result::Result<(String, Vec<usize>), String> {
    let bad = |why: &str| format!(".npy header {:?}: {why}", header.trim_end());
    let body = header
        .trim_end()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or_else(|| bad("not a dict"))?;
    let mut rest = body.trim_start();
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    while !rest.is_empty() {
        let (key, after) = take_quoted(rest).ok_or_else(|| bad("expected a quoted key"))?;
        let after = after
            .trim_start()
            .strip_prefix(':')
            .ok_or_else(|| bad("expected ':'"))?
            .trim_start();
        let after = match key {
            "descr" => {
                let (v, a) = take_quoted(after).ok_or_else(|| bad("descr is not a string"))?;
                set_once(&mut descr, v.to_string()).map_err(|_| bad("descr twice"))?;
                a
            }
            "fortran_order" => {
                let (v, a) = if let Some(a) = after.strip_prefix("False") {
                    (false, a)
                } else if let Some(a) = after.strip_prefix("True") {
                    (true, a)
                } else {
                    return Err(bad("fortran_order is not a boolean"));
                };
                set_once(&mut fortran, v).map_err(|_| bad("fortran_order twice"))?;
                a
            }
            "shape" => {
                let (v, a) =
                    take_shape(after).ok_or_else(|| bad("shape is not a tuple of integers"))?;
                set_once(&mut shape, v).map_err(|_| bad("shape twice"))?;
                a
            }
            other => return Err(bad(&format!("unexpected key '{other}'"))),
        };
        let after = after.trim_start();
        rest = match after.strip_prefix(',') {
            Some(a) => a.trim_start(),
            None if after.is_empty() => after,
            None => return Err(bad("expected ',' between entries")),
        };
    }
    match (descr, fortran, shape) {
        (Some(d), Some(false), Some(shape)) => Ok((d, shape)),
        (_, Some(true), _) => Err("Fortran-order arrays are not supported".into()),
        _ => Err(bad("missing descr, fortran_order or shape")),
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T) -> std::result::Result<(), ()> {
    if slot.is_some() {
        return Err(());
    }
    *slot = Some(value);
    Ok(())
}

/// `'text'` or `"text"` at the start of `s`: the text and what follows.
fn take_quoted(s: &str) -> Option<(&str, &str)> {
    let quote = s.chars().next().filter(|&c| c == '\'' || c == '"')?;
    let inner = &s[1..];
    let end = inner.find(quote)?;
    Some((&inner[..end], &inner[end + 1..]))
}

/// `(a, b, ...)`, `(a,)` or `()` at the start of `s`.
fn take_shape(s: &str) -> Option<(Vec<usize>, &str)> {
    let inner_start = s.strip_prefix('(')?;
    let end = inner_start.find(')')?;
    let inner = inner_start[..end].trim();
    let mut dims = Vec::new();
    if !inner.is_empty() {
        let inner = inner.strip_suffix(',').unwrap_or(inner);
        for part in inner.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            dims.push(part.parse().ok()?);
        }
    }
    Some((dims, &inner_start[end + 1..]))
}

// ---------------------------------------------------------------- colour maps

/// One channel of OpenCV's JET (the GNU Octave "jet"): a trapezoid in x = i/255 rising
/// with slope 4 from `rise_at` and falling with slope 4 to reach 0 at `fall_to`, clamped to
/// [0, 1]. Its table entries are float32.
fn jet_channel(x: f64, rise_at: f64, fall_to: f64) -> f32 {
    let up = 4.0 * (x - rise_at);
    let down = 4.0 * (fall_to - x);
    up.min(down).clamp(0.0, 1.0) as f32
}

/// OpenCV's JET lookup table, RGB. OpenCV stores 256 float32 samples per channel on the
/// breakpoints `linspace(0, 1, 256)` (float32), re-samples them onto the same grid with
/// `interp1` (float32 arithmetic, which can move a value by an ulp), then converts with
/// `convertTo(CV_8U, 255)`: round half to even. We do the same steps.
fn jet_lut() -> [[u8; 3]; 256] {
    let step = 1.0f32 / 255.0;
    let grid: Vec<f32> = (0..256).map(|i| i as f32 * step).collect();
    // Channel breakpoints (where the ramp starts rising, where it has fallen back to 0).
    let ramps = [(0.375, 1.125), (0.125, 0.875), (-0.125, 0.625)]; // r, g, b
    let mut lut = [[0u8; 3]; 256];
    for (c, &(rise_at, fall_to)) in ramps.iter().enumerate() {
        let table: Vec<f32> = (0..256)
            .map(|i| jet_channel(i as f64 / 255.0, rise_at, fall_to))
            .collect();
        for i in 0..256 {
            // interp1 finds low = i - 1, high = i for every grid point but the first.
            let y = if i == 0 {
                table[0]
            } else {
                let (lo, hi) = (i - 1, i);
                table[lo] + (grid[i] - grid[lo]) * (table[hi] - table[lo]) / (grid[hi] - grid[lo])
            };
            lut[i][c] = (y * 255.0).round_ties_even().clamp(0.0, 255.0) as u8;
        }
    }
    lut
}

/// How map values become colours.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HeatmapScale {
    /// The raw map: 0 is blue, 1 is red (the authors' test visualizer), so that maps of
    /// different images compare.
    Fixed,
    /// Piecewise linear with the pixel threshold `t` at the colormap's middle: `[0, t]` to
    /// the blue half, `[t, 1]` to the red half.
    Calibrated(f64),
    /// Each map stretched to its own minimum and maximum (the upstream demo's look).
    MinMax,
}

/// The colormap level (0..=255) of each map value under `scale`. Levels are truncated like
/// the upstream code's `np.uint8(255 * x)` on float32; non-finite values are level 0.
pub fn heatmap_levels(map: &[f32], scale: HeatmapScale) -> Vec<u8> {
    // `as u8` truncates toward zero and saturates, which clamps to [0, 255].
    let level = |x: f32| if x.is_finite() { (x * 255.0) as u8 } else { 0 };
    match scale {
        HeatmapScale::Fixed => map
            .par_iter()
            .with_min_len(4096)
            .map(|&v| level(v))
            .collect(),
        HeatmapScale::Calibrated(t) => {
            let t = t.clamp(1e-12, 1.0 - 1e-12);
            let stretch = |v: f32| {
                let v = f64::from(v);
                let x = if v < t {
                    0.5 * v / t
                } else {
                    0.5 + 0.5 * (v - t) / (1.0 - t)
                };
                level(x as f32)
            };
            map.par_iter()
                .with_min_len(4096)
                .map(|&v| stretch(v))
                .collect()
        }
        HeatmapScale::MinMax => {
            let finite = map.iter().copied().filter(|v| v.is_finite());
            let lo = finite.clone().fold(f32::INFINITY, f32::min);
            let hi = finite.fold(f32::NEG_INFINITY, f32::max);
            let range = hi - lo;
            map.iter()
                .map(|&v| {
                    if range > 0.0 && v.is_finite() {
                        level((v - lo) / range)
                    } else {
                        0
                    }
                })
                .collect()
        }
    }
}

/// OpenCV's COLORMAP_JET of `map` under `scale`: RGB bytes, 3 per value.
pub fn heatmap_rgb(map: &[f32], scale: HeatmapScale) -> Vec<u8> {
    levels_to_rgb(&heatmap_levels(map, scale))
}

/// The JET colours of colormap levels, 3 bytes each.
fn levels_to_rgb(levels: &[u8]) -> Vec<u8> {
    let lut = jet_lut();
    let mut rgb = vec![0u8; levels.len() * 3];
    rgb.par_chunks_mut(3 * 4096)
        .zip(levels.par_chunks(4096))
        .for_each(|(out, lv)| {
            for (o, &l) in out.chunks_exact_mut(3).zip(lv) {
                o.copy_from_slice(&lut[l as usize]);
            }
        });
    rgb
}

/// The JET heatmap of `map` (`width x height`) under `scale` as PNG bytes. Written as an
/// 8-bit palette PNG (the 256 JET colours): the same RGB pixels for any reader, a third of
/// the data to compress, which is what a frame-size heatmap costs.
pub fn heatmap_png(
    map: &[f32],
    width: usize,
    height: usize,
    scale: HeatmapScale,
) -> std::result::Result<Vec<u8>, String> {
    if map.len() != width * height || width == 0 || height == 0 {
        return Err(format!(
            "map has {} values, not {width} x {height}",
            map.len()
        ));
    }
    let palette: Vec<u8> = jet_lut().iter().flatten().copied().collect();
    encode_png(
        &heatmap_levels(map, scale),
        width,
        height,
        PngPixels::Indexed(&palette),
    )
}

/// Min-max normalize `map` to [0, 1] (a constant map becomes all zeros), quantize like the
/// upstream demo (`np.uint8(255 * x)` in float32: truncation), apply OpenCV's COLORMAP_JET.
/// Returns RGB bytes, 3 per value. Non-finite values are ignored for the range and map to 0.
pub fn jet_colormap(map: &[f32]) -> Vec<u8> {
    heatmap_rgb(map, HeatmapScale::MinMax)
}

/// `heat` (RGB) blended 50/50 over `base` (the same size): `round(0.5 * heat + 0.5 * base)`
/// (the upstream demo truncates instead of rounding).
pub fn blend_half(heat: &[u8], base: &[u8]) -> Vec<u8> {
    assert_eq!(heat.len(), base.len(), "blend of images of different sizes");
    // (h + b) / 2 rounded half up, exactly: integer arithmetic.
    heat.iter()
        .zip(base)
        .map(|(&h, &b)| (u16::from(h) + u16::from(b)).div_ceil(2) as u8)
        .collect()
}

/// Draws rectangle outlines `[x0, y0, x1, y1)` (clipped to the image) `thickness` pixels
/// wide, inside each box, on an RGB image.
pub fn draw_boxes(
    rgb: &mut [u8],
    width: usize,
    height: usize,
    boxes: &[[usize; 4]],
    color: [u8; 3],
    thickness: usize,
) {
    assert_eq!(
        rgb.len(),
        width * height * 3,
        "image is not width x height RGB"
    );
    let mut put = |x: usize, y: usize| rgb[(y * width + x) * 3..][..3].copy_from_slice(&color);
    for &[x0, y0, x1, y1] in boxes {
        let (x1, y1) = (x1.min(width), y1.min(height));
        if x0 >= x1 || y0 >= y1 {
            continue;
        }
        for y in y0..y1 {
            for x in x0..x1 {
                let edge = x < x0 + thickness
                    || x + thickness >= x1
                    || y < y0 + thickness
                    || y + thickness >= y1;
                if edge {
                    put(x, y);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- PNG outputs

fn check_square(len: usize, side: usize, what: &str) -> std::result::Result<(), String> {
    if side.checked_mul(side) != Some(len) || side == 0 {
        return Err(format!("{what} has {len} values, not {side} x {side}"));
    }
    Ok(())
}

fn png_bytes(
    pixels: &[u8],
    side: usize,
    color: ExtendedColorType,
) -> std::result::Result<Vec<u8>, String> {
    png_bytes_wh(pixels, side, side, color)
}

/// PNG bytes of a `width x height` image.
fn png_bytes_wh(
    pixels: &[u8],
    width: usize,
    height: usize,
    color: ExtendedColorType,
) -> std::result::Result<Vec<u8>, String> {
    let kind = match color {
        ExtendedColorType::L8 => PngPixels::Gray,
        _ => PngPixels::Rgb,
    };
    encode_png(pixels, width, height, kind)
}

/// What the bytes of a PNG to encode are.
enum PngPixels<'a> {
    Gray,
    Rgb,
    /// One palette index per pixel, with the palette's RGB triples.
    Indexed(&'a [u8]),
}

/// Encodes 8-bit pixels as PNG: fdeflate's fast mode and the `Up` filter, the quickest of
/// the filters here at nearly the best size (a frame-size picture is written per query;
/// on 2448 x 2048 heatmaps `Up` took 22 ms, adaptive 28 ms, at 1.9 vs 1.7 MB).
fn encode_png(
    pixels: &[u8],
    width: usize,
    height: usize,
    kind: PngPixels,
) -> std::result::Result<Vec<u8>, String> {
    let dim = |v: usize| u32::try_from(v).map_err(|_| "image too large for PNG".to_string());
    let mut encoded = Vec::new();
    let mut encoder = png::Encoder::new(&mut encoded, dim(width)?, dim(height)?);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    encoder.set_filter(png::Filter::Up);
    match kind {
        PngPixels::Gray => encoder.set_color(png::ColorType::Grayscale),
        PngPixels::Rgb => encoder.set_color(png::ColorType::Rgb),
        PngPixels::Indexed(palette) => {
            encoder.set_color(png::ColorType::Indexed);
            encoder.set_palette(palette.to_vec());
        }
    }
    let fail = |e: png::EncodingError| format!("cannot encode PNG: {e}");
    let mut writer = encoder.write_header().map_err(fail)?;
    writer.write_image_data(pixels).map_err(fail)?;
    writer.finish().map_err(fail)?;
    Ok(encoded)
}

/// A `width x height` RGB image as PNG bytes.
pub fn rgb_png_bytes(
    rgb: &[u8],
    width: usize,
    height: usize,
) -> std::result::Result<Vec<u8>, String> {
    if rgb.len() != width * height * 3 || width == 0 || height == 0 {
        return Err(format!(
            "{} bytes are not a {width} x {height} RGB image",
            rgb.len()
        ));
    }
    png_bytes_wh(rgb, width, height, ExtendedColorType::Rgb8)
}

/// A `width x height` 8-bit gray image (masks) as PNG bytes.
pub fn gray_png_bytes_wh(
    data: &[u8],
    width: usize,
    height: usize,
) -> std::result::Result<Vec<u8>, String> {
    if data.len() != width * height || width == 0 || height == 0 {
        return Err(format!(
            "{} bytes are not a {width} x {height} mask",
            data.len()
        ));
    }
    png_bytes_wh(data, width, height, ExtendedColorType::L8)
}

/// Writes a `width x height` RGB PNG (atomically).
pub fn write_png_rgb(path: &Path, rgb: &[u8], width: usize, height: usize) -> Result<()> {
    let bytes = rgb_png_bytes(rgb, width, height).map_err(|p| Error::at(path, p))?;
    write_atomic(path, &bytes)
}

/// Writes a `width x height` gray PNG (atomically).
pub fn write_png_gray_wh(path: &Path, data: &[u8], width: usize, height: usize) -> Result<()> {
    let bytes = gray_png_bytes_wh(data, width, height).map_err(|p| Error::at(path, p))?;
    write_atomic(path, &bytes)
}

/// The anomaly map, min-max normalized, as the bytes of a JET heatmap PNG (`side x side`).
pub fn heatmap_png_bytes(map: &[f32], side: usize) -> std::result::Result<Vec<u8>, String> {
    check_square(map.len(), side, "map")?;
    heatmap_png(map, side, side, HeatmapScale::MinMax)
}

/// The JET heatmap blended 50/50 over `base` (already `side x side`), as PNG bytes:
/// `out = round(0.5 * heat + 0.5 * base)`. (The upstream demo truncates instead of rounding.)
pub fn overlay_png_bytes(
    map: &[f32],
    side: usize,
    base: &RgbImage8,
) -> std::result::Result<Vec<u8>, String> {
    check_square(map.len(), side, "map")?;
    if base.width != side || base.height != side || base.data.len() != side * side * 3 {
        return Err(format!(
            "overlay base is {} x {}, not {side} x {side}",
            base.width, base.height
        ));
    }
    let blended = blend_half(&jet_colormap(map), &base.data);
    png_bytes(&blended, side, ExtendedColorType::Rgb8)
}

/// The binary mask of a map: 255 where the anomaly value is at least `threshold`, else 0.
/// NaN is never anomalous.
pub fn threshold_mask(map: &[f32], threshold: f64) -> Vec<u8> {
    map.iter()
        .map(|&v| if f64::from(v) >= threshold { 255 } else { 0 })
        .collect()
}

/// A `side x side` 8-bit gray PNG (masks), as bytes.
pub fn gray_png_bytes(data: &[u8], side: usize) -> std::result::Result<Vec<u8>, String> {
    check_square(data.len(), side, "mask")?;
    png_bytes(data, side, ExtendedColorType::L8)
}

/// The anomaly map as a JET heatmap PNG (`side x side`, RGB).
pub fn write_heatmap_png(path: &Path, map: &[f32], side: usize) -> Result<()> {
    let bytes = heatmap_png_bytes(map, side).map_err(|p| Error::at(path, p))?;
    write_atomic(path, &bytes)
}

/// The JET heatmap blended 50/50 over `base`: see `overlay_png_bytes`.
pub fn write_overlay_png(path: &Path, map: &[f32], side: usize, base: &RgbImage8) -> Result<()> {
    let bytes = overlay_png_bytes(map, side, base).map_err(|p| Error::at(path, p))?;
    write_atomic(path, &bytes)
}

/// A `side x side` 8-bit gray PNG (masks).
pub fn write_png_gray(path: &Path, data: &[u8], side: usize) -> Result<()> {
    let bytes = gray_png_bytes(data, side).map_err(|p| Error::at(path, p))?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("metauas-output-{tag}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn npy_header_bytes_follow_the_spec() {
        let dir = temp_dir("npyhdr");
        let path = dir.join("map.npy");
        let data: Vec<f32> = (0..256 * 256).map(|i| i as f32 * 0.5).collect();
        write_npy_f32(&path, &data, &[256, 256]).unwrap();
        let bytes = fs::read(&path).unwrap();

        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (256, 256), }";
        assert_eq!(&bytes[..6], b"\x93NUMPY");
        assert_eq!(&bytes[6..8], &[1, 0]);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let total = 10 + header_len;
        assert_eq!(total % 64, 0);
        assert_eq!(&bytes[10..10 + dict.len()], dict.as_bytes());
        assert!(bytes[10 + dict.len()..total - 1].iter().all(|&b| b == b' '));
        assert_eq!(bytes[total - 1], b'\n');
        // 10 + 64 + pad + 1 = 128 here.
        assert_eq!(total, 128);
        assert_eq!(bytes.len(), total + 256 * 256 * 4);
        assert_eq!(&bytes[total + 4..total + 8], &0.5f32.to_le_bytes());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn npy_round_trips_every_rank() {
        let dir = temp_dir("npyrt");
        let cases: Vec<(Vec<usize>, Vec<f32>)> = vec![
            (vec![], vec![3.25]),
            (vec![5], vec![1.0, -2.0, f32::MIN_POSITIVE, f32::MAX, -0.0]),
            (vec![2, 3], (0..6).map(|i| i as f32 / 7.0).collect()),
            (
                vec![1, 2, 2, 3],
                (0..12).map(|i| (i as f32).sin()).collect(),
            ),
            (vec![0, 4], vec![]),
        ];
        for (shape, data) in cases {
            let path = dir.join("a.npy");
            write_npy_f32(&path, &data, &shape).unwrap();
            let (s, d) = read_npy_f32(&path).unwrap();
            assert_eq!(s, shape);
            assert_eq!(
                d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(fs::read(&path).unwrap().len() % 4, 0);
        }
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn npy_write_checks_the_shape() {
        let dir = temp_dir("npyshape");
        let err = write_npy_f32(&dir.join("x.npy"), &[1.0, 2.0, 3.0], &[2, 2]).unwrap_err();
        assert!(err.message().contains("does not hold 3 values"), "{err}");
        assert!(!dir.join("x.npy").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn npy_reader_is_strict() {
        let good = {
            let mut b = npy_header(&[2]);
            b.extend_from_slice(&1.0f32.to_le_bytes());
            b.extend_from_slice(&2.0f32.to_le_bytes());
            b
        };
        assert_eq!(parse_npy_f32(&good).unwrap(), (vec![2], vec![1.0, 2.0]));
        // Truncated data, extra data, wrong magic.
        assert!(parse_npy_f32(&good[..good.len() - 1]).is_err());
        let mut extra = good.clone();
        extra.push(0);
        assert!(parse_npy_f32(&extra).is_err());
        assert!(parse_npy_f32(b"NUMPY\x01\x00").is_err());
        assert!(parse_npy_f32(b"").is_err());

        let with_dict = |dict: &str| {
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&((dict.len() + 1) as u16).to_le_bytes());
            b.extend_from_slice(dict.as_bytes());
            b.push(b'\n');
            b.extend_from_slice(&[0u8; 8]);
            b
        };
        assert_eq!(
            parse_npy_f32(&with_dict(
                "{'shape': (2,), 'fortran_order': False, 'descr': '<f4'}"
            ))
            .unwrap()
            .0,
            vec![2]
        );
        for (dict, expect) in [
            ("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", "'<f8'"),
            ("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", "'>f4'"),
            ("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", "Fortran"),
            ("{'descr': '<f4', 'fortran_order': False, }", "missing"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1, }", "unexpected key"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", "shape"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", "shape"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }", "too large"),
        ] {
            let err = parse_npy_f32(&with_dict(dict)).unwrap_err();
            assert!(err.contains(expect), "{dict}: {err}");
        }
        // Header length beyond the file.
        let mut b = b"\x93NUMPY\x01\x00\xff\xff".to_vec();
        b.extend_from_slice(b"{}");
        assert!(parse_npy_f32(&b).is_err());
    }

    #[test]
    fn npy_reader_widens_every_float_dtype_and_byte_order() {
        let file = |descr: &str, data: &[u8]| {
            let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (1, 2), }}");
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&((dict.len() + 1) as u16).to_le_bytes());
            b.extend_from_slice(dict.as_bytes());
            b.push(b'\n');
            b.extend_from_slice(data);
            b
        };
        let (a, b) = (1.5f64, -0.1f64);
        let cat = |x: Vec<u8>, y: Vec<u8>| [x, y].concat();
        let cases = [
            (
                "<f8",
                cat(a.to_le_bytes().into(), b.to_le_bytes().into()),
                b,
            ),
            (
                ">f8",
                cat(a.to_be_bytes().into(), b.to_be_bytes().into()),
                b,
            ),
            (
                ">f4",
                cat(
                    (a as f32).to_be_bytes().into(),
                    (b as f32).to_be_bytes().into(),
                ),
                b as f32 as f64,
            ),
            (
                "<f2",
                cat(
                    half::f16::from_f64(a).to_le_bytes().into(),
                    half::f16::from_f64(b).to_le_bytes().into(),
                ),
                half::f16::from_f64(b).to_f64(),
            ),
        ];
        for (descr, data, second) in cases {
            let arr = parse_npy(&file(descr, &data)).unwrap();
            assert_eq!(arr.shape, vec![1, 2], "{descr}");
            assert_eq!(arr.values, vec![1.5, second], "{descr}");
            let cut = parse_npy(&file(descr, &data[..data.len() - 1])).unwrap_err();
            assert!(cut.starts_with("truncated: "), "{descr}: {cut}");
        }
        let err = parse_npy(&file("<i4", &[0; 8])).unwrap_err();
        assert!(
            err.contains("'<i4' is not float16, float32 or float64"),
            "{err}"
        );
    }

    #[test]
    fn npy_loads_in_numpy_when_available() {
        let python = Path::new("/opt/refenv/bin/python");
        if !python.exists() {
            eprintln!("note: /opt/refenv/bin/python not found; numpy cross-check skipped");
            return;
        }
        let dir = temp_dir("npynumpy");
        let path = dir.join("m.npy");
        let data: Vec<f32> = (0..3 * 5).map(|i| i as f32 * 0.25 - 1.0).collect();
        write_npy_f32(&path, &data, &[3, 5]).unwrap();
        let script = "import sys, numpy as np\n\
                      a = np.load(sys.argv[1])\n\
                      assert a.dtype == np.dtype('<f4') and a.shape == (3, 5), (a.dtype, a.shape)\n\
                      want = np.arange(15, dtype=np.float32).reshape(3, 5) * np.float32(0.25) - np.float32(1)\n\
                      assert (a == want).all()\n\
                      np.save(sys.argv[2], (a * 2).astype('<f4'))\n";
        let back = dir.join("back.npy");
        let status = std::process::Command::new(python)
            .args(["-c", script])
            .arg(&path)
            .arg(&back)
            .status();
        match status {
            Ok(s) if s.success() => {
                let (shape, values) = read_npy_f32(&back).unwrap();
                assert_eq!(shape, vec![3, 5]);
                let want: Vec<f32> = data.iter().map(|v| v * 2.0).collect();
                assert_eq!(values, want);
            }
            Ok(s) => panic!("numpy rejected our .npy ({s})"),
            Err(e) => eprintln!(
                "note: could not run {}: {e}; numpy cross-check skipped",
                python.display()
            ),
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// JET from its textbook definition, straight in float64 on the byte level.
    fn jet_textbook(level: u8) -> [f64; 3] {
        let x = level as f64 / 255.0;
        let f = |a: f64| (1.5 - (4.0 * x - a).abs()).clamp(0.0, 1.0);
        [f(3.0), f(2.0), f(1.0)]
    }

    #[test]
    fn jet_endpoints_and_middle() {
        let lut = jet_lut();
        assert_eq!(lut[0], [0, 0, 128], "0 is dark blue");
        assert_eq!(lut[255], [128, 0, 0], "1 is dark red");
        let mid = lut[128];
        assert!(
            mid[1] == 255 && mid[0] > 100 && mid[2] > 100,
            "middle is green-ish: {mid:?}"
        );
        for level in 0..=255u8 {
            let want = jet_textbook(level);
            for c in 0..3 {
                let diff = (lut[level as usize][c] as f64 - 255.0 * want[c]).abs();
                assert!(
                    diff <= 0.5 + 1e-6,
                    "level {level} channel {c}: {:?} vs {want:?}",
                    lut[level as usize]
                );
            }
        }
    }

    #[test]
    fn jet_lut_equals_opencv() {
        // cv2.applyColorMap(0..255, COLORMAP_JET) as RGB, written by
        // tools/reference/make_image_fixtures.py.
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/jet_lut_opencv.rgb");
        let want = fs::read(path).unwrap();
        let got: Vec<u8> = jet_lut().iter().flatten().copied().collect();
        assert_eq!(got, want);
    }

    #[test]
    fn jet_colormap_normalizes_and_truncates() {
        // min 2, max 4: levels 0, 127 (127.5 truncated), 255.
        let rgb = jet_colormap(&[2.0, 3.0, 4.0]);
        let lut = jet_lut();
        assert_eq!(&rgb[0..3], &lut[0]);
        assert_eq!(&rgb[3..6], &lut[127]);
        assert_eq!(&rgb[6..9], &lut[255]);
        // A constant map is all zeros (level 0), as is a non-finite value.
        assert_eq!(jet_colormap(&[0.7; 4]), lut[0].repeat(4));
        let rgb = jet_colormap(&[0.0, f32::NAN, 1.0]);
        assert_eq!(&rgb[3..6], &lut[0]);
        assert_eq!(&rgb[6..9], &lut[255]);
    }

    #[test]
    fn pngs_round_trip_through_the_decoder() {
        let dir = temp_dir("png");
        let side = 4;
        let map: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let heat_path = dir.join("heat.png");
        write_heatmap_png(&heat_path, &map, side).unwrap();
        let heat = crate::io::image::decode_image_file(&heat_path).unwrap();
        assert_eq!((heat.width, heat.height), (4, 4));
        assert_eq!(heat.data, jet_colormap(&map));

        let base = RgbImage8 {
            width: 4,
            height: 4,
            data: (0..48).map(|i| (i * 5) as u8).collect(),
        };
        let over_path = dir.join("over.png");
        write_overlay_png(&over_path, &map, side, &base).unwrap();
        let over = crate::io::image::decode_image_file(&over_path).unwrap();
        for i in 0..48 {
            let want = (0.5 * heat.data[i] as f64 + 0.5 * base.data[i] as f64).round();
            assert_eq!(over.data[i] as f64, want, "sample {i}");
        }

        let mask: Vec<u8> = (0..16).map(|i| if i % 3 == 0 { 255 } else { 0 }).collect();
        let mask_path = dir.join("mask.png");
        write_png_gray(&mask_path, &mask, side).unwrap();
        let decoded = crate::io::image::decode_image_file(&mask_path).unwrap();
        assert_eq!(
            decoded.data,
            mask.iter().flat_map(|&v| [v, v, v]).collect::<Vec<_>>()
        );

        assert!(write_png_gray(&dir.join("bad.png"), &mask, 5).is_err());
        assert!(write_overlay_png(
            &dir.join("bad.png"),
            &map,
            side,
            &RgbImage8 {
                width: 2,
                height: 2,
                data: vec![0; 12]
            }
        )
        .is_err());
        assert!(!dir.join("bad.png").exists());
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "temporary files left: {names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_into_a_missing_folder_fails_cleanly() {
        let path = std::env::temp_dir().join("metauas-no-such-dir-xyz/a.npy");
        let err = write_npy_f32(&path, &[1.0], &[1]).unwrap_err();
        assert!(
            err.message().starts_with(&path.display().to_string()),
            "{err}"
        );
        assert!(err.message().contains("cannot write"), "{err}");
    }
}

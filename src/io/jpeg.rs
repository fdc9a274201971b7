//! JPEG decoding with libjpeg-turbo (its TurboJPEG API, built from the sources bundled with
//! `turbojpeg-sys`), so that pixels are bit-identical to Pillow's: Pillow's wheels decode
//! with libjpeg-turbo too, with the same defaults (accurate integer IDCT, fancy chroma
//! upsampling, no DCT scaling). Rust decoders round the IDCT and the upsampling differently
//! (a few levels a pixel), which the model amplifies to 0.3 in the final map.
//!
//! What Pillow's `Image.open(p).convert('RGB')` does, and so do we:
//! - YCbCr and Adobe RGB files: libjpeg's own conversion to RGB;
//! - grayscale: one channel, replicated by `convert('RGB')`;
//! - CMYK and YCCK (4 components): libjpeg's CMYK output, read inverted (Pillow's rawmode
//!   `CMYK;I`, Adobe's convention), then Pillow's CMYK -> RGB formula;
//! - warnings (corrupt entropy data, extraneous bytes) are ignored, as Pillow ignores them;
//!   a file that ends before its EOI marker is refused, as Pillow refuses it ("image file is
//!   truncated").

use std::ffi::{c_int, CStr};

use turbojpeg_sys as tj;

use super::image::{ImageLimits, RgbImage8};

/// Progressive scans we agree to decode: real encoders write about 10; a crafted file with
/// thousands of scans of a large image would take minutes (libjpeg-turbo's own fuzzers cap
/// it the same way).
const MAX_SCANS: c_int = 500;

/// Whether `head` starts like a JPEG file (SOI followed by a marker).
pub fn is_jpeg(head: &[u8]) -> bool {
    head.len() >= 3 && head[0] == 0xFF && head[1] == 0xD8 && head[2] == 0xFF
}

/// A TurboJPEG instance (a decompressor, or for [`encode_jpeg`] a compressor), destroyed on
/// drop.
struct TurboJpeg(tj::tjhandle);

impl Drop for TurboJpeg {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

/// The problem with a JPEG file, in words for an error line.
#[derive(Debug)]
pub enum JpegProblem {
    /// Not decodable: libjpeg's own message.
    Undecodable(String),
    /// Decodable but refused by a limit (the message says which).
    Limit(String),
    /// The data ends before the image does.
    Truncated,
}

impl std::fmt::Display for JpegProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JpegProblem::Undecodable(detail) | JpegProblem::Limit(detail) => f.write_str(detail),
            JpegProblem::Truncated => f.write_str("the data ends before the image does"),
        }
    }
}

impl TurboJpeg {
    fn decompressor() -> Result<TurboJpeg, JpegProblem> {
        // SAFETY: plain constructor; NULL is checked.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if handle.is_null() {
            return Err(JpegProblem::Undecodable(
                "cannot start the JPEG decoder".into(),
            ));
        }
        Ok(TurboJpeg(handle))
    }

    fn set(&mut self, param: tj::TJPARAM, value: c_int) -> Result<(), JpegProblem> {
        // SAFETY: valid handle; the parameter ids come from the bindings.
        if unsafe { tj::tj3Set(self.0, param as c_int, value) } != 0 {
            return Err(self.problem());
        }
        Ok(())
    }

    fn get(&mut self, param: tj::TJPARAM) -> c_int {
        // SAFETY: valid handle.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }

    fn message(&mut self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the library.
        let text = unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) };
        text.to_string_lossy().trim().to_string()
    }

    /// The last failure as a problem; a warning that the data ran out is a truncation.
    fn problem(&mut self) -> JpegProblem {
        let message = self.message();
        if message.contains("Premature end of JPEG file") {
            JpegProblem::Truncated
        } else {
            JpegProblem::Undecodable(message)
        }
    }

    /// Whether the last failure was only a warning (the image was fully written).
    fn only_warned(&mut self) -> bool {
        // SAFETY: valid handle.
        unsafe { tj::tj3GetErrorCode(self.0) == tj::TJERR_TJERR_WARNING as c_int }
    }
}

/// What the header says: size, colour space and the output pixel layout we ask for.
struct Header {
    width: u32,
    height: u32,
    colorspace: c_int,
}

fn read_header(dec: &mut TurboJpeg, bytes: &[u8]) -> Result<Header, JpegProblem> {
    // SAFETY: `bytes` is valid for its length for the duration of the call.
    if unsafe { tj::tj3DecompressHeader(dec.0, bytes.as_ptr(), bytes.len() as _) } != 0 {
        // A warning (e.g. extraneous bytes before a marker) still leaves a read header;
        // Pillow ignores warnings.
        let problem = dec.problem();
        if !dec.only_warned() || matches!(problem, JpegProblem::Truncated) {
            return Err(problem);
        }
    }
    let precision = dec.get(tj::TJPARAM_TJPARAM_PRECISION);
    if precision != 8 {
        // Pillow reads 8-bit JPEGs only (its libjpeg API is the 8-bit one).
        return Err(JpegProblem::Undecodable(format!(
            "{precision}-bit JPEG samples are not supported (8-bit only, as Pillow)"
        )));
    }
    let dim = |v: c_int| u32::try_from(v).unwrap_or(0);
    let header = Header {
        width: dim(dec.get(tj::TJPARAM_TJPARAM_JPEGWIDTH)),
        height: dim(dec.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT)),
        colorspace: dec.get(tj::TJPARAM_TJPARAM_COLORSPACE),
    };
    if header.width == 0 || header.height == 0 {
        // Only warnings, but no frame header (the data ends, or is garbage, before it).
        return Err(JpegProblem::Undecodable(
            "no frame header before the data ends".into(),
        ));
    }
    Ok(header)
}

/// Images from this many pixels up are decoded in two row bands at once (a 5-megapixel
/// camera frame takes ~12 ms on one core; below a megapixel a second decoder's start costs
/// more than it saves).
const SPLIT_MIN_PIXELS: usize = 1 << 20;
/// Share of the rows the top band takes. The bottom band's decoder must still entropy-decode
/// the rows above it (libjpeg skips only their IDCT, upsampling and colour conversion), so
/// the top band is made the larger one to finish at about the same time.
const SPLIT_TOP_SHARE: f64 = 0.6;

/// Decode a JPEG held in memory to RGB the way Pillow does (see the module comment). The
/// size is checked against `limits` from the header, before the pixel buffer exists.
///
/// A large sequential (baseline or extended, not progressive or lossless) image whose
/// chroma subsampling TurboJPEG knows (its partial decode refuses the others, e.g. 4:1:0)
/// is decoded in two row bands at once, each by its own decoder: libjpeg-turbo's partial
/// decode (`jpeg_skip_scanlines`) gives the same pixels as the whole-image decode. The unit
/// tests below check that on every corpus JPEG split anywhere and on a 5 MP frame;
/// `python/tests` checks 5 MP frames against Pillow.
pub fn decode_jpeg(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage8, JpegProblem> {
    let two_bands = |dec: &mut TurboJpeg, width: usize, height: usize| {
        let sequential = dec.get(tj::TJPARAM_TJPARAM_PROGRESSIVE) == 0
            && dec.get(tj::TJPARAM_TJPARAM_LOSSLESS) == 0;
        let croppable = dec.get(tj::TJPARAM_TJPARAM_SUBSAMP) != tj::TJSAMP_TJSAMP_UNKNOWN;
        let large = width * height >= SPLIT_MIN_PIXELS;
        let threads = rayon::current_num_threads() > 1;
        (sequential && croppable && large && threads).then_some(SPLIT_TOP_SHARE)
    };
    decode_jpeg_in_bands(bytes, limits, two_bands)
}

/// [`decode_jpeg`], in two row bands when `split` (given the decoder with its header read,
/// and the size) says which share of the rows the top band takes.
fn decode_jpeg_in_bands(
    bytes: &[u8],
    limits: &ImageLimits,
    split: impl Fn(&mut TurboJpeg, usize, usize) -> Option<f64>,
) -> Result<RgbImage8, JpegProblem> {
    let mut dec = configured_decompressor(limits)?;
    let header = read_header(&mut dec, bytes)?;
    limits
        .check(header.width, header.height)
        .map_err(JpegProblem::Limit)?;
    let (format, channels) = match header.colorspace as tj::TJCS {
        tj::TJCS_TJCS_GRAY => (tj::TJPF_TJPF_GRAY, 1),
        tj::TJCS_TJCS_CMYK | tj::TJCS_TJCS_YCCK => (tj::TJPF_TJPF_CMYK, 4),
        _ => (tj::TJPF_TJPF_RGB, 3),
    };
    let (width, height) = (header.width as usize, header.height as usize);
    let mut pixels = vec![0u8; width * height * channels];
    let band = Band {
        format,
        row_bytes: width * channels,
        height,
    };
    let share = split(&mut dec, width, height).filter(|_| height > 1);
    if let Some(share) = share {
        let top_rows = ((height as f64 * share) as usize).clamp(1, height - 1);
        let (top, bottom) = pixels.split_at_mut(top_rows * band.row_bytes);
        // Each band's decoder is made, reads the header and decodes on one thread: libjpeg
        // keeps its messages in thread-local storage, written once per header read.
        let decode_band = |y0: usize, out: &mut [u8]| {
            let mut own = configured_decompressor(limits)?;
            read_header(&mut own, bytes)?;
            band.decode(&mut own, bytes, y0, out)
        };
        let (a, b) = rayon::join(|| decode_band(0, top), || decode_band(top_rows, bottom));
        a?;
        b?;
    } else {
        band.decode(&mut dec, bytes, 0, &mut pixels)?;
    }
    // libjpeg reports only its first warning: a file with an earlier warning could hide the
    // one that says its data ran out. The EOI marker tells.
    if !has_end_of_image(bytes) {
        return Err(JpegProblem::Truncated);
    }
    let data = match channels {
        1 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        4 => pixels
            .chunks_exact(4)
            .flat_map(inverted_cmyk_to_rgb)
            .collect(),
        _ => pixels,
    };
    Ok(RgbImage8 {
        width,
        height,
        data,
    })
}

/// A decompressor with our limits and Pillow's tolerance of warnings.
fn configured_decompressor(limits: &ImageLimits) -> Result<TurboJpeg, JpegProblem> {
    let mut dec = TurboJpeg::decompressor()?;
    dec.set(tj::TJPARAM_TJPARAM_STOPONWARNING, 0)?;
    dec.set(tj::TJPARAM_TJPARAM_SCANLIMIT, MAX_SCANS)?;
    let max_pixels = c_int::try_from(limits.max_pixels).unwrap_or(c_int::MAX);
    dec.set(tj::TJPARAM_TJPARAM_MAXPIXELS, max_pixels)?;
    let max_memory_mb = c_int::try_from(limits.max_alloc() >> 20).unwrap_or(c_int::MAX);
    dec.set(tj::TJPARAM_TJPARAM_MAXMEMORY, max_memory_mb)?;
    Ok(dec)
}

/// The output layout rows are decoded into.
struct Band {
    format: tj::TJPF,
    row_bytes: usize,
    /// The image's rows.
    height: usize,
}

impl Band {
    /// Decodes rows `y0 ..` into `out` (whole rows, as many as it holds) with `dec`, whose
    /// header is read; warnings are ignored, as Pillow ignores them.
    fn decode(
        &self,
        dec: &mut TurboJpeg,
        bytes: &[u8],
        y0: usize,
        out: &mut [u8],
    ) -> Result<(), JpegProblem> {
        let rows = out.len() / self.row_bytes;
        assert!(out.len() == rows * self.row_bytes && y0 + rows <= self.height);
        if rows < self.height {
            let region = tj::tjregion {
                x: 0,
                y: y0 as c_int,
                w: 0,
                h: rows as c_int,
            };
            // SAFETY: valid handle with its header read; the region lies inside the image.
            if unsafe { tj::tj3SetCroppingRegion(dec.0, region) } != 0 {
                return Err(dec.problem());
            }
        }
        // SAFETY: `out` holds `rows` rows of `row_bytes`, the packed (pitch 0) layout of
        // `format` at the image's width, which is what tj3Decompress8 writes for the region.
        let status = unsafe {
            tj::tj3Decompress8(
                dec.0,
                bytes.as_ptr(),
                bytes.len() as _,
                out.as_mut_ptr(),
                0,
                self.format as c_int,
            )
        };
        if status != 0 {
            let problem = dec.problem();
            if !dec.only_warned() || matches!(problem, JpegProblem::Truncated) {
                return Err(problem);
            }
        }
        Ok(())
    }
}

/// Encode 8-bit RGB as a baseline 4:2:0 JPEG at `quality` (1-100), the way cameras and
/// datasets such as VisA write their frames (used by the synthetic datasets).
pub fn encode_jpeg(img: &RgbImage8, quality: u8) -> Result<Vec<u8>, JpegProblem> {
    let too_big = || {
        JpegProblem::Limit(format!(
            "{} x {} is too large for JPEG",
            img.width, img.height
        ))
    };
    let width = c_int::try_from(img.width).map_err(|_| too_big())?;
    let height = c_int::try_from(img.height).map_err(|_| too_big())?;
    assert_eq!(
        img.data.len(),
        img.width * img.height * 3,
        "not an RGB image"
    );
    // SAFETY: plain constructor; NULL is checked.
    let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_COMPRESS as c_int) };
    if handle.is_null() {
        return Err(JpegProblem::Undecodable(
            "cannot start the JPEG encoder".into(),
        ));
    }
    let mut enc = TurboJpeg(handle);
    enc.set(
        tj::TJPARAM_TJPARAM_QUALITY,
        c_int::from(quality.clamp(1, 100)),
    )?;
    enc.set(tj::TJPARAM_TJPARAM_SUBSAMP, tj::TJSAMP_TJSAMP_420 as c_int)?;
    let mut out: *mut u8 = std::ptr::null_mut();
    let mut size = 0;
    // SAFETY: the source holds width * height packed RGB pixels; TurboJPEG allocates `out`,
    // which is copied and then freed with tj3Free.
    let status = unsafe {
        tj::tj3Compress8(
            enc.0,
            img.data.as_ptr(),
            width,
            0,
            height,
            tj::TJPF_TJPF_RGB as c_int,
            &mut out,
            &mut size,
        )
    };
    let bytes = if status == 0 && !out.is_null() {
        // SAFETY: TurboJPEG wrote `size` bytes at `out`.
        Ok(unsafe { std::slice::from_raw_parts(out, size as usize) }.to_vec())
    } else {
        Err(enc.problem())
    };
    // SAFETY: `out` is NULL or TurboJPEG's own allocation.
    unsafe { tj::tj3Free(out.cast()) };
    bytes
}

/// Whether an EOI marker (FF D9) follows the first start-of-scan marker. Inside entropy-coded
/// data a 0xFF byte is always followed by 0x00 or a restart marker, so after the first SOS an
/// FF D9 pair is the end of the image (libjpeg reads up to it; Pillow fails without it).
fn has_end_of_image(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).position(|w| w == [0xFF, 0xDA]) else {
        return false;
    };
    bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Pillow's CMYK -> RGB for libjpeg's CMYK output read as `CMYK;I` (each sample inverted,
/// so Pillow's `c = 255 - raw_c` and `255 - k = raw_k`): `channel = nk - nk * c / 255` with
/// `nk = raw_k`, the product rounded Pillow's way (`t = a * b + 128; (t + (t >> 8)) >> 8`).
fn inverted_cmyk_to_rgb(raw: &[u8]) -> [u8; 3] {
    let nk = u32::from(raw[3]);
    let channel = |v: u8| {
        let t = (255 - u32::from(v)) * nk + 128;
        (nk - ((t + (t >> 8)) >> 8)) as u8
    };
    [channel(raw[0]), channel(raw[1]), channel(raw[2])]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every JPEG of the decoder corpus (whose whole-image decodes equal Pillow's, see
    /// `tests/image_corpus.rs`: subsamplings, restart intervals, arithmetic coding,
    /// progressive, grayscale, CMYK, YCCK, corrupt data) decodes to the same pixels, or the
    /// same refusal, in two bands split anywhere.
    #[test]
    fn two_bands_decode_the_corpus_as_one_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
        let limits = ImageLimits::default();
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if !is_jpeg(&bytes) {
                continue;
            }
            let whole = decode_jpeg_in_bands(&bytes, &limits, |_, _, _| None);
            for share in [0.0, 0.01, 0.3, 0.5, 0.6, 0.77, 0.999] {
                let banded = decode_jpeg_in_bands(&bytes, &limits, |_, _, _| Some(share));
                let name = path.display();
                match (&whole, &banded) {
                    (Ok(a), Ok(b)) => assert!(a.data == b.data, "{name} split at {share}"),
                    (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{name}"),
                    _ => panic!(
                        "{name} split at {share}: {:?} vs {:?}",
                        whole.as_ref().err(),
                        banded.as_ref().err()
                    ),
                }
            }
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} corpus JPEGs");
    }

    /// A 1280x1024 4:1:0 JPEG (cjpeg `-sample 4x2,1x1,1x1`; TurboJPEG's partial decode
    /// refuses its subsampling) takes the one-band path on two threads and gives Pillow's
    /// pixels (SHA-256 of `Image.open(f).convert('RGB')`, Pillow 13.0 with libjpeg-turbo 3.2).
    #[test]
    fn a_large_jpeg_of_unknown_subsampling_decodes_as_pillow_on_two_threads() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/jpeg_410_1280x1024.jpg"
        );
        let bytes = std::fs::read(path).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let img = pool
            .install(|| decode_jpeg(&bytes, &ImageLimits::default()))
            .unwrap();
        assert_eq!((img.width, img.height), (1280, 1024));
        use sha2::{Digest, Sha256};
        let hex: String = Sha256::digest(&img.data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "083c16a86a8ddefebf3efaaf4a3eb179f554c10092871feb98158716a250f518"
        );
    }

    /// A 2448x2048 frame takes the two-band path on a 2-thread pool and gives the
    /// pixels of the one-band decode that a 1-thread pool takes.
    #[test]
    fn a_camera_frame_decodes_the_same_on_one_and_two_threads() {
        // Gradients, stripes and a hash-noise texture: entropy data in every block.
        let (width, height) = (2448, 2048);
        let mut data = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                let noise = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 23;
                data.push((x * 255 / width) as u8 ^ noise as u8);
                data.push((y * 255 / height) as u8 + ((x / 16 + y / 16) % 2 * 40) as u8);
                data.push(((x + y) % 256) as u8 / 2 + noise as u8);
            }
        }
        let frame = RgbImage8 {
            width,
            height,
            data,
        };
        let bytes = encode_jpeg(&frame, 90).unwrap();
        let limits = ImageLimits::default();
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| decode_jpeg(&bytes, &limits).unwrap())
        };
        let (one, two) = (on(1), on(2));
        assert_eq!((two.width, two.height), (2448, 2048));
        assert!(one.data == two.data, "two bands differ from one");
    }

    #[test]
    fn cmyk_white_black_and_primaries() {
        // Raw (inverted) samples: 255 means "no ink".
        assert_eq!(inverted_cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(inverted_cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]);
        assert_eq!(inverted_cmyk_to_rgb(&[0, 255, 255, 255]), [0, 255, 255]);
    }

    #[test]
    fn eoi_is_looked_for_after_the_first_scan() {
        assert!(has_end_of_image(&[
            0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0xD9
        ]));
        assert!(!has_end_of_image(&[
            0xFF, 0xD9, 0xFF, 0xDA, 1, 2, 0xFF, 0x00
        ]));
        assert!(!has_end_of_image(&[0xFF, 0xD8, 0xFF, 0xD9]));
    }

    #[test]
    fn encoded_jpeg_decodes_close_to_its_source() {
        let (width, height) = (37, 21);
        let data = (0..width * height * 3)
            .map(|i| ((i % 97) * 2 + (i / (width * 3)) * 3) as u8)
            .collect();
        let img = RgbImage8 {
            width,
            height,
            data,
        };
        let bytes = encode_jpeg(&img, 95).unwrap();
        let back = decode_jpeg(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!((back.width, back.height), (width, height));
        let mean = back
            .data
            .iter()
            .zip(&img.data)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .sum::<f64>()
            / img.data.len() as f64;
        assert!(mean < 12.0, "mean error {mean}");
    }

    #[test]
    fn garbage_after_soi_is_undecodable_not_a_panic() {
        let err = decode_jpeg(&[0xFF, 0xD8, 0xFF, 0x00, 1, 2, 3], &ImageLimits::default());
        assert!(matches!(err, Err(JpegProblem::Undecodable(_))), "{err:?}");
    }
}

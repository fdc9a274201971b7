//! Where a Winograd conv reads its input from, and the input transform that gathers each
//! tile's 6x6 patch from there: the input itself, or (the decoder's upsample and first scSE
//! folded into the conv) a half-resolution map read as its 2x upsampling, concatenated
//! with a skip and gated, so that the big map is never written.

// Constant-bound index loops over tiles keep them in registers (see gemm.rs).
#![allow(clippy::needless_range_loop)]

use super::transform::{input_tile_to, PatchSource};
use super::{WinoJob, PATCH, POS, TILE};
use crate::cpu::kernels::simd::{load_partial, Level, LANES};
use crate::cpu::kernels::ConvGeometry;

/// The decoder's conv input `u * (channel_gate[c] + spatial_gate[p])` (its first scSE),
/// where `u` is the concat of the 2x upsampled half-resolution map (`x_channels` channels,
/// a multiple of 16) and `skip` (the other channels, full resolution): read in place.
#[derive(Clone, Copy)]
pub(crate) struct GatedConcat<'a> {
    pub skip: &'a [f32],
    pub x_channels: usize,
    /// One per input channel.
    pub channel_gate: &'a [f32],
    /// One per full-resolution input pixel.
    pub spatial_gate: &'a [f32],
}

/// How `x` holds the conv's input.
#[derive(Clone, Copy)]
pub(crate) enum InputLayout<'a> {
    /// The input itself.
    Plain,
    /// The input at half resolution, read as its nearest-neighbour 2x upsampling (the
    /// decoder's upsample folded into the conv: the big map is never written).
    Upsampled,
    /// The first channels upsampled as above; the rest and the gates in [`GatedConcat`].
    GatedConcat(GatedConcat<'a>),
}

impl InputLayout<'_> {
    /// Asserts that `x` and the layout's other parts fit the geometry.
    pub(super) fn check(&self, x: &[f32], g: &ConvGeometry) {
        if let InputLayout::Plain = self {
            assert_eq!(x.len(), g.input_len(), "conv input length");
            return;
        }
        assert!(
            g.in_h.is_multiple_of(2) && g.in_w.is_multiple_of(2),
            "an upsampled input has even sides"
        );
        let pixels = g.in_h * g.in_w;
        let upsampled_channels = match self {
            InputLayout::GatedConcat(cat) => {
                let ca = cat.x_channels;
                assert!(ca.is_multiple_of(LANES) && ca <= g.cin, "concat split");
                assert_eq!(cat.skip.len(), pixels * (g.cin - ca), "skip length");
                assert_eq!(cat.channel_gate.len(), g.cin, "channel gate length");
                assert_eq!(cat.spatial_gate.len(), pixels, "spatial gate length");
                ca
            }
            _ => g.cin,
        };
        assert_eq!(
            x.len(),
            pixels / 4 * upsampled_channels,
            "conv input length"
        );
    }
}

/// Where tile `t`'s patch pixels lie in the (full-resolution) input; `None` for taps
/// outside it, which read zeros.
#[inline(always)]
fn patch_pixels(job: &WinoJob<'_>, t: usize) -> [Option<(usize, usize)>; POS] {
    let g = &job.g;
    let (ty, tx) = (t / job.plan.tiles_w, t % job.plan.tiles_w);
    let iy0 = (ty * TILE) as isize - g.pad_top as isize;
    let ix0 = (tx * TILE) as isize - g.pad_left as isize;
    let mut inside = [None; POS];
    for r in 0..PATCH {
        let iy = iy0 + r as isize;
        if iy < 0 || iy as usize >= g.in_h {
            continue;
        }
        for c in 0..PATCH {
            let ix = ix0 + c as isize;
            if ix >= 0 && (ix as usize) < g.in_w {
                inside[r * PATCH + c] = Some((iy as usize, ix as usize));
            }
        }
    }
    inside
}

/// `v[pos * pos_stride + (t - t0) * kcs + c - c0] = (B^T d B)[pos]` for tiles `t0..t1` and
/// channels `c0..c1` (written in whole vectors of 16).
///
/// # Safety
/// `v` must be writable at those indices, rounded up to whole vectors; the job's lengths
/// must have been checked.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn transform_inputs<L: Level>(
    job: &WinoJob<'_>,
    t0: usize,
    t1: usize,
    c0: usize,
    c1: usize,
    v: *mut f32,
    pos_stride: usize,
    kcs: usize,
) {
    for t in t0..t1 {
        let inside = patch_pixels(job, t);
        let dst = v.add((t - t0) * kcs);
        if let InputLayout::GatedConcat(cat) = &job.layout {
            transform_gated_concat::<L>(job, cat, &inside, c0, c1, dst, pos_stride);
        } else {
            transform_plain::<L>(job, &inside, c0, c1, dst, pos_stride);
        }
    }
}

/// `transform_inputs` for one tile of a plain or upsampled input.
///
/// # Safety
/// As `transform_inputs`; `dst` is the tile's first row of `v`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn transform_plain<L: Level>(
    job: &WinoJob<'_>,
    inside: &[Option<(usize, usize)>; POS],
    c0: usize,
    c1: usize,
    dst: *mut f32,
    stride: usize,
) {
    let g = &job.g;
    let mut src = [job.zeros.as_ptr(); POS];
    for (s, &at) in src.iter_mut().zip(inside) {
        if let Some((iy, ix)) = at {
            let pixel = if let InputLayout::Upsampled = job.layout {
                (iy / 2) * (g.in_w / 2) + ix / 2
            } else {
                iy * g.in_w + ix
            };
            *s = job.x.as_ptr().add(pixel * g.cin);
        }
    }
    let mut c = c0;
    while c < c1 {
        let out = dst.add(c - c0);
        let lanes = LANES.min(g.cin - c);
        if lanes == LANES {
            input_tile_to::<L, _>(&PlainPatch::<false>::at(&src, c, lanes), out, stride);
        } else {
            input_tile_to::<L, _>(&PlainPatch::<true>::at(&src, c, lanes), out, stride);
        }
        c += LANES;
    }
}

/// A plain or upsampled patch: value `i` is channels `c .. c + lanes` at `src[i]` (all 16
/// lanes, or only `lanes` when `TAIL`, zeros after).
struct PlainPatch<'a, const TAIL: bool> {
    src: &'a [*const f32; POS],
    c: usize,
    lanes: usize,
}

impl<'a, const TAIL: bool> PlainPatch<'a, TAIL> {
    fn at(src: &'a [*const f32; POS], c: usize, lanes: usize) -> Self {
        PlainPatch { src, c, lanes }
    }
}

impl<L: Level, const TAIL: bool> PatchSource<L> for PlainPatch<'_, TAIL> {
    /// # Safety
    /// Each `src[i] + c` must be readable for 16 floats, or `lanes` when `TAIL`.
    #[inline(always)]
    unsafe fn value(&self, i: usize) -> L::V {
        let p = self.src[i].add(self.c);
        if TAIL {
            L::load_masked(p, self.lanes)
        } else {
            L::load(p)
        }
    }
}

/// `transform_inputs` for one tile of a [`GatedConcat`] input: each loaded vector of
/// channels is scaled by its gates (the scSE the conv reads through).
///
/// # Safety
/// As `transform_inputs`; `dst` is the tile's first row of `v`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn transform_gated_concat<L: Level>(
    job: &WinoJob<'_>,
    cat: &GatedConcat<'_>,
    inside: &[Option<(usize, usize)>; POS],
    c0: usize,
    c1: usize,
    dst: *mut f32,
    stride: usize,
) {
    let g = &job.g;
    let (ca, cs) = (cat.x_channels, g.cin - cat.x_channels);
    let mut up = [job.zeros.as_ptr(); POS];
    let mut skip = [job.zeros.as_ptr(); POS];
    let mut spatial = [L::zero(); POS];
    for i in 0..POS {
        if let Some((iy, ix)) = inside[i] {
            let pixel = iy * g.in_w + ix;
            up[i] = job.x.as_ptr().add(((iy / 2) * (g.in_w / 2) + ix / 2) * ca);
            skip[i] = cat.skip.as_ptr().add(pixel * cs);
            spatial[i] = L::splat(cat.spatial_gate[pixel]);
        }
    }
    let mut c = c0;
    while c < c1 {
        // `ca` is a multiple of 16: a vector never straddles the two parts.
        let lanes = LANES.min(g.cin - c);
        let (parts, at) = if c < ca { (&up, c) } else { (&skip, c - ca) };
        let channel = load_partial::<L>(&cat.channel_gate[c..c + lanes]);
        let out = dst.add(c - c0);
        if lanes == LANES {
            let plain = PlainPatch::<false>::at(parts, at, lanes);
            input_tile_to::<L, _>(
                &GatedPatch {
                    plain,
                    channel,
                    spatial: &spatial,
                },
                out,
                stride,
            );
        } else {
            let plain = PlainPatch::<true>::at(parts, at, lanes);
            input_tile_to::<L, _>(
                &GatedPatch {
                    plain,
                    channel,
                    spatial: &spatial,
                },
                out,
                stride,
            );
        }
        c += LANES;
    }
}

/// A patch of a [`GatedConcat`] input: the values of `plain`, each scaled by its gates.
struct GatedPatch<'a, L: Level, const TAIL: bool> {
    plain: PlainPatch<'a, TAIL>,
    channel: L::V,
    spatial: &'a [L::V; POS],
}

impl<L: Level, const TAIL: bool> PatchSource<L> for GatedPatch<'_, L, TAIL> {
    /// # Safety
    /// As [`PlainPatch`]'s.
    #[inline(always)]
    unsafe fn value(&self, i: usize) -> L::V {
        let x = PatchSource::<L>::value(&self.plain, i);
        L::mul(x, L::add(self.channel, self.spatial[i]))
    }
}

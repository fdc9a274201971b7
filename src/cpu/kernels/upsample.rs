//! Nearest-neighbour 2x upsampling fused with the decoder's channel concat: a pure copy,
//! parallel over output rows.

use rayon::prelude::*;

/// Elements below which the copy runs on the calling thread.
const SERIAL_ELEMENTS: usize = 1 << 16;

pub(crate) fn upsample2x_concat_nhwc(
    x: &[f32],
    h: usize,
    w: usize,
    cx: usize,
    skip: Option<&[f32]>,
    cs: usize,
    y: &mut [f32],
) {
    let (oh, ow) = (2 * h, 2 * w);
    let c = cx + cs;
    assert_eq!(x.len(), h * w * cx, "upsample input length");
    assert_eq!(y.len(), oh * ow * c, "upsample output length");
    match skip {
        Some(s) => assert_eq!(s.len(), oh * ow * cs, "upsample skip length"),
        None => assert_eq!(cs, 0, "upsample without skip must have cs = 0"),
    }
    if y.is_empty() {
        return;
    }
    let row_len = ow * c;
    let fill_row = |oy: usize, out: &mut [f32]| {
        let src_row = &x[(oy / 2) * w * cx..][..w * cx];
        for (ox, px) in out.chunks_exact_mut(c).enumerate() {
            px[..cx].copy_from_slice(&src_row[(ox / 2) * cx..][..cx]);
            if let Some(s) = skip {
                px[cx..].copy_from_slice(&s[(oy * ow + ox) * cs..][..cs]);
            }
        }
    };
    if rayon::current_num_threads() <= 1 || y.len() < SERIAL_ELEMENTS {
        y.chunks_exact_mut(row_len)
            .enumerate()
            .for_each(|(oy, out)| fill_row(oy, out));
    } else {
        y.par_chunks_exact_mut(row_len)
            .enumerate()
            .for_each(|(oy, out)| fill_row(oy, out));
    }
}

//! Soft feature alignment as a fused, flash-attention style kernel.
//!
//! For a block of [`QUERY_ROWS`] query positions, keys are visited in blocks of
//! [`KEY_BLOCK`]: the logits block is a small GEMM (query rows x transposed keys), the softmax
//! is online (running max and sum per row, earlier output rescaled when the max grows), and
//! the weighted sum of prompt features is a second GEMM (probabilities x prompt rows) on the
//! shared microkernel. Nothing n x n is stored; logits in the thousands are safe because
//! every exponent is `logit - running max <= 0`.
//!
//! Precision: the logits are accumulated in f64 and the running max subtracted before rounding
//! to f32. With sharp softmaxes the output is extremely sensitive to logit errors, and f32
//! logits in the thousands carry absolute errors around 1e-4 (their ulp is 6e-5): measured on
//! the conformance fixtures, f64 logits cut the alignment's error against the float64 truth
//! 10-15x, well below PyTorch's own float32 error. They cost about twice the logit GEMM
//! (n^2 * hidden multiply-adds), the smaller of the kernel's two products.

#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::gemm::{accumulate, add_tile_to, next_tile_width, zero_tile, Tile};
use super::isa::{dispatch_isa, dispatch_tile, Isa};
use super::simd::{exp, exp_scalar, AlignedBuf, Level, LANES};

/// Query positions per block: the tile height of every level's microkernels divides it.
const QUERY_ROWS: usize = 24;
/// Key positions per block (a multiple of 16).
const KEY_BLOCK: usize = 256;
/// Keys summed in one register chain before joining the running output (two-level
/// summation: one chain over 4096 keys was 20x less accurate than PyTorch's blocked GEMM).
const VALUE_RUN: usize = 64;
/// Work (FLOPs) below which the whole alignment runs on the calling thread.
const SERIAL_FLOPS: usize = 1 << 20;
/// f64 lanes per vector.
const D_LANES: usize = 8;

struct AlignJob<'a> {
    fq: &'a [f32],
    /// Query projections in f64: `n x hidden`.
    q: &'a [f64],
    /// Key projections in f64, transposed in panels of 16 keys:
    /// `[keys_padded / 16][hidden][16]`, zero past `n`. (A plain `hidden x keys` transpose
    /// puts the rows a tile reads thousands of bytes apart, all in the same L1 sets.)
    kt: &'a [f64],
    /// Prompt features with rows padded to `values_stride` (a multiple of 16).
    values: &'a [f32],
    n: usize,
    cin: usize,
    hidden: usize,
    keys_padded: usize,
    values_stride: usize,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn soft_align_nhwc_isa(
    isa: Isa,
    fq: &[f32],
    q: &[f32],
    k: &[f32],
    fp: &[f32],
    n: usize,
    cin: usize,
    hidden: usize,
    y: &mut [f32],
) {
    assert_eq!(fq.len(), n * cin, "alignment query feature length");
    assert_eq!(fp.len(), n * cin, "alignment prompt feature length");
    assert_eq!(q.len(), n * hidden, "alignment query projection length");
    assert_eq!(k.len(), n * hidden, "alignment key projection length");
    assert_eq!(y.len(), n * 2 * cin, "alignment output length");
    if n == 0 || cin == 0 {
        return;
    }
    let q64: Vec<f64> = q.iter().map(|&v| v as f64).collect();
    let keys_padded = n.next_multiple_of(LANES);
    let mut kt = vec![0.0f64; hidden * keys_padded];
    for j in 0..n {
        let (chunk, lane) = (j / LANES, j % LANES);
        for h in 0..hidden {
            kt[(chunk * hidden + h) * LANES + lane] = k[j * hidden + h] as f64;
        }
    }
    let values_stride = cin.next_multiple_of(LANES);
    let padded_values;
    let values = if values_stride == cin {
        fp
    } else {
        let mut padded = AlignedBuf::zeroed(n * values_stride);
        for (dst, src) in padded
            .as_mut_slice()
            .chunks_exact_mut(values_stride)
            .zip(fp.chunks_exact(cin))
        {
            dst[..cin].copy_from_slice(src);
        }
        padded_values = padded;
        padded_values.as_slice()
    };
    let job = AlignJob {
        fq,
        q: &q64,
        kt: &kt,
        values,
        n,
        cin,
        hidden,
        keys_padded,
        values_stride,
    };
    let block_len = QUERY_ROWS * 2 * cin;
    let flops = 2 * n * n * (hidden + cin);
    let threads = rayon::current_num_threads();
    if threads <= 1 || flops < SERIAL_FLOPS {
        for (b, out) in y.chunks_mut(block_len).enumerate() {
            align_block_isa(isa, &job, b * QUERY_ROWS, out);
        }
    } else {
        y.par_chunks_mut(block_len)
            .enumerate()
            .for_each(|(b, out)| align_block_isa(isa, &job, b * QUERY_ROWS, out));
    }
}

dispatch_isa! {
    fn align_block_isa(job: &AlignJob<'_>, i0: usize, out: &mut [f32]) => align_block;
}

/// Per-block working memory.
struct BlockState {
    /// Logits in f64: `QUERY_ROWS x KEY_BLOCK`.
    logits: Vec<f64>,
    /// Unnormalized probabilities `exp(logit - running max)`: `QUERY_ROWS x KEY_BLOCK`.
    probs: AlignedBuf,
    /// Unnormalized output: `QUERY_ROWS x values_stride`.
    acc: AlignedBuf,
    running_max: [f64; QUERY_ROWS],
    running_sum: [f32; QUERY_ROWS],
}

/// Query rows `i0 .. i0 + rows` (rows = out.len() / (2 cin), at most QUERY_ROWS).
#[inline(always)]
fn align_block<L: Level>(job: &AlignJob<'_>, i0: usize, out: &mut [f32]) {
    let rows = out.len() / (2 * job.cin);
    let mut st = BlockState {
        logits: vec![0.0; QUERY_ROWS * KEY_BLOCK],
        probs: AlignedBuf::zeroed(QUERY_ROWS * KEY_BLOCK),
        acc: AlignedBuf::zeroed(QUERY_ROWS * job.values_stride),
        running_max: [f64::NEG_INFINITY; QUERY_ROWS],
        running_sum: [0.0; QUERY_ROWS],
    };
    for j0 in (0..job.n).step_by(KEY_BLOCK) {
        let keys = KEY_BLOCK.min(job.n - j0);
        compute_logits::<L>(job, i0, rows, j0, keys, &mut st);
        softmax_update::<L>(job, rows, keys, &mut st);
        accumulate_values::<L>(job, rows, j0, keys, &mut st);
    }
    let cin = job.cin;
    for (r, out_row) in out.chunks_exact_mut(2 * cin).enumerate() {
        out_row[..cin].copy_from_slice(&job.fq[(i0 + r) * cin..][..cin]);
        let inv = 1.0 / st.running_sum[r];
        let acc_row = &st.acc.as_slice()[r * job.values_stride..][..cin];
        for (o, &a) in out_row[cin..].iter_mut().zip(acc_row) {
            *o = a * inv;
        }
    }
}

/// Row pointers of a tile starting at block row `r0`; rows at or past `rows` repeat row 0.
#[inline(always)]
fn row_pointers<T, const MR: usize>(
    base: *const T,
    stride: usize,
    r0: usize,
    rows: usize,
) -> [*const T; MR] {
    let mut pointers = [base; MR];
    for (m, p) in pointers.iter_mut().enumerate() {
        if r0 + m < rows {
            *p = base.wrapping_add((r0 + m) * stride);
        }
    }
    pointers
}

/// `logits[r, jj] = q[i0 + r] · k[j0 + jj]` in f64, for `jj < keys` rounded up to 16.
#[inline(always)]
fn compute_logits<L: Level>(
    job: &AlignJob<'_>,
    i0: usize,
    rows: usize,
    j0: usize,
    keys: usize,
    st: &mut BlockState,
) {
    for col0 in (0..keys).step_by(LANES) {
        // Tiles of MR query rows x 16 keys (2 f64 vectors): 16 accumulators on AVX-512.
        match L::ISA {
            Isa::Avx512 => logits_tile::<L, 8>(job, i0, rows, j0 + col0, col0, st),
            Isa::Avx2 => logits_tile::<L, 3>(job, i0, rows, j0 + col0, col0, st),
            Isa::Portable => logits_tile::<L, 2>(job, i0, rows, j0 + col0, col0, st),
        }
    }
}

#[inline(always)]
fn logits_tile<L: Level, const MR: usize>(
    job: &AlignJob<'_>,
    i0: usize,
    rows: usize,
    key0: usize,
    col0: usize,
    st: &mut BlockState,
) {
    assert!(
        key0.is_multiple_of(LANES) && key0 + LANES <= job.keys_padded && col0 + LANES <= KEY_BLOCK
    );
    assert!(QUERY_ROWS.is_multiple_of(MR) && (i0 + rows) * job.hidden <= job.q.len());
    let q_base = job.q[i0 * job.hidden..].as_ptr();
    let panel = job.kt[key0 * job.hidden..].as_ptr();
    for r0 in (0..rows).step_by(MR) {
        let a = row_pointers::<f64, MR>(q_base, job.hidden, r0, rows);
        let mut acc = [[L::d_zero(); 2]; MR];
        // SAFETY: query rows i0 + r (< n) hold `hidden` doubles; the keys' panel holds
        // `hidden` rows of 16 doubles; the logits block has QUERY_ROWS >= r0 + MR rows of
        // KEY_BLOCK >= col0 + 16 doubles.
        unsafe {
            for h in 0..job.hidden {
                let b = panel.add(h * LANES);
                let (b0, b1) = (L::d_load(b), L::d_load(b.add(D_LANES)));
                for m in 0..MR {
                    let am = L::d_splat(*a[m].add(h));
                    acc[m][0] = L::d_fma(am, b0, acc[m][0]);
                    acc[m][1] = L::d_fma(am, b1, acc[m][1]);
                }
            }
            for m in 0..MR {
                let dst = st.logits.as_mut_ptr().add((r0 + m) * KEY_BLOCK + col0);
                L::d_store(dst, acc[m][0]);
                L::d_store(dst.add(D_LANES), acc[m][1]);
            }
        }
    }
}

/// See `softmax_update`: 2^-100.
const FLUSH_BELOW: f32 = 7.888_609e-31;

/// Fold this key block's logits into the running max and sum, turn them into unnormalized
/// probabilities, and rescale the output rows when their max grew.
#[inline(always)]
fn softmax_update<L: Level>(job: &AlignJob<'_>, rows: usize, keys: usize, st: &mut BlockState) {
    // Probabilities below 2^-100 of the row max are flushed to exactly 0: they are far
    // below f32 resolution against the max term (1), and left as is their products with
    // the values become subnormal, which made sharp (trained-like) alignments 20x slower.
    let flush = L::splat(FLUSH_BELOW);
    let full = keys / LANES;
    let tail = keys % LANES;
    for r in 0..rows {
        let logits = &st.logits[r * KEY_BLOCK..][..keys];
        let block_max = max_f64(logits);
        let new_max = block_max.max(st.running_max[r]);
        let probs = &mut st.probs.as_mut_slice()[r * KEY_BLOCK..][..KEY_BLOCK];
        // Subtract in f64, then round: near-maximal logits keep their small differences exactly.
        for (p, &s) in probs.iter_mut().zip(logits) {
            *p = (s - new_max) as f32;
        }
        let mut sum = L::zero();
        for chunk in probs[..full * LANES].chunks_exact_mut(LANES) {
            // SAFETY: `chunk` holds 16 floats.
            unsafe {
                let p = L::max(L::sub(exp::<L>(L::load(chunk.as_ptr())), flush), L::zero());
                sum = L::add(sum, p);
                L::store(chunk.as_mut_ptr(), p);
            }
        }
        if tail > 0 {
            // The row has room for the whole last vector (KEY_BLOCK % 16 == 0); lanes past
            // `keys` are zeroed so they add nothing to the sum (they are never read later).
            let last = &mut probs[full * LANES..][..LANES];
            // SAFETY: `last` holds 16 floats.
            let e = exp::<L>(unsafe { L::load(last.as_ptr()) });
            let mut p = L::to_array(L::max(L::sub(e, flush), L::zero()));
            p[tail..].fill(0.0);
            last.copy_from_slice(&p);
            // SAFETY: `p` holds 16 floats.
            sum = L::add(sum, unsafe { L::load(p.as_ptr()) });
        }
        // On the first block the old max is -inf: the rescale flushes to 0 (nothing to rescale).
        let rescale = exp_scalar::<L>((st.running_max[r] - new_max) as f32);
        let rescale = if rescale < FLUSH_BELOW { 0.0 } else { rescale };
        st.running_sum[r] = st.running_sum[r] * rescale + L::reduce_add(sum);
        st.running_max[r] = new_max;
        if rescale != 1.0 {
            let scale = L::splat(rescale);
            let acc_row = &mut st.acc.as_mut_slice()[r * job.values_stride..][..job.values_stride];
            for chunk in acc_row.chunks_exact_mut(LANES) {
                // SAFETY: `chunk` holds 16 floats.
                unsafe { L::store(chunk.as_mut_ptr(), L::mul(L::load(chunk.as_ptr()), scale)) };
            }
        }
    }
}

/// The largest element, with 8 independent running maxima (one serial chain of `vmaxsd`
/// was 40% of the kernel's time).
#[inline(always)]
fn max_f64(xs: &[f64]) -> f64 {
    let mut lanes = [f64::NEG_INFINITY; D_LANES];
    let mut chunks = xs.chunks_exact(D_LANES);
    for chunk in &mut chunks {
        for i in 0..D_LANES {
            if chunk[i] > lanes[i] {
                lanes[i] = chunk[i];
            }
        }
    }
    for &x in chunks.remainder() {
        if x > lanes[0] {
            lanes[0] = x;
        }
    }
    lanes.into_iter().fold(f64::NEG_INFINITY, f64::max)
}

/// `acc[r, ..] += sum_jj p[r, jj] * values[j0 + jj, ..]`.
#[inline(always)]
fn accumulate_values<L: Level>(
    job: &AlignJob<'_>,
    rows: usize,
    j0: usize,
    keys: usize,
    st: &mut BlockState,
) {
    let nvec = job.values_stride / LANES;
    let mut v0 = 0;
    while v0 < nvec {
        let nv = next_tile_width(nvec - v0);
        dispatch_tile!(L, nv, values_tile(job, rows, j0, keys, v0 * LANES, st));
        v0 += nv;
    }
}

#[inline(always)]
fn values_tile<L: Level, const MR: usize, const NV: usize>(
    job: &AlignJob<'_>,
    rows: usize,
    j0: usize,
    keys: usize,
    col0: usize,
    st: &mut BlockState,
) {
    assert!(col0 + NV * LANES <= job.values_stride && j0 + keys <= job.n);
    assert!(QUERY_ROWS.is_multiple_of(MR));
    let stride = job.values_stride;
    // A last partial tile also fills rows past `rows` (repeating row 0); nobody reads them.
    for r0 in (0..rows).step_by(MR) {
        let a = row_pointers::<f32, MR>(st.probs.as_slice().as_ptr(), KEY_BLOCK, r0, rows);
        let c = st.acc.as_mut_slice()[r0 * stride + col0..].as_mut_ptr();
        for k0 in (0..keys).step_by(VALUE_RUN) {
            let run = VALUE_RUN.min(keys - k0);
            let a_run: [*const f32; MR] = a.map(|p| p.wrapping_add(k0));
            // SAFETY: probability rows hold KEY_BLOCK >= k0 + run floats; value rows
            // j0 + k0 .. j0 + k0 + run exist and hold `stride >= col0 + 16 NV` floats; acc has
            // QUERY_ROWS (a multiple of MR) rows of `stride` floats.
            unsafe {
                let mut sums: Tile<L, MR, NV> = zero_tile::<L, MR, NV>();
                let b = job.values.as_ptr().add((j0 + k0) * stride + col0);
                accumulate::<L, MR, NV>(&mut sums, &a_run, b, stride, run);
                add_tile_to::<L, MR, NV>(c, stride, &sums);
            }
        }
    }
}

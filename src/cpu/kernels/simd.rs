//! The vector abstraction the kernels are written against: a logical vector of 16 `f32`
//! lanes, implemented per instruction-set level.
//!
//! - AVX-512: one `__m512`.
//! - AVX2 + FMA: a pair of `__m256`.
//! - portable: a plain `[f32; 16]` (LLVM vectorizes what it can for the baseline target).
//!
//! Every method is `#[inline(always)]`; the kernels are instantiated inside
//! `#[target_feature]` functions (see `isa::dispatch_isa!`), where the intrinsics inline.
//! Real vector types matter: with `[f32; 16]` values LLVM turns tile loads into `memmove`s
//! and keeps register tiles in memory.

#![allow(clippy::needless_range_loop)]

use super::isa::Isa;
use super::Activation;

pub(crate) const LANES: usize = 16;

pub(crate) trait Level: Sized + 'static {
    const ISA: Isa;
    /// 16 lanes of `f32`.
    type V: Copy;

    fn zero() -> Self::V;
    fn splat(x: f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for reading 16 floats.
    unsafe fn load(p: *const f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for writing 16 floats.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `n` lanes from `p`, zeros after; nothing past them is touched.
    ///
    /// # Safety
    /// `n <= 16` and `p` must be valid for reading `n` floats.
    unsafe fn load_masked(p: *const f32, n: usize) -> Self::V;
    /// Store the first `n` lanes of `v`; nothing past them is touched.
    ///
    /// # Safety
    /// `n <= 16` and `p` must be valid for writing `n` floats.
    unsafe fn store_masked(p: *mut f32, n: usize, v: Self::V);
    fn add(a: Self::V, b: Self::V) -> Self::V;
    fn sub(a: Self::V, b: Self::V) -> Self::V;
    fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `1 / a` to about 1 ulp (a hardware estimate refined by a Newton step on x86).
    fn recip(a: Self::V) -> Self::V;
    /// `a * b + c`, fused where the level has FMA.
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `if a > b { a } else { b }`, so a NaN in `b` comes through.
    fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `if a < b { a } else { b }`, so a NaN in `b` comes through.
    fn min(a: Self::V, b: Self::V) -> Self::V;
    /// `2^n` where `shifted = n + EXP_ROUNDER` exactly (n integer in -126..=127).
    fn pow2_from_rounded(shifted: Self::V) -> Self::V;

    /// 8 lanes of `f64` (only the alignment logits need them).
    type D: Copy;
    fn d_zero() -> Self::D;
    fn d_splat(x: f64) -> Self::D;
    /// # Safety
    /// `p` must be valid for reading 8 doubles.
    unsafe fn d_load(p: *const f64) -> Self::D;
    /// # Safety
    /// `p` must be valid for writing 8 doubles.
    unsafe fn d_store(p: *mut f64, v: Self::D);
    /// `a * b + c`, fused where the level has FMA.
    fn d_fma(a: Self::D, b: Self::D, c: Self::D) -> Self::D;

    #[inline(always)]
    fn to_array(v: Self::V) -> [f32; LANES] {
        let mut out = [0.0; LANES];
        // SAFETY: `out` holds 16 floats.
        unsafe { Self::store(out.as_mut_ptr(), v) };
        out
    }

    #[inline(always)]
    fn reduce_add(v: Self::V) -> f32 {
        let mut w = Self::to_array(v);
        let mut width = LANES / 2;
        while width > 0 {
            for i in 0..width {
                w[i] += w[i + width];
            }
            width /= 2;
        }
        w[0]
    }
}

/// The first `src.len()` (at most 16) lanes from `src`, zeros after.
#[inline(always)]
pub(crate) fn load_partial<L: Level>(src: &[f32]) -> L::V {
    assert!(src.len() <= LANES);
    // SAFETY: `src` holds n <= 16 floats.
    unsafe { L::load_masked(src.as_ptr(), src.len()) }
}

/// Store the first `dst.len()` (at most 16) lanes of `v`.
#[inline(always)]
pub(crate) fn store_partial<L: Level>(dst: &mut [f32], v: L::V) {
    assert!(dst.len() <= LANES);
    // SAFETY: `dst` holds n <= 16 floats.
    unsafe { L::store_masked(dst.as_mut_ptr(), dst.len(), v) }
}

/// Adding this rounds an `f32` of magnitude < 2^22 to an integer kept in the low mantissa bits.
pub(crate) const EXP_ROUNDER: f32 = 12_582_912.0;

/// `e^x` lane-wise, relative error about 2e-7. Inputs are clamped to [-87.3, 88.3]
/// (results 1.2e-38 .. 2.2e38), so `exp(-inf)` is tiny, not 0; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp<L: Level>(x: L::V) -> L::V {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI - LN2_LO with LN2_HI = 355/512, so n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = 2.121_944_4e-4;
    let x = L::max(L::splat(-87.3), x);
    let x = L::min(L::splat(88.3), x);
    let shifted = L::fma(x, L::splat(LOG2E), L::splat(EXP_ROUNDER));
    let n = L::sub(shifted, L::splat(EXP_ROUNDER));
    let r = L::fma(n, L::splat(-LN2_HI), x);
    let r = L::fma(n, L::splat(LN2_LO), r);
    // e^r for |r| <= ln2/2 by its Taylor series to r^7 / 7!.
    let mut p = L::splat(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = L::fma(p, r, L::splat(c));
    }
    L::mul(p, L::pow2_from_rounded(shifted))
}

#[inline(always)]
pub(crate) fn sigmoid<L: Level>(x: L::V) -> L::V {
    let one = L::splat(1.0);
    L::recip(L::add(one, exp::<L>(L::sub(L::zero(), x))))
}

/// The activation applied lane-wise.
#[inline(always)]
pub(crate) fn activate<L: Level>(act: Activation, v: L::V) -> L::V {
    match act {
        Activation::Identity => v,
        // NaN passes through, as in the reference.
        Activation::Relu => L::max(L::zero(), v),
        Activation::Swish => L::mul(v, sigmoid::<L>(v)),
        Activation::Sigmoid => sigmoid::<L>(v),
    }
}

/// Scalar `e^x` (computed on a splat; lane 0 is the answer).
#[inline(always)]
pub(crate) fn exp_scalar<L: Level>(x: f32) -> f32 {
    L::to_array(exp::<L>(L::splat(x)))[0]
}

/// A zero-initialized `f32` buffer whose first element is 64-byte aligned, so that 16-lane
/// loads of packed data never straddle cache lines.
pub(crate) struct AlignedBuf {
    storage: Vec<f32>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> Self {
        let storage = vec![0.0f32; len + LANES];
        let misalignment = storage.as_ptr() as usize % 64;
        let offset = (64 - misalignment) % 64 / std::mem::size_of::<f32>();
        AlignedBuf {
            storage,
            offset,
            len,
        }
    }

    pub(crate) fn as_slice(&self) -> &[f32] {
        &self.storage[self.offset..self.offset + self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// Baseline code (SSE2 on x86-64, whatever the target guarantees elsewhere).
pub(crate) struct Portable;

impl Level for Portable {
    const ISA: Isa = Isa::Portable;
    type V = [f32; LANES];

    #[inline(always)]
    fn zero() -> Self::V {
        [0.0; LANES]
    }
    #[inline(always)]
    fn splat(x: f32) -> Self::V {
        [x; LANES]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::ptr::read_unaligned(p as *const Self::V)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::ptr::write_unaligned(p as *mut Self::V, v)
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, n: usize) -> Self::V {
        let mut v = [0.0; LANES];
        std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), n);
        v
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, n: usize, v: Self::V) {
        std::ptr::copy_nonoverlapping(v.as_ptr(), p, n)
    }
    #[inline(always)]
    fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn recip(a: Self::V) -> Self::V {
        std::array::from_fn(|i| 1.0 / a[i])
    }
    #[inline(always)]
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        // No FMA guaranteed here: `mul_add` could become a libm call.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn min(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] < b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn pow2_from_rounded(shifted: Self::V) -> Self::V {
        let bias = EXP_ROUNDER.to_bits().wrapping_sub(127);
        std::array::from_fn(|i| f32::from_bits(shifted[i].to_bits().wrapping_sub(bias) << 23))
    }

    type D = [f64; 8];

    #[inline(always)]
    fn d_zero() -> Self::D {
        [0.0; 8]
    }
    #[inline(always)]
    fn d_splat(x: f64) -> Self::D {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn d_load(p: *const f64) -> Self::D {
        std::ptr::read_unaligned(p as *const Self::D)
    }
    #[inline(always)]
    unsafe fn d_store(p: *mut f64, v: Self::D) {
        std::ptr::write_unaligned(p as *mut Self::D, v)
    }
    #[inline(always)]
    fn d_fma(a: Self::D, b: Self::D, c: Self::D) -> Self::D {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Level, EXP_ROUNDER};
    use crate::cpu::kernels::isa::Isa;

    /// Subtracting this from the bits of `n + EXP_ROUNDER` leaves `n + 127` (the exponent of 2^n).
    const POW2_BIAS: i32 = EXP_ROUNDER.to_bits() as i32 - 127;

    pub(crate) struct Avx512;

    /// The AVX-512 mask of the first `n` (at most 16) lanes.
    #[inline(always)]
    fn lane_mask(n: usize) -> __mmask16 {
        debug_assert!(n <= 16);
        ((1u32 << n) - 1) as __mmask16
    }

    // SAFETY (all `unsafe` blocks below): these methods only run inside functions compiled
    // with `avx512f` (see `dispatch_isa!`), chosen after the CPU reported the feature.
    impl Level for Avx512 {
        const ISA: Isa = Isa::Avx512;
        type V = __m512;

        #[inline(always)]
        fn zero() -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn splat(x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, n: usize) -> __m512 {
            // Masked-off lanes are neither read nor able to fault.
            _mm512_maskz_loadu_ps(lane_mask(n), p)
        }
        #[inline(always)]
        unsafe fn store_masked(p: *mut f32, n: usize, v: __m512) {
            _mm512_mask_storeu_ps(p, lane_mask(n), v)
        }
        #[inline(always)]
        fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn recip(a: __m512) -> __m512 {
            // 14-bit estimate, then r (2 - a r): about 1 ulp, several times cheaper than vdivps.
            unsafe {
                let r = _mm512_rcp14_ps(a);
                _mm512_mul_ps(r, _mm512_fnmadd_ps(a, r, _mm512_set1_ps(2.0)))
            }
        }
        #[inline(always)]
        fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(a: __m512, b: __m512) -> __m512 {
            // vmaxps returns the second operand when either is NaN.
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        fn reduce_add(v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        fn pow2_from_rounded(shifted: __m512) -> __m512 {
            unsafe {
                let e =
                    _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(POW2_BIAS));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
            }
        }

        type D = __m512d;

        #[inline(always)]
        fn d_zero() -> __m512d {
            unsafe { _mm512_setzero_pd() }
        }
        #[inline(always)]
        fn d_splat(x: f64) -> __m512d {
            unsafe { _mm512_set1_pd(x) }
        }
        #[inline(always)]
        unsafe fn d_load(p: *const f64) -> __m512d {
            _mm512_loadu_pd(p)
        }
        #[inline(always)]
        unsafe fn d_store(p: *mut f64, v: __m512d) {
            _mm512_storeu_pd(p, v)
        }
        #[inline(always)]
        fn d_fma(a: __m512d, b: __m512d, c: __m512d) -> __m512d {
            unsafe { _mm512_fmadd_pd(a, b, c) }
        }
    }

    pub(crate) struct Avx2;

    /// 16 lanes as two ymm registers.
    #[derive(Clone, Copy)]
    pub(crate) struct Y2(__m256, __m256);

    /// 8 `f64` lanes as two ymm registers.
    #[derive(Clone, Copy)]
    pub(crate) struct D2(__m256d, __m256d);

    /// Lane masks (sign bit set = active) of the first `n` (at most 16) lanes, per half.
    #[inline(always)]
    unsafe fn half_masks(n: usize) -> (__m256i, __m256i) {
        debug_assert!(n <= 16);
        let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let n = _mm256_set1_epi32(n as i32);
        (
            _mm256_cmpgt_epi32(n, index),
            _mm256_cmpgt_epi32(_mm256_sub_epi32(n, _mm256_set1_epi32(8)), index),
        )
    }

    /// Apply a binary ymm operation to both halves.
    macro_rules! halves {
        ($op:ident, $a:expr, $b:expr) => {{
            let (a, b) = ($a, $b);
            unsafe { Y2($op(a.0, b.0), $op(a.1, b.1)) }
        }};
    }

    // SAFETY (all `unsafe` blocks below): these methods only run inside functions compiled
    // with `avx2,fma` (see `dispatch_isa!`), chosen after the CPU reported the features.
    impl Level for Avx2 {
        const ISA: Isa = Isa::Avx2;
        type V = Y2;

        #[inline(always)]
        fn zero() -> Y2 {
            unsafe { Y2(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
        #[inline(always)]
        fn splat(x: f32) -> Y2 {
            unsafe { Y2(_mm256_set1_ps(x), _mm256_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Y2 {
            Y2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Y2) {
            _mm256_storeu_ps(p, v.0);
            _mm256_storeu_ps(p.add(8), v.1);
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, n: usize) -> Y2 {
            // vmaskmovps neither reads nor faults on masked-off lanes.
            let (m0, m1) = half_masks(n);
            // wrapping_add: with n <= 8 the second half may lie past the allocation.
            Y2(
                _mm256_maskload_ps(p, m0),
                _mm256_maskload_ps(p.wrapping_add(8), m1),
            )
        }
        #[inline(always)]
        unsafe fn store_masked(p: *mut f32, n: usize, v: Y2) {
            let (m0, m1) = half_masks(n);
            _mm256_maskstore_ps(p, m0, v.0);
            _mm256_maskstore_ps(p.wrapping_add(8), m1, v.1);
        }
        #[inline(always)]
        fn add(a: Y2, b: Y2) -> Y2 {
            halves!(_mm256_add_ps, a, b)
        }
        #[inline(always)]
        fn sub(a: Y2, b: Y2) -> Y2 {
            halves!(_mm256_sub_ps, a, b)
        }
        #[inline(always)]
        fn mul(a: Y2, b: Y2) -> Y2 {
            halves!(_mm256_mul_ps, a, b)
        }
        #[inline(always)]
        fn recip(a: Y2) -> Y2 {
            // 12-bit estimate, then r (2 - a r): about 2 ulp, cheaper than vdivps.
            unsafe {
                let two = _mm256_set1_ps(2.0);
                let (r0, r1) = (_mm256_rcp_ps(a.0), _mm256_rcp_ps(a.1));
                Y2(
                    _mm256_mul_ps(r0, _mm256_fnmadd_ps(a.0, r0, two)),
                    _mm256_mul_ps(r1, _mm256_fnmadd_ps(a.1, r1, two)),
                )
            }
        }
        #[inline(always)]
        fn fma(a: Y2, b: Y2, c: Y2) -> Y2 {
            unsafe {
                Y2(
                    _mm256_fmadd_ps(a.0, b.0, c.0),
                    _mm256_fmadd_ps(a.1, b.1, c.1),
                )
            }
        }
        #[inline(always)]
        fn max(a: Y2, b: Y2) -> Y2 {
            halves!(_mm256_max_ps, a, b)
        }
        #[inline(always)]
        fn min(a: Y2, b: Y2) -> Y2 {
            halves!(_mm256_min_ps, a, b)
        }
        #[inline(always)]
        fn pow2_from_rounded(shifted: Y2) -> Y2 {
            unsafe {
                let bias = _mm256_set1_epi32(POW2_BIAS);
                let e0 = _mm256_sub_epi32(_mm256_castps_si256(shifted.0), bias);
                let e1 = _mm256_sub_epi32(_mm256_castps_si256(shifted.1), bias);
                Y2(
                    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e0)),
                    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e1)),
                )
            }
        }

        type D = D2;

        #[inline(always)]
        fn d_zero() -> D2 {
            unsafe { D2(_mm256_setzero_pd(), _mm256_setzero_pd()) }
        }
        #[inline(always)]
        fn d_splat(x: f64) -> D2 {
            unsafe { D2(_mm256_set1_pd(x), _mm256_set1_pd(x)) }
        }
        #[inline(always)]
        unsafe fn d_load(p: *const f64) -> D2 {
            D2(_mm256_loadu_pd(p), _mm256_loadu_pd(p.add(4)))
        }
        #[inline(always)]
        unsafe fn d_store(p: *mut f64, v: D2) {
            _mm256_storeu_pd(p, v.0);
            _mm256_storeu_pd(p.add(4), v.1);
        }
        #[inline(always)]
        fn d_fma(a: D2, b: D2, c: D2) -> D2 {
            unsafe {
                D2(
                    _mm256_fmadd_pd(a.0, b.0, c.0),
                    _mm256_fmadd_pd(a.1, b.1, c.1),
                )
            }
        }
    }
}

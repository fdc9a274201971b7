//! Instruction-set levels and the machinery that compiles one generic kernel per level.
//!
//! Hot loops are written once, generic over `simd::Level` (a 16-lane vector type and its
//! operations). Each kernel entry point is instantiated inside a `#[target_feature]` function
//! per level (see [`dispatch_isa!`]), so the same source becomes zmm code for AVX-512, ymm
//! code for AVX2 and baseline code elsewhere. The level is picked once at run time.

use std::sync::OnceLock;

/// An instruction-set level the kernels are compiled for, lowest first.
///
/// Invariant: a value above `Portable` only exists when the running CPU supports it
/// (values come from [`Isa::detected`] or [`Isa::available`]), which is what makes calling
/// the `#[target_feature]` instantiations sound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Portable,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best level this CPU supports.
    pub(crate) fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(detect)
    }

    /// The level the public kernels use: the detected one, lowered by `METAUAS_ISA`
    /// (`portable`, `avx2`, `avx512`) when set. Asking for more than the CPU has gives the CPU's best.
    pub(crate) fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let wanted = std::env::var("METAUAS_ISA")
                .ok()
                .and_then(|name| Isa::parse(&name));
            match wanted {
                Some(level) => level.min(Isa::detected()),
                None => Isa::detected(),
            }
        })
    }

    /// Every level this CPU can run, lowest first.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&level| level <= Isa::detected())
            .collect()
    }

    /// The name `METAUAS_ISA` takes and benchmark tables print.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// The widest register tile, in vectors of 16 columns, whose weight vectors fit the
    /// register file beside its accumulators (see [`dispatch_tile!`]): on AVX2 a 16-lane
    /// vector takes two of the 16 ymm, so 6x1 (12 accumulators + 2 + 1 broadcast) fits,
    /// while 3x2 and 2x3 need 17 and 19 and spill in the k-loop (the query ran 1.45x
    /// slower with them).
    pub(crate) fn widest_tile(self) -> usize {
        match self {
            Isa::Avx2 => 1,
            Isa::Avx512 | Isa::Portable => 3,
        }
    }

    /// The float32 FMA peak of one core, in GFLOP/s: lanes x 2 FMA units x 2 FLOP at a
    /// nominal 2.6 GHz (165 with AVX-512 was measured on the project's machine,
    /// docs/BENCHMARKS.md; AVX2 has half the lanes; the portable code is taken as 4-lane
    /// SSE with no FMA).
    pub(crate) fn fma_peak_gflops_per_core(self) -> f64 {
        match self {
            Isa::Avx512 => 165.0,
            Isa::Avx2 => 82.5,
            Isa::Portable => 20.6,
        }
    }

    fn parse(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" | "none" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx512f" => Some(Isa::Avx512),
            _ => None,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    if avx2 && is_x86_feature_detected!("avx512f") {
        Isa::Avx512
    } else if avx2 {
        Isa::Avx2
    } else {
        Isa::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Portable
}

/// `dispatch_isa!(fn name(a: A, b: B) => generic);` defines `fn name(isa: Isa, a: A, b: B)`
/// that runs `generic::<L>(a, b)` compiled for `isa`'s instruction set. `generic` must be
/// `#[inline(always)]` (all the way down its hot loops) so that it is compiled inside the
/// `#[target_feature]` function; closures handed to rayon are not, so split work before
/// dispatching, never inside.
macro_rules! dispatch_isa {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) => $generic:ident;) => {
        $(#[$meta])*
        $vis fn $name(isa: $crate::cpu::kernels::isa::Isa, $($arg: $ty),*) {
            match isa {
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::kernels::isa::Isa::Avx512 => {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    unsafe fn with_avx512($($arg: $ty),*) {
                        $generic::<$crate::cpu::kernels::simd::Avx512>($($arg),*)
                    }
                    // SAFETY: `Isa::Avx512` only exists when the CPU has these features.
                    unsafe { with_avx512($($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::kernels::isa::Isa::Avx2 => {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn with_avx2($($arg: $ty),*) {
                        $generic::<$crate::cpu::kernels::simd::Avx2>($($arg),*)
                    }
                    // SAFETY: `Isa::Avx2` only exists when the CPU has these features.
                    unsafe { with_avx2($($arg),*) }
                }
                #[allow(unreachable_patterns)]
                _ => $generic::<$crate::cpu::kernels::simd::Portable>($($arg),*),
            }
        }
    };
}

pub(crate) use dispatch_isa;

/// `dispatch_tile!(L, nv, func(args..))` calls `func::<L, MR, NV>(args..)` with the register
/// tile shape for level `L` and a tile `nv` (1..=3) vectors of 16 lanes wide: `MR` pixel rows
/// chosen so the `MR x NV` accumulators fit the register file (32 zmm on AVX-512, 16 ymm on
/// AVX2, where a 16-lane vector is 2 registers). The single place tile shapes are chosen.
/// Column groups are at most [`Isa::widest_tile`] wide for the selected ISA, so AVX2's 3x2
/// and 2x3 (which spill) run only on weights packed under another ISA, as in kernel tests.
macro_rules! dispatch_tile {
    ($level:ty, $nv:expr, $func:ident($($arg:expr),* $(,)?)) => {{
        use $crate::cpu::kernels::isa::Isa;
        use $crate::cpu::kernels::simd::Level;
        match (<$level as Level>::ISA, $nv) {
            (Isa::Avx512, 1) => $func::<$level, 8, 1>($($arg),*),
            (Isa::Avx512, 2) => $func::<$level, 8, 2>($($arg),*),
            (Isa::Avx512, _) => $func::<$level, 8, 3>($($arg),*),
            (Isa::Avx2, 1) => $func::<$level, 6, 1>($($arg),*),
            (Isa::Avx2, 2) => $func::<$level, 3, 2>($($arg),*),
            (Isa::Avx2, _) => $func::<$level, 2, 3>($($arg),*),
            (Isa::Portable, 1) => $func::<$level, 4, 1>($($arg),*),
            (Isa::Portable, 2) => $func::<$level, 2, 2>($($arg),*),
            (Isa::Portable, _) => $func::<$level, 2, 3>($($arg),*),
        }
    }};
}

pub(crate) use dispatch_tile;

//! The FMA peak measured on the spot: the nominal one (`Isa::fma_peak_gflops_per_core`,
//! taken at a 2.6 GHz base clock) is below what a turbo clock gives, and a floor computed
//! from it would sit above kernels that beat it.

use std::time::Instant;

use rayon::prelude::*;

use super::isa::{dispatch_isa, Isa};
use super::simd::{Level, LANES};

/// Independent FMA chains per thread: more than latency x pipes (4 x 2) on every level.
const CHAINS: usize = 12;
/// Steps of every chain per burst (about 5 ms at 200 GFLOP/s per core).
const STEPS: usize = 400_000;

dispatch_isa! {
    fn fma_burst_isa(steps: usize, seed: f32, out: &mut f32) => fma_burst;
}

/// `CHAINS` chains of `x = x * a + b` (converging to 0.1: no subnormals, no overflow).
#[inline(always)]
fn fma_burst<L: Level>(steps: usize, seed: f32, out: &mut f32) {
    let mut acc = [L::splat(seed); CHAINS];
    let (a, b) = (L::splat(0.999_999), L::splat(1e-7));
    for _ in 0..steps {
        for x in acc.iter_mut() {
            *x = L::fma(*x, a, b);
        }
    }
    let mut sum = L::zero();
    for x in acc {
        sum = L::add(sum, x);
    }
    *out = L::reduce_add(sum);
}

/// The float32 FMA rate of every thread of the pool at the selected ISA, in GFLOP/s: the
/// best of three bursts of [`STEPS`] steps.
pub fn measured_fma_peak_gflops() -> f64 {
    let isa = Isa::selected();
    let threads = rayon::current_num_threads();
    let flops = (threads * STEPS * CHAINS * LANES * 2) as f64;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        let sums: f32 = (0..threads)
            .into_par_iter()
            .map(|t| {
                let mut out = 0.0;
                fma_burst_isa(isa, STEPS, 1.0 + t as f32, &mut out);
                out
            })
            .sum();
        std::hint::black_box(sums);
        best = best.min(start.elapsed().as_secs_f64());
    }
    flops / best / 1e9
}

#[cfg(test)]
mod tests {
    /// The measured peak is positive and within a factor of the nominal one (a burst that
    /// the compiler removed would give an absurd rate; a broken dispatch a tiny one).
    #[test]
    fn measured_peak_is_near_the_nominal_one() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let measured = pool.install(super::measured_fma_peak_gflops);
        let nominal = super::Isa::selected().fma_peak_gflops_per_core();
        assert!(
            measured > nominal / 8.0 && measured < nominal * 4.0,
            "measured {measured:.1} GFLOP/s against a nominal {nominal:.1}"
        );
    }
}

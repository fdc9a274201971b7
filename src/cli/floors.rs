//! `bench --profile`'s summary by op family: the time each family takes, its floor on this
//! machine, and the gap between them.
//!
//! A family's floor is the larger of two lower bounds:
//! - compute: the multiply-adds it must do at the FMA peak of the selected ISA on every
//!   thread (a Winograd F(4x4, 3x3) conv needs 36 of the direct conv's 144 per 16 outputs);
//! - memory: every input and output value read or written once, plus the conv weights, at
//!   the copy bandwidth measured here (all threads copying 8 MB into 8 MB: 16 MB in use,
//!   which stays in an L3 of 32 MB, so a lower bound also for values that come from DRAM;
//!   on a machine with a smaller L3 it measures DRAM and the memory floors are not lower
//!   bounds for values that stay in cache).
//!
//! Left out, so that the floor stays a lower bound: the squeeze-excite weights (12.6 MB
//! over the encoder, against ~108 MB of maps at 256), the input of a conv that reads a
//! folded value (it reads the half-resolution map and skip in place, not the full value),
//! and the output of an scSE or squeeze-excite that only computes gates. Folded ops count in their reader's
//! time; an expand conv folded into its depthwise reader counts in the family
//! "1x1 expand + depthwise" with its reader, with its multiply-adds, input and weights.

use std::time::Instant;

use metauas::graph::{Graph, Op};
use rayon::prelude::*;

/// One family's sums.
#[derive(Default)]
struct Family {
    ms: f64,
    flops: f64,
    bytes: f64,
}

/// The family of node `i` (`how`: the backend's description of how it runs).
fn family(op: &Op, how: &str) -> &'static str {
    match op {
        Op::Conv { .. } if how.contains("expand folded in") => "1x1 expand + depthwise",
        Op::Conv {
            depthwise: true, ..
        } => "depthwise",
        Op::Conv { geometry, .. } if geometry.kernel == 1 => "1x1 convs",
        Op::Conv { .. } if how.contains("winograd") => "3x3 convs, Winograd",
        Op::Conv { .. } => "other convs (stem)",
        Op::Align { .. } => "alignment",
        Op::SqueezeExcite { .. } | Op::Scse { .. } => "squeeze-excite + scSE",
        Op::UpsampleConcat { .. } => "upsample + concat",
    }
}

/// Floats of conv weights node `op` reads (0 for the other ops: see the module notes).
fn weight_floats(op: &Op, winograd: bool) -> f64 {
    match op {
        Op::Conv {
            geometry: g,
            depthwise: true,
            ..
        } => (g.cin * g.kernel * g.kernel) as f64,
        // The transformed weights: 36 per input and output channel.
        Op::Conv { geometry: g, .. } if winograd => (36 * g.cin * g.cout) as f64,
        Op::Conv { geometry: g, .. } => (g.cin * g.cout * g.kernel * g.kernel) as f64,
        _ => 0.0,
    }
}

/// Copy bandwidth in GB/s (bytes read plus bytes written), all threads, best of 5.
pub fn copy_bandwidth_gbs() -> f64 {
    const LEN: usize = 8 << 20;
    let src = vec![1u8; LEN];
    let mut dst = vec![0u8; LEN];
    let chunk = LEN / (4 * rayon::current_num_threads());
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * LEN as f64 / best / 1e9
}

/// Prints the family table: `ms[i]` is node `i`'s mean time, `how(i)` how it runs,
/// `peak` the FMA peak of all threads in GFLOP/s.
pub fn print_family_floors(g: &Graph, ms: &[f64], how: impl Fn(usize) -> String, peak: f64) {
    let bandwidth = copy_bandwidth_gbs();
    let mut families: Vec<(&'static str, Family)> = Vec::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let how = how(i);
        if how.contains("folded into its reader") {
            continue;
        }
        let name = family(&node.op, &how);
        let winograd = how.contains("winograd");
        let macs = |n: &metauas::graph::Node| n.op.macs(g.values[n.output].shape, &g.values);
        let mut flops = 2.0 * macs(node) as f64;
        if winograd {
            flops *= 36.0 / 144.0;
        }
        let folded_input = how.contains("upsampled input") || how.contains("gated-concat input");
        let map_len = |n: &metauas::graph::Node| -> usize {
            n.op.inputs().iter().map(|&v| g.values[v].shape.len()).sum()
        };
        let mut weights = weight_floats(&node.op, winograd);
        let maps: usize = if folded_input {
            0
        } else if how.contains("expand folded in") {
            // It runs its input's producer, the expand conv, too: reads that one's input.
            let input = node.op.inputs()[0];
            let expand = g
                .nodes
                .iter()
                .find(|n| n.output == input)
                .expect("expand node");
            flops += 2.0 * macs(expand) as f64;
            weights += weight_floats(&expand.op, false);
            map_len(expand)
        } else {
            map_len(node)
        };
        let output = if how.starts_with("gates only") {
            0
        } else {
            g.values[node.output].shape.len()
        };
        let bytes = 4.0 * (maps + output) as f64 + 4.0 * weights;
        let at = match families.iter().position(|(n, _)| *n == name) {
            Some(at) => at,
            None => {
                families.push((name, Family::default()));
                families.len() - 1
            }
        };
        let f = &mut families[at].1;
        f.ms += ms[i];
        f.flops += flops;
        f.bytes += bytes;
    }
    println!(
        "\nby family: floor = max(multiply-adds at {peak:.0} GFLOP/s, bytes at {bandwidth:.1} GB/s copy bandwidth)"
    );
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "family", "ms", "GFLOP", "MB", "floor ms", "bound", "gap"
    );
    let (mut total, mut floor_total) = (0.0, 0.0);
    for (name, f) in &families {
        let compute = f.flops / (peak * 1e9) * 1e3;
        let memory = f.bytes / (bandwidth * 1e9) * 1e3;
        let floor = compute.max(memory);
        let bound = if compute >= memory {
            "compute"
        } else {
            "memory"
        };
        let gap = if floor > 0.0 { f.ms / floor } else { 0.0 };
        total += f.ms;
        floor_total += floor;
        println!(
            "{:<24} {:>9.3} {:>9.3} {:>9.1} {:>9.3} {:>9} {:>5.1}x",
            name,
            f.ms,
            f.flops / 1e9,
            f.bytes / 1e6,
            floor,
            bound,
            gap
        );
    }
    println!(
        "{:<24} {:>9.3} {:>9} {:>9} {:>9.3} {:>9} {:>5.1}x",
        "all",
        total,
        "",
        "",
        floor_total,
        "",
        total / floor_total.max(f64::MIN_POSITIVE)
    );
}

//! Ops the CPU backend folds into the op that reads them, so their big output is never
//! written: the decoder's 2x upsample (+ concat + the first scSE), read in place by the
//! Winograd input transform of the next 3x3 conv; an MBConv block's 1x1 expand conv, run by
//! row bands inside the depthwise conv that reads it. The graph (and the GPU backend) keep
//! the ops; this backend's memory plan keeps a folded op's inputs alive as long as its
//! output (`extend_lifetimes`), so they are intact when its reader runs.

use crate::graph::{Graph, Lifetime, Op, ValueId};

/// Expanded maps from this size up are folded into their depthwise reader. Smaller ones
/// stay in the L2 and L3 between the two convs anyway, and the bands' extra work (the rows
/// tasks share, smaller GEMM runs) made blocks 7-9 at 512 (3-5 MB maps) 10% slower; block2
/// at 512 (37.7 MB) and blocks 3-5 (12.6 MB) stream from DRAM unfolded.
const EXPAND_FOLD_MIN_BYTES: usize = 8 << 20;

/// Squeeze-excite outputs from this size up are read through by their 1x1 reader: at 512
/// (blocks 0 and 2-5, 9-13 MB) the squeeze-excites and their readers took 6.8 ms and take 5.6
/// per encoder pass; at 256, with the same rule from 2 MB, the difference was in the noise.
const GATES_FOLD_MIN_BYTES: usize = 8 << 20;

/// How a value is produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fold {
    /// By its op, as the graph says.
    Computed,
    /// Not at all: its only reader reads through it (an upsample + concat under an scSE).
    Skipped,
    /// Not at all: a plain 2x upsample of `half`, read by one Winograd conv.
    Upsampled { half: ValueId },
    /// An scSE over the 2x upsample of `half` concatenated with `skip`, read by one Winograd
    /// conv: only its gates are computed (channel gates, then one spatial gate per pixel),
    /// into the start of its own place.
    GatedConcat { half: ValueId, skip: ValueId },
    /// Not at all: the output of the 1x1 expand conv node `node`, computed band by band by
    /// its only reader, a depthwise conv (see `kernels::depthwise_over_expand_nhwc`).
    Expanded { node: usize },
    /// A squeeze-excite of `input` read by one 1x1 conv, which scales its input itself
    /// (`kernels::conv2d_gated_nhwc`): only the channel gates are computed, into the start
    /// of this value's place.
    ChannelGates { input: ValueId },
}

impl Fold {
    pub(super) fn runs_op(self) -> bool {
        matches!(
            self,
            Fold::Computed | Fold::GatedConcat { .. } | Fold::ChannelGates { .. }
        )
    }
}

/// Extends `life` (the graph's lifetimes) for folding: a folded upsample (+ concat), or an
/// scSE over one, is read through by the op that reads it, which then reads the upsample's
/// inputs: those live as long as the upsample's output, or the scSE's over it. Likewise an
/// expand conv's input lives as long as its output, which its depthwise reader expands
/// again. Done for every candidate, folded or not, so the plan does not depend on the
/// Winograd choices.
pub(super) fn extend_lifetimes(graph: &Graph, life: &mut [Lifetime]) {
    let nodes = &graph.nodes;
    let producer = |v: ValueId| nodes.iter().find(|n| n.output == v);
    for (i, node) in nodes.iter().enumerate().rev() {
        let folded = match node.op {
            Op::UpsampleConcat { .. } => Some(node),
            Op::Scse { input, .. } => {
                producer(input).filter(|p| matches!(p.op, Op::UpsampleConcat { .. }))
            }
            _ if expand_read_by_depthwise(graph, i) || se_read_by_pointwise(graph, i) => Some(node),
            _ => None,
        };
        if let Some(up) = folded {
            for v in up.op.inputs() {
                life[v].1 = life[v].1.max(life[node.output].1);
            }
        }
    }
}

/// The only reader of value `v` (not a graph output), if it has one.
fn only_reader(graph: &Graph, v: ValueId) -> Option<&crate::graph::Node> {
    let mut readers = graph.nodes.iter().filter(|r| r.op.inputs().contains(&v));
    match (readers.next(), readers.next()) {
        (Some(r), None) if !graph.outputs.contains(&v) => Some(r),
        _ => None,
    }
}

/// Whether node `n` is a squeeze-excite whose output only a 1x1 conv (stride 1, no padding)
/// reads, as its input: `Fold::ChannelGates`, on maps large enough for its gates alone.
pub(super) fn se_read_by_pointwise(graph: &Graph, n: usize) -> bool {
    let node = &graph.nodes[n];
    let Op::SqueezeExcite { .. } = node.op else {
        return false;
    };
    let v = node.output;
    // Not as a residual too (that read would find only gates).
    only_reader(graph, v).is_some_and(|r| {
        matches!(
            r.op,
            Op::Conv { input: i, geometry: g, depthwise: false, residual, .. }
                if i == v && residual != Some(v) && pointwise_to_channels(&g)
        )
    })
}

/// A 1x1 conv, stride 1, no padding, to 2 or more channels: the convs a fold runs by row
/// or pixel runs (a conv to one channel sums in another order, `pointwise_to_one_channel`).
fn pointwise_to_channels(g: &crate::graph::ConvGeometry) -> bool {
    g.kernel == 1 && g.stride == 1 && g.pad_top == 0 && g.pad_left == 0 && g.cout > 1
}

/// Whether node `n` is a 1x1 expand conv (stride 1, no padding, no residual) whose output
/// only a depthwise conv reads: the fold `Fold::Expanded`.
pub(super) fn expand_read_by_depthwise(graph: &Graph, n: usize) -> bool {
    let node = &graph.nodes[n];
    let Op::Conv {
        geometry: g,
        depthwise: false,
        residual: None,
        ..
    } = node.op
    else {
        return false;
    };
    let pointwise = pointwise_to_channels(&g);
    let v = node.output;
    let depthwise_reader = only_reader(graph, v).is_some_and(|r| {
        matches!(
            r.op,
            Op::Conv { input, depthwise: true, residual: None, .. } if input == v
        )
    });
    pointwise && depthwise_reader
}

/// Decides the folds of `graph`; `winograd(node)` says whether that conv node runs by
/// Winograd (the only reader of a folded value: its input transform reads through the fold).
pub(super) fn plan_folds(graph: &Graph, winograd: impl Fn(usize) -> bool) -> Vec<Fold> {
    let mut folds = vec![Fold::Computed; graph.values.len()];
    let only_reader = |v: ValueId| -> Option<usize> {
        let mut readers =
            (0..graph.nodes.len()).filter(|&n| graph.nodes[n].op.inputs().contains(&v));
        let first = readers.next()?;
        (readers.next().is_none() && !graph.outputs.contains(&v)).then_some(first)
    };
    let winograd_reads = |n: usize, v: ValueId| {
        matches!(graph.nodes[n].op, Op::Conv { input, residual: None, .. } if input == v)
            && winograd(n)
    };
    for (n, node) in graph.nodes.iter().enumerate() {
        let bytes = graph.values[node.output].shape.len() * 4;
        // Folds do not stack: a folded op reads its input whole, as computed.
        let input_computed = node.op.inputs().iter().all(|&v| folds[v] == Fold::Computed);
        if !input_computed {
            continue;
        }
        if bytes >= EXPAND_FOLD_MIN_BYTES && expand_read_by_depthwise(graph, n) {
            folds[node.output] = Fold::Expanded { node: n };
            continue;
        }
        if let Op::SqueezeExcite { input, .. } = node.op {
            let pixels = graph.values[input].shape.pixels();
            let gates_alone = crate::cpu::kernels::squeeze_excite_gates_apply(pixels);
            if bytes >= GATES_FOLD_MIN_BYTES && gates_alone && se_read_by_pointwise(graph, n) {
                folds[node.output] = Fold::ChannelGates { input };
            }
            continue;
        }
        let Op::UpsampleConcat { input, skip } = node.op else {
            continue;
        };
        let u = node.output;
        let Some(reader) = only_reader(u) else {
            continue;
        };
        match (skip, &graph.nodes[reader].op) {
            (None, _) if winograd_reads(reader, u) => folds[u] = Fold::Upsampled { half: input },
            (Some(skip), &Op::Scse { input: i, .. }) if i == u => {
                // Whole vectors of the upsampled part: the gated reader loads 16 channels
                // from one part at a time.
                let c = graph.values[input].shape.c;
                let aligned = c > 0 && c.is_multiple_of(16);
                let v = graph.nodes[reader].output;
                if aligned && only_reader(v).is_some_and(|c| winograd_reads(c, v)) {
                    folds[u] = Fold::Skipped;
                    folds[v] = Fold::GatedConcat { half: input, skip };
                }
            }
            _ => {}
        }
    }
    folds
}

#[cfg(test)]
mod tests {
    use super::{plan_folds, Fold};
    use crate::cpu::memory_plan;
    use crate::graph::{Activation, ConvId, GraphBuilder, ScseId, Shape, SqueezeExciteId};

    /// An MBConv chain on a large map: the project reads its squeeze-excite through, the
    /// next expand runs inside its depthwise conv; but a squeeze-excite read by an expand that
    /// is itself folded keeps its scaled map (folds never read a folded value), and one read
    /// as a residual too is computed in full.
    #[test]
    fn folds_on_a_large_mbconv_chain_do_not_stack() {
        let sw = Activation::Swish;
        let mut g = GraphBuilder::new();
        // 1x1 (cout, residual) and 3x3 depthwise convs, weights numbered in order.
        let mut id = 0;
        let mut conv = |g: &mut GraphBuilder, name: &str, x, cout, dw: bool, r| {
            id += 1;
            let (k, pad) = if dw { (3, 1) } else { (1, 0) };
            g.conv(name, x, ConvId(id), (cout, k, 1), (pad, pad), dw, sw, r)
        };
        let x = g.input("x", Shape::new(128, 128, 144)); // 9.4 MB
        let se = g.squeeze_excite("se", x, SqueezeExciteId(0));
        let project = conv(&mut g, "project", se, 24, false, None);
        let expand = conv(&mut g, "expand", project, 144, false, None);
        let dw = conv(&mut g, "dw", expand, 144, true, None);
        // A squeeze-excite whose only reader is an expand that a depthwise conv reads.
        let se2 = g.squeeze_excite("se2", dw, SqueezeExciteId(1));
        let expand2 = conv(&mut g, "expand2", se2, 144, false, None);
        let dw2 = conv(&mut g, "dw2", expand2, 144, true, None);
        // A squeeze-excite read by a 1x1 conv as its input and as its residual.
        let se3 = g.squeeze_excite("se3", dw2, SqueezeExciteId(2));
        let twice = conv(&mut g, "twice", se3, 144, false, Some(se3));
        g.output(twice);
        let graph = g.finish();
        let folds = plan_folds(&graph, |_| false);
        assert_eq!(folds[se], Fold::ChannelGates { input: x });
        assert_eq!(folds[project], Fold::Computed);
        assert_eq!(folds[expand], Fold::Expanded { node: 2 });
        assert_eq!(folds[dw], Fold::Computed);
        assert_eq!(folds[se2], Fold::ChannelGates { input: dw });
        assert_eq!(folds[expand2], Fold::Computed, "an expand of gates only");
        assert_eq!(
            folds[se3],
            Fold::Computed,
            "a squeeze-excite read as a residual"
        );
    }

    /// A folded upsample's reader reads the upsample's input: that input must stay alive
    /// (apart from the reader's output) until then.
    #[test]
    fn upsample_inputs_live_as_long_as_their_output() {
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(4, 4, 16));
        let s = g.squeeze_excite("se", x, SqueezeExciteId(0));
        let u = g.upsample_concat("up", s, None);
        let a = g.squeeze_excite("reader", u, SqueezeExciteId(0));
        let b = g.squeeze_excite("after", a, SqueezeExciteId(0));
        g.output(b);
        let graph = g.finish();
        let plan = memory_plan(&graph);
        assert_eq!(plan.lifetimes[s].1, plan.lifetimes[u].1);
        assert!(plan.lifetimes[s].1 >= plan.lifetimes[a].0);
        assert_eq!(plan.overlapping_pair(&graph.values), None);

        // Under an scSE the upsample's inputs live as long as the scSE's output, which its
        // reader reads; the upsample's own output does not.
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(4, 4, 16));
        let skip = g.input("skip", Shape::new(8, 8, 8));
        let s = g.squeeze_excite("se", x, SqueezeExciteId(0));
        let u = g.upsample_concat("up", s, Some(skip));
        let v = g.scse("att", u, ScseId(0));
        let a = g.squeeze_excite("reader", v, SqueezeExciteId(0));
        let b = g.squeeze_excite("after", a, SqueezeExciteId(0));
        g.output(b);
        let graph = g.finish();
        let plan = memory_plan(&graph);
        let life = &plan.lifetimes;
        assert!(life[s].1 >= life[a].0 && life[skip].1 >= life[a].0);
        assert!(
            life[u].1 < life[a].0,
            "the concat itself need not outlive the scSE"
        );
        assert_eq!(plan.overlapping_pair(&graph.values), None);
    }
}

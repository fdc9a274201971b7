//! Ops the CPU backend folds into the op that reads them, so their big output is never
//! written: the decoder's 2x upsample (+ concat + the first scSE), read in place by the
//! Winograd input transform of the next 3x3 conv. The graph (and the GPU backend) keep the
//! ops; the memory plan keeps an upsample's and an scSE's inputs alive as long as their
//! outputs, so a folded op's inputs are intact when its reader runs.

use crate::graph::{Graph, Op, ValueId};

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
}

impl Fold {
    pub(super) fn runs_op(self) -> bool {
        matches!(self, Fold::Computed | Fold::GatedConcat { .. })
    }
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
    for node in &graph.nodes {
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

//! What the CPU backend decides about a graph once, before running it any number of times:
//! how each value is produced (its fold) and how each conv node is computed (its strategy).

use super::fold::{plan_folds, Fold};
use super::strategy::{ConvStrategy, PackedWeights};
use crate::graph::{ConvId, Graph, Op};

/// A graph's plan on one `CpuBackend` (made by `CpuBackend::compile`, kept by the `CpuGraph`).
#[derive(Clone, Debug)]
pub struct CpuPlan {
    /// Per value: how it is produced.
    pub(super) folds: Vec<Fold>,
    /// Per node: its strategy, for conv nodes.
    pub(super) convs: Vec<Option<ConvStrategy>>,
}

impl CpuPlan {
    /// `weights(conv)`: the packed weights of conv `conv` of the model.
    pub(super) fn new<'w>(graph: &Graph, weights: impl Fn(ConvId) -> &'w PackedWeights) -> Self {
        let mut convs: Vec<Option<ConvStrategy>> = graph
            .nodes
            .iter()
            .map(|node| match node.op {
                Op::Conv {
                    conv, ref geometry, ..
                } => Some(ConvStrategy::choose(geometry, weights(conv))),
                _ => None,
            })
            .collect();
        let winograd = |node: usize| convs[node].is_some_and(|s| s.schedule().is_some());
        let folds = plan_folds(graph, winograd);
        for (node, strategy) in graph.nodes.iter().zip(&mut convs) {
            if let (Op::Conv { input, .. }, Some(s)) = (&node.op, strategy.as_mut()) {
                *s = s.reading(folds[*input]);
            }
        }
        CpuPlan { folds, convs }
    }

    /// The strategy of node `node`, when it is a conv.
    pub fn conv_strategy(&self, node: usize) -> Option<ConvStrategy> {
        self.convs[node]
    }

    /// How node `node` of `graph` runs, in words: its conv strategy, or how it is folded
    /// into its reader; empty for the other ops, which run as the graph says.
    pub fn describe(&self, graph: &Graph, node: usize) -> String {
        match (self.convs[node], self.folds[graph.nodes[node].output]) {
            (_, Fold::Expanded { .. }) => "folded into its reader".into(),
            (Some(strategy), _) => strategy.to_string(),
            (None, Fold::Computed) => String::new(),
            (None, Fold::GatedConcat { .. } | Fold::ChannelGates { .. }) => {
                "gates only, rest read by its conv".into()
            }
            (None, Fold::Skipped | Fold::Upsampled { .. }) => "folded into its reader".into(),
        }
    }
}

//! The CPU backend's arena views are unsafe: they rely on its memory plan giving values
//! alive at the same step disjoint places, and on every value an op reads (a folded
//! upsample's inputs included) being alive at its step. Checked on the real graphs: prompt,
//! query and query with taps, at 256 and 512.

use metauas::graph::{Graph, MemoryPlan, Op};
use metauas::model::graphs::{build_prompt_graph, build_query_graph};
use metauas::model::ModelWeights;
use metauas::synth::{synthetic_weights, WeightRecipe};

/// Node i runs at step i + 1: what it reads and writes must be alive then, and the inputs of
/// an upsample, expand conv or squeeze-excite it may be folded into (its input's producer)
/// as well.
fn assert_alive_when_read(name: &str, g: &Graph, plan: &MemoryPlan) {
    let producer = |v| g.nodes.iter().find(|n| n.output == v);
    for (i, node) in g.nodes.iter().enumerate() {
        let step = i + 1;
        let mut read = node.op.inputs();
        for v in node.op.inputs() {
            let Some(p) = producer(v) else { continue };
            match p.op {
                Op::UpsampleConcat { .. } => read.extend(p.op.inputs()),
                // A 1x1 expand read only by a depthwise conv may be folded into it.
                Op::Conv {
                    geometry,
                    residual: None,
                    ..
                } if geometry.kernel == 1 => {
                    let readers = g.nodes.iter().filter(|r| r.op.inputs().contains(&v));
                    let depthwise = matches!(
                        node.op,
                        Op::Conv {
                            depthwise: true,
                            ..
                        }
                    );
                    if depthwise && readers.count() == 1 {
                        read.extend(p.op.inputs());
                    }
                }
                // A squeeze-excite read only by a 1x1 conv may be read through by it.
                Op::SqueezeExcite { .. } => {
                    let readers = g.nodes.iter().filter(|r| r.op.inputs().contains(&v));
                    let pointwise = matches!(
                        node.op,
                        Op::Conv { geometry, depthwise: false, .. } if geometry.kernel == 1
                    );
                    if pointwise && readers.count() == 1 {
                        read.extend(p.op.inputs());
                    }
                }
                Op::Scse { input, .. } => {
                    if let Some(up) = producer(input) {
                        if matches!(up.op, Op::UpsampleConcat { .. }) {
                            read.extend(up.op.inputs());
                        }
                    }
                }
                _ => {}
            }
        }
        for v in read.into_iter().chain([node.output]) {
            let (first, last) = plan.lifetimes[v];
            assert!(
                first <= step && step <= last,
                "{name}: {} is not alive when {} runs",
                g.values[v].name,
                node.name
            );
        }
    }
}

#[test]
fn the_cpu_plan_keeps_live_values_apart_on_the_real_graphs() {
    let weights = ModelWeights::load(&synthetic_weights(&WeightRecipe::unit(1))).unwrap();
    for size in [256, 512] {
        let graphs = [
            ("prompt", build_prompt_graph(&weights, size, false)),
            ("query", build_query_graph(&weights, size, false)),
            ("query with taps", build_query_graph(&weights, size, true)),
        ];
        for (name, g) in &graphs {
            let name = format!("{name} graph at {size}");
            let plan = metauas::cpu::memory_plan(g);
            assert_eq!(plan.overlapping_pair(&g.values), None, "{name}");
            assert_alive_when_read(&name, g, &plan);
            let total: usize = g.values.iter().map(|v| v.shape.len()).sum();
            assert!(plan.arena_len < total, "{name}: no memory reused");
        }
    }
}

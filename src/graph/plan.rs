//! Liveness-based memory plan: every value gets an offset in one float arena such that two
//! values alive at the same step never overlap. Greedy first-fit, largest values first.

use super::{Node, Op, Value, ValueId};

/// Offsets are multiples of this many floats (64 bytes: one cache line, one AVX-512 vector).
const ALIGN_FLOATS: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Offset in floats of each value in the arena.
    pub offsets: Vec<usize>,
    /// Arena length in floats.
    pub arena_len: usize,
    /// `(first, last)` step during which each value is alive (inclusive).
    pub lifetimes: Vec<(usize, usize)>,
}

impl MemoryPlan {
    pub fn new(values: &[Value], nodes: &[Node], inputs: &[ValueId], outputs: &[ValueId]) -> Self {
        let lifetimes = lifetimes(values.len(), nodes, inputs, outputs);
        let sizes: Vec<usize> = values
            .iter()
            .map(|v| v.shape.len().div_ceil(ALIGN_FLOATS) * ALIGN_FLOATS)
            .collect();
        let mut order: Vec<ValueId> = (0..values.len()).collect();
        order.sort_by_key(|&v| (std::cmp::Reverse(sizes[v]), v));

        let mut offsets = vec![0usize; values.len()];
        let mut placed: Vec<ValueId> = Vec::new();
        let mut arena_len = 0;
        for v in order {
            let offset = first_fit(v, &sizes, &lifetimes, &offsets, &placed);
            offsets[v] = offset;
            arena_len = arena_len.max(offset + sizes[v]);
            placed.push(v);
        }
        MemoryPlan {
            offsets,
            arena_len,
            lifetimes,
        }
    }

    pub fn arena_bytes(&self) -> usize {
        self.arena_len * std::mem::size_of::<f32>()
    }
}

fn lifetimes(
    n_values: usize,
    nodes: &[Node],
    inputs: &[ValueId],
    outputs: &[ValueId],
) -> Vec<(usize, usize)> {
    // Step 0 binds the inputs; node i runs at step i + 1; outputs are read after the last step.
    let end = nodes.len() + 1;
    let mut life = vec![(usize::MAX, 0usize); n_values];
    for &v in inputs {
        life[v] = (0, 0);
    }
    for (i, node) in nodes.iter().enumerate() {
        life[node.output] = (i + 1, i + 1);
        for v in node.op.inputs() {
            life[v].1 = life[v].1.max(i + 1);
        }
    }
    for &v in outputs {
        life[v].1 = end;
    }
    // A backend may fold an upsample (+ concat), and an scSE over one, into the op that
    // reads them, which then reads the upsample's inputs: those live as long as the
    // upsample's output, or the scSE's over it.
    let producer = |v: ValueId| nodes.iter().find(|n| n.output == v);
    for node in nodes.iter().rev() {
        let upsample = match node.op {
            Op::UpsampleConcat { .. } => Some(node),
            Op::Scse { input, .. } => {
                producer(input).filter(|p| matches!(p.op, Op::UpsampleConcat { .. }))
            }
            _ => None,
        };
        if let Some(up) = upsample {
            for v in up.op.inputs() {
                life[v].1 = life[v].1.max(life[node.output].1);
            }
        }
    }
    life
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Lowest offset where `v` fits between the placed values that are alive at the same time.
fn first_fit(
    v: ValueId,
    sizes: &[usize],
    life: &[(usize, usize)],
    offsets: &[usize],
    placed: &[ValueId],
) -> usize {
    let mut busy: Vec<(usize, usize)> = placed
        .iter()
        .filter(|&&p| overlaps(life[p], life[v]))
        .map(|&p| (offsets[p], offsets[p] + sizes[p]))
        .collect();
    busy.sort_unstable();
    let mut candidate = 0;
    for (start, end) in busy {
        if candidate + sizes[v] <= start {
            break;
        }
        candidate = candidate.max(end);
    }
    candidate
}

/// Buffer slots by liveness, for backends that cannot alias one arena (a GPU may not bind
/// one buffer as both read and written in a dispatch): values whose lifetimes overlap get
/// different slots; a slot is as large as its largest value. Greedy by start step, taking
/// the free slot that fits best (or growing the largest free one). Returns each value's
/// slot and each slot's size.
pub fn assign_slots(sizes: &[u64], lifetimes: &[(usize, usize)]) -> (Vec<usize>, Vec<u64>) {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&v| (lifetimes[v].0, v));
    let mut slot_of = vec![0; sizes.len()];
    let mut slot_size: Vec<u64> = Vec::new();
    // Last step each slot is busy until (its current occupant's end).
    let mut busy_until: Vec<Option<usize>> = Vec::new();
    for v in order {
        let (start, end) = lifetimes[v];
        let free = |s: usize| busy_until[s].is_none_or(|e| e < start);
        let fitting = (0..slot_size.len())
            .filter(|&s| free(s) && slot_size[s] >= sizes[v])
            .min_by_key(|&s| slot_size[s]);
        let slot = fitting
            .or_else(|| {
                (0..slot_size.len())
                    .filter(|&s| free(s))
                    .max_by_key(|&s| slot_size[s])
            })
            .unwrap_or_else(|| {
                slot_size.push(0);
                busy_until.push(None);
                slot_size.len() - 1
            });
        slot_size[slot] = slot_size[slot].max(sizes[v]);
        busy_until[slot] = Some(end);
        slot_of[v] = slot;
    }
    (slot_of, slot_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{GraphBuilder, Shape};

    /// Every pair of values alive at the same step must occupy disjoint arena ranges.
    fn assert_disjoint(plan: &MemoryPlan, values: &[Value]) {
        for a in 0..values.len() {
            for b in (a + 1)..values.len() {
                if !overlaps(plan.lifetimes[a], plan.lifetimes[b]) {
                    continue;
                }
                let (sa, sb) = (plan.offsets[a], plan.offsets[b]);
                let (ea, eb) = (sa + values[a].shape.len(), sb + values[b].shape.len());
                assert!(ea <= sb || eb <= sa, "values {a} and {b} overlap");
            }
        }
    }

    #[test]
    fn chain_reuses_memory_and_keeps_live_values_apart() {
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(8, 8, 16));
        let mut v = x;
        let mut skips = Vec::new();
        for i in 0..6 {
            v = g.squeeze_excite(&format!("se{i}"), v, 0);
            skips.push(v);
        }
        let u = g.upsample_concat("up", v, None);
        g.output(u);
        g.output(skips[2]);
        let graph = g.finish();
        assert_disjoint(&graph.plan, &graph.values);
        let total: usize = graph.values.iter().map(|v| v.shape.len()).sum();
        assert!(graph.plan.arena_len < total, "no reuse happened");
        // An output is kept to the end even though nothing consumes it later.
        assert_eq!(graph.plan.lifetimes[skips[2]].1, graph.nodes.len() + 1);
    }

    /// A backend may fold an upsample into its reader, which then reads the upsample's
    /// input: that input must stay alive (apart from the reader's output) until then.
    #[test]
    fn upsample_inputs_live_as_long_as_their_output() {
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(4, 4, 16));
        let s = g.squeeze_excite("se", x, 0);
        let u = g.upsample_concat("up", s, None);
        let a = g.squeeze_excite("reader", u, 0);
        let b = g.squeeze_excite("after", a, 0);
        g.output(b);
        let graph = g.finish();
        assert_eq!(graph.plan.lifetimes[s].1, graph.plan.lifetimes[u].1);
        assert!(graph.plan.lifetimes[s].1 >= graph.plan.lifetimes[a].0);
        assert_disjoint(&graph.plan, &graph.values);

        // Under an scSE the upsample's inputs live as long as the scSE's output, which its
        // reader reads; the upsample's own output does not.
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(4, 4, 16));
        let skip = g.input("skip", Shape::new(8, 8, 8));
        let s = g.squeeze_excite("se", x, 0);
        let u = g.upsample_concat("up", s, Some(skip));
        let v = g.scse("att", u, 0);
        let a = g.squeeze_excite("reader", v, 0);
        let b = g.squeeze_excite("after", a, 0);
        g.output(b);
        let graph = g.finish();
        let life = &graph.plan.lifetimes;
        assert!(life[s].1 >= life[a].0 && life[skip].1 >= life[a].0);
        assert!(
            life[u].1 < life[a].0,
            "the concat itself need not outlive the scSE"
        );
        assert_disjoint(&graph.plan, &graph.values);
    }

    /// Values alive at the same step never share a slot, and slots hold their values.
    #[test]
    fn slots_separate_overlapping_values_and_reuse_dead_ones() {
        let sizes = [100, 50, 300, 20, 100, 10];
        let life = [(0, 2), (1, 1), (2, 4), (3, 5), (5, 6), (0, 6)];
        let (slot, size) = assign_slots(&sizes, &life);
        for a in 0..sizes.len() {
            assert!(size[slot[a]] >= sizes[a], "slot of {a} too small");
            for b in a + 1..sizes.len() {
                if overlaps(life[a], life[b]) {
                    assert_ne!(
                        slot[a], slot[b],
                        "{a} and {b} share a slot while both alive"
                    );
                }
            }
        }
        assert!(size.len() < sizes.len(), "no slot was reused");
    }
}

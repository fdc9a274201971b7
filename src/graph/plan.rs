//! Liveness-based memory plans, shared by the backends: lifetimes by step (`Liveness`),
//! then either offsets in one float arena such that two values alive at the same step never
//! overlap (`MemoryPlan`, greedy first-fit, largest values first), or buffer slots
//! (`assign_slots`). A backend that reads a value through a fused op extends the lifetimes
//! it needs before planning (the CPU's folds: `cpu/fold.rs`).

use super::{Graph, Value, ValueId};

/// `(first, last)` step during which a value is alive, inclusive.
pub type Lifetime = (usize, usize);

/// Offsets are multiples of this many floats (64 bytes: one cache line, one AVX-512 vector).
const ALIGN_FLOATS: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Offset in floats of each value in the arena.
    pub offsets: Vec<usize>,
    /// Arena length in floats.
    pub arena_len: usize,
    /// When each value is alive.
    pub lifetimes: Vec<Lifetime>,
}

impl MemoryPlan {
    /// Places `values` in one arena by their `lifetimes`.
    pub fn new(values: &[Value], lifetimes: Vec<Lifetime>) -> Self {
        let sizes: Vec<usize> = values
            .iter()
            .map(|v| v.shape.len().div_ceil(ALIGN_FLOATS) * ALIGN_FLOATS)
            .collect();
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by_key(|&v| (std::cmp::Reverse(sizes[v]), v));

        let mut offsets = vec![0usize; values.len()];
        let mut placed: Vec<usize> = Vec::new();
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

    /// The first two values alive at the same step whose arena ranges overlap: `None` for a
    /// sound plan (what the CPU backend's unsafe arena views rely on).
    pub fn overlapping_pair(&self, values: &[Value]) -> Option<(ValueId, ValueId)> {
        for a in 0..values.len() {
            for b in (a + 1)..values.len() {
                if !overlaps(self.lifetimes[a], self.lifetimes[b]) {
                    continue;
                }
                let (sa, sb) = (self.offsets[a], self.offsets[b]);
                let (ea, eb) = (sa + values[a].shape.len(), sb + values[b].shape.len());
                if ea > sb && eb > sa {
                    return Some((ValueId(a), ValueId(b)));
                }
            }
        }
        None
    }
}

/// Lifetimes collected step by step: inputs are alive from step 0, every other value from
/// the first step that touches it to the last, outputs until `end` (read after the run).
/// Values are plain indices: a graph's values, or a backend's own lowered values (the GPU's).
pub struct Liveness {
    life: Vec<Lifetime>,
}

impl Liveness {
    pub fn new(n_values: usize, inputs: impl IntoIterator<Item = usize>) -> Self {
        let mut life = vec![(usize::MAX, 0); n_values];
        for v in inputs {
            life[v] = (0, 0);
        }
        Liveness { life }
    }

    /// Value `v` is read or written at `step`.
    pub fn touch(&mut self, v: usize, step: usize) {
        let (first, last) = self.life[v];
        self.life[v] = (first.min(step), last.max(step));
    }

    /// Outputs live until `end`; a value nothing touched gets `(0, 0)`.
    pub fn finish(mut self, outputs: impl IntoIterator<Item = usize>, end: usize) -> Vec<Lifetime> {
        for v in outputs {
            self.life[v].1 = end;
        }
        for lt in &mut self.life {
            if lt.0 == usize::MAX {
                *lt = (0, 0);
            }
        }
        self.life
    }
}

/// The lifetimes of `graph` run node by node: step 0 binds the inputs, node i runs at step
/// i + 1, outputs are read after the last step.
pub fn graph_lifetimes(graph: &Graph) -> Vec<Lifetime> {
    let ids = |v: &[ValueId]| v.iter().map(|id| id.index()).collect::<Vec<_>>();
    let mut live = Liveness::new(graph.values.len(), ids(&graph.inputs));
    for (i, node) in graph.nodes.iter().enumerate() {
        live.touch(node.output.index(), i + 1);
        for v in node.op.inputs() {
            live.touch(v.index(), i + 1);
        }
    }
    live.finish(ids(&graph.outputs), graph.nodes.len() + 1)
}

/// Whether two lifetimes share a step.
pub fn overlaps(a: Lifetime, b: Lifetime) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Lowest offset where `v` fits between the placed values that are alive at the same time.
fn first_fit(
    v: usize,
    sizes: &[usize],
    life: &[Lifetime],
    offsets: &[usize],
    placed: &[usize],
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
pub fn assign_slots(sizes: &[u64], lifetimes: &[Lifetime]) -> (Vec<usize>, Vec<u64>) {
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
    use crate::graph::{GraphBuilder, Shape, SqueezeExciteId};

    fn plan(graph: &crate::graph::Graph) -> MemoryPlan {
        MemoryPlan::new(&graph.values, graph_lifetimes(graph))
    }

    #[test]
    fn chain_reuses_memory_and_keeps_live_values_apart() {
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(8, 8, 16));
        let mut v = x;
        let mut skips = Vec::new();
        for i in 0..6 {
            v = g.squeeze_excite(&format!("se{i}"), v, SqueezeExciteId(0));
            skips.push(v);
        }
        let u = g.upsample_concat("up", v, None);
        g.output(u);
        g.output(skips[2]);
        let graph = g.finish();
        let plan = plan(&graph);
        assert_eq!(plan.overlapping_pair(&graph.values), None);
        let total: usize = graph.values.iter().map(|v| v.shape.len()).sum();
        assert!(plan.arena_len < total, "no reuse happened");
        // An output is kept to the end even though nothing consumes it later.
        assert_eq!(plan.lifetimes[skips[2]].1, graph.nodes.len() + 1);
    }

    /// The check itself: a plan that puts two live values in one place is caught.
    #[test]
    fn overlapping_live_values_are_found() {
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(4, 4, 16));
        let s = g.squeeze_excite("se", x, SqueezeExciteId(0));
        g.output(s);
        let graph = g.finish();
        let mut plan = plan(&graph);
        assert_eq!(plan.overlapping_pair(&graph.values), None);
        plan.offsets[s] = plan.offsets[x] + 8;
        assert_eq!(plan.overlapping_pair(&graph.values), Some((x, s)));
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

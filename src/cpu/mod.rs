//! CPU backend: executes a `Graph` with the rayon + SIMD kernels of `kernels`, on weights
//! packed once when the backend is created; each compiled graph runs inside its own
//! reusable arena.

mod fold;
pub mod kernels;
mod plan;
mod strategy;

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::Result;
use crate::graph::{
    graph_lifetimes, Backend, CompiledGraph, Graph, MemoryPlan, NodeTimes, Op, Outputs, ValueId,
    WeightTables,
};
use crate::util::sync::lock;
use fold::Fold;
use kernels::{
    Activation, ConvGeometry, GatedConcat, InputLayout, PackedDepthwise, PackedWinograd,
};
use kernels::{Scse, SqueezeExcite};
pub use plan::CpuPlan;
use strategy::PackedWeights;
pub use strategy::{ConvInput, ConvStrategy};

/// Model weights in the layouts the CPU kernels want.
struct PackedModel {
    convs: Vec<(PackedWeights, Vec<f32>)>,
    se: Vec<SqueezeExcite>,
    scse: Vec<Scse>,
}

/// The CPU backend: the packed weights, shared by every graph compiled on it.
pub struct CpuBackend {
    packed: Arc<PackedModel>,
}

impl CpuBackend {
    pub fn new(w: &WeightTables) -> Self {
        let convs = w
            .convs
            .iter()
            .map(|c| (PackedWeights::pack(c), c.bias.clone()))
            .collect();
        let packed = PackedModel {
            convs,
            se: w.se.clone(),
            scse: w.scse.clone(),
        };
        CpuBackend {
            packed: Arc::new(packed),
        }
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> &'static str {
        "cpu"
    }

    fn description(&self) -> String {
        format!(
            "cpu ({}, {} threads)",
            kernels::isa_name(),
            rayon::current_num_threads()
        )
    }

    fn compile(&self, graph: &Graph) -> Result<Box<dyn CompiledGraph>> {
        let packed = self.packed.clone();
        let plan = CpuPlan::new(graph, |conv| &packed.convs[conv].0);
        Ok(Box::new(CpuGraph {
            packed,
            graph: graph.clone(),
            memory: memory_plan(graph),
            plan,
            arena: Mutex::new(Vec::new()),
            second_arena: Mutex::new(Vec::new()),
        }))
    }
}

/// Where this backend puts each value of `graph` in its arena: the graph's lifetimes,
/// extended for the folds (see `fold`).
pub fn memory_plan(graph: &Graph) -> MemoryPlan {
    let mut lifetimes = graph_lifetimes(graph);
    fold::extend_lifetimes(graph, &mut lifetimes);
    MemoryPlan::new(&graph.values, lifetimes)
}

/// A graph compiled for the CPU: its conv strategies and folds decided (its `CpuPlan`), its
/// arena allocated at the first run.
pub struct CpuGraph {
    packed: Arc<PackedModel>,
    graph: Graph,
    /// Where each value lives in the arena.
    memory: MemoryPlan,
    /// How each value is produced (see `fold`) and each conv node computed (see `strategy`).
    plan: CpuPlan,
    arena: Mutex<Vec<f32>>,
    /// The arena of the second of two runs that `run_batch` makes at once (allocated at
    /// the first batch, kept for the next one like `arena`).
    second_arena: Mutex<Vec<f32>>,
}

impl CompiledGraph for CpuGraph {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn run(&self, inputs: &[&[f32]], times: Option<&mut NodeTimes>) -> Result<Outputs> {
        self.run_in(&mut lock(&self.arena), inputs, times)
    }

    /// Two runs at a time, each in its own arena, both on the pool: on every op of one run
    /// the other keeps the cores busy where a single small op leaves one idle (the late
    /// encoder blocks, the alignment, the reductions of squeeze-excite), and each op's
    /// weights are read by both while still in cache. The kernels are the ones `run` uses
    /// and decide their work split by shape alone, so the outputs are `run`'s bit for bit.
    fn run_batch(&self, runs: &[Vec<&[f32]>]) -> Result<Vec<Outputs>> {
        let mut outputs = Vec::with_capacity(runs.len());
        for pair in runs.chunks(2) {
            match pair {
                [one] => outputs.push(self.run(one, None)?),
                [a, b] => {
                    let mut second = lock(&self.second_arena);
                    let second: &mut Vec<f32> = &mut second;
                    let (ya, yb) =
                        rayon::join(|| self.run(a, None), || self.run_in(second, b, None));
                    outputs.push(ya?);
                    outputs.push(yb?);
                }
                _ => unreachable!("chunks of two"),
            }
        }
        Ok(outputs)
    }

    fn batches(&self) -> bool {
        rayon::current_num_threads() >= 2
    }

    /// The leading nodes run on the pool while the calling thread computes `late` (for the
    /// pair prompt + query: each encoder on about one core, where the small late layers of
    /// a single encoder would leave the second core partly idle).
    fn run_overlapped(
        &self,
        early: &[&[f32]],
        prefix: usize,
        late: &(dyn Fn() -> Result<Outputs> + Sync),
    ) -> Result<(Outputs, Outputs)> {
        let g = &self.graph;
        let mut arena = lock(&self.arena);
        self.prepare_arena(&mut arena);
        self.load_inputs(
            &mut arena,
            g.inputs.iter().copied().zip(early.iter().copied()),
        );
        let arena_ref: &mut Vec<f32> = &mut arena;
        let (rest, ()) = rayon::join(late, || self.run_nodes(arena_ref, 0..prefix, None));
        let rest = rest?;
        let late_inputs = g.inputs[early.len()..].iter().copied();
        self.load_inputs(
            &mut arena,
            late_inputs.zip(rest.iter().map(|t| t.as_slice())),
        );
        self.run_nodes(&mut arena, prefix..g.nodes.len(), None);
        Ok((rest, self.outputs(&arena)))
    }

    /// How node `node` runs on this backend: its conv strategy, or how it is folded into
    /// its reader (see `CpuPlan::describe`).
    fn describe_node(&self, node: usize) -> Option<String> {
        Some(self.plan.describe(&self.graph, node))
    }
}

impl CpuGraph {
    /// One whole run in `arena`: `run` in its own, `run_batch`'s second run in another.
    fn run_in(
        &self,
        arena: &mut Vec<f32>,
        inputs: &[&[f32]],
        times: Option<&mut NodeTimes>,
    ) -> Result<Outputs> {
        let g = &self.graph;
        assert_eq!(inputs.len(), g.inputs.len(), "input count");
        self.prepare_arena(arena);
        self.load_inputs(arena, g.inputs.iter().copied().zip(inputs.iter().copied()));
        self.run_nodes(arena, 0..g.nodes.len(), times);
        Ok(self.outputs(arena))
    }

    /// Runs the nodes `range` by the plan on an arena that `prepare_arena` sized and whose
    /// inputs those nodes read are loaded. Ranges run in order make one run.
    fn run_nodes(&self, arena: &mut [f32], range: Range<usize>, mut times: Option<&mut NodeTimes>) {
        let graph = &self.graph;
        let plan = &self.plan;
        assert!(arena.len() >= self.memory.arena_len, "arena not prepared");
        let base = Arena {
            ptr: arena.as_mut_ptr(),
            graph,
            offsets: &self.memory.offsets,
            plan,
        };
        // The whole node loop runs on a pool thread, which then takes part in every op's
        // parallel work: no cross-thread wake-up of the caller per op (about 200 ops per
        // graph; a wake-up costs tens of microseconds in a VM).
        rayon::scope(|_| {
            for i in range {
                let node = &graph.nodes[i];
                let start = Instant::now();
                let runs = plan.folds[node.output].runs_op();
                if runs {
                    self.run_node(&base, &node.op, plan.convs[i], node.output);
                }
                if let Some(t) = times.as_deref_mut() {
                    t.push(if !runs {
                        0.0
                    } else {
                        start.elapsed().as_secs_f64()
                    });
                }
            }
        });
    }

    /// Runs `op` (a conv by `strategy`) into the value `out`.
    fn run_node(&self, a: &Arena, op: &Op, strategy: Option<ConvStrategy>, out: ValueId) {
        // SAFETY: the memory plan gives values alive at the same step disjoint arena ranges,
        // and an op's inputs and output are all alive at its step.
        let y = unsafe { a.slice_mut(out) };
        match *op {
            Op::Conv {
                input,
                conv,
                ref geometry,
                act,
                residual,
                ..
            } => {
                let x = unsafe { a.slice(input) };
                let (packed, bias) = &self.packed.convs[conv];
                let strategy = strategy.expect("every conv node has a strategy");
                match (strategy, packed) {
                    (
                        ConvStrategy::Direct,
                        PackedWeights::Dense(w) | PackedWeights::Dense3x3(_, w),
                    ) => {
                        let r = residual.map(|r| unsafe { a.slice(r) });
                        kernels::conv2d_nhwc(x, geometry, w, bias, act, r, y)
                    }
                    (
                        ConvStrategy::DirectGated { x: source },
                        PackedWeights::Dense(w) | PackedWeights::Dense3x3(_, w),
                    ) => {
                        // The folded squeeze-excite left its gates at the start of its place.
                        let gate = &x[..geometry.cin];
                        let r = residual.map(|r| unsafe { a.slice(r) });
                        // SAFETY: the memory plan keeps a folded squeeze-excite's input alive.
                        let source = unsafe { a.slice(source) };
                        kernels::conv2d_gated_nhwc(source, gate, geometry, w, bias, act, r, y)
                    }
                    (ConvStrategy::Depthwise, PackedWeights::Depthwise(w)) => {
                        kernels::depthwise_conv2d_nhwc(x, geometry, w, bias, act, y)
                    }
                    (ConvStrategy::DepthwiseOverExpand { expand }, PackedWeights::Depthwise(w)) => {
                        self.depthwise_over_expand(a, expand, geometry, w, bias, act, y)
                    }
                    (_, PackedWeights::Dense3x3(wino, _)) if strategy.schedule().is_some() => {
                        let r = residual.map(|r| unsafe { a.slice(r) });
                        let conv = WinogradConv {
                            geometry,
                            w: wino,
                            bias,
                            act,
                            residual: r,
                        };
                        self.winograd(a, strategy, x, &conv, y)
                    }
                    _ => unreachable!("{strategy} does not apply to these weights"),
                }
            }
            Op::SqueezeExcite { input, se } => {
                let x = unsafe { a.slice(input) };
                let pixels = a.graph.values[input].shape.pixels();
                let se = &self.packed.se[se];
                if let Fold::ChannelGates { .. } = a.plan.folds[out] {
                    // Only the gates, at the start of this value's (otherwise unused) place.
                    kernels::squeeze_excite_gates(x, pixels, se, &mut y[..se.channels])
                } else {
                    kernels::squeeze_excite_nhwc(x, pixels, se, y)
                }
            }
            Op::Scse { input, scse } => match a.plan.folds[out] {
                Fold::GatedConcat { half, skip } => {
                    // Only the gates, at the start of this value's (otherwise unused) place.
                    let s = a.graph.values[half].shape;
                    let (channel_gate, rest) = y.split_at_mut(self.packed.scse[scse].channels);
                    let spatial_gate = &mut rest[..4 * s.pixels()];
                    let (x_half, skip) = unsafe { (a.slice(half), a.slice(skip)) };
                    let shape = (s.h, s.w, s.c);
                    let w = &self.packed.scse[scse];
                    kernels::scse_gates_upsampled_concat(
                        x_half,
                        shape,
                        skip,
                        w,
                        channel_gate,
                        spatial_gate,
                    )
                }
                _ => {
                    let x = unsafe { a.slice(input) };
                    let pixels = a.graph.values[input].shape.pixels();
                    kernels::scse_nhwc(x, pixels, &self.packed.scse[scse], y)
                }
            },
            Op::Align { fq, q, k, fp } => {
                let sq = a.graph.values[q].shape;
                let sf = a.graph.values[fq].shape;
                let (fq, q, k, fp) = unsafe { (a.slice(fq), a.slice(q), a.slice(k), a.slice(fp)) };
                kernels::soft_align_nhwc(fq, q, k, fp, sf.pixels(), sf.c, sq.c, y)
            }
            Op::UpsampleConcat { input, skip } => {
                let s = a.graph.values[input].shape;
                let x = unsafe { a.slice(input) };
                let cs = skip.map_or(0, |k| a.graph.values[k].shape.c);
                let skip = skip.map(|k| unsafe { a.slice(k) });
                kernels::upsample2x_concat_nhwc(x, s.h, s.w, s.c, skip, cs, y)
            }
        }
    }
}

impl CpuGraph {
    /// A depthwise conv of geometry `g` over the output of the expand conv node `expand`
    /// (folded: see `Fold::Expanded`), from that node's input.
    #[allow(clippy::too_many_arguments)]
    fn depthwise_over_expand(
        &self,
        a: &Arena,
        expand: usize,
        g: &ConvGeometry,
        w: &PackedDepthwise,
        bias: &[f32],
        act: Activation,
        y: &mut [f32],
    ) {
        let Op::Conv {
            input,
            conv,
            act: expand_act,
            ..
        } = a.graph.nodes[expand].op
        else {
            unreachable!("an expand fold is a conv node")
        };
        let (PackedWeights::Dense(expand_w), expand_bias) = &self.packed.convs[conv] else {
            unreachable!("a 1x1 conv is packed dense")
        };
        // SAFETY: the memory plan keeps an expand's input alive until its reader.
        let x = unsafe { a.slice(input) };
        kernels::depthwise_over_expand_nhwc(
            x,
            expand_w,
            expand_bias,
            expand_act,
            g,
            w,
            bias,
            act,
            y,
        )
    }
}

/// A stride-1 3x3 conv run by Winograd, less its input.
struct WinogradConv<'a> {
    geometry: &'a ConvGeometry,
    w: &'a PackedWinograd,
    bias: &'a [f32],
    act: Activation,
    residual: Option<&'a [f32]>,
}

impl CpuGraph {
    /// Runs `conv` by the Winograd `strategy` on `x`, the conv's input value, or, when that
    /// value is folded (see `fold`), on what it was folded from.
    fn winograd(
        &self,
        a: &Arena,
        strategy: ConvStrategy,
        x: &[f32],
        conv: &WinogradConv,
        y: &mut [f32],
    ) {
        let WinogradConv {
            geometry: g,
            w,
            bias,
            act,
            residual: r,
        } = *conv;
        let schedule = strategy.schedule().expect("a Winograd strategy");
        let (x, layout) = match strategy.input() {
            ConvInput::Plain => (x, InputLayout::Plain),
            // SAFETY: the memory plan keeps a folded upsample's input alive until its reader.
            ConvInput::Upsampled { half } => (unsafe { a.slice(half) }, InputLayout::Upsampled),
            ConvInput::GatedConcat { half, skip } => {
                // The folded scSE left its gates at the start of its place (`x`).
                let (channel_gate, rest) = x.split_at(g.cin);
                let concat = GatedConcat {
                    // SAFETY: as above, for the upsample under the scSE.
                    skip: unsafe { a.slice(skip) },
                    x_channels: a.graph.values[half].shape.c,
                    channel_gate,
                    spatial_gate: &rest[..g.in_h * g.in_w],
                };
                (unsafe { a.slice(half) }, InputLayout::GatedConcat(concat))
            }
        };
        kernels::conv3x3_winograd_planned(schedule, x, layout, g, w, bias, act, r, y)
    }
}

/// Typed views of values inside the arena.
struct Arena<'g> {
    ptr: *mut f32,
    graph: &'g Graph,
    /// Each value's place (the memory plan).
    offsets: &'g [usize],
    /// Each value's fold and each conv node's strategy.
    plan: &'g CpuPlan,
}

// SAFETY: the arena is only used by the node loop, which runs on one thread at a time
// (handed to a pool thread by `rayon::scope`); ops split their own output ranges.
unsafe impl Send for Arena<'_> {}
unsafe impl Sync for Arena<'_> {}

impl Arena<'_> {
    unsafe fn slice(&self, v: ValueId) -> &[f32] {
        let off = self.offsets[v];
        std::slice::from_raw_parts(self.ptr.add(off), self.graph.values[v].shape.len())
    }

    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, v: ValueId) -> &mut [f32] {
        let off = self.offsets[v];
        std::slice::from_raw_parts_mut(self.ptr.add(off), self.graph.values[v].shape.len())
    }
}

impl CpuGraph {
    /// Grows `arena` to the size the memory plan needs (once; later runs reuse it).
    fn prepare_arena(&self, arena: &mut Vec<f32>) {
        if arena.len() < self.memory.arena_len {
            arena.resize(self.memory.arena_len, 0.0);
        }
    }

    /// Copies input values into their planned places (inputs are alive from the first
    /// step, so this may happen between `run_nodes` calls, before the first node that
    /// reads them).
    fn load_inputs<'a>(
        &self,
        arena: &mut [f32],
        inputs: impl IntoIterator<Item = (ValueId, &'a [f32])>,
    ) {
        let graph = &self.graph;
        for (v, data) in inputs {
            assert!(graph.inputs.contains(&v), "not an input of the graph");
            assert_eq!(data.len(), graph.values[v].shape.len(), "input length");
            let off = self.memory.offsets[v];
            arena[off..off + data.len()].copy_from_slice(data);
        }
    }

    /// Copies the graph's outputs out of the arena after a run.
    fn outputs(&self, arena: &[f32]) -> Outputs {
        let graph = &self.graph;
        let read = |&v: &ValueId| {
            let off = self.memory.offsets[v];
            arena[off..off + graph.values[v].shape.len()].to_vec()
        };
        graph.outputs.iter().map(read).collect()
    }
}

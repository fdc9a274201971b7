//! Lowers a backend-neutral `Graph` into GPU steps (one compute dispatch each), folding
//! what a GPU should never write out: the squeeze-excite scaling goes into the projection
//! conv's input, nearest-x2 upsample + concat (and the scSE gating that follows it) into the
//! next conv's input addressing. Only the gates (a few floats per channel or pixel) are
//! written for them.

use std::collections::HashMap;

use super::device::PipelineKey;
use super::params::{
    AlignOverrides, AlignParams, ChannelSumParams, ConvOverrides, ConvParams, DepthwiseOverrides,
    DepthwiseParams, ExciteGateParams, ExciteHiddenParams, ExciteOverrides, HeadParams, InputMode,
    Kernel, Overrides as _, ReduceOverrides, ReduceParams, ScseApplyParams, SpatialGateOverrides,
    SpatialGateParams, ToF32Params, ToStoreParams, WinogradInputOverrides, WinogradInputParams,
    WinogradOutputOverrides, WinogradOutputParams, UNIFORM_BYTES,
};
use super::weights::WeightTable;
use crate::graph::{Activation, ConvGeometry, ConvId, Graph, Op, Precision, ScseId, ValueId};

/// What a binding points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buf {
    /// A value of the lowered program (planned by liveness).
    Value(usize),
    /// An uploaded weight tensor (`WeightTable::tensors` index).
    Weight(usize),
    /// A binding the kernel's mode never reads (bound to a small dummy buffer).
    Unused,
    /// A writable binding the kernel's mode never writes (its own dummy: a buffer may not be
    /// bound read-only and writable in one dispatch).
    UnusedWritable,
}

/// A tensor the GPU program writes: activations in the storage type of the step writing them
/// (the program's precision, or f32 in a full-precision node), gates and partial sums
/// always in f32.
#[derive(Clone, Debug)]
pub struct GpuValue {
    pub name: String,
    /// Values per image.
    pub elems: usize,
    pub always_f32: bool,
    /// Images stored one after another: the batch, or 1 for an input every image shares.
    pub copies: usize,
}

impl GpuValue {
    /// The value's storage type in a program of precision `mode`.
    pub fn store(&self, mode: Precision) -> Precision {
        if self.always_f32 {
            Precision::F32
        } else {
            mode
        }
    }
}

/// One compute dispatch.
#[derive(Clone, Debug)]
pub struct Step {
    /// The graph node it belongs to (profiles aggregate by it).
    pub node: String,
    pub key: PipelineKey,
    pub uniform_binding: u32,
    /// The kernel's `Kernel` struct, zero-padded to one uniform slot.
    pub params: [u32; UNIFORM_BYTES / 4],
    pub bindings: Vec<(u32, Buf)>,
    pub workgroups: [u32; 3],
    pub flops: f64,
    /// Reduction steps one workgroup runs in series (convs; 0 for the rest).
    pub serial_steps: u64,
    /// The storage type of its activations and conv weights (also in `key`).
    pub store: Precision,
}

pub struct Lowered {
    pub values: Vec<GpuValue>,
    pub steps: Vec<Step>,
    /// Program values of the graph's inputs and outputs, in graph order.
    pub inputs: Vec<usize>,
    pub outputs: Vec<usize>,
    /// Images per run.
    pub batch: usize,
}

/// How a graph value can be read on the GPU.
#[derive(Clone, Copy, Debug)]
enum Source {
    Plain(usize),
    /// Squeeze-excite output: `x * gate[c]`, never written.
    ChannelScaled {
        x: usize,
        gate: usize,
    },
    /// Nearest-x2 upsample of `a` concatenated with `skip`, optionally scSE-gated.
    UpConcat {
        a: usize,
        ca: usize,
        skip: Option<usize>,
        gates: Option<(usize, usize)>,
    },
}

/// Pixels per partial sum in the channel-mean reductions.
const POOL_CHUNK: usize = 256;
const CONV_TILE: usize = 64;
/// The kernels' fixed capacities (see the WGSL files).
pub const MAX_ALIGN_HIDDEN: usize = 256;
pub const MAX_ALIGN_CHANNELS: usize = 512;
/// Query positions per alignment workgroup (ROWS in align.wgsl, at most 4): each key and
/// prompt feature read then serves that many queries. As many as keep `MIN_WORKGROUPS`
/// workgroups (one where even that is too few: the small levels need the parallelism more).
pub fn align_rows(n: usize) -> usize {
    [4, 2]
        .into_iter()
        .find(|&r| n.div_ceil(r) >= MIN_WORKGROUPS)
        .unwrap_or(1)
}

struct Lowering<'a> {
    graph: &'a Graph,
    weights: &'a WeightTable,
    values: Vec<GpuValue>,
    steps: Vec<Step>,
    sources: HashMap<ValueId, Source>,
    /// The program's storage precision.
    mode: Precision,
    /// The storage type of the node being lowered (f32 where it is full precision).
    store: Precision,
    /// Values converted to the other storage type, by (value, target).
    casts: HashMap<(usize, Precision), usize>,
    /// Images per run: every kernel takes the image from workgroup z.
    batch: usize,
    /// The adapter's largest storage binding: a strategy whose intermediates (for one
    /// image) exceed it is not chosen.
    max_binding_bytes: u64,
}

/// Lowers `graph` for storage precision `mode`: under f16, the graph's full-precision nodes
/// run and store in f32, and each value crossing between the two is converted once.
///
/// `batch` images per run, one after another in every value; the graph inputs marked in
/// `shared` are stored once for all of them (a prompt's features: only the alignment may
/// read those). Every decision (tiles, split-K, alignment rows) is the one-image one, so
/// each image's outputs are those of a run on its own, bit for bit.
pub fn lower(
    graph: &Graph,
    weights: &WeightTable,
    mode: Precision,
    batch: usize,
    shared: &[bool],
    max_binding_bytes: u64,
) -> Lowered {
    let mut l = Lowering {
        graph,
        weights,
        values: Vec::new(),
        steps: Vec::new(),
        sources: HashMap::new(),
        mode,
        store: mode,
        casts: HashMap::new(),
        batch: batch.max(1),
        max_binding_bytes,
    };
    // An input is stored as its readers want it: f32 if a full-precision node reads it.
    let inputs = graph
        .inputs
        .iter()
        .map(|&v| {
            let precise = graph
                .nodes
                .iter()
                .any(|n| n.full_precision && n.op.inputs().contains(&v));
            l.store = if precise { Precision::F32 } else { mode };
            l.materialize(v)
        })
        .collect::<Vec<usize>>();
    for (&id, _) in inputs.iter().zip(shared).filter(|(_, &s)| s) {
        l.values[id].copies = 1;
    }
    for node in &graph.nodes {
        l.store = if node.full_precision {
            Precision::F32
        } else {
            mode
        };
        l.node(&node.name, &node.op, node.output);
    }
    let outputs = graph
        .outputs
        .iter()
        .map(|v| match l.sources[v] {
            Source::Plain(p) => p,
            other => panic!("graph output {} is not materialized: {other:?}", l.name(*v)),
        })
        .collect();
    Lowered {
        batch: l.batch,
        values: l.values,
        steps: l.steps,
        inputs,
        outputs,
    }
}

/// Workgroup counts for `groups` workgroups, folded into x and y (65535 at most each).
pub fn fold(groups: usize) -> [u32; 3] {
    let x = groups.clamp(1, 65535);
    [x as u32, groups.div_ceil(x).max(1) as u32, 1]
}

/// `ca`: channels of the upsampled part when the input is an upsample-concat.
fn conv_params(g: &ConvGeometry, ca: usize) -> ConvParams {
    ConvParams {
        in_h: g.in_h as u32,
        in_w: g.in_w as u32,
        cin: g.cin as u32,
        cout: g.cout as u32,
        out_h: g.out_h as u32,
        out_w: g.out_w as u32,
        pad_top: g.pad_top as u32,
        pad_left: g.pad_left as u32,
        ca: ca as u32,
        pixel_tiles: (g.out_h * g.out_w).div_ceil(CONV_TILE) as u32,
        cout_vec4: g.cout.div_ceil(4) as u32,
        k_chunk: 0,
        cout_tiles: g.cout.div_ceil(CONV_TILE) as u32,
        z_per_image: g.cout.div_ceil(CONV_TILE) as u32,
        w_images: 1,
        w_image_stride: 0,
    }
}

/// How a dense conv runs (burn-cubecl style: each strategy with its applicability check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvStrategy {
    /// conv.wgsl: the implicit GEMM (any geometry, any input mode, split-K when small).
    ImplicitGemm,
    /// winograd.wgsl + the GEMM: F(4x4, 3x3), a quarter of the multiply-adds.
    Winograd4x4,
}

/// Output pixels from which a 3x3 conv runs as Winograd: on smaller maps its two extra
/// dispatches and the 36-fold intermediate cost more than the multiply-adds it saves
/// (at 256: dec2..dec4, at 512: dec1..dec4).
pub const WINOGRAD_MIN_PIXELS: usize = 64 * 64;

/// `METAUAS_GPU_WINOGRAD=0` keeps every conv on the implicit GEMM (to measure the gain).
fn winograd_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("METAUAS_GPU_WINOGRAD").is_ok_and(|v| v.trim() == "0"))
}

impl ConvStrategy {
    /// Winograd for a stride-1 3x3 conv over a large enough map, read plainly or through
    /// the upsample + concat (+ scSE) modes, without a residual, in float32 storage (f16
    /// would round the transformed input, whose values grow up to 100-fold).
    pub fn choose(
        g: &ConvGeometry,
        e: &super::weights::ConvEntry,
        mode: InputMode,
        residual: bool,
        store: Precision,
        max_binding_bytes: u64,
    ) -> ConvStrategy {
        let applies = g.kernel == 3
            && g.stride == 1
            && e.winograd.is_some()
            && !residual
            && mode != InputMode::ChannelScaled
            && store == Precision::F32
            && g.out_h * g.out_w >= WINOGRAD_MIN_PIXELS
            && fits_one_binding(winograd_elems(g), max_binding_bytes)
            && !winograd_disabled();
        if applies {
            ConvStrategy::Winograd4x4
        } else {
            ConvStrategy::ImplicitGemm
        }
    }
}

/// The float32 elements of a Winograd conv's largest intermediate for one image without
/// split-K: the transformed input (36 x tiles x cin) or the GEMM's output (x cout). Checked
/// per image so a batch's maps equal single runs (a batch that does not fit runs image by
/// image); at 512 the decoder's first block would need 144 MiB where lavapipe binds 128.
fn winograd_elems(g: &ConvGeometry) -> usize {
    36 * g.out_h.div_ceil(4) * g.out_w.div_ceil(4) * g.cin.max(g.cout)
}

fn fits_one_binding(f32_elems: usize, max_binding_bytes: u64) -> bool {
    (f32_elems * 4) as u64 <= max_binding_bytes
}

/// How a Winograd conv reads its input: the mode and the conv's x, skip, cgate, sgate.
struct WinogradInput {
    mode: InputMode,
    bindings: [Buf; 4],
    ca: usize,
}

/// Workgroups a dispatch should launch to fill a large GPU: two waves on 132 SMs.
pub const MIN_WORKGROUPS: usize = 264;
/// The conv kernel's reduction step (KT in conv.wgsl).
const CONV_KT: usize = 16;
/// Fewest reduction steps a split-K part keeps (below that the reduction pass costs more
/// than the parallelism gains).
const MIN_SPLIT_STEPS: usize = 8;

/// `METAUAS_GPU_SPLIT_K=0` turns split-K off (to measure what it buys on a given GPU).
fn split_k_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("METAUAS_GPU_SPLIT_K").is_ok_and(|v| v.trim() == "0"))
}

/// How many parts a conv's reduction is cut into (1: no split) and the terms in each (a
/// multiple of the kernel's step), so that tiles x parts reaches `MIN_WORKGROUPS`.
pub fn split_k(tiles: usize, k_terms: usize) -> (usize, usize) {
    let steps = k_terms.div_ceil(CONV_KT);
    let wanted = MIN_WORKGROUPS.div_ceil(tiles.max(1));
    let splits = wanted.min(steps / MIN_SPLIT_STEPS);
    if splits < 2 {
        return (1, k_terms);
    }
    let chunk = steps.div_ceil(splits) * CONV_KT;
    (k_terms.div_ceil(chunk), chunk)
}

/// A conversion of `elems` values from `src` into `dst`, whose storage type is `to` (the
/// other one's is the other precision).
pub fn cast_step(name: &str, to: Precision, elems: usize, src: Buf, dst: Buf) -> Step {
    let workgroups = fold(elems.div_ceil(256));
    let elems = elems as u32;
    // Each entry point binds only the buffers it uses (auto layouts).
    let step = if to == Precision::F32 {
        let bindings = vec![(3, src), (4, dst)];
        Step::new(name, ToF32Params { elems }, (), bindings, workgroups, 0.0)
    } else {
        let bindings = vec![(1, src), (2, dst)];
        Step::new(name, ToStoreParams { elems }, (), bindings, workgroups, 0.0)
    };
    // The conversions are compiled with `store` = the narrow type.
    step.with_store(Precision::F16)
}

impl Step {
    /// A dispatch of kernel `K`: its pipeline, uniform binding and parameters all follow
    /// from the typed parameters.
    fn new<K: Kernel>(
        node: &str,
        params: K,
        overrides: K::Overrides,
        bindings: Vec<(u32, Buf)>,
        workgroups: [u32; 3],
        flops: f64,
    ) -> Step {
        Step {
            node: node.to_string(),
            key: PipelineKey {
                family: K::FAMILY,
                entry: K::ENTRY,
                store: Precision::F32,
                constants: overrides.values(),
            },
            uniform_binding: K::BINDING,
            params: params.uniform_words(),
            bindings,
            workgroups,
            flops,
            serial_steps: 0,
            store: Precision::F32,
        }
    }

    fn with_store(mut self, store: Precision) -> Step {
        self.store = store;
        self.key.store = store;
        self
    }
}

impl Lowering<'_> {
    fn name(&self, v: ValueId) -> &str {
        &self.graph.values[v].name
    }

    /// Adds a step of the node being lowered (in its storage type), for every image.
    fn push(&mut self, mut step: Step) {
        step.workgroups[2] *= self.batch as u32;
        step.flops *= self.batch as f64;
        self.steps.push(step.with_store(self.store));
    }

    /// `v` in the storage type of the node being lowered: itself, or its conversion
    /// (one cast dispatch, made once per value and type).
    fn in_store(&mut self, v: usize) -> usize {
        let from = self.values[v].store(self.mode);
        let to = self.store;
        if from == to {
            return v;
        }
        if let Some(&c) = self.casts.get(&(v, to)) {
            return c;
        }
        let elems = self.values[v].elems;
        let name = format!("{}.as_{}", self.values[v].name, to.name());
        let c = self.new_value(name.clone(), elems, to == Precision::F32);
        let copies = self.values[v].copies;
        self.values[c].copies = copies;
        let mut step = cast_step(&name, to, elems, Buf::Value(v), Buf::Value(c));
        step.workgroups[2] = copies as u32;
        self.steps.push(step);
        self.casts.insert((v, to), c);
        c
    }

    /// A source read in the storage type of the node being lowered.
    fn source_in_store(&mut self, src: Source) -> Source {
        match src {
            Source::Plain(x) => Source::Plain(self.in_store(x)),
            Source::ChannelScaled { x, gate } => Source::ChannelScaled {
                x: self.in_store(x),
                gate,
            },
            Source::UpConcat { a, ca, skip, gates } => Source::UpConcat {
                a: self.in_store(a),
                ca,
                skip: skip.map(|k| self.in_store(k)),
                gates,
            },
        }
    }

    fn new_value(&mut self, name: String, elems: usize, always_f32: bool) -> usize {
        self.values.push(GpuValue {
            name,
            elems,
            always_f32,
            copies: self.batch,
        });
        self.values.len() - 1
    }

    /// A graph value written by the node being lowered, in its storage type.
    fn materialize(&mut self, v: ValueId) -> usize {
        let value = &self.graph.values[v];
        let f32_storage = self.store == Precision::F32;
        let id = self.new_value(value.name.clone(), value.shape.len(), f32_storage);
        self.sources.insert(v, Source::Plain(id));
        id
    }

    /// A written-out value, in the storage type of the node being lowered (one per image:
    /// see `plain_or_shared` for the alignment's keys).
    fn plain(&mut self, v: ValueId, user: &str) -> usize {
        let p = self.plain_or_shared(v, user);
        assert_eq!(
            self.values[p].copies,
            self.batch,
            "GPU lowering: {user} reads {}, which the images of a batch share",
            self.name(v)
        );
        p
    }

    fn plain_or_shared(&mut self, v: ValueId, user: &str) -> usize {
        match self.sources[&v] {
            Source::Plain(p) => self.in_store(p),
            other => panic!(
                "GPU lowering: {user} needs {} written out, but it is {other:?}",
                self.name(v)
            ),
        }
    }

    fn node(&mut self, name: &str, op: &Op, out: ValueId) {
        let flops = 2.0 * op.macs(self.graph.values[out].shape, &self.graph.values) as f64;
        match *op {
            Op::Conv {
                input,
                conv,
                ref geometry,
                depthwise: true,
                act,
                ..
            } => {
                let x = self.plain(input, name);
                let y = self.materialize(out);
                self.depthwise(name, x, y, conv, geometry, act, flops);
            }
            Op::Conv {
                input,
                conv,
                ref geometry,
                act,
                residual,
                ..
            } => {
                let y = self.materialize(out);
                let head = geometry.cout == 1 && geometry.kernel == 1;
                if head && act == Activation::Sigmoid && residual.is_none() {
                    let x = self.plain(input, name);
                    self.head(name, x, y, conv, geometry, flops);
                } else {
                    let residual = residual.map(|r| self.plain(r, name));
                    let src = self.source_in_store(self.sources[&input]);
                    self.conv(name, src, y, conv, geometry, act, residual, flops);
                }
            }
            Op::SqueezeExcite { input, se } => {
                let x = self.plain(input, name);
                let s = self.graph.values[input].shape;
                let entry = self.weights.se[se];
                let parts = [(x, s.pixels(), s.c)];
                let gate = self.channel_gate(name, &parts, entry, Activation::Swish);
                self.sources.insert(out, Source::ChannelScaled { x, gate });
            }
            Op::UpsampleConcat { input, skip } => {
                let a = self.plain(input, name);
                let ca = self.graph.values[input].shape.c;
                let skip = skip.map(|k| self.plain(k, name));
                let src = Source::UpConcat {
                    a,
                    ca,
                    skip,
                    gates: None,
                };
                self.sources.insert(out, src);
            }
            Op::Scse { input, scse } => self.scse(name, input, scse, out),
            Op::Align { fq, q, k, fp } => {
                let ids = [
                    self.plain(fq, name),
                    self.plain(q, name),
                    self.plain_or_shared(k, name),
                    self.plain_or_shared(fp, name),
                ];
                let y = self.materialize(out);
                let sf = self.graph.values[fq].shape;
                let hidden = self.graph.values[q].shape.c;
                self.align(name, ids, y, sf.pixels(), sf.c, hidden, flops);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: &str,
        src: Source,
        y: usize,
        conv: ConvId,
        g: &ConvGeometry,
        act: Activation,
        residual: Option<usize>,
        flops: f64,
    ) {
        let e = self.weights.convs[conv];
        let (mode, x, skip, cgate, sgate, ca) = match src {
            Source::Plain(x) => (
                InputMode::Plain,
                x,
                Buf::Unused,
                Buf::Unused,
                Buf::Unused,
                0,
            ),
            Source::ChannelScaled { x, gate } => {
                let cgate = Buf::Value(gate);
                (
                    InputMode::ChannelScaled,
                    x,
                    Buf::Unused,
                    cgate,
                    Buf::Unused,
                    0,
                )
            }
            Source::UpConcat { a, ca, skip, gates } => {
                let skip = skip.map_or(Buf::Unused, Buf::Value);
                match gates {
                    Some((cg, sg)) => {
                        let (cgate, sgate) = (Buf::Value(cg), Buf::Value(sg));
                        (InputMode::UpConcatGated, a, skip, cgate, sgate, ca)
                    }
                    None => (InputMode::UpConcat, a, skip, Buf::Unused, Buf::Unused, ca),
                }
            }
        };
        let residual_read = residual.is_some();
        let strategy = ConvStrategy::choose(
            g,
            &e,
            mode,
            residual_read,
            self.store,
            self.max_binding_bytes,
        );
        if let (ConvStrategy::Winograd4x4, Some(kernels)) = (strategy, e.winograd) {
            let input = WinogradInput {
                mode,
                bindings: [Buf::Value(x), skip, cgate, sgate],
                ca,
            };
            self.winograd(name, input, y, kernels, e.bias, g, act);
            return;
        }
        let mut params = conv_params(g, ca);
        let cout_tiles = params.cout_tiles as usize;
        let k_terms = g.kernel * g.kernel * g.cin;
        let (splits, chunk) = if split_k_disabled() {
            (1, k_terms)
        } else {
            split_k(params.pixel_tiles as usize * cout_tiles, k_terms)
        };
        let pixels = g.out_h * g.out_w;
        let partial = (splits > 1)
            .then(|| self.new_value(format!("{name}.split_k"), splits * pixels * g.cout, true));
        params.k_chunk = chunk as u32;
        params.z_per_image = (cout_tiles * splits) as u32;
        let mut workgroups = fold(params.pixel_tiles as usize);
        workgroups[2] = (cout_tiles * splits) as u32;
        let overrides = ConvOverrides {
            act,
            input_mode: mode,
            ksize: g.kernel as u32,
            residual: residual.is_some(),
            split_k: partial.is_some(),
            stride: g.stride as u32,
        };
        let residual = residual.map_or(Buf::Unused, Buf::Value);
        let bindings = vec![
            (1, Buf::Value(x)),
            (2, Buf::Weight(e.weight)),
            (3, Buf::Weight(e.bias)),
            (4, Buf::Value(y)),
            (5, skip),
            (6, cgate),
            (7, sgate),
            (8, residual),
            (9, partial.map_or(Buf::UnusedWritable, Buf::Value)),
        ];
        let mut step = Step::new(name, params, overrides, bindings, workgroups, flops);
        step.serial_steps = chunk.div_ceil(CONV_KT) as u64;
        self.push(step);
        if let Some(partial) = partial {
            let elems = pixels * g.cout;
            let params = ReduceParams {
                elems: elems as u32,
                cout: g.cout as u32,
                splits: splits as u32,
            };
            let overrides = ReduceOverrides {
                act,
                residual: residual != Buf::Unused,
            };
            let bindings = vec![
                (3, Buf::Weight(e.bias)),
                (4, Buf::Value(y)),
                (8, residual),
                (9, Buf::Value(partial)),
            ];
            let workgroups = fold(elems.div_ceil(64));
            let step = Step::new(name, params, overrides, bindings, workgroups, 0.0);
            self.push(step);
        }
    }

    /// A 3x3 stride-1 conv as Winograd F(4x4, 3x3): input transform, 36 GEMMs (conv.wgsl
    /// as a split-K 1x1 conv, one weight block per transform point), output transform.
    #[allow(clippy::too_many_arguments)]
    fn winograd(
        &mut self,
        name: &str,
        input: WinogradInput,
        y: usize,
        kernels: usize,
        bias: usize,
        g: &ConvGeometry,
        act: Activation,
    ) {
        let (tiles_h, tiles_w) = (g.out_h.div_ceil(4), g.out_w.div_ceil(4));
        let tiles = tiles_h * tiles_w;
        let f32_storage = self.store == Precision::F32;
        let v = self.new_value(
            format!("{name}.winograd_in"),
            36 * tiles * g.cin,
            f32_storage,
        );
        let params = WinogradInputParams {
            in_h: g.in_h as u32,
            in_w: g.in_w as u32,
            cin: g.cin as u32,
            ca: input.ca as u32,
            tiles_h: tiles_h as u32,
            tiles_w: tiles_w as u32,
            pad_top: g.pad_top as u32,
            pad_left: g.pad_left as u32,
        };
        let [x, skip, cgate, sgate] = input.bindings;
        let bindings = vec![
            (1, x),
            (2, skip),
            (3, cgate),
            (4, sgate),
            (5, Buf::Value(v)),
        ];
        let overrides = WinogradInputOverrides {
            input_mode: input.mode,
        };
        let workgroups = fold((tiles * g.cin).div_ceil(64));
        let step = Step::new(name, params, overrides, bindings, workgroups, 0.0);
        self.push(step);

        // The GEMM: 36 "images" of `tiles` pixels, each with its own weights.
        let cout_tiles = g.cout.div_ceil(CONV_TILE);
        let pixel_tiles = tiles.div_ceil(CONV_TILE);
        let (mut splits, mut chunk) = if split_k_disabled() {
            (1, g.cin)
        } else {
            split_k(36 * pixel_tiles * cout_tiles, g.cin)
        };
        // The partial sums must fit one binding too (`choose` checked one part).
        if !fits_one_binding(36 * splits * tiles * g.cout, self.max_binding_bytes) {
            (splits, chunk) = (1, g.cin);
        }
        let m = self.new_value(
            format!("{name}.winograd_m"),
            36 * splits * tiles * g.cout,
            true,
        );
        let cout_vec4 = g.cout.div_ceil(4);
        let params = ConvParams {
            in_h: tiles as u32,
            in_w: 1,
            cin: g.cin as u32,
            cout: g.cout as u32,
            out_h: tiles as u32,
            out_w: 1,
            pad_top: 0,
            pad_left: 0,
            ca: 0,
            pixel_tiles: pixel_tiles as u32,
            cout_vec4: cout_vec4 as u32,
            k_chunk: chunk as u32,
            cout_tiles: cout_tiles as u32,
            z_per_image: (cout_tiles * splits) as u32,
            w_images: 36,
            w_image_stride: (g.cin * cout_vec4) as u32,
        };
        let overrides = ConvOverrides {
            act: Activation::Identity,
            input_mode: InputMode::Plain,
            ksize: 1,
            residual: false,
            split_k: true,
            stride: 1,
        };
        let bindings = vec![
            (1, Buf::Value(v)),
            (2, Buf::Weight(kernels)),
            (3, Buf::Weight(bias)),
            (4, Buf::UnusedWritable),
            (5, Buf::Unused),
            (6, Buf::Unused),
            (7, Buf::Unused),
            (8, Buf::Unused),
            (9, Buf::Value(m)),
        ];
        let mut workgroups = fold(pixel_tiles);
        workgroups[2] = (36 * cout_tiles * splits) as u32;
        let flops = 2.0 * (36 * tiles * g.cin * g.cout) as f64;
        let mut step = Step::new(name, params, overrides, bindings, workgroups, flops);
        step.serial_steps = chunk.div_ceil(CONV_KT) as u64;
        self.push(step);

        let params = WinogradOutputParams {
            out_h: g.out_h as u32,
            out_w: g.out_w as u32,
            cout: g.cout as u32,
            tiles_h: tiles_h as u32,
            tiles_w: tiles_w as u32,
            splits: splits as u32,
        };
        let bindings = vec![
            (7, Buf::Value(m)),
            (8, Buf::Weight(bias)),
            (9, Buf::Value(y)),
        ];
        let overrides = WinogradOutputOverrides { act };
        let workgroups = fold((tiles * g.cout).div_ceil(64));
        let step = Step::new(name, params, overrides, bindings, workgroups, 0.0);
        self.push(step);
    }

    #[allow(clippy::too_many_arguments)]
    fn depthwise(
        &mut self,
        name: &str,
        x: usize,
        y: usize,
        conv: ConvId,
        g: &ConvGeometry,
        act: Activation,
        flops: f64,
    ) {
        let e = self.weights.convs[conv];
        let quads = g.cout.div_ceil(4);
        let total = g.out_h * g.out_w * quads;
        let params = DepthwiseParams {
            in_h: g.in_h as u32,
            in_w: g.in_w as u32,
            channels: g.cout as u32,
            out_h: g.out_h as u32,
            out_w: g.out_w as u32,
            pad_top: g.pad_top as u32,
            pad_left: g.pad_left as u32,
            channel_quads: quads as u32,
            total: total as u32,
        };
        let overrides = DepthwiseOverrides {
            act,
            ksize: g.kernel as u32,
            stride: g.stride as u32,
        };
        let bindings = vec![
            (1, Buf::Value(x)),
            (2, Buf::Weight(e.weight)),
            (3, Buf::Weight(e.bias)),
            (4, Buf::Value(y)),
        ];
        let workgroups = fold(total.div_ceil(64));
        let step = Step::new(name, params, overrides, bindings, workgroups, flops);
        self.push(step);
    }

    fn head(&mut self, name: &str, x: usize, y: usize, conv: ConvId, g: &ConvGeometry, flops: f64) {
        let e = self.weights.convs[conv];
        let pixels = g.out_h * g.out_w;
        let params = HeadParams {
            pixels: pixels as u32,
            cin: g.cin as u32,
            bias: self.weights.head_bias[conv],
        };
        let bindings = vec![
            (1, Buf::Value(x)),
            (2, Buf::Weight(e.head.expect("head weights"))),
            (3, Buf::Value(y)),
        ];
        let workgroups = fold(pixels.div_ceil(64));
        let step = Step::new(name, params, (), bindings, workgroups, flops);
        self.push(step);
    }

    /// Channel means of the parts `(value, pixels, channels)` (concatenated along channels),
    /// then the two FCs: returns the f32 gate value.
    fn channel_gate(
        &mut self,
        name: &str,
        parts: &[(usize, usize, usize)],
        e: super::weights::AttentionEntry,
        mid_act: Activation,
    ) -> usize {
        let c_total: usize = parts.iter().map(|p| p.2).sum();
        let full_pixels = parts.iter().map(|p| p.1).max().unwrap_or(1);
        assert!(
            e.hidden <= 65535,
            "{name}: one workgroup per hidden unit: at most 65535"
        );
        let chunks = full_pixels.div_ceil(POOL_CHUNK).max(1);
        let partial = self.new_value(format!("{name}.partial"), chunks * c_total, true);
        let gate = self.new_value(format!("{name}.gate"), c_total, true);
        let mut c_off = 0;
        for &(x, pixels, channels) in parts {
            let params = ChannelSumParams {
                pixels: pixels as u32,
                channels: channels as u32,
                c_off: c_off as u32,
                c_total: c_total as u32,
                chunk: pixels.div_ceil(chunks).max(1) as u32,
                inv_count: 1.0 / pixels as f32,
            };
            let bindings = vec![(1, Buf::Value(x)), (2, Buf::Value(partial))];
            let workgroups = [channels.div_ceil(64) as u32, chunks as u32, 1];
            let step = Step::new(name, params, (), bindings, workgroups, 0.0);
            self.push(step);
            c_off += channels;
        }
        let hidden = self.new_value(format!("{name}.hidden"), e.hidden, true);
        let params = ExciteHiddenParams {
            channels: c_total as u32,
            hidden: e.hidden as u32,
            chunks: chunks as u32,
        };
        let bindings = vec![
            (4, Buf::Value(partial)),
            (5, Buf::Weight(e.w1)),
            (6, Buf::Weight(e.b1)),
            (10, Buf::Value(hidden)),
        ];
        let overrides = ExciteOverrides { mid_act };
        let workgroups = [e.hidden as u32, 1, 1];
        let step = Step::new(name, params, overrides, bindings, workgroups, 0.0);
        self.push(step);
        let params = ExciteGateParams {
            channels: c_total as u32,
            hidden: e.hidden as u32,
            chunks: chunks as u32,
        };
        let bindings = vec![
            (7, Buf::Weight(e.w2)),
            (8, Buf::Weight(e.b2)),
            (9, Buf::Value(gate)),
            (11, Buf::Value(hidden)),
        ];
        let workgroups = fold(c_total.div_ceil(64));
        let step = Step::new(name, params, (), bindings, workgroups, 0.0);
        self.push(step);
        gate
    }

    fn scse(&mut self, name: &str, input: ValueId, scse: ScseId, out: ValueId) {
        let e = self.weights.scse[scse];
        let s = self.graph.values[input].shape;
        let pixels = s.pixels();
        let src = self.source_in_store(self.sources[&input]);
        let (parts, mode, x, skip, ca) = match src {
            Source::Plain(x) => (vec![(x, pixels, s.c)], InputMode::Plain, x, Buf::Unused, 0),
            Source::UpConcat {
                a,
                ca,
                skip,
                gates: None,
            } => {
                let mut parts = vec![(a, pixels / 4, ca)];
                if let Some(k) = skip {
                    parts.push((k, pixels, s.c - ca));
                }
                let skip = skip.map_or(Buf::Unused, Buf::Value);
                (parts, InputMode::UpConcat, a, skip, ca)
            }
            other => panic!("GPU lowering: {name} cannot read {other:?}"),
        };
        let cgate = self.channel_gate(name, &parts, e, Activation::Relu);
        let sgate = self.new_value(format!("{name}.sgate"), pixels, true);
        let params = SpatialGateParams {
            h: s.h as u32,
            w: s.w as u32,
            cin: s.c as u32,
            ca: ca as u32,
            bias: self.weights.sse_bias[scse],
        };
        let bindings = vec![
            (1, Buf::Value(x)),
            (2, skip),
            (3, Buf::Weight(e.sse.expect("scSE spatial weights"))),
            (4, Buf::Value(sgate)),
        ];
        let overrides = SpatialGateOverrides { input_mode: mode };
        let workgroups = fold(pixels.div_ceil(64));
        let step = Step::new(name, params, overrides, bindings, workgroups, 0.0);
        self.push(step);
        if let Source::UpConcat { a, ca, skip, .. } = src {
            // Read in place by the next conv (mode 3): nothing written.
            let gates = Some((cgate, sgate));
            let src = Source::UpConcat { a, ca, skip, gates };
            self.sources.insert(out, src);
            return;
        }
        let y = self.materialize(out);
        let params = ScseApplyParams {
            pixels: pixels as u32,
            channels: s.c as u32,
        };
        let bindings = vec![
            (6, Buf::Value(x)),
            (7, Buf::Value(cgate)),
            (8, Buf::Value(sgate)),
            (9, Buf::Value(y)),
        ];
        let workgroups = fold(s.len().div_ceil(64));
        let step = Step::new(name, params, (), bindings, workgroups, 0.0);
        self.push(step);
    }

    #[allow(clippy::too_many_arguments)]
    fn align(
        &mut self,
        name: &str,
        [fq, q, k, fp]: [usize; 4],
        y: usize,
        n: usize,
        cin: usize,
        hidden: usize,
        flops: f64,
    ) {
        assert!(
            hidden <= MAX_ALIGN_HIDDEN && cin <= MAX_ALIGN_CHANNELS,
            "{name}: alignment sizes beyond the kernel's capacity"
        );
        let shared = [k, fp].map(|v| self.values[v].copies == 1 && self.batch > 1);
        assert_eq!(
            shared[0], shared[1],
            "{name}: keys and features shared alike"
        );
        let params = AlignParams {
            n: n as u32,
            cin: cin as u32,
            hidden: hidden as u32,
            shared_keys: shared[0] as u32,
        };
        let bindings = vec![
            (1, Buf::Value(fq)),
            (2, Buf::Value(q)),
            (3, Buf::Value(k)),
            (4, Buf::Value(fp)),
            (5, Buf::Value(y)),
        ];
        let rows = align_rows(n);
        let workgroups = fold(n.div_ceil(rows));
        let overrides = AlignOverrides { rows: rows as u32 };
        let step = Step::new(name, params, overrides, bindings, workgroups, flops);
        self.push(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_k_fills_two_waves_or_keeps_long_parts() {
        // dec0.conv1 at 256: 4 pixel tiles x 4 channel tiles, 9 * 1216 terms.
        let (splits, chunk) = split_k(16, 9 * 1216);
        assert!(16 * splits >= MIN_WORKGROUPS, "{splits}");
        assert!(splits * chunk >= 9 * 1216 && (splits - 1) * chunk < 9 * 1216);
        assert_eq!(chunk % CONV_KT, 0);
        // Alignment rows per workgroup: 4 or 2 only while two waves remain.
        assert_eq!(align_rows(64), 1);
        assert_eq!(align_rows(561), 2);
        assert_eq!(align_rows(1073), 4);
        assert!((1..5000).all(|n| align_rows(n) == 1 || n.div_ceil(align_rows(n)) >= 264));
        // Enough tiles already, or too short a reduction: no split.
        assert_eq!(split_k(300, 10_000), (1, 10_000));
        assert_eq!(split_k(4, 100), (1, 100));
        // Every part keeps at least MIN_SPLIT_STEPS steps.
        for tiles in 1..300 {
            for k in [16, 127, 128, 129, 1000, 4096, 11_000] {
                let (s, c) = split_k(tiles, k);
                if s > 1 {
                    assert!(c / CONV_KT >= MIN_SPLIT_STEPS && s * c >= k && (s - 1) * c < k);
                }
            }
        }
    }
}

//! A tiny static graph: ops over NHWC float32 values whose shapes are inferred when the
//! graph is built, and the liveness-based memory plans the backends place values with.
//!
//! The graph is backend-neutral and depends on nothing else of the crate: an op names its
//! parameters by index into `WeightTables`, and each backend (`Backend`) packs those weights
//! its own way.

mod backend;
mod params;
mod plan;

pub use backend::{
    Backend, CompiledGraph, DispatchInfo, DispatchTime, NodeTimes, Outputs, RunPhases,
};
pub use params::{
    Activation, ConvGeometry, ConvId, ConvWeights, Precision, ScseId, ScseWeights, SqueezeExciteId,
    SqueezeExciteWeights, WeightTables,
};
pub use plan::{assign_slots, graph_lifetimes, overlaps, Lifetime, Liveness, MemoryPlan};

params::index_type!(
    /// Index of a value in its graph's `values`.
    ValueId
);

/// Shape of one NHWC activation (batch 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Shape {
    pub fn new(h: usize, w: usize, c: usize) -> Self {
        Shape { h, w, c }
    }
    pub fn pixels(&self) -> usize {
        self.h * self.w
    }
    pub fn len(&self) -> usize {
        self.h * self.w * self.c
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Dense or depthwise convolution with fused bias, activation and optional residual add.
    Conv {
        input: ValueId,
        conv: ConvId,
        geometry: ConvGeometry,
        depthwise: bool,
        act: Activation,
        residual: Option<ValueId>,
    },
    /// EfficientNet squeeze-excite: channel gate from the spatial mean.
    SqueezeExcite { input: ValueId, se: SqueezeExciteId },
    /// Soft alignment of query features to prompt features, output `concat(fq, aligned)`.
    Align {
        fq: ValueId,
        q: ValueId,
        k: ValueId,
        fp: ValueId,
    },
    /// Nearest x2 upsample, then channel concat with an optional skip.
    UpsampleConcat {
        input: ValueId,
        skip: Option<ValueId>,
    },
    /// Concurrent spatial and channel squeeze-excite (decoder attention).
    Scse { input: ValueId, scse: ScseId },
}

impl Op {
    pub fn inputs(&self) -> Vec<ValueId> {
        match *self {
            Op::Conv {
                input, residual, ..
            } => std::iter::once(input).chain(residual).collect(),
            Op::SqueezeExcite { input, .. } | Op::Scse { input, .. } => vec![input],
            Op::Align { fq, q, k, fp } => vec![fq, q, k, fp],
            Op::UpsampleConcat { input, skip } => std::iter::once(input).chain(skip).collect(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Op::Conv {
                depthwise: true, ..
            } => "depthwise",
            Op::Conv { geometry, .. } if geometry.kernel == 1 => "conv1x1",
            Op::Conv { .. } => "conv",
            Op::SqueezeExcite { .. } => "squeeze_excite",
            Op::Align { .. } => "align",
            Op::UpsampleConcat { .. } => "upsample_concat",
            Op::Scse { .. } => "scse",
        }
    }

    /// Multiply-accumulates of this op (for summaries and profiles).
    pub fn macs(&self, out: Shape, values: &[Value]) -> u64 {
        match self {
            Op::Conv {
                geometry,
                depthwise,
                ..
            } => {
                let per_out = geometry.kernel * geometry.kernel;
                let reduce = if *depthwise { 1 } else { geometry.cin };
                (out.len() * per_out * reduce) as u64
            }
            Op::Align { q, fp, .. } => {
                let n = values[*q].shape.pixels() as u64;
                let hidden = values[*q].shape.c as u64;
                let cin = values[*fp].shape.c as u64;
                n * n * (hidden + cin)
            }
            _ => out.len() as u64,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub name: String,
    pub shape: Shape,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub output: ValueId,
    /// Numerically sensitive: a backend with reduced-precision storage (the GPU's f16)
    /// computes and stores this node in float32 (see `GraphBuilder::set_full_precision`).
    pub full_precision: bool,
}

/// A built graph: values, nodes in execution order, named inputs and outputs.
#[derive(Clone, Debug)]
pub struct Graph {
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
}

impl Graph {
    pub fn value_named(&self, name: &str) -> Option<ValueId> {
        self.values.iter().position(|v| v.name == name).map(ValueId)
    }

    /// Number of leading nodes that read none of `values`. The first node reading one
    /// ends the prefix, so nothing in it depends on them even indirectly: the prefix can
    /// run before those values are known (the query encoder, before the prompt's features).
    pub fn prefix_independent_of(&self, values: &[ValueId]) -> usize {
        self.nodes
            .iter()
            .position(|n| n.op.inputs().iter().any(|v| values.contains(v)))
            .unwrap_or(self.nodes.len())
    }

    pub fn total_macs(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.op.macs(self.values[n.output].shape, &self.values))
            .sum()
    }

    /// One line per op kind: count and multiply-accumulates.
    pub fn summary(&self) -> Vec<(String, usize, u64)> {
        let mut rows: Vec<(String, usize, u64)> = Vec::new();
        for node in &self.nodes {
            let macs = node.op.macs(self.values[node.output].shape, &self.values);
            match rows.iter_mut().find(|r| r.0 == node.op.kind()) {
                Some(row) => {
                    row.1 += 1;
                    row.2 += macs;
                }
                None => rows.push((node.op.kind().to_string(), 1, macs)),
            }
        }
        rows
    }
}

/// Builds a graph op by op, inferring every output shape.
#[derive(Default)]
pub struct GraphBuilder {
    values: Vec<Value>,
    nodes: Vec<Node>,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
    full_precision: bool,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn shape(&self, v: ValueId) -> Shape {
        self.values[v].shape
    }

    pub fn value_named(&self, name: &str) -> Option<ValueId> {
        self.values.iter().position(|v| v.name == name).map(ValueId)
    }

    fn value(&mut self, name: &str, shape: Shape) -> ValueId {
        self.values.push(Value {
            name: name.to_string(),
            shape,
        });
        ValueId(self.values.len() - 1)
    }

    fn node(&mut self, name: &str, op: Op, shape: Shape) -> ValueId {
        let output = self.value(name, shape);
        self.nodes.push(Node {
            name: name.to_string(),
            op,
            output,
            full_precision: self.full_precision,
        });
        output
    }

    /// Marks the nodes added from now on (until the next call) as numerically sensitive:
    /// float32 even where a backend stores the rest in f16.
    pub fn set_full_precision(&mut self, on: bool) {
        self.full_precision = on;
    }

    pub fn input(&mut self, name: &str, shape: Shape) -> ValueId {
        let v = self.value(name, shape);
        self.inputs.push(v);
        v
    }

    /// Marks a value as a graph output: it stays alive until the end of the run.
    pub fn output(&mut self, v: ValueId) {
        if !self.outputs.contains(&v) {
            self.outputs.push(v);
        }
    }

    /// Convolution; `pad_after` is the bottom/right padding (may differ from `pad_before`).
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        name: &str,
        input: ValueId,
        conv: ConvId,
        (cout, kernel, stride): (usize, usize, usize),
        (pad_before, pad_after): (usize, usize),
        depthwise: bool,
        act: Activation,
        residual: Option<ValueId>,
    ) -> ValueId {
        let s = self.shape(input);
        assert!(
            s.h + pad_before + pad_after >= kernel && s.w + pad_before + pad_after >= kernel,
            "{name}: padded input {}x{} smaller than the {kernel}x{kernel} kernel",
            s.h,
            s.w
        );
        let out_h = (s.h + pad_before + pad_after - kernel) / stride + 1;
        let out_w = (s.w + pad_before + pad_after - kernel) / stride + 1;
        let geometry = ConvGeometry {
            in_h: s.h,
            in_w: s.w,
            cin: s.c,
            cout,
            kernel,
            stride,
            pad_top: pad_before,
            pad_left: pad_before,
            out_h,
            out_w,
        };
        let out = Shape::new(out_h, out_w, cout);
        if let Some(r) = residual {
            assert_eq!(self.shape(r), out, "residual shape of {name}");
        }
        let op = Op::Conv {
            input,
            conv,
            geometry,
            depthwise,
            act,
            residual,
        };
        self.node(name, op, out)
    }

    pub fn squeeze_excite(&mut self, name: &str, input: ValueId, se: SqueezeExciteId) -> ValueId {
        let shape = self.shape(input);
        self.node(name, Op::SqueezeExcite { input, se }, shape)
    }

    pub fn align(
        &mut self,
        name: &str,
        fq: ValueId,
        q: ValueId,
        k: ValueId,
        fp: ValueId,
    ) -> ValueId {
        let s = self.shape(fq);
        assert_eq!(
            s,
            self.shape(fp),
            "{name}: query and prompt features differ"
        );
        assert_eq!(self.shape(q), self.shape(k), "{name}: projections differ");
        self.node(
            name,
            Op::Align { fq, q, k, fp },
            Shape::new(s.h, s.w, 2 * s.c),
        )
    }

    pub fn upsample_concat(
        &mut self,
        name: &str,
        input: ValueId,
        skip: Option<ValueId>,
    ) -> ValueId {
        let s = self.shape(input);
        let (h, w) = (2 * s.h, 2 * s.w);
        let cs = match skip {
            Some(k) => {
                let ks = self.shape(k);
                assert_eq!((ks.h, ks.w), (h, w), "{name}: skip size");
                ks.c
            }
            None => 0,
        };
        self.node(
            name,
            Op::UpsampleConcat { input, skip },
            Shape::new(h, w, s.c + cs),
        )
    }

    pub fn scse(&mut self, name: &str, input: ValueId, scse: ScseId) -> ValueId {
        let shape = self.shape(input);
        self.node(name, Op::Scse { input, scse }, shape)
    }

    pub fn finish(self) -> Graph {
        Graph {
            values: self.values,
            nodes: self.nodes,
            inputs: self.inputs,
            outputs: self.outputs,
        }
    }
}

//! Model weights in the layouts the WGSL kernels read, uploaded once per engine and shared
//! by the prompt and query programs.

use super::device::GpuContext;
use crate::graph::{Precision, WeightTables};

/// One weight tensor: stored in the kernel's storage type (`store`: f32 or f16) or always f32
/// (biases and the small attention matrices, read by f32-only kernels).
pub struct WeightTensor {
    pub data: Vec<f32>,
    pub in_store_type: bool,
}

/// Indices into `WeightTable::tensors`.
#[derive(Clone, Copy, Debug)]
pub struct ConvEntry {
    pub weight: usize,
    pub bias: usize,
    /// f32 weights for the head kernel (1x1 convs to one channel only).
    pub head: Option<usize>,
    /// Dense 3x3 convs: the Winograd F(4x4, 3x3) kernels `G g G^T`, [36][cin][cout / 4].
    pub winograd: Option<usize>,
}

#[derive(Clone, Copy, Debug)]
pub struct AttentionEntry {
    pub w1: usize,
    pub b1: usize,
    pub w2: usize,
    pub b2: usize,
    /// scSE only: the spatial branch's weights.
    pub sse: Option<usize>,
    pub hidden: usize,
}

pub struct WeightTable {
    pub tensors: Vec<WeightTensor>,
    pub convs: Vec<ConvEntry>,
    pub se: Vec<AttentionEntry>,
    pub scse: Vec<AttentionEntry>,
    /// Scalar parameters passed in uniforms: each conv's bias when it has one output channel
    /// (the head) and each scSE's spatial bias.
    pub head_bias: Vec<f32>,
    pub sse_bias: Vec<f32>,
}

impl WeightTable {
    pub fn new(w: &WeightTables) -> WeightTable {
        let mut t = WeightTable {
            tensors: Vec::new(),
            convs: Vec::new(),
            se: Vec::new(),
            scse: Vec::new(),
            head_bias: Vec::new(),
            sse_bias: Vec::new(),
        };
        for c in &w.convs {
            let data = if c.depthwise {
                depthwise_taps_major(&c.weight, c.cout, c.kernel)
            } else {
                dense_k_major(&c.weight, c.cout, c.cin, c.kernel)
            };
            let weight = t.push(data, true);
            let bias = t.push(c.bias.clone(), false);
            // A 1x1 conv to one channel may run as the head kernel, which reads f32 weights.
            let single = !c.depthwise && c.cout == 1 && c.kernel == 1;
            let head = single.then(|| t.push(c.weight.clone(), false));
            let dense_3x3 = !c.depthwise && c.kernel == 3;
            let winograd =
                dense_3x3.then(|| t.push(winograd_kernels(&c.weight, c.cout, c.cin), true));
            t.convs.push(ConvEntry {
                weight,
                bias,
                head,
                winograd,
            });
            t.head_bias.push(c.bias.first().copied().unwrap_or(0.0));
        }
        for s in &w.se {
            let e = AttentionEntry {
                w1: t.push(s.reduce_w.clone(), false),
                b1: t.push(s.reduce_b.clone(), false),
                w2: t.push(transpose(&s.expand_w, s.channels, s.squeeze), false),
                b2: t.push(s.expand_b.clone(), false),
                sse: None,
                hidden: s.squeeze,
            };
            t.se.push(e);
        }
        for s in &w.scse {
            let e = AttentionEntry {
                w1: t.push(s.cse1_w.clone(), false),
                b1: t.push(s.cse1_b.clone(), false),
                w2: t.push(transpose(&s.cse3_w, s.channels, s.hidden), false),
                b2: t.push(s.cse3_b.clone(), false),
                sse: Some(t.push(s.sse_w.clone(), false)),
                hidden: s.hidden,
            };
            t.scse.push(e);
            t.sse_bias.push(s.sse_b);
        }
        t
    }

    fn push(&mut self, data: Vec<f32>, in_store_type: bool) -> usize {
        self.tensors.push(WeightTensor {
            data,
            in_store_type,
        });
        self.tensors.len() - 1
    }

    /// Uploads every tensor; f16 storage converts the `store` ones once, here.
    pub fn upload(&self, ctx: &GpuContext) -> Vec<wgpu::Buffer> {
        self.tensors
            .iter()
            .map(|t| {
                let bytes = if t.in_store_type && ctx.precision == Precision::F16 {
                    f16_bytes(&t.data)
                } else {
                    bytemuck::cast_slice(&t.data).to_vec()
                };
                storage_buffer_init(ctx, "weights", &bytes)
            })
            .collect()
    }
}

impl WeightTable {
    /// Under f16 storage, an f32 copy of every tensor kept in the storage type (what the
    /// full-precision steps read); nothing under f32.
    pub fn upload_f32_copies(&self, ctx: &GpuContext) -> Vec<Option<wgpu::Buffer>> {
        self.tensors
            .iter()
            .map(|t| {
                let copy = t.in_store_type && ctx.precision == Precision::F16;
                copy.then(|| storage_buffer_init(ctx, "f32 weights", bytemuck::cast_slice(&t.data)))
            })
            .collect()
    }
}

/// (cout, cin, k, k) -> [ky][kx][ci][cout rounded up to 4], zero padded: one row of vec4s per
/// reduction index, as the implicit GEMM reads it.
pub fn dense_k_major(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let cp = cout.next_multiple_of(4);
    let mut out = vec![0.0; k * k * cin * cp];
    for co in 0..cout {
        for ci in 0..cin {
            for tap in 0..k * k {
                out[(tap * cin + ci) * cp + co] = w[(co * cin + ci) * k * k + tap];
            }
        }
    }
    out
}

/// (c, 1, k, k) -> [ky][kx][c].
pub fn depthwise_taps_major(w: &[f32], c: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; k * k * c];
    for ch in 0..c {
        for tap in 0..k * k {
            out[tap * c + ch] = w[ch * k * k + tap];
        }
    }
    out
}

/// F(4x4, 3x3)'s kernel transform G (6x3), for 0, +-1, +-2 and infinity.
const WINOGRAD_G: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// (cout, cin, 3, 3) -> `G g G^T` per (co, ci) in float64, rounded once, laid out
/// [xi = 6 i + j][ci][cout rounded up to 4] (36 GEMM weight matrices, as conv.wgsl reads one).
pub fn winograd_kernels(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let cp = cout.next_multiple_of(4);
    let mut out = vec![0.0; 36 * cin * cp];
    let g = &WINOGRAD_G;
    for co in 0..cout {
        for ci in 0..cin {
            let k = |ky: usize, kx: usize| f64::from(w[((co * cin + ci) * 3 + ky) * 3 + kx]);
            for i in 0..6 {
                for j in 0..6 {
                    let mut u = 0.0;
                    for ky in 0..3 {
                        for kx in 0..3 {
                            u += g[i][ky] * k(ky, kx) * g[j][kx];
                        }
                    }
                    out[((i * 6 + j) * cin + ci) * cp + co] = u as f32;
                }
            }
        }
    }
    out
}

pub fn f16_bytes(data: &[f32]) -> Vec<u8> {
    data.iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

/// A storage buffer holding `bytes` (padded to 16 bytes: vec4 views and empty tensors).
pub fn storage_buffer_init(ctx: &GpuContext, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    let size = (bytes.len() as u64).max(16).next_multiple_of(16);
    let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    if !bytes.is_empty() {
        let mut padded = bytes.to_vec();
        padded.resize(padded.len().next_multiple_of(4), 0);
        ctx.queue.write_buffer(&buffer, 0, &padded);
    }
    buffer
}

/// `rows x cols` (row-major) as `cols x rows`: the excite's second FC is read hidden-major so
/// that adjacent invocations (channels) read adjacent weights.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(m.len(), rows * cols, "FC weight shape");
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| m[r * cols + c]))
        .collect()
}

//! MetaUAS parameters under their official checkpoint names, with BatchNorm folded into the
//! preceding convolution at load time (in float64, rounded once to float32).

use std::collections::HashMap;

use super::arch::{
    efficientnet_b4_blocks, se_squeeze, ALIGN_CHANNELS, DECODER_BLOCKS, DECODER_BN_EPS,
    ENCODER_BN_EPS,
};
use crate::error::Result;
use crate::graph::{ConvId, ScseId, SqueezeExciteId, WeightTables};

/// Anything that yields float32 tensors by official entry name and checks their shape.
pub trait TensorSource {
    fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

impl TensorSource for crate::io::weights::WeightFile {
    /// Also refuses NaN and infinities: a damaged file must not turn into a map of NaNs.
    fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let data = crate::io::weights::WeightFile::tensor_f32(self, name, shape)?;
        match data.iter().position(|v| !v.is_finite()) {
            None => Ok(data),
            Some(i) => Err(crate::Error::at(
                self.path(),
                format!("entry `{name}` holds a non-finite value ({}) at element {i}: the file is damaged", data[i]),
            )),
        }
    }
}

pub use crate::graph::{ConvWeights, ScseWeights, SqueezeExciteWeights};

/// Every parameter the forward pass uses, in the tables graph ops index, and where each
/// official name is in them.
#[derive(Clone, Debug, Default)]
pub struct ModelWeights {
    pub tables: WeightTables,
    conv_index: HashMap<String, usize>,
    se_index: HashMap<String, usize>,
    scse_index: HashMap<String, usize>,
}

impl ModelWeights {
    pub fn load(src: &dyn TensorSource) -> Result<ModelWeights> {
        let mut m = ModelWeights::default();
        m.load_encoder(src)?;
        for (i, cin) in ALIGN_CHANNELS.into_iter().enumerate() {
            let name = format!("alignment.{i}.alignment_layer.dimensionality_reduction");
            m.push_conv(conv_with_bias(src, &name, cin / 2, cin, 1)?);
        }
        m.load_decoder(src)?;
        let head_cin = DECODER_BLOCKS[DECODER_BLOCKS.len() - 1].cout;
        m.push_conv(conv_with_bias(src, "mask_head", 1, head_cin, 1)?);
        Ok(m)
    }

    pub fn conv_id(&self, name: &str) -> ConvId {
        ConvId(self.conv_index[name])
    }
    pub fn se_id(&self, name: &str) -> SqueezeExciteId {
        SqueezeExciteId(self.se_index[name])
    }
    pub fn scse_id(&self, name: &str) -> ScseId {
        ScseId(self.scse_index[name])
    }

    /// Parameters actually used (after folding BN: weights + biases).
    pub fn parameter_count(&self) -> usize {
        let conv: usize = self
            .tables
            .convs
            .iter()
            .map(|c| c.weight.len() + c.bias.len())
            .sum();
        let se: usize = self
            .tables
            .se
            .iter()
            .map(|s| s.reduce_w.len() + s.reduce_b.len() + s.expand_w.len() + s.expand_b.len())
            .sum();
        let scse: usize = self
            .tables
            .scse
            .iter()
            .map(|s| {
                s.cse1_w.len()
                    + s.cse1_b.len()
                    + s.cse3_w.len()
                    + s.cse3_b.len()
                    + s.sse_w.len()
                    + 1
            })
            .sum();
        conv + se + scse
    }

    /// A 64-bit fingerprint of every parameter the forward uses (after BN folding) and of
    /// the names and shapes: the same for a checkpoint and its converted safetensors, different
    /// for any changed value. Banks of prompt features record it to refuse other weights.
    pub fn fingerprint(&self) -> u64 {
        let mut h = ParamHasher::default();
        for c in &self.tables.convs {
            h.text(&c.name);
            h.words(&[c.cout, c.cin, c.kernel, usize::from(c.depthwise)]);
            h.floats(&c.weight);
            h.floats(&c.bias);
        }
        for s in &self.tables.se {
            h.words(&[s.channels, s.squeeze]);
            for t in [&s.reduce_w, &s.reduce_b, &s.expand_w, &s.expand_b] {
                h.floats(t);
            }
        }
        for s in &self.tables.scse {
            h.words(&[s.channels, s.hidden]);
            for t in [&s.cse1_w, &s.cse1_b, &s.cse3_w, &s.cse3_b, &s.sse_w] {
                h.floats(t);
            }
            h.floats(&[s.sse_b]);
        }
        h.finish()
    }

    /// Drops the conv weight and bias arrays, keeping names, shapes and indices (all a
    /// graph build needs) once a backend has packed its own copy.
    pub fn release_conv_data(&mut self) {
        for c in &mut self.tables.convs {
            c.weight = Vec::new();
            c.bias = Vec::new();
        }
    }

    fn push_conv(&mut self, c: ConvWeights) {
        self.conv_index
            .insert(c.name.clone(), self.tables.convs.len());
        self.tables.convs.push(c);
    }

    fn load_encoder(&mut self, src: &dyn TensorSource) -> Result<()> {
        let e = ENCODER_BN_EPS;
        self.push_conv(conv_bn(
            src,
            "encoder._conv_stem",
            "encoder._bn0",
            (48, 3, 3),
            false,
            e,
        )?);
        for (i, b) in efficientnet_b4_blocks().iter().enumerate() {
            let p = format!("encoder._blocks.{i}");
            let mid = b.cin * b.expand;
            if b.expand != 1 {
                let c = conv_bn(
                    src,
                    &format!("{p}._expand_conv"),
                    &format!("{p}._bn0"),
                    (mid, b.cin, 1),
                    false,
                    e,
                )?;
                self.push_conv(c);
            }
            let dw = conv_bn(
                src,
                &format!("{p}._depthwise_conv"),
                &format!("{p}._bn1"),
                (mid, 1, b.kernel),
                true,
                e,
            )?;
            self.push_conv(dw);
            let se = squeeze_excite(src, &p, mid, se_squeeze(b.cin))?;
            self.se_index.insert(p.clone(), self.tables.se.len());
            self.tables.se.push(se);
            let proj = conv_bn(
                src,
                &format!("{p}._project_conv"),
                &format!("{p}._bn2"),
                (b.cout, mid, 1),
                false,
                e,
            )?;
            self.push_conv(proj);
        }
        Ok(())
    }

    fn load_decoder(&mut self, src: &dyn TensorSource) -> Result<()> {
        let e = DECODER_BN_EPS;
        for (i, blk) in DECODER_BLOCKS.iter().enumerate() {
            let p = format!("decoder.blocks.{i}");
            let cin = blk.cin + blk.skip;
            if blk.skip > 0 {
                self.push_scse(src, &format!("{p}.attention1"), cin)?;
            }
            let c1 = conv_bn(
                src,
                &format!("{p}.conv1.0"),
                &format!("{p}.conv1.1"),
                (blk.cout, cin, 3),
                false,
                e,
            )?;
            self.push_conv(c1);
            let c2 = conv_bn(
                src,
                &format!("{p}.conv2.0"),
                &format!("{p}.conv2.1"),
                (blk.cout, blk.cout, 3),
                false,
                e,
            )?;
            self.push_conv(c2);
            if blk.skip > 0 {
                self.push_scse(src, &format!("{p}.attention2"), blk.cout)?;
            }
        }
        Ok(())
    }

    fn push_scse(&mut self, src: &dyn TensorSource, prefix: &str, c: usize) -> Result<()> {
        let h = c / 16;
        let a = format!("{prefix}.attention");
        let s = ScseWeights {
            channels: c,
            hidden: h,
            cse1_w: src.tensor_f32(&format!("{a}.cSE.1.weight"), &[h, c, 1, 1])?,
            cse1_b: src.tensor_f32(&format!("{a}.cSE.1.bias"), &[h])?,
            cse3_w: src.tensor_f32(&format!("{a}.cSE.3.weight"), &[c, h, 1, 1])?,
            cse3_b: src.tensor_f32(&format!("{a}.cSE.3.bias"), &[c])?,
            sse_w: src.tensor_f32(&format!("{a}.sSE.0.weight"), &[1, c, 1, 1])?,
            sse_b: src.tensor_f32(&format!("{a}.sSE.0.bias"), &[1])?[0],
        };
        self.scse_index
            .insert(prefix.to_string(), self.tables.scse.len());
        self.tables.scse.push(s);
        Ok(())
    }
}

fn squeeze_excite(
    src: &dyn TensorSource,
    p: &str,
    c: usize,
    sq: usize,
) -> Result<SqueezeExciteWeights> {
    Ok(SqueezeExciteWeights {
        channels: c,
        squeeze: sq,
        reduce_w: src.tensor_f32(&format!("{p}._se_reduce.weight"), &[sq, c, 1, 1])?,
        reduce_b: src.tensor_f32(&format!("{p}._se_reduce.bias"), &[sq])?,
        expand_w: src.tensor_f32(&format!("{p}._se_expand.weight"), &[c, sq, 1, 1])?,
        expand_b: src.tensor_f32(&format!("{p}._se_expand.bias"), &[c])?,
    })
}

fn conv_with_bias(
    src: &dyn TensorSource,
    name: &str,
    cout: usize,
    cin: usize,
    k: usize,
) -> Result<ConvWeights> {
    Ok(ConvWeights {
        name: name.to_string(),
        cout,
        cin,
        kernel: k,
        depthwise: false,
        weight: src.tensor_f32(&format!("{name}.weight"), &[cout, cin, k, k])?,
        bias: src.tensor_f32(&format!("{name}.bias"), &[cout])?,
    })
}

/// Loads a bias-free conv and folds the BatchNorm after it:
/// `w' = w * g / sqrt(var + eps)`, `b' = beta - mean * g / sqrt(var + eps)`, in float64.
fn conv_bn(
    src: &dyn TensorSource,
    conv: &str,
    bn: &str,
    (cout, cin, k): (usize, usize, usize),
    depthwise: bool,
    eps: f64,
) -> Result<ConvWeights> {
    let w = src.tensor_f32(&format!("{conv}.weight"), &[cout, cin, k, k])?;
    let gamma = src.tensor_f32(&format!("{bn}.weight"), &[cout])?;
    let beta = src.tensor_f32(&format!("{bn}.bias"), &[cout])?;
    let mean = src.tensor_f32(&format!("{bn}.running_mean"), &[cout])?;
    let var = src.tensor_f32(&format!("{bn}.running_var"), &[cout])?;
    let per_out = cin * k * k;
    let mut weight = vec![0f32; w.len()];
    let mut bias = vec![0f32; cout];
    for o in 0..cout {
        let scale = gamma[o] as f64 / (var[o] as f64 + eps).sqrt();
        for i in 0..per_out {
            weight[o * per_out + i] = (w[o * per_out + i] as f64 * scale) as f32;
        }
        bias[o] = (beta[o] as f64 - mean[o] as f64 * scale) as f32;
    }
    Ok(ConvWeights {
        name: conv.to_string(),
        cout,
        cin,
        kernel: k,
        depthwise,
        weight,
        bias,
    })
}

/// Tensors held in memory (synthetic weights for benchmarks and tests).
#[derive(Default)]
pub struct MemorySource {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl MemorySource {
    pub fn insert(&mut self, name: &str, shape: Vec<usize>, data: Vec<f32>) {
        self.tensors.insert(name.to_string(), (shape, data));
    }
}

impl TensorSource for MemorySource {
    fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.tensors.get(name) {
            None => Err(crate::Error::new(format!(
                "missing entry `{name}` (expected shape {shape:?})"
            ))),
            Some((s, _)) if s.as_slice() != shape => Err(crate::Error::new(format!(
                "entry `{name}` has shape {s:?}, expected {shape:?}"
            ))),
            Some((_, d)) => Ok(d.clone()),
        }
    }
}

/// Word-at-a-time 64-bit hash (multiply-xorshift mixing): ~20 ms over the whole model, where
/// a byte-wise FNV would take several times that on every load.
#[derive(Default)]
struct ParamHasher {
    state: u64,
    count: u64,
}

impl ParamHasher {
    fn word(&mut self, w: u64) {
        let z = (self.state ^ w).wrapping_add(0x9E37_79B9_7F4A_7C15);
        let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        self.state = z ^ (z >> 31);
        self.count += 1;
    }
    fn words(&mut self, ws: &[usize]) {
        for &w in ws {
            self.word(w as u64);
        }
    }
    fn floats(&mut self, xs: &[f32]) {
        self.word(xs.len() as u64);
        for pair in xs.chunks(2) {
            let lo = u64::from(pair[0].to_bits());
            let hi = pair.get(1).map_or(0, |v| u64::from(v.to_bits()));
            self.word(lo | hi << 32);
        }
    }
    fn text(&mut self, s: &str) {
        self.word(s.len() as u64);
        for chunk in s.as_bytes().chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.word(u64::from_le_bytes(b));
        }
    }
    fn finish(&self) -> u64 {
        self.state ^ self.count.rotate_left(32)
    }
}

//! Taps: the named intermediate tensors a conformance user compares layer by layer with
//! another engine. Each is named after the PyTorch module (of the authors' model, as in
//! `tools/reference/metauas_ref.py`) whose forward output it is, prefixed with `prompt.` or
//! `query.` where the module runs once per image (the shared encoder, the projections).
//! Tensors are float32 in PyTorch's NCHW layout with N = 1.

use super::arch::{DECODER_BLOCKS, FEATURE_BLOCKS};
use crate::graph::Shape;

/// One tap: its bundle name, the module that produces it, and the graph value holding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapSpec {
    /// The tensor's name in a bundle (also its file stem): `query.encoder._blocks.5`.
    pub name: String,
    /// The PyTorch module path whose forward output this is (`encoder._conv_stem:input`
    /// for the pre-processed image, which is that module's input; `sigmoid(mask_head)` for
    /// the map, which `MetaUAS.forward` computes outside any module).
    pub module: String,
    /// Which call of a module run for both images: `prompt` or `query`; `None` otherwise.
    pub call: Option<&'static str>,
    /// The value's name in our graphs (`None` for the pre-processed input, made on the host).
    pub(crate) value: Option<String>,
}

/// A captured tap: float32, NCHW (`shape` is `[1, C, H, W]`).
#[derive(Clone, Debug, PartialEq)]
pub struct TapTensor {
    pub name: String,
    pub module: String,
    pub call: Option<&'static str>,
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

impl TapTensor {
    /// The tensor of `spec` from `nhwc` data of `shape`, transposed to NCHW.
    pub(crate) fn from_nhwc(spec: &TapSpec, shape: Shape, nhwc: &[f32]) -> TapTensor {
        TapTensor {
            name: spec.name.clone(),
            module: spec.module.clone(),
            call: spec.call,
            shape: [1, shape.c, shape.h, shape.w],
            data: nhwc_to_nchw(nhwc, shape),
        }
    }
}

/// `data` (H x W x C) as C x H x W.
pub fn nhwc_to_nchw(data: &[f32], shape: Shape) -> Vec<f32> {
    let (h, w, c) = (shape.h, shape.w, shape.c);
    debug_assert_eq!(data.len(), h * w * c);
    let mut out = vec![0.0; data.len()];
    for (pixel, values) in data.chunks_exact(c).enumerate() {
        for (ch, &v) in values.iter().enumerate() {
            out[ch * h * w + pixel] = v;
        }
    }
    out
}

fn spec(name: String, module: String, call: Option<&'static str>, value: &str) -> TapSpec {
    TapSpec {
        name,
        module,
        call,
        value: (!value.is_empty()).then(|| value.to_string()),
    }
}

/// The encoder's taps for one image, with `call` "prompt" or "query": the pre-processed
/// input, then f1 (the stem's swish) and the outputs of the blocks that end stages 2-5.
fn encoder_specs(call: &'static str, value_prefix: &str) -> Vec<TapSpec> {
    let mut specs = vec![
        spec(
            format!("{call}.input"),
            "encoder._conv_stem:input".into(),
            Some(call),
            "",
        ),
        spec(
            format!("{call}.encoder._swish"),
            "encoder._swish".into(),
            Some(call),
            &format!("{value_prefix}f1"),
        ),
    ];
    for (level, block) in FEATURE_BLOCKS.iter().enumerate() {
        let module = format!("encoder._blocks.{block}");
        let value = format!("{value_prefix}f{}", level + 2);
        specs.push(spec(format!("{call}.{module}"), module, Some(call), &value));
    }
    specs
}

fn projection_module(level: usize) -> String {
    format!("alignment.{level}.alignment_layer.dimensionality_reduction")
}

/// Taps of the prompt half, in graph order: the encoder, then the key projections of
/// alignment levels 0, 1, 2 (on f5, f4, f3).
pub fn prompt_tap_specs() -> Vec<TapSpec> {
    let mut specs = encoder_specs("prompt", "prompt.");
    for level in 0..3 {
        let module = projection_module(level);
        let value = format!("prompt.k{}", 5 - level);
        specs.push(spec(
            format!("prompt.{module}"),
            module,
            Some("prompt"),
            &value,
        ));
    }
    specs
}

/// Taps of the query half, in graph order: the encoder; per alignment level its query
/// projection and output; per decoder block its conv1, conv2 (blocks with a skip) and
/// output; the head's logits; the map.
pub fn query_tap_specs() -> Vec<TapSpec> {
    let mut specs = encoder_specs("query", "");
    for level in 0..3 {
        let module = projection_module(level);
        let value = format!("q{}", 5 - level);
        specs.push(spec(
            format!("query.{module}"),
            module,
            Some("query"),
            &value,
        ));
        let module = format!("alignment.{level}");
        specs.push(spec(
            module.clone(),
            module,
            None,
            &format!("fused{}", 5 - level),
        ));
    }
    for (i, block) in DECODER_BLOCKS.iter().enumerate() {
        let p = format!("decoder.blocks.{i}");
        let has_skip = block.skip > 0;
        let mut inner = Vec::new();
        // attention1 is not a tap: both backends fold it into conv1's input reads (its
        // output never exists), and keeping it would change conv1's rounding.
        inner.push(("conv1", format!("dec{i}.conv1")));
        // Without a skip there is no attention2: conv2 is the block's output.
        if has_skip {
            inner.push(("conv2", format!("dec{i}.conv2")));
        }
        for (m, value) in inner {
            let module = format!("{p}.{m}");
            specs.push(spec(module.clone(), module, None, &value));
        }
        specs.push(spec(p.clone(), p, None, &format!("dec{i}")));
    }
    specs.push(spec("mask_head".into(), "mask_head".into(), None, "logits"));
    specs.push(spec("map".into(), "sigmoid(mask_head)".into(), None, "map"));
    specs
}

/// Every tap name in graph order: the prompt half, then the query half.
pub fn tap_names() -> Vec<String> {
    prompt_tap_specs()
        .into_iter()
        .chain(query_tap_specs())
        .map(|s| s.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_files_are_plain() {
        let names = tap_names();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert_eq!(names.len(), 9 + 12 + 14 + 2);
        for n in &names {
            assert!(n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_'));
        }
    }

    #[test]
    fn transposes_to_nchw() {
        let shape = Shape::new(2, 3, 4);
        let nhwc: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let nchw = nhwc_to_nchw(&nhwc, shape);
        for (y, x, c) in
            (0..2).flat_map(|y| (0..3).flat_map(move |x| (0..4).map(move |c| (y, x, c))))
        {
            assert_eq!(nchw[(c * 2 + y) * 3 + x], nhwc[(y * 3 + x) * 4 + c]);
        }
    }
}

//! The two MetaUAS subgraphs: the prompt half (encoder + key projections, run once per
//! prompt) and the query half (encoder, alignment against the prompt's features, decoder, head).

use super::arch::{
    efficientnet_b4_blocks, static_same_padding, ALIGN_CHANNELS, DECODER_BLOCKS, FEATURE_BLOCKS,
};
use super::taps::{prompt_tap_specs, query_tap_specs, TapSpec};
use super::weights::ModelWeights;
use crate::graph::{Activation, Graph, GraphBuilder, Shape, ValueId};

/// Names of the prompt graph's outputs, in the order `PromptFeatures` stores them:
/// per alignment level (f5, f4, f3), the raw feature and its projection.
pub const PROMPT_OUTPUTS: [&str; 6] = [
    "prompt.f5",
    "prompt.k5",
    "prompt.f4",
    "prompt.k4",
    "prompt.f3",
    "prompt.k3",
];

fn align_proj_name(level: usize) -> String {
    format!("alignment.{level}.alignment_layer.dimensionality_reduction")
}

/// The last encoder block computed in float32 under f16 storage: the one producing f3.
/// The finest alignment level is ill-conditioned: with sharp attention it amplifies an
/// error in f3 (or its projections) about 200-fold, so f16 rounding anywhere up to f3 would
/// cost the map ~3e-2 (measured on the conformance suite's sharp cases); beyond f3 f16 costs
/// the map well under 1e-2.
const LAST_FULL_PRECISION_BLOCK: usize = FEATURE_BLOCKS[1];

/// Runs the encoder, returning f1..f5 (named `{prefix}f1` .. `{prefix}f5`). The stem and the
/// blocks up to `LAST_FULL_PRECISION_BLOCK` are marked full precision.
fn encoder(g: &mut GraphBuilder, w: &ModelWeights, image: ValueId, prefix: &str) -> [ValueId; 5] {
    let swish = Activation::Swish;
    g.set_full_precision(true);
    let pad = static_same_padding(3, 2);
    let stem = w.conv_id("encoder._conv_stem");
    let mut x = g.conv(
        &format!("{prefix}f1"),
        image,
        stem,
        (48, 3, 2),
        pad,
        false,
        swish,
        None,
    );
    let mut feats = [x; 5];
    for (i, b) in efficientnet_b4_blocks().iter().enumerate() {
        let p = format!("encoder._blocks.{i}");
        let input = x;
        let mid = b.cin * b.expand;
        if b.expand != 1 {
            let id = w.conv_id(&format!("{p}._expand_conv"));
            x = g.conv(
                &format!("block{i}.expand"),
                x,
                id,
                (mid, 1, 1),
                (0, 0),
                false,
                swish,
                None,
            );
        }
        let id = w.conv_id(&format!("{p}._depthwise_conv"));
        let pad = static_same_padding(b.kernel, b.stride);
        x = g.conv(
            &format!("block{i}.dw"),
            x,
            id,
            (mid, b.kernel, b.stride),
            pad,
            true,
            swish,
            None,
        );
        x = g.squeeze_excite(&format!("block{i}.se"), x, w.se_id(&p));
        let residual = (b.stride == 1 && b.cin == b.cout).then_some(input);
        let id = w.conv_id(&format!("{p}._project_conv"));
        let name = match FEATURE_BLOCKS.iter().position(|&f| f == i) {
            Some(level) => format!("{prefix}f{}", level + 2),
            None => format!("block{i}"),
        };
        x = g.conv(
            &name,
            x,
            id,
            (b.cout, 1, 1),
            (0, 0),
            false,
            Activation::Identity,
            residual,
        );
        if let Some(level) = FEATURE_BLOCKS.iter().position(|&f| f == i) {
            feats[level + 1] = x;
        }
        if i == LAST_FULL_PRECISION_BLOCK {
            g.set_full_precision(false);
        }
    }
    feats
}

fn projection(
    g: &mut GraphBuilder,
    w: &ModelWeights,
    name: &str,
    level: usize,
    f: ValueId,
) -> ValueId {
    let id = w.conv_id(&align_proj_name(level));
    let cout = ALIGN_CHANNELS[level] / 2;
    // The alignment's logits are products of projections: kept in float32.
    g.set_full_precision(true);
    let k = g.conv(
        name,
        f,
        id,
        (cout, 1, 1),
        (0, 0),
        false,
        Activation::Identity,
        None,
    );
    g.set_full_precision(false);
    k
}

/// Prompt half: encoder on the prompt image and the key projections of f5, f4, f3. With
/// `keep_taps`, the values of `prompt_tap_specs` are outputs too, after those six.
pub fn build_prompt_graph(w: &ModelWeights, size: usize, keep_taps: bool) -> Graph {
    let mut g = GraphBuilder::new();
    let image = g.input("image", Shape::new(size, size, 3));
    let feats = encoder(&mut g, w, image, "prompt.");
    for level in 0..3 {
        let f = feats[4 - level];
        let k = projection(&mut g, w, &format!("prompt.k{}", 5 - level), level, f);
        g.output(f);
        g.output(k);
    }
    if keep_taps {
        keep(&mut g, &prompt_tap_specs());
    }
    g.finish()
}

/// Makes every tap value an output (`output` keeps the first place of one already there).
fn keep(g: &mut GraphBuilder, specs: &[TapSpec]) {
    for name in specs.iter().filter_map(|s| s.value.as_deref()) {
        let v = value_id(g, name);
        g.output(v);
    }
}

/// Shapes of the prompt features at a given input size (same order as `PROMPT_OUTPUTS`).
pub fn prompt_shapes(size: usize) -> [Shape; 6] {
    let mut shapes = [Shape::new(0, 0, 0); 6];
    for level in 0..3 {
        let side = size >> (5 - level);
        let c = ALIGN_CHANNELS[level];
        shapes[2 * level] = Shape::new(side, side, c);
        shapes[2 * level + 1] = Shape::new(side, side, c / 2);
    }
    shapes
}

/// Query half. With `keep_taps`, the values of `query_tap_specs` are outputs too, after the
/// map, and the head's logits are computed for them (a second 1x1 conv without the sigmoid).
pub fn build_query_graph(w: &ModelWeights, size: usize, keep_taps: bool) -> Graph {
    let mut g = GraphBuilder::new();
    let image = g.input("image", Shape::new(size, size, 3));
    let shapes = prompt_shapes(size);
    let prompt: Vec<ValueId> = PROMPT_OUTPUTS
        .iter()
        .zip(shapes)
        .map(|(n, s)| g.input(n, s))
        .collect();
    let feats = encoder(&mut g, w, image, "");
    let mut fused = [ValueId(0); 3];
    for level in 0..3 {
        let fq = feats[4 - level];
        let q = projection(&mut g, w, &format!("q{}", 5 - level), level, fq);
        let (fp, kp) = (prompt[2 * level], prompt[2 * level + 1]);
        // Logits, softmax and the weighted sum: float32 (the ill-conditioned step).
        g.set_full_precision(true);
        fused[level] = g.align(&format!("fused{}", 5 - level), fq, q, kp, fp);
        g.set_full_precision(false);
    }
    let skips = [
        Some(fused[1]),
        Some(fused[2]),
        Some(feats[1]),
        Some(feats[0]),
        None,
    ];
    let mut x = fused[0];
    for (i, skip) in skips.into_iter().enumerate() {
        x = decoder_block(&mut g, w, i, x, skip);
    }
    let head = w.conv_id("mask_head");
    let map = g.conv(
        "map",
        x,
        head,
        (1, 1, 1),
        (0, 0),
        false,
        Activation::Sigmoid,
        None,
    );
    g.output(map);
    if keep_taps {
        g.conv(
            "logits",
            x,
            head,
            (1, 1, 1),
            (0, 0),
            false,
            Activation::Identity,
            None,
        );
        keep(&mut g, &query_tap_specs());
    }
    g.finish()
}

fn value_id(g: &GraphBuilder, name: &str) -> ValueId {
    g.value_named(name)
        .unwrap_or_else(|| panic!("graph has no value {name}"))
}

fn decoder_block(
    g: &mut GraphBuilder,
    w: &ModelWeights,
    i: usize,
    x: ValueId,
    skip: Option<ValueId>,
) -> ValueId {
    let p = format!("decoder.blocks.{i}");
    let cout = DECODER_BLOCKS[i].cout;
    let relu = Activation::Relu;
    let mut x = g.upsample_concat(&format!("dec{i}.up"), x, skip);
    if skip.is_some() {
        x = g.scse(
            &format!("dec{i}.att1"),
            x,
            w.scse_id(&format!("{p}.attention1")),
        );
    }
    let c1 = w.conv_id(&format!("{p}.conv1.0"));
    x = g.conv(
        &format!("dec{i}.conv1"),
        x,
        c1,
        (cout, 3, 1),
        (1, 1),
        false,
        relu,
        None,
    );
    let c2 = w.conv_id(&format!("{p}.conv2.0"));
    let last = if skip.is_some() {
        format!("dec{i}.conv2")
    } else {
        format!("dec{i}")
    };
    x = g.conv(&last, x, c2, (cout, 3, 1), (1, 1), false, relu, None);
    if skip.is_some() {
        x = g.scse(&format!("dec{i}"), x, w.scse_id(&format!("{p}.attention2")));
    }
    x
}

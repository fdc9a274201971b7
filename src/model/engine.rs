//! The library API: build an engine once, encode a prompt once, segment many queries.

use std::path::Path;

use super::graphs::{build_prompt_graph, build_query_graph, prompt_shapes};
use super::taps::{prompt_tap_specs, query_tap_specs, TapSpec, TapTensor};
use super::weights::{ModelWeights, TensorSource};
use crate::cpu::CpuBackend;
use crate::error::{Error, Result};
#[cfg(feature = "gpu")]
use crate::gpu::{probe_adapter, GpuBackend};
use crate::graph::{
    Backend, CompiledGraph, DispatchInfo, DispatchTime, Graph, NodeTimes, Precision, RunPhases,
    Shape, WeightTables,
};
use crate::io::image::{preprocess, RgbImage8};
use crate::io::weights::WeightFile;

/// Queries per batch in `segment_batch`: one batched forward on the GPU (bounds its
/// memory: every activation is stored once per query).
pub const MAX_GPU_BATCH: usize = 16;

/// Largest input side accepted: the arena at 2048 already needs several GiB.
pub const MAX_SIZE: usize = 2048;

/// Checks the model resolution: a positive multiple of 32, at most `MAX_SIZE`.
pub fn check_size(size: usize) -> Result<()> {
    if size == 0 || !size.is_multiple_of(32) {
        return Err(Error::setting(
            "size",
            format!("size {size} is not a positive multiple of 32 (e.g. 256 or 512)"),
        ));
    }
    if size > MAX_SIZE {
        return Err(Error::setting(
            "size",
            format!("size {size} is larger than the supported maximum {MAX_SIZE}"),
        ));
    }
    Ok(())
}

/// The prompt's features, computed once and reused for every query of the same product.
///
/// Cloneable and `Send`: one engine can serve many products, each with its own features.
///
/// ```
/// # use metauas::{synth::{synthetic_image, synthetic_weights, WeightRecipe}, Engine};
/// # let engine = Engine::new(&synthetic_weights(&WeightRecipe::unit(1)), 64)?;
/// let bottle = engine.encode_prompt(&synthetic_image(1, 64, 64, None))?;
/// let cable = engine.encode_prompt(&synthetic_image(7, 64, 64, None))?;
/// assert_eq!((bottle.size, cable.size), (64, 64));
/// // Features from an engine of another size are refused, not misread:
/// let other = Engine::new(&synthetic_weights(&WeightRecipe::unit(1)), 96)?;
/// let err = other.segment(&bottle, &synthetic_image(2, 64, 64, None)).unwrap_err();
/// assert!(err.to_string().contains("size 64"));
/// # Ok::<(), metauas::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct PromptFeatures {
    pub size: usize,
    /// Per alignment level (f5, f4, f3): the raw feature and its projection, NHWC.
    pub tensors: Vec<Vec<f32>>,
}

/// A per-pixel anomaly map at model resolution, values in (0, 1), row-major.
///
/// ```
/// use metauas::io::output::{heatmap_png_bytes, threshold_mask};
/// # use metauas::{synth::{synthetic_image, synthetic_weights, WeightRecipe}, Engine};
/// # let engine = Engine::new(&synthetic_weights(&WeightRecipe::unit(1)), 64)?;
/// # let prompt = engine.encode_prompt(&synthetic_image(1, 64, 64, None))?;
/// let map = engine.segment(&prompt, &synthetic_image(2, 64, 64, Some((20, 20, 8))))?;
/// let (x, y) = (10, 20);
/// let value = map.data[y * map.size + x];
/// assert!(value <= map.score());
/// let mask = threshold_mask(&map.data, 0.5); // 255 where anomalous
/// let png = heatmap_png_bytes(&map.data, map.size).unwrap(); // what people look at
/// assert_eq!((mask.len(), &png[1..4]), (64 * 64, &b"PNG"[..]));
/// # Ok::<(), metauas::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct AnomalyMap {
    pub size: usize,
    pub data: Vec<f32>,
}

impl AnomalyMap {
    /// The authors' image-level score: the maximum of the map.
    pub fn score(&self) -> f32 {
        self.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// Which backend runs the graphs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// The CPU backend (rayon + SIMD).
    #[default]
    Cpu,
    /// The GPU backend on the first Vulkan/Metal/DX12 adapter, software ones included.
    Gpu,
    /// A hardware GPU when there is one, the CPU backend otherwise.
    Auto,
}

#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub backend: BackendChoice,
    /// Storage precision on the GPU; the CPU backend is float32 only.
    pub precision: Precision,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            backend: BackendChoice::Cpu,
            precision: Precision::F32,
        }
    }
}

/// The model, loaded once: weights packed for one backend, graphs built and planned for one
/// input size. `Sync`: share it between threads (runs on one engine are serialized per graph;
/// the CPU backend uses every core for each run).
///
/// ```no_run
/// use metauas::io::image::decode_image_file;
/// use metauas::model::{BackendChoice, EngineOptions};
/// use metauas::Engine;
///
/// let options = EngineOptions { backend: BackendChoice::Auto, ..Default::default() };
/// let engine = Engine::from_file_with("metauas-256.ckpt".as_ref(), 256, options)?;
/// eprintln!("running on {}", engine.backend_description());
/// let prompt = engine.encode_prompt(&decode_image_file("good.png".as_ref())?)?;
/// for frame in ["frame1.png", "frame2.png"] {
///     let map = engine.segment(&prompt, &decode_image_file(frame.as_ref())?)?;
///     println!("{frame}: score {:.3}", map.score());
/// }
/// # Ok::<(), metauas::Error>(())
/// ```
pub struct Engine {
    size: usize,
    /// Parameter tables for building graphs; the conv weights themselves live only in the
    /// backend's packed form (see `from_weights`).
    weights: ModelWeights,
    parameters: usize,
    weights_hash: u64,
    backend: Box<dyn Backend>,
    prompt: Box<dyn CompiledGraph>,
    query: Box<dyn CompiledGraph>,
    prompt_graph: Graph,
    query_graph: Graph,
    /// Leading nodes of the query graph that do not need the prompt (its encoder).
    query_encoder_nodes: usize,
}

impl Engine {
    /// Loads a weights file (safetensors or a torch.save checkpoint) and builds the engine.
    pub fn from_file(path: &Path, size: usize) -> Result<Engine> {
        check_size(size)?;
        let file = WeightFile::open(path)?;
        Engine::new(&file, size)
    }

    pub fn new(src: &dyn TensorSource, size: usize) -> Result<Engine> {
        check_size(size)?;
        let weights = ModelWeights::load(src)?;
        Ok(Engine::from_weights(weights, size))
    }

    /// Like `from_file`, on the backend `options` choose.
    pub fn from_file_with(path: &Path, size: usize, options: EngineOptions) -> Result<Engine> {
        check_size(size)?;
        let file = WeightFile::open(path)?;
        let weights = ModelWeights::load(&file)?;
        Engine::from_weights_with(weights, size, options)
    }

    /// Like `new`, on the backend `options` choose.
    pub fn with_options(
        src: &dyn TensorSource,
        size: usize,
        options: EngineOptions,
    ) -> Result<Engine> {
        check_size(size)?;
        let weights = ModelWeights::load(src)?;
        Engine::from_weights_with(weights, size, options)
    }

    /// CPU engine from loaded weights.
    pub fn from_weights(weights: ModelWeights, size: usize) -> Engine {
        let backend = Box::new(CpuBackend::new(&weights.tables));
        Engine::assemble(weights, size, backend).expect("the CPU backend compiles any graph")
    }

    pub fn from_weights_with(
        weights: ModelWeights,
        size: usize,
        options: EngineOptions,
    ) -> Result<Engine> {
        check_size(size)?;
        let backend = create_backend(&weights.tables, options)?;
        Engine::assemble(weights, size, backend)
    }

    fn assemble(
        mut weights: ModelWeights,
        size: usize,
        backend: Box<dyn Backend>,
    ) -> Result<Engine> {
        let prompt_graph = build_prompt_graph(&weights, size, false);
        let query_graph = build_query_graph(&weights, size, false);
        let prompt = backend.compile(&prompt_graph)?;
        let query = backend.compile(&query_graph)?;
        let query_encoder_nodes = query_graph.prefix_independent_of(&query_graph.inputs[1..]);
        let parameters = weights.parameter_count();
        let weights_hash = weights.fingerprint();
        // The backend holds packed copies: keeping the unpacked ones would double the
        // resident weights (~85 MB) for nothing.
        weights.release_conv_data();
        Ok(Engine {
            size,
            weights,
            parameters,
            weights_hash,
            backend,
            prompt,
            query,
            prompt_graph,
            query_graph,
            query_encoder_nodes,
        })
    }

    /// Which backend runs this engine, in words (for logs).
    pub fn backend_description(&self) -> String {
        self.backend.description()
    }

    /// Whether `segment_batch` beats one `segment` after another (the GPU: one forward for
    /// the batch; the CPU with two or more threads: two queries at a time).
    pub fn batches_queries(&self) -> bool {
        self.query.batches()
    }

    /// `"cpu"` or `"gpu"`.
    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// GPU only: one query forward with a timestamp around every dispatch:
    /// `(graph node, kernel, seconds, FLOPs)` per dispatch.
    pub fn profile_gpu_query(
        &self,
        prompt: &PromptFeatures,
        image: &RgbImage8,
    ) -> Result<Vec<DispatchTime>> {
        self.check_prompt(prompt)?;
        if self.query.dispatches().is_none() {
            return Err(Error::new("profile_gpu_query: this engine runs on the CPU"));
        }
        let input = preprocess(image, self.size);
        self.query.profile(&self.query_inputs(&input, prompt))
    }

    /// Compute dispatches per query forward on the GPU (None on the CPU).
    pub fn gpu_dispatches(&self) -> Option<usize> {
        self.query.dispatches()
    }

    /// Every dispatch of the prompt and of the query forward on the GPU (None on the CPU).
    pub fn gpu_shape(&self) -> Option<(Vec<DispatchInfo>, Vec<DispatchInfo>)> {
        Some((self.prompt.dispatch_shape()?, self.query.dispatch_shape()?))
    }

    /// The host-side phases of the last query forward (`segment`) on the GPU.
    pub fn last_query_phases(&self) -> Option<RunPhases> {
        self.query.last_phases()
    }

    /// How the backend runs node `node` of the query graph, in words (on the CPU: each conv
    /// node's strategy, the folded ops; None on backends that do not choose per node).
    pub fn describe_query_node(&self, node: usize) -> Option<String> {
        self.query.describe_node(node)
    }

    pub fn size(&self) -> usize {
        self.size
    }
    /// Parameters used by the forward pass, after folding BatchNorm.
    pub fn parameter_count(&self) -> usize {
        self.parameters
    }
    /// The fingerprint of the loaded parameters (see `ModelWeights::fingerprint`), as
    /// `"mw64:<16 hex digits>"`: the same for a `.ckpt` and its converted safetensors.
    pub fn weights_hash(&self) -> String {
        format!("mw64:{:016x}", self.weights_hash)
    }

    pub fn prompt_graph(&self) -> &Graph {
        &self.prompt_graph
    }
    pub fn query_graph(&self) -> &Graph {
        &self.query_graph
    }

    /// Encodes the normal (prompt) image once.
    pub fn encode_prompt(&self, image: &RgbImage8) -> Result<PromptFeatures> {
        self.encode_prompt_timed(image, None)
    }

    pub fn encode_prompt_timed(
        &self,
        image: &RgbImage8,
        times: Option<&mut NodeTimes>,
    ) -> Result<PromptFeatures> {
        let input = preprocess(image, self.size);
        let tensors = self.prompt.run(&[&input], times)?;
        Ok(PromptFeatures {
            size: self.size,
            tensors,
        })
    }

    /// Segments one query image against a prompt encoded by this engine.
    pub fn segment(&self, prompt: &PromptFeatures, image: &RgbImage8) -> Result<AnomalyMap> {
        self.segment_timed(prompt, image, None)
    }

    pub fn segment_timed(
        &self,
        prompt: &PromptFeatures,
        image: &RgbImage8,
        times: Option<&mut NodeTimes>,
    ) -> Result<AnomalyMap> {
        self.check_prompt(prompt)?;
        let input = preprocess(image, self.size);
        self.segment_input(prompt, &input, times)
    }

    /// Segments a query already pre-processed (`io::image::preprocess` at this engine's
    /// size: 3 x S x S float32, HWC), e.g. on another thread while the previous one runs.
    pub fn segment_preprocessed(
        &self,
        prompt: &PromptFeatures,
        input: &[f32],
    ) -> Result<AnomalyMap> {
        self.check_prompt(prompt)?;
        let want = 3 * self.size * self.size;
        if input.len() != want {
            return Err(Error::new(format!(
                "pre-processed query: {} values, this engine (size {}) takes {want}",
                input.len(),
                self.size
            )));
        }
        self.segment_input(prompt, input, None)
    }

    fn segment_input(
        &self,
        prompt: &PromptFeatures,
        input: &[f32],
        times: Option<&mut NodeTimes>,
    ) -> Result<AnomalyMap> {
        let inputs = self.query_inputs(input, prompt);
        let mut outputs = self.query.run(&inputs, times)?;
        Ok(AnomalyMap {
            size: self.size,
            data: outputs.swap_remove(0),
        })
    }

    /// Encodes a prompt and segments one query against it: what `encode_prompt` then
    /// `segment` give, bit for bit, in less time: on the CPU backend the two encoders run at
    /// the same time (each on about one core: the small late layers of a single encoder leave
    /// the second core partly idle); on the GPU both halves are one submission, the prompt's
    /// features handed to the query half on the device.
    pub fn segment_pair(
        &self,
        prompt: &RgbImage8,
        query: &RgbImage8,
    ) -> Result<(PromptFeatures, AnomalyMap)> {
        let prompt_input = preprocess(prompt, self.size);
        let query_input = preprocess(query, self.size);
        // The GPU: one submission, the prompt's features never leave the device.
        let chained = self
            .query
            .run_after(&*self.prompt, &[&prompt_input], &[&query_input]);
        let encode = || self.prompt.run(&[&prompt_input], None);
        let (tensors, mut outputs) = match chained {
            Some(result) => result?,
            None => {
                self.query
                    .run_overlapped(&[&query_input], self.query_encoder_nodes, &encode)?
            }
        };
        let features = PromptFeatures {
            size: self.size,
            tensors,
        };
        let map = AnomalyMap {
            size: self.size,
            data: outputs.swap_remove(0),
        };
        Ok((features, map))
    }

    /// Segments several query images against one prompt. On the GPU backend each chunk of
    /// up to `MAX_GPU_BATCH` queries is one forward with a batch dimension (every dispatch
    /// covers all of them, the prompt's features stored once; one submission, one
    /// readback); on the CPU two queries run at a time, each in its own arena, sharing the
    /// cores op by op. The maps are those `segment` gives, bit for bit.
    pub fn segment_batch(
        &self,
        prompt: &PromptFeatures,
        images: &[&RgbImage8],
    ) -> Result<Vec<AnomalyMap>> {
        self.check_prompt(prompt)?;
        let mut maps = Vec::with_capacity(images.len());
        let batch = if self.query.batches() {
            MAX_GPU_BATCH
        } else {
            1
        };
        for chunk in images.chunks(batch) {
            let inputs: Vec<Vec<f32>> = chunk.iter().map(|im| preprocess(im, self.size)).collect();
            let runs: Vec<Vec<&[f32]>> = inputs
                .iter()
                .map(|input| self.query_inputs(input, prompt))
                .collect();
            for mut outputs in self.query.run_batch(&runs)? {
                maps.push(AnomalyMap {
                    size: self.size,
                    data: outputs.swap_remove(0),
                });
            }
        }
        Ok(maps)
    }

    /// Encodes a prompt like `encode_prompt`, also returning its taps (`prompt_tap_specs`:
    /// the pre-processed image, the encoder's stages, the key projections), float32 NCHW.
    /// Slower: it compiles a graph that keeps them alive.
    pub fn prompt_taps(&self, image: &RgbImage8) -> Result<(PromptFeatures, Vec<TapTensor>)> {
        let input = preprocess(image, self.size);
        let g = build_prompt_graph(&self.weights, self.size, true);
        let outputs = self.backend.compile(&g)?.run(&[&input], None)?;
        let taps = collect_taps(&g, &prompt_tap_specs(), &input, self.size, &outputs);
        let tensors = outputs
            .into_iter()
            .take(prompt_shapes(self.size).len())
            .collect();
        let features = PromptFeatures {
            size: self.size,
            tensors,
        };
        Ok((features, taps))
    }

    /// Segments like `segment`, also returning the query half's taps (`query_tap_specs`:
    /// the pre-processed image, the encoder, each alignment level, each decoder block and its
    /// parts, the logits, the map), float32 NCHW. The map is `segment`'s, bit for bit.
    pub fn query_taps(
        &self,
        prompt: &PromptFeatures,
        image: &RgbImage8,
    ) -> Result<(AnomalyMap, Vec<TapTensor>)> {
        self.check_prompt(prompt)?;
        let input = preprocess(image, self.size);
        let g = build_query_graph(&self.weights, self.size, true);
        let inputs = self.query_inputs(&input, prompt);
        let outputs = self.backend.compile(&g)?.run(&inputs, None)?;
        let taps = collect_taps(&g, &query_tap_specs(), &input, self.size, &outputs);
        let map = AnomalyMap {
            size: self.size,
            data: outputs.into_iter().next().expect("the map is output 0"),
        };
        Ok((map, taps))
    }

    /// Every tap of a prompt/query pair: `prompt_taps` then `query_taps`, in graph order.
    pub fn segment_with_taps(
        &self,
        prompt: &RgbImage8,
        query: &RgbImage8,
    ) -> Result<(AnomalyMap, Vec<TapTensor>)> {
        let (features, mut taps) = self.prompt_taps(prompt)?;
        let (map, query_taps) = self.query_taps(&features, query)?;
        taps.extend(query_taps);
        Ok((map, taps))
    }

    fn query_inputs<'a>(&self, input: &'a [f32], prompt: &'a PromptFeatures) -> Vec<&'a [f32]> {
        std::iter::once(input)
            .chain(prompt.tensors.iter().map(|t| t.as_slice()))
            .collect()
    }

    fn check_prompt(&self, prompt: &PromptFeatures) -> Result<()> {
        let shapes = prompt_shapes(self.size);
        let ok = prompt.size == self.size
            && prompt.tensors.len() == shapes.len()
            && prompt
                .tensors
                .iter()
                .zip(shapes)
                .all(|(t, s)| t.len() == s.len());
        if ok {
            Ok(())
        } else {
            Err(Error::new(format!(
                "prompt features were computed at size {} but this engine runs at {}",
                prompt.size, self.size
            )))
        }
    }
}

/// The taps of `specs` from a run of `g` (`input` is the pre-processed image, NHWC).
fn collect_taps(
    g: &Graph,
    specs: &[TapSpec],
    input: &[f32],
    size: usize,
    outputs: &[Vec<f32>],
) -> Vec<TapTensor> {
    specs
        .iter()
        .map(|spec| match spec.value.as_deref() {
            None => TapTensor::from_nhwc(spec, Shape::new(size, size, 3), input),
            Some(name) => {
                let v = g.value_named(name).expect("tap value in the graph");
                let at = g.outputs.iter().position(|&o| o == v);
                let at = at.expect("tap value is an output");
                TapTensor::from_nhwc(spec, g.values[v].shape, &outputs[at])
            }
        })
        .collect()
}

/// The backend `options` choose, with the weights packed for it.
fn create_backend(tables: &WeightTables, options: EngineOptions) -> Result<Box<dyn Backend>> {
    let use_gpu = match options.backend {
        BackendChoice::Cpu => false,
        BackendChoice::Gpu => true,
        BackendChoice::Auto => hardware_gpu(),
    };
    if !use_gpu && options.precision != Precision::F32 {
        return Err(Error::setting(
            "precision",
            "f16 storage needs the GPU backend (the CPU backend is float32 only)",
        ));
    }
    if use_gpu {
        gpu_backend(tables, options.precision)
    } else {
        Ok(Box::new(CpuBackend::new(tables)))
    }
}

#[cfg(feature = "gpu")]
fn hardware_gpu() -> bool {
    probe_adapter().is_some_and(|a| !a.software)
}

#[cfg(not(feature = "gpu"))]
fn hardware_gpu() -> bool {
    false
}

#[cfg(feature = "gpu")]
fn gpu_backend(tables: &WeightTables, precision: Precision) -> Result<Box<dyn Backend>> {
    Ok(Box::new(GpuBackend::new(tables, precision)?))
}

#[cfg(not(feature = "gpu"))]
fn gpu_backend(_: &WeightTables, _: Precision) -> Result<Box<dyn Backend>> {
    Err(Error::new(
        "this build has no GPU backend (metauas was built without its `gpu` feature)",
    ))
}

//! The library API: build an engine once, encode a prompt once, segment many queries.

use std::path::Path;
use std::sync::Mutex;

use super::graphs::{build_prompt_graph, build_query_graph, prompt_shapes, TAPS};
use super::weights::{ModelWeights, TensorSource};
use crate::cpu::{self, CpuBackend, NodeTimes};
use crate::error::{Error, Result};
use crate::graph::{Graph, Shape};
use crate::io::image::{preprocess, RgbImage8};
use crate::io::weights::WeightFile;

/// Largest input side accepted: the arena at 2048 already needs several GiB.
pub const MAX_SIZE: usize = 2048;

/// Checks the model resolution: a positive multiple of 32, at most `MAX_SIZE`.
pub fn check_size(size: usize) -> Result<()> {
    if size == 0 || !size.is_multiple_of(32) {
        return Err(Error::new(format!(
            "--size {size}: must be a positive multiple of 32 (e.g. 256 or 512)"
        )));
    }
    if size > MAX_SIZE {
        return Err(Error::new(format!(
            "--size {size}: larger than the supported maximum {MAX_SIZE}"
        )));
    }
    Ok(())
}

/// The prompt's features, computed once and reused for every query of the same product.
#[derive(Clone, Debug)]
pub struct PromptFeatures {
    pub size: usize,
    /// Per alignment level (f5, f4, f3): the raw feature and its projection, NHWC.
    pub tensors: Vec<Vec<f32>>,
}

/// A per-pixel anomaly map at model resolution, values in (0, 1), row-major.
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

/// An intermediate tensor captured for conformance checks (NHWC).
#[derive(Clone, Debug)]
pub struct Tap {
    pub name: String,
    pub shape: Shape,
    pub data: Vec<f32>,
}

pub struct Engine {
    size: usize,
    /// Parameter tables for building graphs; the conv weights themselves live only in the
    /// backend's packed form (see `from_weights`).
    weights: ModelWeights,
    parameters: usize,
    backend: CpuBackend,
    prompt_graph: Graph,
    query_graph: Graph,
    prompt_arena: Mutex<Vec<f32>>,
    query_arena: Mutex<Vec<f32>>,
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

    pub fn from_weights(mut weights: ModelWeights, size: usize) -> Engine {
        let backend = CpuBackend::new(&weights);
        let prompt_graph = build_prompt_graph(&weights, size);
        let query_graph = build_query_graph(&weights, size, false);
        let parameters = weights.parameter_count();
        // The backend holds packed copies: keeping the unpacked ones would double the
        // resident weights (~85 MB) for nothing.
        weights.release_conv_data();
        Engine {
            size,
            weights,
            parameters,
            backend,
            prompt_graph,
            query_graph,
            prompt_arena: Mutex::new(Vec::new()),
            query_arena: Mutex::new(Vec::new()),
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }
    /// Parameters used by the forward pass, after folding BatchNorm.
    pub fn parameter_count(&self) -> usize {
        self.parameters
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
        let mut arena = lock(&self.prompt_arena);
        let g = &self.prompt_graph;
        self.backend.run(g, &mut arena, &[&input], times);
        let tensors = g
            .outputs
            .iter()
            .map(|&v| cpu::value(g, &arena, v).to_vec())
            .collect();
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
        let mut arena = lock(&self.query_arena);
        let g = &self.query_graph;
        self.backend
            .run(g, &mut arena, &self.query_inputs(&input, prompt), times);
        let data = cpu::value(g, &arena, g.outputs[0]).to_vec();
        Ok(AnomalyMap {
            size: self.size,
            data,
        })
    }

    /// Like `segment`, also returning the intermediates named in `graphs::TAPS` (slower:
    /// builds a graph that keeps them alive).
    pub fn segment_with_taps(
        &self,
        prompt: &PromptFeatures,
        image: &RgbImage8,
    ) -> Result<(AnomalyMap, Vec<Tap>)> {
        self.check_prompt(prompt)?;
        let input = preprocess(image, self.size);
        let g = build_query_graph(&self.weights, self.size, true);
        let mut arena = Vec::new();
        self.backend
            .run(&g, &mut arena, &self.query_inputs(&input, prompt), None);
        let map = AnomalyMap {
            size: self.size,
            data: cpu::value(&g, &arena, g.outputs[0]).to_vec(),
        };
        let taps = TAPS
            .iter()
            .map(|name| {
                let v = g.value_named(name).expect("tap value");
                Tap {
                    name: name.to_string(),
                    shape: g.values[v].shape,
                    data: cpu::value(&g, &arena, v).to_vec(),
                }
            })
            .collect();
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

/// A poisoned arena only means another thread panicked mid-run; the arena is rewritten by
/// every run, so it is safe to keep using it.
fn lock(m: &Mutex<Vec<f32>>) -> std::sync::MutexGuard<'_, Vec<f32>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

//! GPU backend: the same graph as the CPU backend, every op a WGSL compute shader (files in
//! `shaders/`, one per kernel family) run through wgpu on Vulkan, Metal or DX12.
//!
//! Weights are uploaded once per engine; each graph is lowered once into a `GpuProgram`
//! (pipelines, liveness-planned value buffers, bind groups); a forward pass is one command
//! encoder, one submit and one readback.

mod device;
mod lower;
mod params;
mod program;
mod weights;

use crate::graph::Precision;
pub use crate::util::sync::lock;
pub use device::{adapter_details, probe_adapter, AdapterSummary, GpuContext};
pub use lower::{ConvStrategy, WINOGRAD_MIN_PIXELS};
pub use program::GpuProgram;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::graph::{
    Backend, CompiledGraph, DispatchInfo, DispatchTime, Graph, NodeTimes, Outputs, RunPhases,
    WeightTables,
};
use weights::WeightTable;

/// One device with the model's weights on it.
pub struct GpuBackend {
    device: Arc<DeviceWeights>,
}

/// The device and the uploaded weights, shared by every program compiled on them.
struct DeviceWeights {
    ctx: GpuContext,
    table: WeightTable,
    weights: Vec<wgpu::Buffer>,
    /// Under f16 storage: f32 copies of the f16 weights, for full-precision nodes.
    f32_weights: Vec<Option<wgpu::Buffer>>,
}

impl GpuBackend {
    pub fn new(w: &WeightTables, precision: Precision) -> Result<GpuBackend> {
        let ctx = GpuContext::new(precision)?;
        let mut table = WeightTable::new(w);
        let weights = table.upload(&ctx);
        let f32_weights = table.upload_f32_copies(&ctx);
        // The device holds the weights now; the host copies would only double the memory.
        table.tensors.iter_mut().for_each(|t| t.data = Vec::new());
        let device = DeviceWeights {
            ctx,
            table,
            weights,
            f32_weights,
        };
        Ok(GpuBackend {
            device: Arc::new(device),
        })
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.device.ctx.adapter
    }

    pub fn precision(&self) -> Precision {
        self.device.ctx.precision
    }
}

impl Backend for GpuBackend {
    fn kind(&self) -> &'static str {
        "gpu"
    }

    fn description(&self) -> String {
        format!("gpu: {} [{}]", self.adapter(), self.precision().name())
    }

    /// Lowers `graph` and binds it to this device's buffers.
    fn compile(&self, graph: &Graph) -> Result<Box<dyn CompiledGraph>> {
        let program = self.device.program(graph, 1, &[])?;
        Ok(Box::new(GpuGraph {
            device: self.device.clone(),
            program: Mutex::new(program),
            graph: graph.clone(),
            batched: Mutex::new(HashMap::new()),
        }))
    }
}

impl DeviceWeights {
    fn program(&self, graph: &Graph, batch: usize, shared: &[bool]) -> Result<GpuProgram> {
        let buffers = (&self.weights[..], &self.f32_weights[..]);
        GpuProgram::new(
            &self.ctx,
            graph,
            &self.table,
            buffers.0,
            buffers.1,
            (batch, shared),
        )
    }
}

/// Batch programs of one graph, by (images, which inputs they share); None where the
/// batch does not fit the adapter's limits (then the runs go one after another).
type BatchPrograms = HashMap<(usize, Vec<bool>), Option<Arc<Mutex<GpuProgram>>>>;

/// A graph lowered and bound to one device.
struct GpuGraph {
    device: Arc<DeviceWeights>,
    /// A program owns its readback buffer: one run at a time.
    program: Mutex<GpuProgram>,
    graph: Graph,
    batched: Mutex<BatchPrograms>,
}

impl GpuGraph {
    /// The program for `runs` as one batch (built on first use), if it fits the device.
    fn batch_program(&self, runs: &[Vec<&[f32]>]) -> Option<Arc<Mutex<GpuProgram>>> {
        let first = runs.first()?;
        // An input is shared when every run passes the very same slice (the prompt).
        let shared: Vec<bool> = (0..first.len())
            .map(|k| runs.iter().all(|r| std::ptr::eq(r[k], first[k])))
            .collect();
        let key = (runs.len(), shared);
        let mut programs = lock(&self.batched);
        programs
            .entry(key)
            .or_insert_with_key(|(batch, shared)| {
                let program = self.device.program(&self.graph, *batch, shared).ok()?;
                Some(Arc::new(Mutex::new(program)))
            })
            .clone()
    }
}

impl CompiledGraph for GpuGraph {
    /// Every graph output as f32; `times` are not recorded (see `profile`).
    fn run(&self, inputs: &[&[f32]], _times: Option<&mut NodeTimes>) -> Result<Outputs> {
        lock(&self.program).run(&self.device.ctx, inputs)
    }

    fn batches(&self) -> bool {
        true
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// One submission: the producer's forward, its outputs copied (or converted) into this
    /// program's input buffers on the device, this forward, one readback of both.
    fn run_after(
        &self,
        producer: &dyn CompiledGraph,
        producer_inputs: &[&[f32]],
        early: &[&[f32]],
    ) -> Option<Result<(Outputs, Outputs)>> {
        let producer = producer.as_any().downcast_ref::<GpuGraph>()?;
        if !Arc::ptr_eq(&producer.device, &self.device) || std::ptr::eq(producer, self) {
            return None;
        }
        // Lock order: producer, then consumer (the engine chains prompt -> query only).
        let first = lock(&producer.program);
        let mut second = lock(&self.program);
        Some(second.run_after(&self.device.ctx, &first, producer_inputs, early))
    }

    /// Several runs as one forward with a batch dimension (every dispatch covers all the
    /// images; the shared prompt stored once); where that does not fit the device, one
    /// submission of the runs one after another (`GpuProgram::run_many`).
    fn run_batch(&self, runs: &[Vec<&[f32]>]) -> Result<Vec<Outputs>> {
        if runs.len() > 1 {
            if let Some(program) = self.batch_program(runs) {
                return lock(&program).run_batched(&self.device.ctx, runs);
            }
        }
        lock(&self.program).run_many(&self.device.ctx, runs)
    }

    fn profile(&self, inputs: &[&[f32]]) -> Result<Vec<DispatchTime>> {
        lock(&self.program).profile(&self.device.ctx, inputs)
    }

    fn dispatch_shape(&self) -> Option<Vec<DispatchInfo>> {
        Some(lock(&self.program).shape())
    }

    fn last_phases(&self) -> Option<RunPhases> {
        Some(lock(&self.program).last_phases())
    }
}

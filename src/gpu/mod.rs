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

pub use device::{probe_adapter, AdapterSummary, GpuContext, Precision};
pub use program::GpuProgram;

use crate::error::Result;
use crate::graph::Graph;
use crate::model::ModelWeights;
use weights::WeightTable;

/// One device with the model's weights on it.
pub struct GpuBackend {
    ctx: GpuContext,
    table: WeightTable,
    weights: Vec<wgpu::Buffer>,
}

impl GpuBackend {
    pub fn new(w: &ModelWeights, precision: Precision) -> Result<GpuBackend> {
        let ctx = GpuContext::new(precision)?;
        let mut table = WeightTable::new(w);
        let weights = table.upload(&ctx);
        // The device holds the weights now; the host copies would only double the memory.
        table.tensors.iter_mut().for_each(|t| t.data = Vec::new());
        Ok(GpuBackend {
            ctx,
            table,
            weights,
        })
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.ctx.adapter
    }

    pub fn precision(&self) -> Precision {
        self.ctx.precision
    }

    /// Lowers `graph` and binds it to this device's buffers.
    pub fn program(&self, graph: &Graph) -> Result<GpuProgram> {
        GpuProgram::new(&self.ctx, graph, &self.table, &self.weights)
    }

    /// One timed run of `program`: `(node, kernel, seconds, FLOPs)` per dispatch.
    pub fn profile(
        &self,
        program: &GpuProgram,
        inputs: &[&[f32]],
    ) -> Result<Vec<(String, &'static str, f64, f64)>> {
        program.profile(&self.ctx, inputs)
    }

    /// Runs `program` on `inputs` (graph order) and returns every graph output as f32.
    pub fn run(&self, program: &GpuProgram, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        program.run(&self.ctx, inputs)
    }

    /// Several runs of `program` in one submit (see `GpuProgram::run_many`).
    pub fn run_many(
        &self,
        program: &GpuProgram,
        runs: &[Vec<&[f32]>],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        program.run_many(&self.ctx, runs)
    }
}

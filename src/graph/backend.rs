//! What a backend offers the layers above it: compile a graph against the weights it packed
//! when it was created, then run the compiled graph, one input set or a batch at a time.
//! The engine holds a `Box<dyn Backend>` and knows nothing of arenas, buffers or devices.

use super::Graph;
use crate::error::{Error, Result};

/// Wall time in seconds of each graph node in one run (`metauas bench --profile`).
pub type NodeTimes = Vec<f64>;

/// One timed dispatch of a profiled run: `(graph node, kernel, seconds, FLOPs)`.
pub type DispatchTime = (String, &'static str, f64, f64);

/// One compute dispatch of a compiled graph, as planned (`metauas bench --json/--profile`).
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchInfo {
    pub node: String,
    pub kernel: &'static str,
    /// Workgroups launched (x * y * z).
    pub workgroups: u64,
    pub flops: f64,
    /// The longest serial loop one workgroup runs (a conv's reduction steps; 0 where the
    /// kernel has none worth counting).
    pub serial_steps: u64,
}

/// Host-side phases of a backend's last run, in seconds (the GPU: upload, recording,
/// submit until the device is done, readback and decode).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunPhases {
    pub upload_s: f64,
    pub record_s: f64,
    pub submit_to_done_s: f64,
    pub readback_s: f64,
    /// Command submissions (each one a wait for the device).
    pub submits: usize,
}

/// Outputs of one run, in `Graph::outputs` order.
pub type Outputs = Vec<Vec<f32>>;

/// A device (or the CPU) with the model's weights packed for it.
pub trait Backend: Send + Sync {
    /// `"cpu"` or `"gpu"`.
    fn kind(&self) -> &'static str;

    /// Which backend this is, in words (for logs).
    fn description(&self) -> String;

    /// Prepares `graph` (whose ops index the weights this backend was created with) to run.
    fn compile(&self, graph: &Graph) -> Result<Box<dyn CompiledGraph>>;
}

/// A graph ready to run on one backend. Runs of one compiled graph are serialized (it owns
/// its working memory); different compiled graphs may run at the same time.
pub trait CompiledGraph: Send + Sync {
    /// Runs once on `inputs` (in `Graph::inputs` order). With `times`, backends that can
    /// time single nodes record them.
    fn run(&self, inputs: &[&[f32]], times: Option<&mut NodeTimes>) -> Result<Outputs>;

    /// Several runs; the outputs are those `run` gives, bit for bit. A backend may submit
    /// them together (the GPU: one submission, inputs shared by every run uploaded once).
    fn run_batch(&self, runs: &[Vec<&[f32]>]) -> Result<Vec<Outputs>> {
        runs.iter().map(|inputs| self.run(inputs, None)).collect()
    }

    /// Whether `run_batch` does better than one run after another (then the engine hands it
    /// several inputs at once; otherwise one at a time, so that their memory is not held).
    fn batches(&self) -> bool {
        false
    }

    /// Runs with inputs that arrive in two parts: `early` (the first inputs) now, the rest
    /// from `late`, which computes them. The first `prefix` nodes must read only `early`
    /// (see `Graph::prefix_independent_of`); a backend may run them at the same time as
    /// `late`. Returns `late`'s result and this graph's outputs, as if run one after the other.
    fn run_overlapped(
        &self,
        early: &[&[f32]],
        prefix: usize,
        late: &(dyn Fn() -> Result<Outputs> + Sync),
    ) -> Result<(Outputs, Outputs)> {
        let _ = prefix;
        let rest = late()?;
        let inputs: Vec<&[f32]> = early
            .iter()
            .copied()
            .chain(rest.iter().map(|t| t.as_slice()))
            .collect();
        let outputs = self.run(&inputs, None)?;
        Ok((rest, outputs))
    }

    /// Runs `producer` on `producer_inputs`, then this graph on `early` followed by the
    /// producer's outputs, as one piece of work where the backend can (the GPU: one
    /// submission, the producer's outputs handed over on the device). Returns the producer's
    /// outputs and this graph's, as `producer.run` then `run` would, bit for bit; None where
    /// the backend has nothing better than the two runs (the caller then makes them).
    fn run_after(
        &self,
        producer: &dyn CompiledGraph,
        producer_inputs: &[&[f32]],
        early: &[&[f32]],
    ) -> Option<Result<(Outputs, Outputs)>> {
        let _ = (producer, producer_inputs, early);
        None
    }

    /// For `run_after`: a backend recognizes its own compiled graphs.
    fn as_any(&self) -> &dyn std::any::Any;

    /// One run with a timestamp around every dispatch.
    fn profile(&self, inputs: &[&[f32]]) -> Result<Vec<DispatchTime>> {
        let _ = inputs;
        Err(Error::new("this backend has no per-dispatch profile"))
    }

    /// Compute dispatches per run, on backends that dispatch (the GPU).
    fn dispatches(&self) -> Option<usize> {
        self.dispatch_shape().map(|d| d.len())
    }

    /// Every dispatch of one run, on backends that dispatch (the GPU).
    fn dispatch_shape(&self) -> Option<Vec<DispatchInfo>> {
        None
    }

    /// The host-side phases of the last run, on backends that measure them (the GPU).
    fn last_phases(&self) -> Option<RunPhases> {
        None
    }

    /// How node `node` runs, in words, on backends that choose per node (the CPU: each
    /// conv's strategy, the ops folded into their readers; empty for a node run as the
    /// graph says). For `metauas bench --profile`.
    fn describe_node(&self, node: usize) -> Option<String> {
        let _ = node;
        None
    }
}

//! A lowered graph bound to GPU resources: value buffers planned by liveness, pipelines and
//! bind groups built once; a run is one command encoder, one submit, one readback.

use std::sync::Arc;

use super::device::GpuContext;
use super::lower::{cast_step, lower, Buf, Lowered};
use super::weights::{f16_bytes, WeightTable};
use crate::error::{Error, Result};
use std::time::Instant;

use crate::graph::{
    assign_slots, DispatchInfo, Graph, Lifetime, Liveness, Outputs, Precision, RunPhases,
};

/// Uniform blocks are placed at this stride (WebGPU's maximum offset alignment).
const UNIFORM_STRIDE: u64 = 256;

pub struct GpuProgram {
    lowered: Lowered,
    value_slot: Vec<usize>,
    slots: Vec<wgpu::Buffer>,
    pipelines: Vec<Arc<wgpu::ComputePipeline>>,
    bind_groups: Vec<wgpu::BindGroup>,
    staging: wgpu::Buffer,
    /// Byte offset of each output in `staging`.
    output_offsets: Vec<u64>,
    precision: Precision,
    /// The host-side phases of the last `run`.
    last_phases: RunPhases,
    /// Keeps the uniform and dummy buffers alive with the bind groups.
    _uniforms: wgpu::Buffer,
    _dummy: [wgpu::Buffer; 2],
}

impl GpuProgram {
    /// `weights`: the uploaded tensors; `f32_weights`: under f16 storage, f32 copies of the
    /// ones in the storage type, for full-precision steps. `batch` images per run, the
    /// inputs marked in `shared` stored once for all (see `lower`).
    pub fn new(
        ctx: &GpuContext,
        graph: &Graph,
        table: &WeightTable,
        weights: &[wgpu::Buffer],
        f32_weights: &[Option<wgpu::Buffer>],
        (batch, shared): (usize, &[bool]),
    ) -> Result<GpuProgram> {
        let limit = ctx.limits.max_storage_buffer_binding_size;
        let lowered = lower(graph, table, ctx.precision, batch, shared, limit);
        let bytes: Vec<u64> = lowered
            .values
            .iter()
            .map(|v| value_bytes(v.elems * v.copies, v.always_f32, ctx.precision))
            .collect();
        let lifetimes = lifetimes(&lowered);
        let (value_slot, slot_bytes) = assign_slots(&bytes, &lifetimes);
        if let Some(big) = slot_bytes.iter().find(|&&b| b > limit) {
            let problem = format!(
                "GPU {}: this size{} needs a {} MiB tensor but the adapter binds at most {} MiB; \
                 use a smaller size or the CPU backend",
                ctx.adapter,
                if batch > 1 { " and batch" } else { "" },
                big >> 20,
                limit >> 20
            );
            return Err(Error::setting("size", problem));
        }
        let slots: Vec<wgpu::Buffer> = slot_bytes
            .iter()
            .map(|&size| {
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("value"),
                    size,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_DST
                        | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let uniforms = uniform_buffer(ctx, &lowered);
        let dummy = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("unused binding"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let dummy_writable = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("unused writable binding"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let pipelines: Vec<_> = lowered.steps.iter().map(|s| ctx.pipeline(&s.key)).collect();
        let narrow = ctx.precision != Precision::F32;
        let resolve = |b: Buf, store: Precision| match b {
            Buf::Value(v) => &slots[value_slot[v]],
            Buf::Weight(w) => match &f32_weights.get(w) {
                Some(Some(wide)) if narrow && store == Precision::F32 => wide,
                _ => &weights[w],
            },
            Buf::Unused => &dummy,
            Buf::UnusedWritable => &dummy_writable,
        };
        let bind_groups =
            lowered
                .steps
                .iter()
                .zip(&pipelines)
                .enumerate()
                .map(|(i, (step, pipeline))| {
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: step.uniform_binding,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &uniforms,
                            offset: i as u64 * UNIFORM_STRIDE,
                            size: wgpu::BufferSize::new(64),
                        }),
                    }];
                    entries.extend(step.bindings.iter().map(|&(binding, buf)| {
                        wgpu::BindGroupEntry {
                            binding,
                            resource: resolve(buf, step.store).as_entire_binding(),
                        }
                    }));
                    ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(&step.node),
                        layout: &pipeline.get_bind_group_layout(0),
                        entries: &entries,
                    })
                })
                .collect();
        let mut output_offsets = Vec::new();
        let mut staging_size = 0;
        for &o in &lowered.outputs {
            output_offsets.push(staging_size);
            staging_size += bytes[o].next_multiple_of(4);
        }
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: staging_size.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.save_pipeline_cache();
        Ok(GpuProgram {
            lowered,
            value_slot,
            slots,
            pipelines,
            bind_groups,
            staging,
            output_offsets,
            precision: ctx.precision,
            last_phases: RunPhases::default(),
            _uniforms: uniforms,
            _dummy: [dummy, dummy_writable],
        })
    }

    /// Images per run.
    pub fn batch(&self) -> usize {
        self.lowered.batch
    }

    /// One run of a batch program: `runs[r]` are image r's inputs (`shared` ones, the same
    /// slice in every run, are uploaded once); one submission, one readback; each image's
    /// outputs as `run` gives them alone.
    pub fn run_batched(&self, ctx: &GpuContext, runs: &[Vec<&[f32]>]) -> Result<Vec<Outputs>> {
        for inputs in runs {
            self.check_inputs(inputs)?;
        }
        if runs.len() != self.batch() {
            return Err(Error::new(format!(
                "GPU program: {} runs for a batch of {}",
                runs.len(),
                self.batch()
            )));
        }
        for (k, &v) in self.lowered.inputs.iter().enumerate() {
            let value = &self.lowered.values[v];
            let bytes = if value.copies == 1 {
                self.to_store_bytes(v, runs[0][k])
            } else {
                let data: Vec<f32> = runs.iter().flat_map(|r| r[k].iter().copied()).collect();
                self.to_store_bytes(v, &data)
            };
            ctx.queue
                .write_buffer(&self.slots[self.value_slot[v]], 0, &bytes);
        }
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        self.record(&mut encoder, None);
        ctx.queue.submit([encoder.finish()]);
        let outputs = self.read_outputs(ctx)?;
        // Each output holds the images one after another.
        let mut per_run: Vec<Outputs> = vec![Vec::new(); runs.len()];
        for (&o, data) in self.lowered.outputs.iter().zip(outputs) {
            let n = self.lowered.values[o].elems;
            for (r, chunk) in data.chunks(n).enumerate().take(runs.len()) {
                per_run[r].push(chunk.to_vec());
            }
        }
        Ok(per_run)
    }

    /// Every dispatch of a run, as lowered.
    pub fn shape(&self) -> Vec<DispatchInfo> {
        self.lowered
            .steps
            .iter()
            .map(|s| DispatchInfo {
                node: s.node.clone(),
                kernel: s.key.entry,
                workgroups: s.workgroups.iter().map(|&w| w as u64).product(),
                flops: s.flops,
                serial_steps: s.serial_steps,
            })
            .collect()
    }

    pub fn last_phases(&self) -> RunPhases {
        self.last_phases
    }

    /// Uploads `inputs` (graph order), runs every step in one submit, and reads back every
    /// graph output as f32; records the host-side phases.
    pub fn run(&mut self, ctx: &GpuContext, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        let t0 = Instant::now();
        self.upload_inputs(ctx, inputs)?;
        let t1 = Instant::now();
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        self.record(&mut encoder, None);
        let commands = encoder.finish();
        let t2 = Instant::now();
        ctx.queue.submit([commands]);
        ctx.wait()?;
        let t3 = Instant::now();
        let outputs = self.read_outputs(ctx)?;
        let t4 = Instant::now();
        self.last_phases = RunPhases {
            upload_s: (t1 - t0).as_secs_f64(),
            record_s: (t2 - t1).as_secs_f64(),
            submit_to_done_s: (t3 - t2).as_secs_f64(),
            readback_s: (t4 - t3).as_secs_f64(),
            submits: 1,
        };
        Ok(outputs)
    }

    /// `producer`'s forward on `producer_inputs`, then this one's on `early` followed by the
    /// producer's outputs, in one submission: the outputs are copied into this program's
    /// input buffers on the device (converted where the two store them in different types,
    /// as the readback and upload would), and both programs' outputs read back once.
    pub fn run_after(
        &mut self,
        ctx: &GpuContext,
        producer: &GpuProgram,
        producer_inputs: &[&[f32]],
        early: &[&[f32]],
    ) -> Result<(Outputs, Outputs)> {
        let inputs = &self.lowered.inputs;
        let handed = inputs.len().checked_sub(early.len());
        let handed = handed.filter(|&h| h <= producer.lowered.outputs.len());
        let Some(handed) = handed else {
            return Err(Error::new("GPU program: chained inputs do not add up"));
        };
        let t0 = Instant::now();
        producer.upload_inputs(ctx, producer_inputs)?;
        for (&v, data) in inputs.iter().zip(early) {
            self.check_input(v, data)?;
            let bytes = self.to_store_bytes(v, data);
            ctx.queue
                .write_buffer(&self.slots[self.value_slot[v]], 0, &bytes);
        }
        let t1 = Instant::now();
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        producer.record(&mut encoder, None);
        let pairs = producer.lowered.outputs[..handed]
            .iter()
            .zip(&inputs[early.len()..]);
        // Bind groups of the conversions live until the pass is recorded.
        let mut casts = Vec::new();
        for (&from, &to) in pairs {
            let (a, b) = (&producer.lowered.values[from], &self.lowered.values[to]);
            if a.elems != b.elems {
                return Err(Error::new(format!(
                    "GPU program: {} ({} values) cannot feed {} ({})",
                    a.name, a.elems, b.name, b.elems
                )));
            }
            let src = &producer.slots[producer.value_slot[from]];
            let dst = &self.slots[self.value_slot[to]];
            if a.store(self.precision) == b.store(self.precision) {
                let size = self.value_bytes(to).next_multiple_of(4);
                encoder.copy_buffer_to_buffer(src, 0, dst, 0, size);
            } else {
                casts.push(self.handover_cast(ctx, b.store(self.precision), a.elems, src, dst));
            }
        }
        if !casts.is_empty() {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("handover"),
                timestamp_writes: None,
            });
            for (pipeline, group, [x, y, z], _uniform) in &casts {
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(*x, *y, *z);
            }
        }
        self.record(&mut encoder, None);
        let commands = encoder.finish();
        let t2 = Instant::now();
        ctx.queue.submit([commands]);
        ctx.wait()?;
        let t3 = Instant::now();
        let first = producer.read_outputs(ctx)?;
        let second = self.read_outputs(ctx)?;
        let t4 = Instant::now();
        self.last_phases = RunPhases {
            upload_s: (t1 - t0).as_secs_f64(),
            record_s: (t2 - t1).as_secs_f64(),
            submit_to_done_s: (t3 - t2).as_secs_f64(),
            readback_s: (t4 - t3).as_secs_f64(),
            submits: 1,
        };
        Ok((first, second))
    }

    /// A conversion dispatch from `src` to `dst` (`to`: the type of `dst`), with its own
    /// uniform buffer: pipeline, bind group, workgroups.
    fn handover_cast(
        &self,
        ctx: &GpuContext,
        to: Precision,
        elems: usize,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
    ) -> (
        Arc<wgpu::ComputePipeline>,
        wgpu::BindGroup,
        [u32; 3],
        wgpu::Buffer,
    ) {
        // Placeholders: the bindings are resolved here, not through the lowering's values.
        let step = cast_step("handover", to, elems, Buf::Unused, Buf::UnusedWritable);
        let pipeline = ctx.pipeline(&step.key);
        let uniform = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("handover params"),
            size: 64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.queue
            .write_buffer(&uniform, 0, bytemuck::cast_slice(&step.params));
        let (s, d) = (step.bindings[0].0, step.bindings[1].0);
        let entries = [
            wgpu::BindGroupEntry {
                binding: step.uniform_binding,
                resource: uniform.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: s,
                resource: src.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: d,
                resource: dst.as_entire_binding(),
            },
        ];
        let group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("handover"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        (pipeline, group, step.workgroups, uniform)
    }

    /// Records every step (one compute pass; with `timestamps`, one pass per step so that
    /// each is timed) and the copies of the outputs to the readback buffer.
    /// Several runs in one command encoder and one submit (e.g. a batch of queries against
    /// one prompt): per run, its inputs are copied into their slots from one upload buffer,
    /// the forward pass is recorded, and its outputs are copied out; one readback at the end.
    /// Inputs shared by every run (the same slice, e.g. the prompt) are uploaded once.
    pub fn run_many(&self, ctx: &GpuContext, runs: &[Vec<&[f32]>]) -> Result<Vec<Vec<Vec<f32>>>> {
        for inputs in runs {
            self.check_inputs(inputs)?;
        }
        let Some(first) = runs.first() else {
            return Ok(Vec::new());
        };
        // Upload layout: every distinct input slice once, 256-byte aligned (copy offsets
        // need 4; 256 keeps each start on a nice boundary).
        let mut upload = Vec::new();
        let mut placement: Vec<Vec<u64>> = Vec::with_capacity(runs.len());
        for inputs in runs {
            let mut offsets = Vec::with_capacity(inputs.len());
            for (k, data) in inputs.iter().enumerate() {
                let shared = std::ptr::eq(*data, first[k]) && !placement.is_empty();
                if shared {
                    offsets.push(placement[0][k]);
                    continue;
                }
                offsets.push(upload.len() as u64);
                upload.extend_from_slice(&self.to_store_bytes(self.lowered.inputs[k], data));
                upload.resize(upload.len().next_multiple_of(256), 0);
            }
            placement.push(offsets);
        }
        let source = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("batch inputs"),
            size: (upload.len() as u64).max(4),
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.queue.write_buffer(&source, 0, &upload);
        let per_run = self.staging.size();
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("batch readback"),
            size: per_run * runs.len() as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        for (r, offsets) in placement.iter().enumerate() {
            for (&v, &offset) in self.lowered.inputs.iter().zip(offsets) {
                let size = self.value_bytes(v).next_multiple_of(4);
                let slot = &self.slots[self.value_slot[v]];
                encoder.copy_buffer_to_buffer(&source, offset, slot, 0, size);
            }
            self.record_forward(&mut encoder, None);
            self.copy_outputs(&mut encoder, &staging, r as u64 * per_run);
        }
        ctx.queue.submit([encoder.finish()]);
        let bytes = map_read(ctx, &staging)?;
        Ok((0..runs.len())
            .map(|r| self.decode_outputs(&bytes[r * per_run as usize..]))
            .collect())
    }

    fn record(&self, encoder: &mut wgpu::CommandEncoder, timestamps: Option<&wgpu::QuerySet>) {
        self.record_forward(encoder, timestamps);
        self.copy_outputs(encoder, &self.staging, 0);
    }

    /// Copies every output into `staging` from `base` on, at the offsets of `output_offsets`.
    fn copy_outputs(&self, encoder: &mut wgpu::CommandEncoder, staging: &wgpu::Buffer, base: u64) {
        for (&o, &offset) in self.lowered.outputs.iter().zip(&self.output_offsets) {
            let size = self.value_bytes(o).next_multiple_of(4);
            let slot = &self.slots[self.value_slot[o]];
            encoder.copy_buffer_to_buffer(slot, 0, staging, base + offset, size);
        }
    }

    fn record_forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        timestamps: Option<&wgpu::QuerySet>,
    ) {
        let n = self.lowered.steps.len();
        match timestamps {
            None => {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("forward"),
                    timestamp_writes: None,
                });
                (0..n).for_each(|i| self.dispatch(&mut pass, i));
            }
            Some(query_set) => {
                for i in 0..n {
                    let writes = wgpu::ComputePassTimestampWrites {
                        query_set,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    };
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some(&self.lowered.steps[i].node),
                        timestamp_writes: Some(writes),
                    });
                    self.dispatch(&mut pass, i);
                }
            }
        }
    }

    fn dispatch(&self, pass: &mut wgpu::ComputePass, i: usize) {
        pass.set_pipeline(&self.pipelines[i]);
        pass.set_bind_group(0, &self.bind_groups[i], &[]);
        let [x, y, z] = self.lowered.steps[i].workgroups;
        pass.dispatch_workgroups(x, y, z);
    }

    /// Runs once with a timestamp around every step: `(graph node, kernel entry point,
    /// seconds, FLOPs)` per step. Needs the adapter's `TIMESTAMP_QUERY`.
    pub fn profile(
        &self,
        ctx: &GpuContext,
        inputs: &[&[f32]],
    ) -> Result<Vec<(String, &'static str, f64, f64)>> {
        if !ctx.timestamps {
            return Err(Error::new(format!(
                "GPU {}: no TIMESTAMP_QUERY, so no per-kernel profile",
                ctx.adapter
            )));
        }
        let n = self.lowered.steps.len() as u32;
        let query_set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * n,
        });
        let bytes = 16 * n as u64;
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.upload_inputs(ctx, inputs)?;
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        self.record(&mut encoder, Some(&query_set));
        encoder.resolve_query_set(&query_set, 0..2 * n, &resolve, 0);
        encoder.copy_buffer_to_buffer(&resolve, 0, &readback, 0, bytes);
        ctx.queue.submit([encoder.finish()]);
        self.read_outputs(ctx)?;
        let ticks = read_u64s(ctx, &readback)?;
        let period = ctx.queue.get_timestamp_period() as f64 * 1e-9;
        Ok(self
            .lowered
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let dt = ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period;
                (s.node.clone(), s.key.entry, dt, s.flops)
            })
            .collect())
    }

    fn upload_inputs(&self, ctx: &GpuContext, inputs: &[&[f32]]) -> Result<()> {
        self.check_inputs(inputs)?;
        for (&v, data) in self.lowered.inputs.iter().zip(inputs) {
            let bytes = self.to_store_bytes(v, data);
            ctx.queue
                .write_buffer(&self.slots[self.value_slot[v]], 0, &bytes);
        }
        Ok(())
    }

    fn check_inputs(&self, inputs: &[&[f32]]) -> Result<()> {
        if inputs.len() != self.lowered.inputs.len() {
            return Err(Error::new("GPU program: wrong number of inputs"));
        }
        for (&v, data) in self.lowered.inputs.iter().zip(inputs) {
            self.check_input(v, data)?;
        }
        Ok(())
    }

    /// `data` has one image's values of program input `v`.
    fn check_input(&self, v: usize, data: &[f32]) -> Result<()> {
        let value = &self.lowered.values[v];
        if data.len() != value.elems {
            return Err(Error::new(format!(
                "GPU program: input {} has {} values, expected {}",
                value.name,
                data.len(),
                value.elems
            )));
        }
        Ok(())
    }

    fn read_outputs(&self, ctx: &GpuContext) -> Result<Vec<Vec<f32>>> {
        let bytes = map_read(ctx, &self.staging)?;
        Ok(self.decode_outputs(&bytes))
    }

    /// The outputs of one run from its readback bytes (laid out by `output_offsets`).
    fn decode_outputs(&self, bytes: &[u8]) -> Vec<Vec<f32>> {
        self.lowered
            .outputs
            .iter()
            .zip(&self.output_offsets)
            .map(|(&o, &offset)| {
                let n = self.lowered.values[o].elems * self.lowered.values[o].copies;
                let start = offset as usize;
                let end = start + self.value_bytes(o) as usize;
                self.decode_store_bytes(o, &bytes[start..end], n)
            })
            .collect()
    }

    fn value_bytes(&self, v: usize) -> u64 {
        let value = &self.lowered.values[v];
        (value.elems * value.copies) as u64 * element_bytes(value.always_f32, self.precision)
    }

    /// `data` in the storage type of program value `v`.
    fn to_store_bytes(&self, v: usize, data: &[f32]) -> Vec<u8> {
        let mut bytes = match self.lowered.values[v].store(self.precision) {
            Precision::F32 => bytemuck::cast_slice(data).to_vec(),
            Precision::F16 => f16_bytes(data),
        };
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    fn decode_store_bytes(&self, v: usize, bytes: &[u8], n: usize) -> Vec<f32> {
        match self.lowered.values[v].store(self.precision) {
            Precision::F32 => bytes
                .chunks_exact(4)
                .take(n)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Precision::F16 => bytes
                .chunks_exact(2)
                .take(n)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

/// Maps `buffer` (MAP_READ) after the queued work and returns a copy of its bytes.
fn map_read(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Result<Vec<u8>> {
    let slice = buffer.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.wait()?;
    let failed = |e: String| Error::new(format!("GPU {}: readback failed: {e}", ctx.adapter));
    rx.recv()
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))?;
    let bytes = slice
        .get_mapped_range()
        .map_err(|e| failed(e.to_string()))?
        .to_vec();
    buffer.unmap();
    Ok(bytes)
}

fn read_u64s(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Result<Vec<u64>> {
    Ok(map_read(ctx, buffer)?
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

fn element_bytes(always_f32: bool, precision: Precision) -> u64 {
    if always_f32 {
        4
    } else {
        precision.bytes()
    }
}

/// Buffer bytes for a value: padded to 256 so that every vec4 view and copy stays in bounds.
fn value_bytes(elems: usize, always_f32: bool, precision: Precision) -> u64 {
    (elems as u64 * element_bytes(always_f32, precision))
        .max(16)
        .next_multiple_of(256)
}

/// First and last step binding each program value; inputs live from the start, outputs to
/// the end. The program's values are not the graph's (fused ones are never written, gates
/// and partial sums are added), so the GPU plans its own, with the shared liveness.
fn lifetimes(l: &Lowered) -> Vec<Lifetime> {
    let mut live = Liveness::new(l.values.len(), l.inputs.iter().copied());
    for (i, step) in l.steps.iter().enumerate() {
        for &(_, b) in &step.bindings {
            if let Buf::Value(v) = b {
                live.touch(v, i);
            }
        }
    }
    live.finish(l.outputs.iter().copied(), l.steps.len())
}

fn uniform_buffer(ctx: &GpuContext, l: &Lowered) -> wgpu::Buffer {
    let mut data = vec![0u8; (l.steps.len().max(1) as u64 * UNIFORM_STRIDE) as usize];
    for (i, step) in l.steps.iter().enumerate() {
        let at = i * UNIFORM_STRIDE as usize;
        data[at..at + 64].copy_from_slice(bytemuck::cast_slice(&step.params));
    }
    let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("params"),
        size: data.len() as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    ctx.queue.write_buffer(&buffer, 0, &data);
    buffer
}

//! The device layer: picks an adapter, opens one device per engine, and builds compute
//! pipelines once (through wgpu's `PipelineCache` when the adapter offers it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::graph::Precision;
use crate::util::sync::lock;

/// What the chosen adapter is, for messages and `auto` decisions.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    /// A software rasterizer (lavapipe, WARP, SwiftShader): correct but slower than the CPU backend.
    pub software: bool,
    /// Offers `SHADER_F16` (`--precision f16`).
    pub f16: bool,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.software { ", software" } else { "" };
        write!(f, "{} ({}{kind})", self.name, self.backend)
    }
}

/// Backends we drive: never GL (see Cargo.toml); `WGPU_BACKEND` narrows the set when set.
fn backends() -> wgpu::Backends {
    let ours = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    wgpu::Backends::from_env().map_or(ours, |b| b & ours)
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends();
    wgpu::Instance::new(desc)
}

fn summary(adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        software: info.device_type == wgpu::DeviceType::Cpu,
        f16: adapter.features().contains(wgpu::Features::SHADER_F16),
    }
}

fn request_adapter(instance: &wgpu::Instance) -> Result<wgpu::Adapter> {
    let options = wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        apply_limit_buckets: false,
    };
    pollster::block_on(instance.request_adapter(&options)).map_err(|e| {
        let problem = format!(
            "no GPU adapter (Vulkan, Metal or DX12) found: {e}; install a driver \
             (e.g. mesa-vulkan-drivers) or use the CPU backend"
        );
        Error::setting("backend", problem)
    })
}

/// The adapter `--backend gpu` would use, if any (for `auto` and for test skips).
pub fn probe_adapter() -> Option<AdapterSummary> {
    request_adapter(&instance()).ok().map(|a| summary(&a))
}

/// Identifies one specialized pipeline: shader family, entry point, storage type, and the
/// override constants (sorted by name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub family: Family,
    pub entry: &'static str,
    /// The `store` type of its activations and conv weights: the program's precision, or
    /// f32 for a full-precision node under f16 storage.
    pub store: Precision,
    pub constants: Vec<(&'static str, u32)>,
}

/// One WGSL file per kernel family, embedded at compile time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Conv,
    Depthwise,
    SqueezeExcite,
    Scse,
    Align,
    Head,
    Cast,
    Winograd,
}

impl Family {
    fn source(self) -> &'static str {
        match self {
            Family::Conv => include_str!("../../shaders/conv.wgsl"),
            Family::Depthwise => include_str!("../../shaders/depthwise.wgsl"),
            Family::SqueezeExcite => include_str!("../../shaders/squeeze_excite.wgsl"),
            Family::Scse => include_str!("../../shaders/scse.wgsl"),
            Family::Align => include_str!("../../shaders/align.wgsl"),
            Family::Head => include_str!("../../shaders/head.wgsl"),
            Family::Cast => include_str!("../../shaders/cast.wgsl"),
            Family::Winograd => include_str!("../../shaders/winograd.wgsl"),
        }
    }
}

/// The template step: a fixed header choosing the storage type, the activation and input-mode
/// codes (defined in `params`), the shared helpers, then the family's file. Nothing
/// user-provided is ever pasted into a shader.
pub(super) fn shader_source(family: Family, precision: Precision) -> String {
    let header = match precision {
        Precision::F32 => "alias store = f32;\n",
        Precision::F16 => "enable f16;\nalias store = f16;\n",
    };
    let codes = super::params::wgsl_constants();
    let common = include_str!("../../shaders/common.wgsl");
    // The input modes' reader: one definition for the two families that read conv inputs.
    let inputs = match family {
        Family::Conv | Family::Winograd => include_str!("../../shaders/input_modes.wgsl"),
        _ => "",
    };
    format!("{header}{codes}{common}\n{inputs}\n{}", family.source())
}

/// One device, its queue, and every pipeline built so far.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterSummary,
    pub precision: Precision,
    pub limits: wgpu::Limits,
    pub timestamps: bool,
    cache: Option<(wgpu::PipelineCache, PathBuf)>,
    modules: Mutex<HashMap<(Family, Precision), wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

impl GpuContext {
    /// Opens the best adapter with the adapter's own limits (not WebGPU's defaults, which
    /// cap storage bindings at 128 MiB).
    pub fn new(precision: Precision) -> Result<GpuContext> {
        let adapter = request_adapter(&instance())?;
        let summary = summary(&adapter);
        let available = adapter.features();
        let mut features = wgpu::Features::empty();
        if precision == Precision::F16 {
            if !available.contains(wgpu::Features::SHADER_F16) {
                return Err(Error::setting(
                    "precision",
                    format!(
                        "f16 storage needs the SHADER_F16 feature, which the GPU {summary} \
                         does not offer; use f32"
                    ),
                ));
            }
            features |= wgpu::Features::SHADER_F16;
        }
        for optional in [
            wgpu::Features::PIPELINE_CACHE,
            wgpu::Features::TIMESTAMP_QUERY,
        ] {
            if available.contains(optional) {
                features |= optional;
            }
        }
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("metauas"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::new(format!("GPU {summary}: could not open a device: {e}")))?;
        let cache = features
            .contains(wgpu::Features::PIPELINE_CACHE)
            .then(|| open_pipeline_cache(&device, &adapter))
            .flatten();
        Ok(GpuContext {
            device,
            queue,
            adapter: summary,
            precision,
            limits,
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            cache,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    /// The pipeline for `key`, compiled on first use and shared afterwards.
    pub fn pipeline(&self, key: &PipelineKey) -> Arc<wgpu::ComputePipeline> {
        if let Some(p) = lock(&self.pipelines).get(key) {
            return p.clone();
        }
        let module = self.module(key.family, key.store);
        let constants: Vec<(&str, f64)> =
            key.constants.iter().map(|&(n, v)| (n, v as f64)).collect();
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.entry),
                layout: None,
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: self.cache.as_ref().map(|(c, _)| c),
            });
        let pipeline = Arc::new(pipeline);
        lock(&self.pipelines).insert(key.clone(), pipeline.clone());
        pipeline
    }

    fn module(&self, family: Family, store: Precision) -> wgpu::ShaderModule {
        let mut modules = lock(&self.modules);
        modules
            .entry((family, store))
            .or_insert_with(|| {
                let source = shader_source(family, store);
                let desc = wgpu::ShaderModuleDescriptor {
                    label: Some(&format!("{family:?}")),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                };
                let mut checks = wgpu::ShaderRuntimeChecks::checked();
                // Our kernels only: every loop runs to a bound from the uniforms (no loop
                // waits on another invocation), and every divisor is a shape, never 0 (the
                // lowering makes no step for an empty tensor). Buffer bounds checks stay:
                // a kernel indexing out of bounds is a bug that must stay contained.
                checks.force_loop_bounding = false;
                checks.int_div_checks = false;
                // SAFETY: the two conditions above, which the per-kernel property tests
                // (tests/gpu_kernels.rs) and the conformance tests exercise on every family.
                unsafe { self.device.create_shader_module_trusted(desc, checks) }
            })
            .clone()
    }

    /// Writes the pipeline cache back to disk (best effort: a cache is only an optimization).
    pub fn save_pipeline_cache(&self) {
        if let Some((cache, path)) = &self.cache {
            if let Some(data) = cache.get_data() {
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, data).is_ok() {
                    let _ = std::fs::rename(&tmp, path);
                }
            }
        }
    }

    /// Waits until the device has finished all submitted work.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::new(format!("GPU {}: {e}", self.adapter)))
    }
}

/// `$XDG_CACHE_HOME/metauas` or `~/.cache/metauas`, one file per adapter and driver.
fn pipeline_cache_path(adapter: &wgpu::Adapter) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let key = wgpu::util::pipeline_cache_key(&adapter.get_info())?;
    Some(base.join("metauas").join(key))
}

fn open_pipeline_cache(
    device: &wgpu::Device,
    adapter: &wgpu::Adapter,
) -> Option<(wgpu::PipelineCache, PathBuf)> {
    let path = pipeline_cache_path(adapter)?;
    std::fs::create_dir_all(path.parent()?).ok()?;
    let data = std::fs::read(&path).ok();
    // SAFETY: the data was written by `get_data` of a cache for the same adapter key (wgpu
    // validates its header and falls back to an empty cache when it does not match).
    let cache = unsafe {
        device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
            label: Some("metauas"),
            data: data.as_deref(),
            fallback: true,
        })
    };
    Some((cache, path))
}

/// Everything `metauas gpu-info` reports about the adapter the GPU backend would open:
/// identity, driver, the features and limits the kernels care about, subgroup sizes and the
/// cooperative-matrix configurations it offers.
pub fn adapter_details() -> Result<serde_json::Value> {
    let adapter = request_adapter(&instance())?;
    let info = adapter.get_info();
    let features = adapter.features();
    let limits = adapter.limits();
    let has = |f: wgpu::Features| features.contains(f);
    let coop: Vec<serde_json::Value> = adapter
        .cooperative_matrix_properties()
        .iter()
        .map(|p| {
            serde_json::json!({
                "m": p.m_size, "n": p.n_size, "k": p.k_size,
                "ab": format!("{:?}", p.ab_type), "cr": format!("{:?}", p.cr_type),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "name": info.name,
        "backend": format!("{:?}", info.backend),
        "device_type": format!("{:?}", info.device_type),
        "vendor": format!("0x{:04x}", info.vendor),
        "device": format!("0x{:04x}", info.device),
        "driver": info.driver,
        "driver_info": info.driver_info,
        "features": {
            "SHADER_F16": has(wgpu::Features::SHADER_F16),
            "SUBGROUP": has(wgpu::Features::SUBGROUP),
            "TIMESTAMP_QUERY": has(wgpu::Features::TIMESTAMP_QUERY),
            "PIPELINE_CACHE": has(wgpu::Features::PIPELINE_CACHE),
            "EXPERIMENTAL_COOPERATIVE_MATRIX": has(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
        },
        "all_features": format!("{features:?}"),
        "subgroup_size": [info.subgroup_min_size, info.subgroup_max_size],
        "limits": {
            "max_storage_buffer_binding_size": limits.max_storage_buffer_binding_size,
            "max_buffer_size": limits.max_buffer_size,
            "max_storage_buffers_per_shader_stage": limits.max_storage_buffers_per_shader_stage,
            "max_compute_workgroup_storage_size": limits.max_compute_workgroup_storage_size,
            "max_compute_invocations_per_workgroup": limits.max_compute_invocations_per_workgroup,
            "max_compute_workgroups_per_dimension": limits.max_compute_workgroups_per_dimension,
        },
        "cooperative_matrix": coop,
    }))
}

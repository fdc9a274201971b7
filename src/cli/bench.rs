//! `metauas bench`: median and p90 latency of the full forward (prompt + query) and of a
//! query against a cached prompt, peak RSS, and optionally a per-op profile.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use metauas::graph::{DispatchInfo, Graph, RunPhases};
use metauas::io::image::{decode_image_bytes, preprocess};
use metauas::io::jpeg::encode_jpeg;
use metauas::io::output::rgb_png_bytes;
use metauas::model::{check_size, Engine};
use metauas::synth::{camera_frame, synthetic_image, synthetic_weights, WeightRecipe};
use metauas::{Error, Result};

use super::RunOptions;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub(super) run: RunOptions,
    /// Real weights; by default deterministic synthetic ones (time does not depend on values).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Timed iterations (after 2 warm-up runs).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also time batches of N queries against one prompt (`segment_batch`: one submission
    /// per batch on the GPU) and report images per second.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    batch: Option<u16>,
    /// Add a per-op table (time and GFLOP/s) of the query graph.
    #[arg(long)]
    profile: bool,
    /// Also time a camera frame end to end, from its bytes to the verdict (decode,
    /// pre-process, forward with the cached prompt, verdict + regions): a synthetic
    /// 2448x2048 frame as a quality-90 JPEG and as a PNG.
    #[arg(long)]
    frame: bool,
    /// Time these image files end to end like `--frame` (your camera's frames).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    frame_file: Vec<PathBuf>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    check_size(args.run.size)?;
    let options = args.run.engine_options();
    let engine = match &args.weights {
        Some(path) => Engine::from_file_with(path, args.run.size, options)?,
        None => {
            let recipe = WeightRecipe::unit(1);
            Engine::with_options(&synthetic_weights(&recipe), args.run.size, options)?
        }
    };
    super::announce(&engine);
    let prompt_img = synthetic_image(1, args.run.size, args.run.size, None);
    let query_img = synthetic_image(
        2,
        args.run.size,
        args.run.size,
        Some((args.run.size / 3, args.run.size / 3, args.run.size / 8)),
    );

    let mut full = Vec::with_capacity(args.iters);
    let mut cached = Vec::with_capacity(args.iters);
    let mut phases = Vec::with_capacity(args.iters);
    let mut preprocess_ms = Vec::with_capacity(args.iters);
    let prompt = engine.encode_prompt(&prompt_img)?;
    // Submissions per full forward and per cached query, as the GPU counted them.
    let mut submits = (0, 0);
    for i in 0..args.iters + 2 {
        let t = Instant::now();
        engine.segment_pair(&prompt_img, &query_img)?;
        let full_ms = t.elapsed().as_secs_f64() * 1e3;
        submits.0 = engine.last_query_phases().map_or(0, |p| p.submits);
        let t = Instant::now();
        engine.segment(&prompt, &query_img)?;
        let cached_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        std::hint::black_box(preprocess(&query_img, args.run.size));
        let pre_ms = t.elapsed().as_secs_f64() * 1e3;
        if i >= 2 {
            full.push(full_ms);
            cached.push(cached_ms);
            preprocess_ms.push(pre_ms);
            phases.extend(engine.last_query_phases());
            submits.1 = engine.last_query_phases().map_or(0, |p| p.submits);
        }
    }
    let (full_med, full_p90) = (percentile(&full, 50.0), percentile(&full, 90.0));
    let (cached_med, cached_p90) = (percentile(&cached, 50.0), percentile(&cached, 90.0));
    let batch = match args.batch {
        Some(n) => Some(time_batches(
            &engine,
            &prompt,
            args.run.size,
            n.into(),
            args.iters,
        )?),
        None => None,
    };
    let frames = time_frames(&engine, &prompt, &args)?;
    let rss = peak_rss_mb();
    if args.json {
        let obj = serde_json::json!({
            "full_ms": full_med, "cached_ms": cached_med,
            "p90_full_ms": full_p90, "p90_cached_ms": cached_p90,
            "peak_rss_mb": rss, "backend": engine.backend_kind(), "size": args.run.size,
            "threads": rayon::current_num_threads(), "iters": args.iters,
            "device": engine.backend_description(), "dispatches": engine.gpu_dispatches(),
            "preprocess_ms": percentile(&preprocess_ms, 50.0),
        });
        let mut obj = obj;
        if let Some(shape) = shape_json(&engine, submits) {
            obj["shape"] = shape;
        }
        if !phases.is_empty() {
            obj["phases_cached_ms"] = phases_json(&phases);
        }
        if !frames.is_empty() {
            obj["frames"] = frames.iter().map(|f| f.json(cached_med)).collect();
        }
        if let (Some(n), Some((ms, per_s))) = (args.batch, batch) {
            obj["batch"] = n.into();
            obj["batch_ms"] = ms.into();
            obj["batch_images_per_s"] = per_s.into();
        }
        println!("{obj}");
    } else {
        println!(
            "metauas bench: size {} backend {} iters {}",
            args.run.size,
            engine.backend_description(),
            args.iters
        );
        println!("full forward (prompt + query): median {full_med:.2} ms, p90 {full_p90:.2} ms");
        println!(
            "query with cached prompt:      median {cached_med:.2} ms, p90 {cached_p90:.2} ms"
        );
        if let (Some(n), Some((ms, per_s))) = (args.batch, batch) {
            println!("batch of {n} queries, one prompt: median {ms:.2} ms, {per_s:.1} images/s");
        }
        for f in &frames {
            f.print(cached_med);
        }
        println!("peak RSS: {rss:.1} MB");
    }
    if args.profile && engine.backend_kind() == "gpu" {
        gpu_profile(&engine, &prompt, &query_img)?;
    } else if args.profile {
        profile(&engine, &prompt, &query_img, args.iters.max(1))?;
    }
    Ok(())
}

/// One frame's way from bytes to a verdict, median ms per step.
struct FrameTimes {
    name: String,
    bytes: usize,
    width: usize,
    height: usize,
    decode: f64,
    preprocess: f64,
    forward: f64,
    decide: f64,
    total: f64,
}

impl FrameTimes {
    /// Decode + pre-process against the cached forward of the model-size image.
    fn input_share(&self, cached_ms: f64) -> f64 {
        (self.decode + self.preprocess) / cached_ms
    }

    fn json(&self, cached_ms: f64) -> serde_json::Value {
        serde_json::json!({
            "name": self.name, "bytes": self.bytes, "width": self.width, "height": self.height,
            "decode_ms": self.decode, "preprocess_ms": self.preprocess,
            "forward_ms": self.forward, "decide_ms": self.decide, "total_ms": self.total,
            "decode_preprocess_over_cached_forward": self.input_share(cached_ms),
        })
    }

    fn print(&self, cached_ms: f64) {
        println!(
            "frame {} ({}x{}, {} bytes): decode {:.2} ms, preprocess {:.2} ms, forward {:.2} ms, \
             verdict + regions {:.2} ms; bytes to verdict {:.2} ms (decode + preprocess = {:.0}% \
             of the cached forward)",
            self.name,
            self.width,
            self.height,
            self.bytes,
            self.decode,
            self.preprocess,
            self.forward,
            self.decide,
            self.total,
            100.0 * self.input_share(cached_ms)
        );
    }
}

/// The frames `--frame` and `--frame-file` ask for, each timed end to end.
fn time_frames(
    engine: &Engine,
    prompt: &metauas::model::PromptFeatures,
    args: &BenchArgs,
) -> Result<Vec<FrameTimes>> {
    let mut sources: Vec<(String, Vec<u8>)> = Vec::new();
    if args.frame {
        let frame = camera_frame(FRAME_WIDTH, FRAME_HEIGHT);
        let jpeg = encode_jpeg(&frame, 90).map_err(|e| Error::new(format!("frame: {e}")))?;
        let png = rgb_png_bytes(&frame.data, frame.width, frame.height)
            .map_err(|e| Error::new(format!("frame: {e}")))?;
        sources.push(("synthetic.jpg".into(), jpeg));
        sources.push(("synthetic.png".into(), png));
    }
    for path in &args.frame_file {
        let bytes = std::fs::read(path).map_err(|e| Error::at(path, e))?;
        sources.push((path.display().to_string(), bytes));
    }
    sources
        .iter()
        .map(|(name, bytes)| time_frame(engine, prompt, name, bytes, args.iters.max(1)))
        .collect()
}

const FRAME_WIDTH: usize = 2448;
const FRAME_HEIGHT: usize = 2048;

/// Bytes -> image -> model input -> map -> verdict, `iters` times after one warm-up; the
/// regions are those above the map's 99.5th percentile (a handful, as on a real defect).
fn time_frame(
    engine: &Engine,
    prompt: &metauas::model::PromptFeatures,
    name: &str,
    bytes: &[u8],
    iters: usize,
) -> Result<FrameTimes> {
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let first = decode_image_bytes(bytes, name)?;
    let map = engine.segment(prompt, &first)?;
    let policy = metauas::synth::top_half_percent_policy(&map.data);
    let mut steps: [Vec<f64>; 5] = Default::default();
    for _ in 0..iters {
        let start = Instant::now();
        let t = Instant::now();
        let image = decode_image_bytes(bytes, name)?;
        steps[0].push(ms(t));
        let t = Instant::now();
        let input = preprocess(&image, engine.size());
        steps[1].push(ms(t));
        let t = Instant::now();
        let mut map = engine.segment_preprocessed(prompt, &input)?;
        steps[2].push(ms(t));
        let t = Instant::now();
        std::hint::black_box(policy.decide(&mut map, (image.width, image.height))?);
        steps[3].push(ms(t));
        steps[4].push(ms(start));
    }
    let [decode, preprocess, forward, decide, total] = steps.map(|v| percentile(&v, 50.0));
    Ok(FrameTimes {
        name: name.to_string(),
        bytes: bytes.len(),
        width: first.width,
        height: first.height,
        decode,
        preprocess,
        forward,
        decide,
        total,
    })
}

/// How the GPU forward is cut up: dispatches and submits per cached query and per full
/// forward, and how many workgroups the conv dispatches launch (a 132-SM GPU needs about 264
/// to fill two waves).
fn shape_json(engine: &Engine, (full, cached): (usize, usize)) -> Option<serde_json::Value> {
    let (prompt, query) = engine.gpu_shape()?;
    let is_conv = |d: &&DispatchInfo| d.kernel == "conv2d_nhwc";
    let stats = |ds: &[DispatchInfo]| {
        let mut conv: Vec<u64> = ds.iter().filter(is_conv).map(|d| d.workgroups).collect();
        conv.sort_unstable();
        let under = ds.iter().filter(|d| d.workgroups < 264).count();
        // Under two waves with a long serial loop: the dispatches that leave a big GPU idle
        // for long (the rest finish within a launch's latency).
        let long = |d: &&DispatchInfo| d.workgroups < 264 && d.serial_steps > 16;
        let idle: Vec<String> = ds.iter().filter(long).map(|d| d.node.clone()).collect();
        serde_json::json!({
            "dispatches": ds.len(),
            "conv_dispatches": conv.len(),
            "conv_workgroups_min": conv.first(),
            "conv_workgroups_median": conv.get(conv.len() / 2),
            "workgroups_min": ds.iter().map(|d| d.workgroups).min(),
            "dispatches_under_264_workgroups": under,
            "conv_serial_steps_max": ds.iter().filter(is_conv).map(|d| d.serial_steps).max(),
            "under_264_with_long_serial_loops": idle,
        })
    };
    let both: Vec<DispatchInfo> = prompt.iter().chain(&query).cloned().collect();
    Some(serde_json::json!({
        "cached": dict_with(stats(&query), "submits", cached),
        "full": dict_with(stats(&both), "submits", full),
    }))
}

fn dict_with(mut v: serde_json::Value, key: &str, n: usize) -> serde_json::Value {
    v[key] = n.into();
    v
}

/// Median of each host-side phase of the cached queries, in ms.
fn phases_json(phases: &[RunPhases]) -> serde_json::Value {
    let median = |f: fn(&RunPhases) -> f64| {
        let ms: Vec<f64> = phases.iter().map(|p| f(p) * 1e3).collect();
        percentile(&ms, 50.0)
    };
    serde_json::json!({
        "upload": median(|p| p.upload_s),
        "record": median(|p| p.record_s),
        "submit_to_done": median(|p| p.submit_to_done_s),
        "readback": median(|p| p.readback_s),
    })
}

/// Median time of `segment_batch` over batches of `n` different query images (frames of a
/// camera differ: a backend may compute identical runs once), after one warm-up batch, and
/// the images per second it means.
fn time_batches(
    engine: &Engine,
    prompt: &metauas::model::PromptFeatures,
    size: usize,
    n: usize,
    iters: usize,
) -> Result<(f64, f64)> {
    let queries: Vec<_> = (0..n)
        .map(|i| {
            let at = size / 4 + (i * size / 2) / n.max(1);
            synthetic_image(2 + i as u64, size, size, Some((at, size / 3, size / 8)))
        })
        .collect();
    let images: Vec<_> = queries.iter().collect();
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters.max(1) + 1 {
        let t = Instant::now();
        engine.segment_batch(prompt, &images)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ms = percentile(&times, 50.0);
    Ok((ms, n as f64 / (ms * 1e-3)))
}

fn profile(
    engine: &Engine,
    prompt: &metauas::model::PromptFeatures,
    query: &metauas::io::image::RgbImage8,
    iters: usize,
) -> Result<()> {
    let g: &Graph = engine.query_graph();
    let mut total = vec![0f64; g.nodes.len()];
    for _ in 0..iters {
        let mut times = Vec::with_capacity(g.nodes.len());
        engine.segment_timed(prompt, query, Some(&mut times))?;
        total.iter_mut().zip(&times).for_each(|(t, x)| *t += x);
    }
    // The column is relative to all threads in use at the ISA the kernels run with: the
    // nominal peak, or the one measured now when a turbo clock beats it.
    let nominal =
        metauas::cpu::kernels::fma_peak_gflops_per_core() * rayon::current_num_threads() as f64;
    let peak = nominal.max(metauas::cpu::kernels::measured_fma_peak_gflops());
    let sum: f64 = total.iter().sum();
    println!(
        "\nper-op profile of the query graph (mean of {iters} runs; % peak of {peak:.0} GFLOP/s, {} FMA on {} threads)",
        metauas::cpu::kernels::isa_name(),
        rayon::current_num_threads()
    );
    println!(
        "{:<24} {:<16} {:>9} {:>7} {:>9} {:>7}  strategy",
        "node", "op", "ms", "%", "GFLOP/s", "% peak"
    );
    for (i, (node, t)) in g.nodes.iter().zip(&total).enumerate() {
        let ms = t / iters as f64 * 1e3;
        let flops = 2.0 * node.op.macs(g.values[node.output].shape, &g.values) as f64;
        // A folded op (done inside its reader) takes no time of its own.
        let gflops = if ms > 0.0 {
            flops / (ms * 1e-3) / 1e9
        } else {
            0.0
        };
        let line = format!(
            "{:<24} {:<16} {:>9.3} {:>6.1}% {:>9.1} {:>6.1}%  {}",
            node.name,
            node.op.kind(),
            ms,
            100.0 * t / sum,
            gflops,
            100.0 * gflops / peak,
            // How the node runs: the conv strategy or fold the backend chose for it.
            engine.describe_query_node(i).unwrap_or_default()
        );
        println!("{}", line.trim_end());
    }
    let ms: Vec<f64> = total.iter().map(|t| t / iters as f64 * 1e3).collect();
    let how = |i: usize| engine.describe_query_node(i).unwrap_or_default();
    super::floors::print_family_floors(g, &ms, how, peak);
    Ok(())
}

/// Per-dispatch GPU times from timestamp queries (each dispatch in its own pass, so the
/// total is a little above the single-pass latency).
fn gpu_profile(
    engine: &Engine,
    prompt: &metauas::model::PromptFeatures,
    query: &metauas::io::image::RgbImage8,
) -> Result<()> {
    let steps = engine.profile_gpu_query(prompt, query)?;
    let shape = engine.gpu_shape().map(|(_, q)| q).unwrap_or_default();
    let sum: f64 = steps.iter().map(|s| s.2).sum();
    println!(
        "\nGPU profile of the query graph ({} dispatches, {:.3} ms in kernels)",
        steps.len(),
        sum * 1e3
    );
    println!(
        "{:<24} {:<16} {:>10} {:>8} {:>9} {:>7} {:>9}",
        "node", "kernel", "workgroups", "GFLOP", "ms", "%", "GFLOP/s"
    );
    for (i, (node, kernel, t, flops)) in steps.iter().enumerate() {
        let gflops = if *t > 0.0 { flops / t / 1e9 } else { 0.0 };
        let groups = shape.get(i).map_or(0, |d| d.workgroups);
        println!(
            "{:<24} {:<16} {:>10} {:>8.4} {:>9.4} {:>6.1}% {:>9.1}",
            node,
            kernel,
            groups,
            flops / 1e9,
            t * 1e3,
            100.0 * t / sum.max(f64::MIN_POSITIVE),
            gflops
        );
    }
    Ok(())
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

/// Peak resident set size (VmHWM) in MB; 0 where /proc is not available.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

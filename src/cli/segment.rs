//! `metauas segment`: one prompt, many queries; a map, a heatmap and an overlay per query.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use metauas::io::image::{decode_image_file, resize_rgb8};
use metauas::io::output::{write_heatmap_png, write_npy_f32, write_overlay_png};
use metauas::model::{check_size, AnomalyMap, Engine, PromptFeatures};
use metauas::{Error, Result};

use super::{announce, engine_options, Backend, PrecisionArg};

#[derive(Args)]
pub struct SegmentArgs {
    /// Weights: safetensors or an official torch.save checkpoint (.ckpt).
    #[arg(long)]
    weights: PathBuf,
    /// The normal (defect-free) image of the product.
    #[arg(long)]
    prompt: PathBuf,
    /// Query image(s) to segment; repeat the flag for several.
    #[arg(long, required = true)]
    query: Vec<PathBuf>,
    /// Model resolution: a multiple of 32 (the official checkpoints use 256 and 512).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Where to run: `auto` takes a hardware GPU when there is one, else the CPU.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,
    /// Storage precision (f16 needs the GPU backend and an adapter with SHADER_F16).
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
    /// Output directory.
    #[arg(long, default_value = "metauas-out")]
    out: PathBuf,
}

pub fn run(args: SegmentArgs) -> Result<ExitCode> {
    check_size(args.size)?;
    let stems = unique_stems(&args.query)?;
    for q in &args.query {
        if q.is_dir() {
            return Err(Error::at(q, "is a directory, not an image file"));
        }
        if !q.is_file() {
            return Err(Error::at(q, "no such file"));
        }
    }
    let mut inputs: Vec<&Path> = args.query.iter().map(|q| q.as_path()).collect();
    inputs.extend([args.prompt.as_path(), args.weights.as_path()]);
    outputs_spare_inputs(&args.out, &stems, &inputs)?;
    let prompt_image = decode_image_file(&args.prompt)?;
    let options = engine_options(args.backend, args.precision);
    let engine = Engine::from_file_with(&args.weights, args.size, options)?;
    announce(&engine);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::at(&args.out, format!("cannot create output directory: {e}")))?;
    let prompt = engine.encode_prompt(&prompt_image)?;

    let mut failures = 0;
    for (query, stem) in args.query.iter().zip(&stems) {
        if let Err(e) = segment_one(&engine, &prompt, &args, query, stem) {
            eprintln!("metauas: {e}");
            failures += 1;
        }
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn segment_one(
    engine: &Engine,
    prompt: &PromptFeatures,
    args: &SegmentArgs,
    query: &Path,
    stem: &str,
) -> Result<()> {
    let image = decode_image_file(query)?;
    let start = Instant::now();
    let map = engine.segment(prompt, &image)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let npy = args.out.join(format!("{stem}.npy"));
    write_outputs(&map, &image, &args.out, stem)?;
    let line = serde_json::json!({
        "query": query.display().to_string(),
        "prompt": args.prompt.display().to_string(),
        "score": map.score(),
        "map": npy.display().to_string(),
        "ms": (ms * 1000.0).round() / 1000.0,
    });
    super::emit(&format!("{line}\n"))
}

/// File names written for one query.
fn output_names(stem: &str) -> [String; 3] {
    [
        format!("{stem}.npy"),
        format!("{stem}_heatmap.png"),
        format!("{stem}_overlay.png"),
    ]
}

/// Refuses a run whose outputs would overwrite one of its own inputs before it is read.
fn outputs_spare_inputs(out: &Path, stems: &[String], inputs: &[&Path]) -> Result<()> {
    let Ok(out_dir) = out.canonicalize() else {
        return Ok(()); // not created yet: nothing in it can be an input
    };
    let inputs: Vec<(PathBuf, &Path)> = inputs
        .iter()
        .filter_map(|p| p.canonicalize().ok().map(|c| (c, *p)))
        .collect();
    for name in stems.iter().flat_map(|s| output_names(s)) {
        let target = out_dir.join(&name);
        if let Some((_, input)) = inputs.iter().find(|(c, _)| *c == target) {
            return Err(Error::at(input, format!("is an input but would be overwritten by the output `{name}`; choose another --out")));
        }
    }
    Ok(())
}

fn write_outputs(
    map: &AnomalyMap,
    image: &metauas::io::image::RgbImage8,
    out: &Path,
    stem: &str,
) -> Result<()> {
    let n = map.size;
    write_npy_f32(&out.join(format!("{stem}.npy")), &map.data, &[n, n])?;
    write_heatmap_png(&out.join(format!("{stem}_heatmap.png")), &map.data, n)?;
    let base = resize_rgb8(image, n);
    write_overlay_png(
        &out.join(format!("{stem}_overlay.png")),
        &map.data,
        n,
        &base,
    )
}

/// Output files are named by the query's file stem, so two queries must not share one.
fn unique_stems(queries: &[PathBuf]) -> Result<Vec<String>> {
    let mut seen: HashMap<String, &Path> = HashMap::new();
    let mut stems = Vec::with_capacity(queries.len());
    for q in queries {
        let stem = q
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::at(q, "query path has no file name"))?;
        if let Some(first) = seen.insert(stem.clone(), q) {
            return Err(Error::at(
                q,
                format!(
                    "same file stem `{stem}` as {}: their outputs would overwrite each other",
                    first.display()
                ),
            ));
        }
        stems.push(stem);
    }
    Ok(stems)
}

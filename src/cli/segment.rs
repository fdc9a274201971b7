//! `metauas segment`: normal prompt image(s) or a bank, many queries (files or directories);
//! a map, a heatmap, an overlay and optionally a mask per query, and a JSON line each.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, ValueEnum};
use metauas::io::image::{decode_image_file, resize_rgb8, RgbImage8};
use metauas::io::output::{
    threshold_mask, write_atomic, write_heatmap_png, write_npy_f32, write_overlay_png,
    write_png_gray,
};
use metauas::model::{
    check_size, AnomalyMap, Engine, PromptBank, PromptSelection, PromptSet, PromptsUsed,
};
use metauas::{Error, Result};

use super::inputs::{expand, name_inputs, ImageInput};
use super::progress::progress_bar;
use super::RunOptions;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MultiPrompt {
    /// The prompt whose average-pooled f5 feature is most similar (cosine) to the query's.
    Best,
    /// The mean of the maps against every prompt.
    Mean,
    /// The per-pixel minimum of the maps against every prompt.
    Min,
}

impl From<MultiPrompt> for PromptSelection {
    fn from(m: MultiPrompt) -> PromptSelection {
        match m {
            MultiPrompt::Best => PromptSelection::Best,
            MultiPrompt::Mean => PromptSelection::Mean,
            MultiPrompt::Min => PromptSelection::Min,
        }
    }
}

#[derive(Args)]
pub struct SegmentArgs {
    /// Weights: safetensors or an official torch.save checkpoint (.ckpt).
    #[arg(long)]
    weights: PathBuf,
    /// Normal (defect-free) image(s) of the product: files or directories; repeatable.
    #[arg(long, required_unless_present = "bank")]
    prompt: Vec<PathBuf>,
    /// A prompt bank from `metauas bank build` (used with any --prompt images).
    #[arg(long)]
    bank: Option<PathBuf>,
    /// Query images: files or directories (recursed, image files by extension); repeatable.
    #[arg(long, required = true)]
    query: Vec<PathBuf>,
    /// How several prompts are used: `best` (most similar prompt), `mean` or `min` of the maps.
    #[arg(long, value_enum, default_value_t = MultiPrompt::Best)]
    multi_prompt: MultiPrompt,
    #[command(flatten)]
    pub(super) run: RunOptions,
    /// Output directory.
    #[arg(long, default_value = "metauas-out")]
    out: PathBuf,
    /// Also write the JSON lines to this file (complete when the run ends).
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// Also write `<name>_mask.png`: 255 where the map is at least T, else 0.
    #[arg(long, value_name = "T")]
    threshold: Option<f32>,
    /// Write only the maps (.npy) and the JSON lines: no heatmap, overlay or mask pictures.
    #[arg(long)]
    no_images: bool,
}

/// The first query's result when it was computed together with the only prompt
/// (`Engine::segment_pair`: both encoders at once).
struct PairedQuery {
    image: RgbImage8,
    map: AnomalyMap,
    ms: f64,
}

pub fn run(args: SegmentArgs) -> Result<ExitCode> {
    check_size(args.run.size)?;
    if let Some(t) = args.threshold {
        if !t.is_finite() {
            return Err(Error::new(format!(
                "--threshold {t}: must be a finite number"
            )));
        }
    }
    let queries = name_inputs(expand(&args.query, "--query")?)?;
    let prompt_files = expand(&args.prompt, "--prompt")?;
    check_outputs_spare_inputs(&args, &queries, &prompt_files)?;
    let engine = args.run.load_engine(&args.weights)?;
    let (prompts, mut paired) = load_prompts(&engine, &args, &prompt_files, queries.first())?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::at(&args.out, format!("cannot create output directory: {e}")))?;

    let bar = progress_bar(queries.len(), "segment");
    let mut jsonl = Vec::new();
    let mut failures = 0;
    for query in &queries {
        match segment_one(&engine, &prompts, &args, query, paired.take()) {
            Ok(line) => {
                jsonl.extend_from_slice(line.as_bytes());
                bar.suspend(|| super::emit(&line))?;
            }
            Err(e) => {
                bar.suspend(|| eprintln!("metauas: {e}"));
                failures += 1;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(path) = &args.jsonl {
        write_atomic(path, &jsonl)?;
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Encodes the `--prompt` images and loads the bank. Names: the bank's, and the image paths
/// as given; they must not clash. With a single prompt image and no bank, the first query is
/// segmented together with it and returned too.
fn load_prompts(
    engine: &Engine,
    args: &SegmentArgs,
    files: &[PathBuf],
    first_query: Option<&ImageInput>,
) -> Result<(PromptSet, Option<PairedQuery>)> {
    if let ([file], None, Some(query)) = (files, &args.bank, first_query) {
        let image = decode_image_file(file)?;
        // An undecodable first query, or one the engine fails on, is then reported by the
        // query loop like any other.
        if let Ok(query_image) = decode_image_file(&query.path) {
            let start = Instant::now();
            let Ok((features, map)) = engine.segment_pair(&image, &query_image) else {
                return load_all_prompts(engine, args, files);
            };
            let paired = PairedQuery {
                image: query_image,
                map,
                ms: start.elapsed().as_secs_f64() * 1e3,
            };
            let prompt = (file.display().to_string(), features);
            let prompts = PromptSet::new(vec![prompt], args.multi_prompt.into())?;
            return Ok((prompts, Some(paired)));
        }
    }
    load_all_prompts(engine, args, files)
}

/// Every `--prompt` image encoded, and the bank's prompts.
fn load_all_prompts(
    engine: &Engine,
    args: &SegmentArgs,
    files: &[PathBuf],
) -> Result<(PromptSet, Option<PairedQuery>)> {
    let mut prompts = Vec::new();
    if let Some(path) = &args.bank {
        let bank = PromptBank::load(path, engine)?;
        if bank.is_empty() {
            return Err(Error::at(path, "bank holds no prompts"));
        }
        for entry in bank.entries() {
            prompts.push((entry.name.clone(), entry.features.clone()));
        }
    }
    let bar = progress_bar(files.len(), "encode prompts");
    for file in files {
        let image = decode_image_file(file)?;
        let name = file.display().to_string();
        if prompts.iter().any(|(n, _)| *n == name) {
            return Err(Error::at(file, "prompt name is also in the bank"));
        }
        prompts.push((name, engine.encode_prompt(&image)?));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((PromptSet::new(prompts, args.multi_prompt.into())?, None))
}

fn segment_one(
    engine: &Engine,
    prompts: &PromptSet,
    args: &SegmentArgs,
    query: &ImageInput,
    paired: Option<PairedQuery>,
) -> Result<String> {
    let (image, map, used, ms) = match paired {
        Some(p) => (p.image, p.map, prompts.name(0).into(), p.ms),
        None => {
            let image = decode_image_file(&query.path)?;
            let start = Instant::now();
            let (map, used) = prompts.segment(engine, &image)?;
            (
                image,
                map,
                used_names(prompts, used),
                start.elapsed().as_secs_f64() * 1e3,
            )
        }
    };
    let written = write_outputs(&map, &image, args, &query.name)?;
    let mut line = serde_json::json!({
        "query": query.path.display().to_string(),
        "prompt": used,
        "score": map.score(),
        "map": written.npy.display().to_string(),
        "ms": (ms * 1000.0).round() / 1000.0,
    });
    if let Some(mask) = written.mask {
        line["mask"] = mask.display().to_string().into();
    }
    Ok(format!("{line}\n"))
}

/// The JSON value naming the prompt(s) a map used: a name, or a list of names for
/// `mean`/`min`.
fn used_names(prompts: &PromptSet, used: PromptsUsed) -> serde_json::Value {
    match used {
        PromptsUsed::One(i) => prompts.name(i).into(),
        PromptsUsed::All => (0..prompts.len()).map(|i| prompts.name(i)).collect(),
    }
}

/// Paths written for one query.
struct Written {
    npy: PathBuf,
    mask: Option<PathBuf>,
}

/// File names written for one query named `name` (which may hold `/`: a mirrored path).
fn output_files(out: &Path, name: &str, images: bool, mask: bool) -> Vec<PathBuf> {
    let mut files = vec![out.join(format!("{name}.npy"))];
    if images {
        files.push(out.join(format!("{name}_heatmap.png")));
        files.push(out.join(format!("{name}_overlay.png")));
        if mask {
            files.push(out.join(format!("{name}_mask.png")));
        }
    }
    files
}

fn write_outputs(
    map: &AnomalyMap,
    image: &RgbImage8,
    args: &SegmentArgs,
    name: &str,
) -> Result<Written> {
    let n = map.size;
    let images = !args.no_images;
    let files = output_files(&args.out, name, images, args.threshold.is_some());
    if let Some(dir) = files[0].parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::at(dir, format!("cannot create output directory: {e}")))?;
    }
    write_npy_f32(&files[0], &map.data, &[n, n])?;
    let mut mask = None;
    if images {
        write_heatmap_png(&files[1], &map.data, n)?;
        write_overlay_png(&files[2], &map.data, n, &resize_rgb8(image, n))?;
        if let Some(t) = args.threshold {
            write_png_gray(&files[3], &threshold_mask(&map.data, t), n)?;
            mask = Some(files[3].clone());
        }
    }
    Ok(Written {
        npy: files[0].clone(),
        mask,
    })
}

/// Refuses a run whose outputs would overwrite one of its own inputs before it is read.
fn check_outputs_spare_inputs(
    args: &SegmentArgs,
    queries: &[ImageInput],
    prompts: &[PathBuf],
) -> Result<()> {
    let mut inputs: Vec<&Path> = queries.iter().map(|q| q.path.as_path()).collect();
    inputs.extend(prompts.iter().map(|p| p.as_path()));
    inputs.push(args.weights.as_path());
    inputs.extend(args.bank.as_deref());
    let canonical: Vec<(PathBuf, &Path)> = inputs
        .iter()
        .filter_map(|p| p.canonicalize().ok().map(|c| (c, *p)))
        .collect();
    let clash = |target: &Path| -> Option<&Path> {
        let target = target.canonicalize().ok()?;
        canonical
            .iter()
            .find(|(c, _)| *c == target)
            .map(|(_, p)| *p)
    };
    if let Some(jsonl) = &args.jsonl {
        if let Some(input) = clash(jsonl) {
            return Err(Error::at(
                input,
                "is an input but --jsonl would overwrite it",
            ));
        }
    }
    for q in queries {
        let files = output_files(
            &args.out,
            &q.name,
            !args.no_images,
            args.threshold.is_some(),
        );
        for target in files {
            if let Some(input) = clash(&target) {
                return Err(Error::at(
                    input,
                    format!(
                        "is an input but would be overwritten by the output {}; choose another --out",
                        target.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

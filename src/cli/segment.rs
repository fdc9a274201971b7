//! `metauas segment`: normal prompt image(s) or a bank, many queries (files or directories);
//! a map, a heatmap, an overlay and optionally a mask per query, and a JSON line each.

use metauas::model::decision::selection_name;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, ValueEnum};
use metauas::bundle::write_bundle;
use metauas::io::image::{decode_image_file, resize_rgb8, RgbImage8};
use metauas::io::output::{
    blend_half, draw_boxes, heatmap_png, heatmap_rgb, threshold_mask, write_atomic, write_npy_f32,
    write_png_gray_wh, write_png_rgb, HeatmapScale,
};
use metauas::model::decision::{resize_map, Decision, Policy, RoiMask, Threshold};
use metauas::model::{
    check_size, AnomalyMap, Engine, PromptBank, PromptFeatures, PromptSelection, PromptSet,
    PromptsUsed, TapTensor,
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

/// The size pictures (and optionally maps) are written at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputSize {
    /// The model's resolution (`--size`), square.
    Model,
    /// The query's own width x height (the map resized like OpenCV's INTER_LINEAR).
    Original,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScaleArg {
    /// The raw map: 0 = blue, 1 = red (comparable between images).
    Fixed,
    /// The pixel threshold at the colormap's middle (needs a calibrated bank or a threshold).
    Calibrated,
    /// Each map stretched to its own min and max (the upstream demo's look).
    Minmax,
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
    /// How several prompts are used: `best` (most similar prompt), `mean` or `min` of the
    /// maps. Default: the mode the bank was calibrated with, else `best`.
    #[arg(long, value_enum)]
    multi_prompt: Option<MultiPrompt>,
    #[command(flatten)]
    pub(super) run: RunOptions,
    /// Output directory.
    #[arg(long, default_value = "metauas-out")]
    out: PathBuf,
    /// Also write the JSON lines to this file (complete when the run ends).
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// Decide with this threshold: anomalous when the score is at least T, regions and
    /// `<name>_mask.png` where the map is at least T (overrides a bank's calibration).
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    threshold: Option<f64>,
    /// The pixel threshold of regions and masks alone (overrides --threshold and the bank's).
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    pixel_threshold: Option<f64>,
    /// Regions with fewer map pixels (at the model's resolution) are dropped.
    #[arg(long, default_value_t = 1, value_name = "PIXELS")]
    min_region_area: usize,
    /// An inspection mask (PNG, white = inspect) of the queries' size: outside it the map is
    /// 0 (replaces a bank's mask).
    #[arg(long, value_name = "PNG")]
    roi: Option<PathBuf>,
    /// Size of the heatmap, overlay and mask pictures.
    #[arg(long, value_enum, default_value_t = OutputSize::Original)]
    output_size: OutputSize,
    /// Size of the `.npy` map.
    #[arg(long, value_enum, default_value_t = OutputSize::Model)]
    npy_size: OutputSize,
    /// How map values become heatmap colours.
    #[arg(long, value_enum, default_value_t = ScaleArg::Fixed)]
    heatmap_scale: ScaleArg,
    /// Draw each region's box on the overlay.
    #[arg(long)]
    draw_regions: bool,
    /// Write only the maps (.npy) and the JSON lines: no heatmap, overlay or mask pictures.
    #[arg(long)]
    no_images: bool,
    /// Also write each query's reference bundle to DIR/<name>/: every intermediate tensor
    /// (prompt and query) as float32 NCHW .npy named after its PyTorch module, with
    /// manifest.json (see README, "Checking another engine"). Needs one --prompt image.
    #[arg(long, value_name = "DIR")]
    taps: Option<PathBuf>,
}

/// `--taps`: the prompt's taps (computed once) and the manifest fields every bundle shares.
struct TapsRun {
    dir: PathBuf,
    features: PromptFeatures,
    prompt_taps: Vec<TapTensor>,
    head: serde_json::Map<String, serde_json::Value>,
}

/// How every query of a run is judged and drawn.
struct Judge {
    policy: Policy,
    scale: HeatmapScale,
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
    for (flag, t) in [
        ("--threshold", args.threshold),
        ("--pixel-threshold", args.pixel_threshold),
    ] {
        if let Some(t) = t.filter(|t| !t.is_finite()) {
            return Err(Error::new(format!("{flag} {t}: must be a finite number")));
        }
    }
    let queries = name_inputs(expand(&args.query, "--query")?)?;
    let prompt_files = expand(&args.prompt, "--prompt")?;
    check_outputs_spare_inputs(&args, &queries, &prompt_files)?;
    let engine = args.run.load_engine(&args.weights)?;
    let bank = match &args.bank {
        Some(path) => Some(load_bank(path, &engine)?),
        None => None,
    };
    let judge = judge(&args, bank.as_ref(), engine.size())?;
    let selection = selection(&args, bank.as_ref());
    let taps = match &args.taps {
        Some(dir) => Some(taps_run(&args, &engine, bank.as_ref(), &prompt_files, dir)?),
        None => None,
    };
    let (prompts, mut paired) = match &taps {
        Some(t) => {
            let prompt = (prompt_files[0].display().to_string(), t.features.clone());
            (PromptSet::new(vec![prompt], selection)?, None)
        }
        None => load_prompts(
            &engine,
            bank.as_ref(),
            selection,
            &prompt_files,
            queries.first(),
        )?,
    };
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::at(&args.out, format!("cannot create output directory: {e}")))?;

    let bar = progress_bar(queries.len(), "segment");
    // A writer thread encodes and writes each query's outputs while the engine runs the
    // next query (frame-size PNGs cost about as much as a forward pass); it emits the JSON
    // lines in query order.
    let (jsonl, failures) = std::thread::scope(|scope| -> Result<(Vec<u8>, usize)> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Judged>(2);
        let writer = scope.spawn(|| -> Result<(Vec<u8>, usize)> {
            let (mut jsonl, mut failures) = (Vec::new(), 0);
            for judged in rx {
                match write_one(&args, judge.scale, taps.as_ref(), judged) {
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
            Ok((jsonl, failures))
        });
        let mut failures = 0;
        for query in &queries {
            let taps_features = taps.as_ref().map(|t| &t.features);
            match judge_one(
                &engine,
                &prompts,
                &judge,
                query,
                paired.take(),
                taps_features,
            ) {
                // A closed channel means the writer failed: its error is returned below.
                Ok(judged) => {
                    if tx.send(judged).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    bar.suspend(|| eprintln!("metauas: {e}"));
                    failures += 1;
                    bar.inc(1);
                }
            }
        }
        drop(tx);
        let (jsonl, written_failures) = writer
            .join()
            .map_err(|_| Error::new("the output writer stopped unexpectedly"))??;
        Ok((jsonl, failures + written_failures))
    })?;
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
    bank: Option<&PromptBank>,
    selection: PromptSelection,
    files: &[PathBuf],
    first_query: Option<&ImageInput>,
) -> Result<(PromptSet, Option<PairedQuery>)> {
    if let ([file], None, Some(query)) = (files, bank, first_query) {
        let image = decode_image_file(file)?;
        // An undecodable first query, or one the engine fails on, is then reported by the
        // query loop like any other.
        if let Ok(query_image) = decode_image_file(&query.path) {
            let start = Instant::now();
            let Ok((features, map)) = engine.segment_pair(&image, &query_image) else {
                return load_all_prompts(engine, bank, selection, files);
            };
            let paired = PairedQuery {
                image: query_image,
                map,
                ms: start.elapsed().as_secs_f64() * 1e3,
            };
            let prompt = (file.display().to_string(), features);
            let prompts = PromptSet::new(vec![prompt], selection)?;
            return Ok((prompts, Some(paired)));
        }
    }
    load_all_prompts(engine, bank, selection, files)
}

/// Every `--prompt` image encoded, and the bank's prompts.
fn load_all_prompts(
    engine: &Engine,
    bank: Option<&PromptBank>,
    selection: PromptSelection,
    files: &[PathBuf],
) -> Result<(PromptSet, Option<PairedQuery>)> {
    let mut prompts = Vec::new();
    if let Some(bank) = bank {
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
    Ok((PromptSet::new(prompts, selection)?, None))
}

fn load_bank(path: &Path, engine: &Engine) -> Result<PromptBank> {
    let bank = PromptBank::load(path, engine)?;
    if bank.is_empty() {
        return Err(Error::at(path, "bank holds no prompts"));
    }
    Ok(bank)
}

/// The prompt selection: the flag, else the bank's calibration mode, else `best`. A flag
/// other than the calibration's gets a warning: the thresholds were found with the other.
fn selection(args: &SegmentArgs, bank: Option<&PromptBank>) -> PromptSelection {
    let calibrated = bank.and_then(|b| b.calibration()).map(|c| c.selection);
    match (args.multi_prompt.map(PromptSelection::from), calibrated) {
        (Some(flag), Some(cal)) if flag != cal && args.threshold.is_none() => {
            eprintln!(
                "metauas: warning: the bank was calibrated with --multi-prompt {}; its thresholds may not hold for {}",
                selection_name(cal),
                selection_name(flag)
            );
            flag
        }
        (Some(flag), _) => flag,
        (None, Some(cal)) => cal,
        (None, None) => PromptSelection::Best,
    }
}

/// The decision policy and heatmap scale from the flags and the bank: given thresholds win
/// over the calibration, `--roi` over the bank's mask.
fn judge(args: &SegmentArgs, bank: Option<&PromptBank>, size: usize) -> Result<Judge> {
    let calibration = bank.and_then(|b| b.calibration());
    let given = |t: Option<f64>| t.map(Threshold::given);
    let image =
        given(args.threshold).or_else(|| calibration.map(|c| Threshold::calibrated(c.image.value)));
    let pixel = given(args.pixel_threshold)
        .or(given(args.threshold))
        .or_else(|| calibration.map(|c| Threshold::calibrated(c.pixel.value)));
    let roi = match &args.roi {
        Some(path) => Some(
            RoiMask::from_image(&decode_image_file(path)?, size).map_err(|e| Error::at(path, e))?,
        ),
        None => bank.and_then(|b| b.roi().cloned()),
    };
    let scale = match args.heatmap_scale {
        ScaleArg::Fixed => HeatmapScale::Fixed,
        ScaleArg::Minmax => HeatmapScale::MinMax,
        ScaleArg::Calibrated => match pixel {
            Some(t) => HeatmapScale::Calibrated(t.value),
            None => {
                return Err(Error::new(
                    "--heatmap-scale calibrated: no pixel threshold (calibrate the bank with `metauas bank calibrate`, or give --threshold)",
                ))
            }
        },
    };
    if args.draw_regions && pixel.is_none() {
        return Err(Error::new(
            "--draw-regions: no pixel threshold (calibrate the bank, or give --threshold)",
        ));
    }
    Ok(Judge {
        policy: Policy {
            image,
            pixel,
            roi,
            min_region_area: args.min_region_area,
        },
        scale,
    })
}

/// One query segmented and decided, waiting for its outputs.
struct Judged<'a> {
    query: &'a ImageInput,
    image: RgbImage8,
    map: AnomalyMap,
    decision: Decision,
    used: serde_json::Value,
    ms: f64,
    /// The query half's taps (`--taps`).
    taps: Option<Vec<TapTensor>>,
}

fn judge_one<'a>(
    engine: &Engine,
    prompts: &PromptSet,
    judge: &Judge,
    query: &'a ImageInput,
    paired: Option<PairedQuery>,
    taps_of: Option<&PromptFeatures>,
) -> Result<Judged<'a>> {
    let mut taps = None;
    let (image, mut map, used, ms) = match (paired, taps_of) {
        (Some(p), _) => (p.image, p.map, prompts.name(0).into(), p.ms),
        (None, Some(features)) => {
            let image = decode_image_file(&query.path)?;
            let start = Instant::now();
            let (map, query_taps) = engine.query_taps(features, &image)?;
            taps = Some(query_taps);
            let ms = start.elapsed().as_secs_f64() * 1e3;
            (image, map, prompts.name(0).into(), ms)
        }
        (None, None) => {
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
    let decision = judge
        .policy
        .decide(&mut map, (image.width, image.height))
        .map_err(|e| Error::at(&query.path, e))?;
    Ok(Judged {
        query,
        image,
        map,
        decision,
        used,
        ms,
        taps,
    })
}

/// Writes one query's outputs; returns its JSON line.
fn write_one(
    args: &SegmentArgs,
    scale: HeatmapScale,
    taps_run: Option<&TapsRun>,
    judged: Judged,
) -> Result<String> {
    let Judged {
        query,
        image,
        map,
        decision,
        used,
        ms,
        taps,
    } = judged;
    let written = write_outputs(&map, &image, &decision, args, scale, &query.name)?;
    let bundle = match (taps_run, taps) {
        (Some(run), Some(query_taps)) => Some(write_taps(run, query, &image, query_taps)?),
        _ => None,
    };
    let mut line = serde_json::json!({
        "query": query.path.display().to_string(),
        "prompt": used,
        "score": decision.score,
        "verdict": decision.verdict_json(),
        "regions": decision.regions_json(),
        "frame": [image.width, image.height],
        "map": written.npy.display().to_string(),
        "ms": (ms * 1000.0).round() / 1000.0,
    });
    if let Some(mask) = written.mask {
        line["mask"] = mask.display().to_string().into();
    }
    if let Some(dir) = bundle {
        line["taps"] = dir.display().to_string().into();
    }
    Ok(format!("{line}\n"))
}

/// Checks `--taps` against the other flags, encodes the prompt with its taps and gathers the
/// manifest fields every bundle of the run shares.
fn taps_run(
    args: &SegmentArgs,
    engine: &Engine,
    bank: Option<&PromptBank>,
    prompt_files: &[PathBuf],
    dir: &Path,
) -> Result<TapsRun> {
    let [prompt_file] = prompt_files else {
        return Err(Error::new(format!(
            "--taps needs exactly one --prompt image (got {})",
            prompt_files.len()
        )));
    };
    if bank.is_some() {
        return Err(Error::new(
            "--taps cannot use --bank: a bank keeps only the prompt's final features, not its intermediate tensors",
        ));
    }
    let image = decode_image_file(prompt_file)?;
    let (features, prompt_taps) = engine.prompt_taps(&image)?;
    let head = serde_json::json!({
        "producer": format!("metauas {}", env!("CARGO_PKG_VERSION")),
        "backend": engine.backend_description(),
        "precision": format!("{:?}", args.run.precision).to_lowercase(),
        "size": engine.size(),
        "weights": {
            "file": args.weights.display().to_string(),
            "sha256": sha256_file(&args.weights)?,
            "fingerprint": engine.weights_hash(),
        },
        "inputs": { "prompt": input_json(prompt_file, &image)? },
    });
    let serde_json::Value::Object(head) = head else {
        unreachable!("a JSON object")
    };
    Ok(TapsRun {
        dir: dir.to_path_buf(),
        features,
        prompt_taps,
        head,
    })
}

/// Writes one query's bundle to `--taps`/<name>; returns its folder.
fn write_taps(
    run: &TapsRun,
    query: &ImageInput,
    image: &RgbImage8,
    query_taps: Vec<TapTensor>,
) -> Result<PathBuf> {
    let dir = run.dir.join(&query.name);
    let mut head = run.head.clone();
    head["inputs"]["query"] = input_json(&query.path, image)?;
    // The prompt's taps are the same for every query: referenced, not copied.
    let tensors: Vec<&TapTensor> = run.prompt_taps.iter().chain(&query_taps).collect();
    write_bundle(&dir, head, &tensors)?;
    Ok(dir)
}

fn input_json(path: &Path, image: &RgbImage8) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "file": path.display().to_string(),
        "sha256": sha256_file(path)?,
        "width": image.width,
        "height": image.height,
    }))
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).map_err(|e| Error::at(path, format!("cannot read: {e}")))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::at(path, format!("cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
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
    decision: &Decision,
    args: &SegmentArgs,
    scale: HeatmapScale,
    name: &str,
) -> Result<Written> {
    let n = map.size;
    let images = !args.no_images;
    let pixel = decision.pixel_threshold.map(|t| t.value);
    let files = output_files(&args.out, name, images, pixel.is_some());
    if let Some(dir) = files[0].parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::at(dir, format!("cannot create output directory: {e}")))?;
    }
    let (w, h) = (image.width, image.height);
    let at_frame = (args.npy_size == OutputSize::Original
        || (images && args.output_size == OutputSize::Original))
        .then(|| resize_map(&map.data, n, w, h));
    match (&at_frame, args.npy_size) {
        (Some(big), OutputSize::Original) => write_npy_f32(&files[0], big, &[h, w])?,
        _ => write_npy_f32(&files[0], &map.data, &[n, n])?,
    }
    let mut mask = None;
    if images {
        // The pictures' map, base image and region boxes, at the chosen size.
        let (pic, base, boxes, pw, ph) = match (&at_frame, args.output_size) {
            (Some(big), OutputSize::Original) => {
                let boxes: Vec<[usize; 4]> = decision.regions.iter().map(|r| r.bbox).collect();
                (big.as_slice(), image.data.clone(), boxes, w, h)
            }
            _ => {
                let boxes = decision.regions.iter().map(|r| r.map_bbox).collect();
                (map.data.as_slice(), resize_rgb8(image, n).data, boxes, n, n)
            }
        };
        // The three pictures are encoded in parallel: at a camera's frame size, PNG encoding
        // is most of their cost.
        let overlay = || -> Result<()> {
            let mut overlay = blend_half(&heatmap_rgb(pic, scale), &base);
            if args.draw_regions {
                let thickness = (pw.max(ph) / 256).max(1);
                draw_boxes(&mut overlay, pw, ph, &boxes, [255, 255, 255], thickness);
            }
            write_png_rgb(&files[2], &overlay, pw, ph)
        };
        let heatmap_and_mask = || -> Result<()> {
            let heat = heatmap_png(pic, pw, ph, scale).map_err(|e| Error::at(&files[1], e))?;
            write_atomic(&files[1], &heat)?;
            if let Some(t) = pixel {
                // The frame-size mask thresholds the frame-size map, as a viewer would.
                write_png_gray_wh(&files[3], &threshold_mask(pic, t), pw, ph)?;
            }
            Ok(())
        };
        let (a, b) = rayon::join(overlay, heatmap_and_mask);
        a.and(b)?;
        if pixel.is_some() {
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
        // The mask may come from a bank's calibration too: assume it is written.
        let files = output_files(&args.out, &q.name, !args.no_images, true);
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

//! `metauas bank build`: encode normal images once, store their features for `segment --bank`
//! and `serve --bank`. `metauas bank calibrate`: thresholds from held-out normal images,
//! stored in the bank.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use metauas::eval::dataset::{load_mask, read_test_list, Listed};
use metauas::eval::metrics::f1_optimal;
use metauas::io::image::decode_image_file;
use metauas::model::decision::{
    Calibration, Calibrator, F1Thresholds, RoiMask, Rule, FEW_IMAGES, MAX_CALIBRATION_IMAGES,
};
use metauas::model::{check_size, BankEntry, Engine, PromptBank, PromptSet};
use metauas::{Error, Result};

use super::inputs::{expand, name_inputs, ImageInput};
use super::progress::progress_bar;
use super::segment::MultiPrompt;
use super::RunOptions;

#[derive(Subcommand)]
pub enum BankCommand {
    /// Encode normal images into a prompt bank (safetensors).
    Build(BuildArgs),
    /// Find thresholds from held-out normal images and store them in the bank.
    Calibrate(CalibrateArgs),
}

impl BankCommand {
    pub fn run_options(&self) -> RunOptions {
        match self {
            BankCommand::Build(a) => a.run,
            BankCommand::Calibrate(a) => a.run,
        }
    }
}

#[derive(Args)]
pub struct CalibrateArgs {
    /// The bank to calibrate (rewritten atomically with the thresholds).
    #[arg(long)]
    bank: PathBuf,
    /// Weights: the ones the bank was built with.
    #[arg(long)]
    weights: PathBuf,
    /// Held-out normal images (not the bank's prompts): files or directories; repeatable.
    #[arg(long, required = true, num_args = 1..)]
    images: Vec<PathBuf>,
    /// Image-level rule over the normal scores: max, quantile:Q or sigma:K (mean + K std).
    #[arg(long, default_value = "max", value_name = "RULE")]
    method: String,
    /// The image threshold is the rule's value times 1 + M.
    #[arg(
        long,
        default_value_t = 0.05,
        value_name = "M",
        allow_negative_numbers = true
    )]
    margin: f64,
    /// Pixel-level rule over every inspected normal pixel.
    #[arg(long, default_value = "quantile:0.999", value_name = "RULE")]
    pixel_method: String,
    /// How the bank's prompts are used (stored; `segment` and `serve` default to it).
    #[arg(long, value_enum, default_value_t = MultiPrompt::Best)]
    multi_prompt: MultiPrompt,
    /// A labeled test list in the authors' meta-file format (JSON lines with `filename`,
    /// `label`, optional `maskname`, `clsname`): also report F1-optimal thresholds (stored
    /// for reference, never used by default).
    #[arg(long, value_name = "JSONL")]
    labels: Option<PathBuf>,
    /// The folder the label file's paths are relative to (default: the file's folder).
    #[arg(long, requires = "labels")]
    labels_root: Option<PathBuf>,
    /// The class of the label file to use, when it lists several.
    #[arg(long, requires = "labels")]
    class: Option<String>,
    #[command(flatten)]
    pub(super) run: RunOptions,
}

#[derive(Args)]
pub struct BuildArgs {
    /// Weights: safetensors or an official torch.save checkpoint (.ckpt).
    #[arg(long)]
    weights: PathBuf,
    /// Normal images: files or directories (recursed); several values or a repeated flag.
    #[arg(long, required = true, num_args = 1..)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    pub(super) run: RunOptions,
    /// The bank file to write (safetensors; written atomically).
    #[arg(long)]
    out: PathBuf,
    /// An inspection mask (PNG, white = inspect) of the images' size: outside it maps are 0
    /// for the score, the regions and the calibration.
    #[arg(long, value_name = "PNG")]
    roi: Option<PathBuf>,
}

pub fn run(command: BankCommand) -> Result<()> {
    match command {
        BankCommand::Build(args) => build(args),
        BankCommand::Calibrate(args) => calibrate(args),
    }
}

fn build(args: BuildArgs) -> Result<()> {
    check_size(args.run.size)?;
    let images = name_inputs(expand(&args.images, "--images")?)?;
    if images.len() > metauas::model::bank::MAX_BANK_PROMPTS {
        return Err(Error::new(format!(
            "--images: {} images, a bank holds at most {}",
            images.len(),
            metauas::model::bank::MAX_BANK_PROMPTS
        )));
    }
    if let Some(clash) = images
        .iter()
        .map(|i| i.path.as_path())
        .chain([args.weights.as_path()])
        .find(|p| same_file(p, &args.out))
    {
        return Err(Error::at(clash, "is an input but --out would overwrite it"));
    }
    let engine = args.run.load_engine(&args.weights)?;
    let mut bank = PromptBank::new(&engine);
    let roi = match &args.roi {
        Some(path) => {
            let mask = decode_image_file(path)?;
            Some(RoiMask::from_image(&mask, engine.size()).map_err(|e| Error::at(path, e))?)
        }
        None => None,
    };
    let bar = progress_bar(images.len(), "encode");
    for input in images {
        let image = decode_image_file(&input.path)?;
        if let Some(roi) = &roi {
            roi.check_frame(image.width, image.height)
                .map_err(|e| Error::at(&input.path, e))?;
        }
        let features = engine.encode_prompt(&image)?;
        bank.push(BankEntry {
            name: input.name,
            source: input.path.display().to_string(),
            features,
        })?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    bank.set_roi(roi)?;
    bank.save(&args.out)?;
    eprintln!(
        "metauas: wrote {} ({} prompts, size {}, weights {})",
        args.out.display(),
        bank.len(),
        bank.size(),
        bank.weights_hash()
    );
    Ok(())
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

fn calibrate(args: CalibrateArgs) -> Result<()> {
    check_size(args.run.size)?;
    let image_rule: Rule = flag_rule("--method", &args.method)?;
    let pixel_rule: Rule = flag_rule("--pixel-method", &args.pixel_method)?;
    if !args.margin.is_finite() || args.margin <= -1.0 {
        return Err(Error::new(format!(
            "--margin {}: must be a finite number above -1",
            args.margin
        )));
    }
    let images = name_inputs(expand(&args.images, "--images")?)?;
    if images.len() > MAX_CALIBRATION_IMAGES {
        return Err(Error::new(format!(
            "--images: {} images, a calibration takes at most {MAX_CALIBRATION_IMAGES}",
            images.len()
        )));
    }
    let labeled = match &args.labels {
        Some(path) => Some(labeled_images(path, &args)?),
        None => None,
    };
    let engine = args.run.load_engine(&args.weights)?;
    let mut bank = PromptBank::load(&args.bank, &engine)?;
    if bank.is_empty() {
        return Err(Error::at(&args.bank, "bank holds no prompts"));
    }
    warn_about_inputs(&images, &bank);
    let selection = args.multi_prompt.into();
    let prompts = PromptSet::from_bank(&bank, selection)?;
    let roi = bank.roi().cloned();
    let mut calibrator = Calibrator::new(roi.clone());
    let bar = progress_bar(images.len(), "calibrate");
    for input in &images {
        let map = judged_map(&engine, &prompts, roi.as_ref(), &input.path)?;
        calibrator.add(&input.name, &map)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut calibration = calibrator.finish(image_rule, args.margin, pixel_rule, selection)?;
    if let Some(listed) = labeled {
        calibration.f1 = Some(f1_thresholds(&engine, &prompts, roi.as_ref(), &listed)?);
    }
    bank.set_calibration(Some(calibration.clone()));
    bank.save(&args.bank)?;
    report(&args.bank, &calibration)
}

fn flag_rule(flag: &str, text: &str) -> Result<Rule> {
    text.parse().map_err(|e: Error| e.context(flag))
}

/// One-line warnings: too few images, or images that are the bank's own prompts.
fn warn_about_inputs(images: &[ImageInput], bank: &PromptBank) {
    if images.len() < FEW_IMAGES {
        eprintln!(
            "metauas: warning: only {} calibration image(s); thresholds from fewer than {FEW_IMAGES} normal images are unreliable",
            images.len()
        );
    }
    let canonical = |p: &Path| p.canonicalize().ok();
    let prompts: Vec<PathBuf> = bank
        .entries()
        .iter()
        .filter_map(|e| canonical(Path::new(&e.source)))
        .collect();
    if let Some(input) = images
        .iter()
        .find(|i| canonical(&i.path).is_some_and(|c| prompts.contains(&c)))
    {
        eprintln!(
            "metauas: warning: {} is one of the bank's prompts; calibrating on prompts gives thresholds that are too low",
            input.path.display()
        );
    }
}

/// The map of one image against the prompts, with the ROI applied (a frame of another size
/// than the mask is refused).
fn judged_map(
    engine: &Engine,
    prompts: &PromptSet,
    roi: Option<&RoiMask>,
    path: &Path,
) -> Result<metauas::model::AnomalyMap> {
    let image = decode_image_file(path)?;
    let (mut map, _) = prompts.segment(engine, &image)?;
    if let Some(roi) = roi {
        roi.check_frame(image.width, image.height)
            .and_then(|()| roi.apply(&mut map))
            .map_err(|e| Error::at(path, e))?;
    }
    Ok(map)
}

fn labeled_images(path: &Path, args: &CalibrateArgs) -> Result<Vec<Listed>> {
    let root = match &args.labels_root {
        Some(r) => r.clone(),
        None => path.parent().unwrap_or(Path::new(".")).to_path_buf(),
    };
    let listed = read_test_list(&root, path)?;
    let mut classes: Vec<&str> = Vec::new();
    for l in &listed {
        if !classes.contains(&l.class.as_str()) {
            classes.push(&l.class);
        }
    }
    let chosen = match (&args.class, classes.as_slice()) {
        (Some(c), _) if classes.contains(&c.as_str()) => c.clone(),
        (Some(c), _) => {
            return Err(Error::at(
                path,
                format!("no class `{c}` (classes: {})", classes.join(", ")),
            ))
        }
        (None, [one]) => one.to_string(),
        (None, _) => {
            return Err(Error::at(
                path,
                format!(
                    "lists several classes ({}): choose one with --class",
                    classes.join(", ")
                ),
            ))
        }
    };
    let listed: Vec<Listed> = listed.into_iter().filter(|l| l.class == chosen).collect();
    for l in &listed {
        for file in std::iter::once(&l.image).chain(&l.mask) {
            if !file.is_file() {
                return Err(Error::at(
                    file,
                    format!("no such file (line {} of the labels)", l.line),
                ));
            }
        }
    }
    Ok(listed)
}

/// F1-optimal image and pixel thresholds over the labeled images (pixels: the images with a
/// mask, and the good ones).
fn f1_thresholds(
    engine: &Engine,
    prompts: &PromptSet,
    roi: Option<&RoiMask>,
    listed: &[Listed],
) -> Result<F1Thresholds> {
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    let (mut pixels, mut pixel_labels) = (Vec::new(), Vec::new());
    let bar = progress_bar(listed.len(), "labeled");
    for l in listed {
        let map = judged_map(engine, prompts, roi, &l.image)?;
        scores.push(map.score());
        labels.push(l.label);
        if l.mask.is_some() || l.label == 0 {
            let truth = load_mask(&l.sample(), map.size)?;
            for (i, (&v, &t)) in map.data.iter().zip(&truth).enumerate() {
                if roi.is_none_or(|r| r.inside[i] != 0) {
                    pixels.push(v);
                    pixel_labels.push(t);
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let defective = labels.iter().filter(|&&l| l != 0).count();
    Ok(F1Thresholds {
        image: f1_optimal(&scores, &labels),
        pixel: f1_optimal(&pixels, &pixel_labels),
        images: (labels.len() - defective, defective),
    })
}

/// The calibration as one JSON line on stdout, and a summary on stderr.
fn report(bank: &Path, c: &Calibration) -> Result<()> {
    eprintln!(
        "metauas: calibrated {} on {} normal images: image threshold {:.6} ({}, margin {}), pixel threshold {:.6} ({})",
        bank.display(),
        c.images.len(),
        c.image.value,
        c.image.rule,
        c.image.margin,
        c.pixel.value,
        c.pixel.rule
    );
    if let Some(f1) = &c.f1 {
        let show = |p: Option<(f64, f64)>| {
            p.map_or("n/a".to_string(), |(t, f)| format!("{t:.6} (F1 {f:.4})"))
        };
        eprintln!(
            "metauas: labeled set ({} good, {} defective): F1-optimal image threshold {}, pixel threshold {} (reported only; the calibrated thresholds stay in use)",
            f1.images.0,
            f1.images.1,
            show(f1.image),
            show(f1.pixel)
        );
    }
    let mut line = c.to_json();
    line["bank"] = bank.display().to_string().into();
    super::emit(&format!("{line}\n"))
}

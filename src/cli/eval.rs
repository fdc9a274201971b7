//! `metauas eval`: the MVTec AD / VisA protocol of the paper, seven metrics per class.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use metauas::eval::report::{Report, RunInfo};
use metauas::eval::{dataset, evaluate_class};
use metauas::model::check_size;
use metauas::{Error, Result};

use super::RunOptions;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// `CLASS/train/good`, `CLASS/test/DEFECT`, `CLASS/ground_truth/DEFECT/*_mask.png`.
    Mvtec,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Weights: safetensors or an official torch.save checkpoint (.ckpt).
    #[arg(long)]
    weights: PathBuf,
    /// The dataset folder; file names in the meta files are relative to it.
    #[arg(long)]
    root: PathBuf,
    /// Read the standard folder layout instead of meta files (one prompt per class from
    /// `train/good`, picked by --prompt-seed).
    #[arg(long, value_enum, required_unless_present = "test_json", conflicts_with_all = ["test_json", "prompt_json"])]
    layout: Option<Layout>,
    /// With --layout mvtec: which `train/good` image each class uses as its prompt.
    #[arg(long, default_value_t = 0, requires = "layout")]
    prompt_seed: u64,
    /// The authors' test meta file: one JSON object per line (`filename`, `label` 0/1,
    /// optional `maskname`, `clsname`).
    #[arg(long, requires = "prompt_json")]
    test_json: Option<PathBuf>,
    /// The authors' prompt meta file: `{"CLASS": {"filename": ...}, ...}` or one object per
    /// line mapping a query file name to a ranked list of prompt file names.
    #[arg(long, requires = "test_json")]
    prompt_json: Option<PathBuf>,
    /// Evaluate only this class (repeat for several); default: all.
    #[arg(long = "class")]
    classes: Vec<String>,
    #[command(flatten)]
    pub(super) run: RunOptions,
    /// Output directory for report.{md,csv,json} (and maps/ with --save-maps).
    #[arg(long, default_value = "metauas-eval")]
    out: PathBuf,
    /// Keep every raw map and its ground truth as .npy under OUT/maps/CLASS/.
    #[arg(long)]
    save_maps: bool,
}

/// The command line as typed, quoted where a shell would need it.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    check_size(args.run.size)?;
    let (classes, source, dataset_text) = match (&args.layout, &args.test_json, &args.prompt_json) {
        (Some(Layout::Mvtec), _, _) => (
            dataset::mvtec_layout(&args.root, args.prompt_seed)?,
            args.root.clone(),
            format!(
                "MVTec AD layout under {} (prompt seed {})",
                args.root.display(),
                args.prompt_seed
            ),
        ),
        (None, Some(test), Some(prompt)) => (
            dataset::meta_files(&args.root, test, prompt)?,
            test.clone(),
            format!(
                "{} with prompts {} under {}",
                test.display(),
                prompt.display(),
                args.root.display()
            ),
        ),
        _ => {
            return Err(Error::new(
                "give --layout mvtec or both --test-json and --prompt-json",
            ))
        }
    };
    let classes = dataset::select_classes(classes, &args.classes, &source)?;
    dataset::check_files(&classes)?;
    let engine = args.run.load_engine(&args.weights)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::at(&args.out, format!("cannot create output directory: {e}")))?;
    let maps_dir = args.save_maps.then(|| args.out.join("maps"));

    let total: usize = classes.iter().map(|c| c.samples.len()).sum();
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix:>12} [{bar:32}] {pos}/{len} images  {elapsed_precise} (eta {eta})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut results = Vec::with_capacity(classes.len());
    for class in &classes {
        bar.set_prefix(class.name.clone());
        let result = evaluate_class(&engine, class, maps_dir.as_deref(), |_| bar.inc(1));
        match result {
            Ok(r) => results.push(r),
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        }
    }
    bar.finish_and_clear();

    let report = Report {
        info: RunInfo {
            command: command_line(),
            weights: args.weights.display().to_string(),
            weights_hash: engine.weights_hash(),
            size: args.run.size,
            backend: engine.backend_description(),
            dataset: dataset_text,
        },
        classes: results,
    };
    report.write(&args.out)?;
    super::emit(&report.to_markdown())?;
    Ok(ExitCode::SUCCESS)
}

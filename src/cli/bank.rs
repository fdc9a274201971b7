//! `metauas bank build`: encode normal images once, store their features for `segment --bank`
//! and `serve --bank`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use metauas::io::image::decode_image_file;
use metauas::model::{check_size, BankEntry, PromptBank};
use metauas::{Error, Result};

use super::inputs::{expand, name_inputs};
use super::progress::progress_bar;
use super::RunOptions;

#[derive(Subcommand)]
pub enum BankCommand {
    /// Encode normal images into a prompt bank (safetensors).
    Build(BuildArgs),
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
}

pub fn run(command: BankCommand) -> Result<()> {
    match command {
        BankCommand::Build(args) => build(args),
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
    let bar = progress_bar(images.len(), "encode");
    for input in images {
        let image = decode_image_file(&input.path)?;
        let features = engine.encode_prompt(&image)?;
        bank.push(BankEntry {
            name: input.name,
            source: input.path.display().to_string(),
            features,
        })?;
        bar.inc(1);
    }
    bar.finish_and_clear();
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

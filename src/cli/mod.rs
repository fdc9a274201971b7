//! Command-line front end. Every failure is one line naming the file and the problem.

mod bench;
mod info;
mod segment;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use metauas::Result;

#[derive(Parser)]
#[command(
    name = "metauas",
    version,
    about = "MetaUAS one-prompt anomaly segmentation, exact and fast"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Cpu,
}

#[derive(Subcommand)]
enum Command {
    /// Segment query images against one normal prompt image.
    Segment(segment::SegmentArgs),
    /// Describe a weights file and the model graph.
    Info {
        /// Weights: safetensors or an official torch.save checkpoint (.ckpt).
        #[arg(long)]
        weights: PathBuf,
        /// Model resolution for the graph summary.
        #[arg(long, default_value_t = 256)]
        size: usize,
    },
    /// Convert a torch.save checkpoint (or any weights file) to safetensors.
    Convert { input: PathBuf, output: PathBuf },
    /// Time the forward pass (synthetic weights unless --weights is given).
    Bench(bench::BenchArgs),
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Segment(args) => segment::run(args),
        Command::Info { weights, size } => info::run(&weights, size).map(|_| ExitCode::SUCCESS),
        Command::Convert { input, output } => {
            let n = metauas::io::weights::convert_to_safetensors(&input, &output)?;
            eprintln!("wrote {} ({n} entries)", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => bench::run(args).map(|_| ExitCode::SUCCESS),
    }
}

/// Writes to stdout; a closed pipe (`metauas info | head`) is not an error.
pub fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(metauas::Error::new(format!("cannot write to stdout: {e}"))),
    }
}

//! Command-line front end. Every failure is one line naming the file and the problem.

mod bench;
mod info;
mod segment;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use metauas::gpu::Precision;
use metauas::model::{BackendChoice, Engine, EngineOptions};
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
    /// The CPU backend (rayon + SIMD).
    Cpu,
    /// The GPU backend (wgpu: Vulkan, Metal or DX12), software adapters included.
    Gpu,
    /// A hardware GPU when one exists, the CPU otherwise.
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    F32,
    /// f16 storage with f32 accumulation (GPU with SHADER_F16 only).
    F16,
}

/// Engine options from the command line.
pub fn engine_options(backend: Backend, precision: PrecisionArg) -> EngineOptions {
    EngineOptions {
        backend: match backend {
            Backend::Cpu => BackendChoice::Cpu,
            Backend::Gpu => BackendChoice::Gpu,
            Backend::Auto => BackendChoice::Auto,
        },
        precision: match precision {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::F16 => Precision::F16,
        },
    }
}

/// Says on stderr which backend an engine runs on (`auto` decides at run time).
pub fn announce(engine: &Engine) {
    eprintln!("metauas: backend {}", engine.backend_description());
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
    /// Serve segmentation over HTTP/1.1 with JSON (see README, "Serve").
    Serve(serve::ServeArgs),
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
        Command::Serve(args) => serve::run(args),
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

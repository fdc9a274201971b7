//! Command-line front end. Every failure is one line naming the file and the problem.

mod bank;
mod bench;
mod compare;
mod eval;
mod floors;
mod info;
mod inputs;
mod progress;
mod segment;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use metauas::graph::Precision;
use metauas::model::{check_size, BackendChoice, Engine, EngineOptions};
use metauas::{Error, Result};

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

/// Where and how a command runs the model: the options `segment`, `bank`, `eval`, `bench`
/// and `serve` share.
#[derive(Args, Clone, Copy, Debug)]
pub struct RunOptions {
    /// Model resolution: a multiple of 32 (the official checkpoints use 256 and 512).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Where to run: `auto` takes a hardware GPU when there is one, else the CPU.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Storage precision (f16 needs the GPU backend and an adapter with SHADER_F16).
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
}

impl RunOptions {
    pub fn engine_options(&self) -> EngineOptions {
        engine_options(self.backend, self.precision)
    }

    /// Names the flag behind a library error about a setting: `--size 250: size 250 is ...`.
    pub fn name_flag(&self, e: Error) -> Error {
        match e.about_setting() {
            Some("size") => size_flag(e, self.size),
            Some("precision") => e.context(format!("--precision {}", flag_value(self.precision))),
            Some("backend") => e.context(format!("--backend {}", flag_value(self.backend))),
            _ => e,
        }
    }

    /// Loads `weights` for these options and says on stderr which backend runs.
    pub fn load_engine(&self, weights: &std::path::Path) -> Result<Engine> {
        check_size(self.size)?;
        let engine = Engine::from_file_with(weights, self.size, self.engine_options())?;
        announce(&engine);
        Ok(engine)
    }
}

fn size_flag(e: Error, size: usize) -> Error {
    match e.about_setting() {
        Some("size") => e.context(format!("--size {size}")),
        _ => e,
    }
}

/// How a value is spelled on the command line.
fn flag_value(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
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
    /// Segment query images against normal prompt image(s) or a prompt bank.
    Segment(segment::SegmentArgs),
    /// Prompt banks: normal images encoded once, reused without re-encoding.
    #[command(subcommand)]
    Bank(bank::BankCommand),
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
    /// Write deterministic synthetic weights (every official entry) as safetensors, to try the
    /// tool without downloading a checkpoint; its maps mean nothing.
    SynthWeights {
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the deterministic generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Evaluate on MVTec AD / VisA: the paper's seven metrics per class.
    Eval(eval::EvalArgs),
    /// Serve segmentation over HTTP/1.1 with JSON (see README, "Serve").
    Serve(serve::ServeArgs),
    /// Describe the GPU adapter the `gpu` backend would use: driver, features, limits,
    /// subgroup sizes, cooperative-matrix configurations.
    GpuInfo {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare two reference bundles (`segment --taps`, `export_taps.py`, another engine's
    /// .npy or .npz) tensor by tensor; exit 1 when one is past --tol.
    Compare(compare::CompareArgs),
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let flagged = |run: RunOptions, result: Result<ExitCode>| result.map_err(|e| run.name_flag(e));
    match cli.command {
        Command::Segment(args) => flagged(args.run, segment::run(args)),
        Command::Bank(command) => {
            let run = command.run_options();
            flagged(run, bank::run(command).map(|_| ExitCode::SUCCESS))
        }
        Command::Info { weights, size } => info::run(&weights, size)
            .map(|_| ExitCode::SUCCESS)
            .map_err(|e| size_flag(e, size)),
        Command::Convert { input, output } => {
            let n = metauas::io::weights::convert_to_safetensors(&input, &output)?;
            eprintln!("wrote {} ({n} entries)", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => flagged(args.run, bench::run(args).map(|_| ExitCode::SUCCESS)),
        Command::SynthWeights { out, seed } => {
            write_synthetic_weights(&out, seed)?;
            eprintln!(
                "metauas: wrote {} (synthetic weights, seed {seed})",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => flagged(args.run, eval::run(args)),
        Command::Serve(args) => flagged(args.run, serve::run(args)),
        Command::Compare(args) => compare::run(args),
        Command::GpuInfo { json } => gpu_info(json),
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

fn write_synthetic_weights(out: &std::path::Path, seed: u64) -> Result<()> {
    use metauas::synth::{write_synthetic_safetensors, WeightRecipe};
    let meta = [(
        "source".to_string(),
        format!("metauas synth-weights --seed {seed}"),
    )];
    write_synthetic_safetensors(out, &WeightRecipe::unit(seed), &meta)
}

#[cfg(feature = "gpu")]
fn gpu_info(json: bool) -> Result<ExitCode> {
    let details = metauas::gpu::adapter_details()?;
    let text = if json {
        details.to_string() + "\n"
    } else {
        let mut out = String::new();
        if let serde_json::Value::Object(map) = &details {
            for (key, value) in map {
                let shown = match value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out += &format!("{key:<14} {shown}\n");
            }
        }
        out
    };
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "gpu"))]
fn gpu_info(_json: bool) -> Result<ExitCode> {
    Err(Error::new(
        "this build has no GPU backend (built without the `gpu` feature)",
    ))
}

//! `metauas serve`: the HTTP server (see `metauas::serve`) with signal handling.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use metauas::model::{check_size, Engine, PromptBank};
use metauas::serve::batcher::BatchConfig;
use metauas::serve::http::Limits;
use metauas::serve::{Product, ServeConfig, Server};
use metauas::{Error, Result};

#[derive(Args)]
pub struct ServeArgs {
    /// Weights: safetensors or an official torch.save checkpoint (.ckpt).
    #[arg(long)]
    weights: PathBuf,
    /// Address to listen on (port 0: any free port; the real one is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: String,
    #[command(flatten)]
    pub(super) run: super::RunOptions,
    /// A prompt bank (`metauas bank build`) to preload, as `PATH` or `NAME=PATH`: its prompts
    /// by their names, and the bank as the product NAME (default: the file stem) for
    /// `/v1/segment?product=NAME`, with its calibration and inspection mask. Repeatable.
    #[arg(long, value_name = "[NAME=]PATH")]
    bank: Vec<String>,
    /// A model repository (Triton's layout: DIR/PRODUCT/VERSION/bank.safetensors, the
    /// highest version served): its products are served over /v1 and /v2, and products
    /// registered through the API are written to it.
    #[arg(long, value_name = "DIR")]
    model_repository: Option<PathBuf>,
    /// Rescan the model repository every N seconds for added, changed and removed products
    /// (0: only at start and on the repository API's load).
    #[arg(long, default_value_t = 0, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=86_400))]
    poll_s: u64,
    /// Most segment queries run per batch.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_batch: u32,
    /// How long the worker waits for more queries after the first of a batch, ms.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    batch_window_ms: u64,
    /// Segment queries that may wait; more are answered 503.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    queue: u32,
    /// Largest request body, MiB (413 past it).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_body_mb: u64,
    /// Request bodies held at once by all connections together, MiB (503 past it).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    max_inflight_body_mb: u64,
    /// Open connections; more are answered 503 and closed.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_connections: u32,
    /// Registered prompts; more are answered 507.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_prompts: u32,
    /// Idle keep-alive connections are closed after this long, and a request head must
    /// arrive within it (408), seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    idle_timeout_s: u64,
    /// A request body must arrive within this long of its head (408), seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    body_timeout_s: u64,
    /// On SIGTERM or ctrl-c, how long requests in flight may take to finish, seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    shutdown_grace_s: u64,
    /// Testing aid: the worker sleeps this long before each query, ms.
    #[arg(long, default_value_t = 0, hide = true)]
    debug_job_delay_ms: u64,
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    check_size(args.run.size)?;
    let bind = resolve(&args.bind)?;
    // No separate backend line: the "listening" line names it, and a startup error stays
    // the only line.
    let options = args.run.engine_options();
    let engine = Arc::new(Engine::from_file_with(
        &args.weights,
        args.run.size,
        options,
    )?);
    let mut prompts = Vec::new();
    let mut products = Vec::new();
    for spec in &args.bank {
        let (name, path) = bank_spec(spec)?;
        let bank = PromptBank::load(&path, &engine)?;
        if bank.is_empty() {
            return Err(Error::at(&path, "bank holds no prompts"));
        }
        if prompts.len() + bank.len() > args.max_prompts as usize {
            return Err(Error::at(
                &path,
                format!(
                    "{} prompts in the banks, more than --max-prompts {}",
                    prompts.len() + bank.len(),
                    args.max_prompts
                ),
            ));
        }
        for e in bank.entries() {
            prompts.push((e.name.clone(), e.features.clone()));
        }
        products.push(Product::from_bank(&name, &bank, None).map_err(|e| Error::at(&path, e))?);
    }
    let config = ServeConfig {
        bind,
        limits: Limits {
            max_body_bytes: args.max_body_mb << 20,
            ..Limits::default()
        },
        batch: BatchConfig {
            queue: args.queue as usize,
            max_batch: args.max_batch as usize,
            window: Duration::from_millis(args.batch_window_ms),
            job_delay: Duration::from_millis(args.debug_job_delay_ms),
        },
        max_connections: args.max_connections as usize,
        max_inflight_body_bytes: args.max_inflight_body_mb << 20,
        max_prompts: args.max_prompts as usize,
        idle_timeout: Duration::from_secs(args.idle_timeout_s),
        body_timeout: Duration::from_secs(args.body_timeout_s),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
        model_repository: args.model_repository.clone(),
        poll: Some(Duration::from_secs(args.poll_s)),
        ..ServeConfig::default()
    };
    let server = Server::start_with(engine.clone(), config, prompts, products)?;
    let stopper = server.stopper();
    let signals = AtomicUsize::new(0);
    ctrlc::set_handler(move || {
        if signals.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!("metauas: stopping (finishing requests in flight; signal again to quit now)");
            stopper.stop();
        } else {
            std::process::exit(130);
        }
    })
    .map_err(|e| Error::new(format!("cannot install the signal handler: {e}")))?;
    eprintln!(
        "metauas: listening on http://{} (backend {}, size {}, {} prompts, {} products)",
        server.local_addr(),
        engine.backend_description(),
        engine.size(),
        server.prompt_count(),
        server.product_count()
    );
    if server.wait() {
        eprintln!("metauas: stopped");
        Ok(ExitCode::SUCCESS)
    } else {
        Err(Error::new(
            "stopped with requests still in flight after --shutdown-grace-s",
        ))
    }
}

fn resolve(bind: &str) -> Result<SocketAddr> {
    let bad = |why: String| Error::new(format!("--bind {bind}: {why}"));
    bind.to_socket_addrs()
        .map_err(|e| bad(format!("not an address:port ({e})")))?
        .next()
        .ok_or_else(|| bad("resolves to no address".to_string()))
}

/// `NAME=PATH` or `PATH` (the name is then the file stem).
fn bank_spec(spec: &str) -> Result<(String, PathBuf)> {
    let (name, path) = match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => {
            (name.to_string(), PathBuf::from(path))
        }
        _ => {
            let path = PathBuf::from(spec);
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            let stem = stem.filter(|s| !s.is_empty()).ok_or_else(|| {
                Error::new(format!(
                    "--bank {spec}: no file name to name the product by"
                ))
            })?;
            (stem, path)
        }
    };
    Ok((name, path))
}

//! `metauas compare A B`: two reference bundles tensor by tensor (see `metauas::bundle`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use metauas::bundle::{compare, Bundle, CompareOptions, Metric};
use metauas::{Error, Result};

use super::progress::progress_bar;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MetricArg {
    /// max |A-B| / max |B|: the error relative to the reference tensor's scale.
    Rel,
    /// max |A-B|.
    Abs,
    /// The 99.9th percentile of |A-B|.
    P999,
}

#[derive(Args)]
pub struct CompareArgs {
    /// The bundle under test: a folder from `segment --taps` or `export_taps.py`, a folder of
    /// `.npy` named like ours, or an `.npz`.
    a: PathBuf,
    /// The reference bundle (relative errors are taken against its scale).
    b: PathBuf,
    /// A tensor fails when its error (see --metric) is above this.
    #[arg(
        long,
        default_value_t = 1e-4,
        value_name = "T",
        allow_negative_numbers = true
    )]
    tol: f64,
    /// Which error --tol bounds.
    #[arg(long, value_enum, default_value_t = MetricArg::Rel)]
    metric: MetricArg,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Exit 0 when every shared tensor is within the tolerance, 1 when one is not (or is
/// non-finite, of another shape or unreadable), or when a bundle cannot be opened.
pub fn run(args: CompareArgs) -> Result<ExitCode> {
    if !(args.tol.is_finite() && args.tol >= 0.0) {
        return Err(Error::new(format!(
            "--tol {}: must be a finite number >= 0",
            args.tol
        )));
    }
    let a = Bundle::open(&args.a)?;
    let b = Bundle::open(&args.b)?;
    let metric = match args.metric {
        MetricArg::Rel => Metric::Rel,
        MetricArg::Abs => Metric::Abs,
        MetricArg::P999 => Metric::P999,
    };
    let options = CompareOptions {
        tol: args.tol,
        metric,
    };
    let bar = progress_bar(a.entries.len().max(b.entries.len()), "compare");
    let report = compare(&a, &b, options, &mut |done, _| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    if args.json {
        super::emit(&(report.to_json().to_string() + "\n"))?;
    } else {
        super::emit(&report.to_text())?;
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

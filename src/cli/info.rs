//! `metauas info`: what a weights file holds, and the graph it builds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use metauas::io::weights::WeightFile;
use metauas::model::{check_size, Engine};
use metauas::Result;

pub fn run(path: &Path, size: usize) -> Result<()> {
    check_size(size)?;
    let mut out = String::new();
    let file = WeightFile::open(path)?;
    let _ = writeln!(out, "weights: {} ({:?})", path.display(), file.format());
    let mut by_dtype: BTreeMap<String, usize> = BTreeMap::new();
    let (mut params, mut buffers) = (0usize, 0usize);
    for e in file.entries() {
        *by_dtype.entry(format!("{:?}", e.dtype)).or_default() += 1;
        let numel: usize = e.shape.iter().product();
        // Running statistics and counters are buffers, not parameters (as in PyTorch).
        if e.name.ends_with(".running_mean")
            || e.name.ends_with(".running_var")
            || e.name.ends_with("num_batches_tracked")
        {
            buffers += numel;
        } else {
            params += numel;
        }
    }
    let dtypes: Vec<String> = by_dtype.iter().map(|(d, n)| format!("{d}: {n}")).collect();
    let _ = writeln!(
        out,
        "entries: {} ({})",
        file.entries().len(),
        dtypes.join(", ")
    );
    let _ = writeln!(
        out,
        "parameters: {} (plus {} buffer values)",
        group_thousands(params),
        group_thousands(buffers)
    );

    let engine = Engine::new(&file, size)?;
    let _ = writeln!(
        out,
        "model: MetaUAS, EfficientNet-b4 encoder, 3-level soft alignment, UNet+scSE decoder"
    );
    let _ = writeln!(
        out,
        "parameters used after folding BatchNorm: {}",
        group_thousands(engine.parameter_count())
    );
    for (label, g) in [
        ("prompt graph", engine.prompt_graph()),
        ("query graph", engine.query_graph()),
    ] {
        let _ = writeln!(out,
            "{label} at {size}x{size}: {} ops, {:.2} GMAC, arena peak {} bytes ({:.1} MiB, {} values)",
            g.nodes.len(),
            g.total_macs() as f64 / 1e9,
            group_thousands(metauas::cpu::memory_plan(g).arena_bytes()),
            metauas::cpu::memory_plan(g).arena_bytes() as f64 / (1 << 20) as f64,
            g.values.len()
        );
        for (kind, count, macs) in g.summary() {
            let _ = writeln!(
                out,
                "  {kind:<16} {count:>4} ops {:>8.3} GMAC",
                macs as f64 / 1e9
            );
        }
    }
    super::emit(&out)
}

fn group_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

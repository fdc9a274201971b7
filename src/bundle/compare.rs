//! Two bundles held against each other tensor by tensor: max and p99.9 absolute error, the
//! max error relative to the reference's scale, cosine similarity; the first tensor (in graph
//! order) past the tolerance is the one to look at.

use serde_json::{json, Value};

use super::{Bundle, Entry};
use crate::io::output::NpyArray;

/// The error `--tol` bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// max |a - b|.
    Abs,
    /// The 99.9th percentile of |a - b|.
    P999,
    /// max |a - b| / max |b|: the error relative to the reference tensor's scale (B is the
    /// reference), comparable between layers whose values differ by orders of magnitude.
    Rel,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Abs => "abs",
            Metric::P999 => "p999",
            Metric::Rel => "rel",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Metric::Abs => "max |A-B|",
            Metric::P999 => "p99.9 of |A-B|",
            Metric::Rel => "max |A-B| / max |B|",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompareOptions {
    pub tol: f64,
    pub metric: Metric,
}

/// The errors of one tensor pair (over finite pairs; non-finite values counted apart).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Errors {
    pub values: usize,
    pub max_abs: f64,
    pub p999_abs: f64,
    pub max_rel: f64,
    pub cosine: f64,
    pub nonfinite_a: usize,
    pub nonfinite_b: usize,
}

impl Errors {
    fn metric(&self, m: Metric) -> f64 {
        match m {
            Metric::Abs => self.max_abs,
            Metric::P999 => self.p999_abs,
            Metric::Rel => self.max_rel,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Compared(Errors),
    ShapeMismatch {
        a: Vec<usize>,
        b: Vec<usize>,
    },
    /// `side` is "A" or "B".
    Unreadable {
        side: &'static str,
        problem: String,
    },
    OnlyIn(&'static str),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorReport {
    pub name: String,
    pub module: Option<String>,
    pub shape: Option<Vec<usize>>,
    pub outcome: Outcome,
    /// Past the tolerance, non-finite, of another shape or unreadable.
    pub fails: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CompareReport {
    pub a: String,
    pub b: String,
    pub options: CompareOptions,
    pub tensors: Vec<TensorReport>,
    /// Differences between the bundles' manifests (weights, inputs, size) worth knowing.
    pub warnings: Vec<String>,
}

impl CompareReport {
    /// The first failing tensor in graph order.
    pub fn first_failure(&self) -> Option<&TensorReport> {
        self.tensors.iter().find(|t| t.fails)
    }

    pub fn compared(&self) -> usize {
        let both = |t: &&TensorReport| !matches!(t.outcome, Outcome::OnlyIn(_));
        self.tensors.iter().filter(both).count()
    }

    /// No tensor fails and at least one was compared. Names in only one bundle are listed
    /// but do not fail: another engine may export a subset.
    pub fn passed(&self) -> bool {
        self.compared() > 0 && self.first_failure().is_none()
    }
}

/// Compares `a` against the reference `b`; `progress(done, total)` after each tensor.
pub fn compare(
    a: &Bundle,
    b: &Bundle,
    options: CompareOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> CompareReport {
    let order = merged_order(a, b);
    let mut tensors = Vec::with_capacity(order.len());
    for (i, (ea, eb)) in order.iter().enumerate() {
        tensors.push(compare_entry(a, b, *ea, *eb, options));
        progress(i + 1, order.len());
    }
    CompareReport {
        a: a.path.display().to_string(),
        b: b.path.display().to_string(),
        options,
        tensors,
        warnings: manifest_warnings(a, b),
    }
}

/// Pairs of entries by name: A's order, then B's names that A lacks in B's order. When only
/// B has a manifest, B's order leads.
fn merged_order<'a>(a: &'a Bundle, b: &'a Bundle) -> Vec<(Option<&'a Entry>, Option<&'a Entry>)> {
    let swap = a.manifest.is_none() && b.manifest.is_some();
    let (first, second) = if swap { (b, a) } else { (a, b) };
    let mut pairs: Vec<(Option<&Entry>, Option<&Entry>)> = first
        .entries
        .iter()
        .map(|e| (Some(e), second.entries.iter().find(|o| o.name == e.name)))
        .collect();
    for e in &second.entries {
        if !first.entries.iter().any(|o| o.name == e.name) {
            pairs.push((None, Some(e)));
        }
    }
    if swap {
        pairs = pairs.into_iter().map(|(x, y)| (y, x)).collect();
    }
    pairs
}

fn compare_entry(
    a: &Bundle,
    b: &Bundle,
    ea: Option<&Entry>,
    eb: Option<&Entry>,
    options: CompareOptions,
) -> TensorReport {
    let named = ea.or(eb).expect("one side names it");
    let module = ea
        .and_then(|e| e.module.clone())
        .or_else(|| eb.and_then(|e| e.module.clone()));
    let report = |outcome: Outcome, shape: Option<Vec<usize>>, fails: bool| TensorReport {
        name: named.name.clone(),
        module: module.clone(),
        shape,
        outcome,
        fails,
    };
    let (ea, eb) = match (ea, eb) {
        (Some(x), Some(y)) => (x, y),
        (Some(x), None) => return report(Outcome::OnlyIn("A"), x.declared_shape.clone(), false),
        (None, Some(y)) => return report(Outcome::OnlyIn("B"), y.declared_shape.clone(), false),
        (None, None) => unreachable!(),
    };
    let xa = match a.read(ea) {
        Ok(x) => x,
        Err(problem) => return report(Outcome::Unreadable { side: "A", problem }, None, true),
    };
    let xb = match b.read(eb) {
        Ok(x) => x,
        Err(problem) => return report(Outcome::Unreadable { side: "B", problem }, None, true),
    };
    if squeeze(&xa.shape) != squeeze(&xb.shape) {
        let outcome = Outcome::ShapeMismatch {
            a: xa.shape,
            b: xb.shape,
        };
        return report(outcome, None, true);
    }
    let errors = errors(&xa, &xb);
    let fails = errors.nonfinite_a + errors.nonfinite_b > 0
        || errors.metric(options.metric).is_nan()
        || errors.metric(options.metric) > options.tol;
    report(Outcome::Compared(errors), Some(xa.shape.clone()), fails)
}

/// The shape without its size-1 dimensions: (1, 1, S, S) and (S, S) hold the same map.
fn squeeze(shape: &[usize]) -> Vec<usize> {
    shape.iter().copied().filter(|&d| d != 1).collect()
}

fn errors(a: &NpyArray, b: &NpyArray) -> Errors {
    let (mut nonfinite_a, mut nonfinite_b) = (0, 0);
    let mut diffs = Vec::with_capacity(a.values.len());
    let (mut dot, mut na, mut nb, mut max_b) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.values.iter().zip(&b.values) {
        nonfinite_a += usize::from(!x.is_finite());
        nonfinite_b += usize::from(!y.is_finite());
        if x.is_finite() && y.is_finite() {
            diffs.push((x - y).abs());
            dot += x * y;
            na += x * x;
            nb += y * y;
            max_b = max_b.max(y.abs());
        }
    }
    let max_abs = diffs.iter().copied().fold(0.0, f64::max);
    let p999_abs = percentile_999(&mut diffs);
    let max_rel = if max_b > 0.0 {
        max_abs / max_b
    } else if max_abs == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    let cosine = match (na > 0.0, nb > 0.0) {
        (true, true) => dot / (na.sqrt() * nb.sqrt()),
        (false, false) => 1.0,
        _ => 0.0,
    };
    Errors {
        values: a.values.len(),
        max_abs,
        p999_abs,
        max_rel,
        cosine,
        nonfinite_a,
        nonfinite_b,
    }
}

/// The value at rank round(0.999 (n - 1)) of the sorted values (0 for none).
fn percentile_999(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let k = ((values.len() - 1) as f64 * 0.999).round() as usize;
    let (_, v, _) = values.select_nth_unstable_by(k, |x, y| x.total_cmp(y));
    *v
}

/// Manifest fields that should agree between two bundles of the same pair.
fn manifest_warnings(a: &Bundle, b: &Bundle) -> Vec<String> {
    let mut warnings = Vec::new();
    let checks: [(&str, &[&str]); 4] = [
        ("size", &["size"]),
        ("weights file (sha256)", &["weights", "sha256"]),
        ("prompt image (sha256)", &["inputs", "prompt", "sha256"]),
        ("query image (sha256)", &["inputs", "query", "sha256"]),
    ];
    for (what, path) in checks {
        let get = |bundle: &Bundle| -> Option<Value> {
            let mut v = bundle.manifest.as_ref()?;
            for key in path {
                v = v.get(*key)?;
            }
            (!v.is_null()).then(|| v.clone())
        };
        if let (Some(x), Some(y)) = (get(a), get(b)) {
            if x != y {
                warnings.push(format!("the bundles differ in their {what}: {x} vs {y}"));
            }
        }
    }
    warnings
}

// ---------------------------------------------------------------- reports

fn number(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

impl TensorReport {
    fn status(&self) -> &'static str {
        match (&self.outcome, self.fails) {
            (Outcome::Compared(_), false) => "ok",
            (Outcome::Compared(_), true) => "fails",
            (Outcome::ShapeMismatch { .. }, _) => "shape_mismatch",
            (Outcome::Unreadable { .. }, _) => "unreadable",
            (Outcome::OnlyIn("A"), _) => "only_in_a",
            (Outcome::OnlyIn(_), _) => "only_in_b",
        }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "module": self.module,
            "shape": self.shape,
            "status": self.status(),
        });
        match &self.outcome {
            Outcome::Compared(e) => {
                v["max_abs"] = number(e.max_abs);
                v["p999_abs"] = number(e.p999_abs);
                v["max_rel"] = number(e.max_rel);
                v["cosine"] = number(e.cosine);
                v["nonfinite_a"] = json!(e.nonfinite_a);
                v["nonfinite_b"] = json!(e.nonfinite_b);
            }
            Outcome::ShapeMismatch { a, b } => {
                v["shape_a"] = json!(a);
                v["shape_b"] = json!(b);
            }
            Outcome::Unreadable { side, problem } => {
                v["side"] = json!(side);
                v["problem"] = json!(problem);
            }
            Outcome::OnlyIn(_) => {}
        }
        v
    }

    /// The part of a text row after the name and shape.
    fn text_detail(&self) -> String {
        match &self.outcome {
            Outcome::Compared(e) => {
                let mut s = format!(
                    "{:>10.3e} {:>10.3e} {:>10.3e} {:>12.9}",
                    e.max_abs, e.p999_abs, e.max_rel, e.cosine
                );
                for (n, side) in [(e.nonfinite_a, "A"), (e.nonfinite_b, "B")] {
                    if n > 0 {
                        s += &format!("  {n} NaN/inf in {side}");
                    }
                }
                s
            }
            Outcome::ShapeMismatch { a, b } => format!("shape {a:?} in A, {b:?} in B"),
            Outcome::Unreadable { side, problem } => format!("{side}: {problem}"),
            Outcome::OnlyIn(side) => format!("only in {side}"),
        }
    }
}

impl CompareReport {
    pub fn to_json(&self) -> Value {
        json!({
            "a": self.a,
            "b": self.b,
            "metric": self.options.metric.name(),
            "tol": self.options.tol,
            "compared": self.compared(),
            "failing": self.tensors.iter().filter(|t| t.fails).count(),
            "first_failure": self.first_failure().map(|t| t.name.clone()),
            "passed": self.passed(),
            "warnings": self.warnings,
            "tensors": self.tensors.iter().map(TensorReport::to_json).collect::<Vec<_>>(),
        })
    }

    /// A table in graph order; the first failing tensor is marked `>>`, later ones `x`.
    pub fn to_text(&self) -> String {
        let mut out = format!("A: {}\nB: {} (the reference)\n", self.a, self.b);
        out += &format!(
            "tolerance: {} <= {:e}\n",
            self.options.metric.describe(),
            self.options.tol
        );
        for w in &self.warnings {
            out += &format!("warning: {w}\n");
        }
        let width = self
            .tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(6);
        out += &format!(
            "\n     {:<width$} {:<16} {:>10} {:>10} {:>10} {:>12}\n",
            "tensor", "shape", "max abs", "p99.9 abs", "max rel", "cosine"
        );
        let first = self.first_failure().map(|t| t.name.as_str());
        for t in &self.tensors {
            let mark = match (t.fails, Some(t.name.as_str()) == first) {
                (true, true) => ">>",
                (true, false) => " x",
                _ => "  ",
            };
            let shape = t
                .shape
                .as_ref()
                .map(|s| {
                    s.iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join("x")
                })
                .unwrap_or_default();
            out += &format!(
                "{mark}   {:<width$} {shape:<16} {}\n",
                t.name,
                t.text_detail()
            );
        }
        let failing = self.tensors.iter().filter(|t| t.fails).count();
        out += &format!("\n{} tensors compared, {failing} failing", self.compared());
        match self.first_failure() {
            Some(t) => {
                let module = t.module.as_deref().unwrap_or("?");
                out += &format!("; first: {} (module {module})\n", t.name);
            }
            None if self.compared() == 0 => out += "; the bundles have no tensor name in common\n",
            None => out += "\n",
        }
        out
    }
}

//! The layering of `docs/ARCHITECTURE.md`, checked on the source: every `crate::` path in a
//! non-test file of `src/` (and every `metauas::` path of the command line) must name a
//! module its layer may use. An arrow never points up: `graph` knows no backend, the
//! backends know no model, the model knows neither its test data (`synth`) nor its users.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each top-level module and the modules it may import. `error` and `util` sit under
/// everything and depend on nothing.
const MAY_USE: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("util", &[]),
    ("io", &["error", "util"]),
    ("graph", &["error", "util"]),
    ("cpu", &["graph", "error", "util"]),
    ("gpu", &["graph", "error", "util"]),
    ("model", &["cpu", "gpu", "graph", "io", "error", "util"]),
    ("synth", &["model", "graph", "io", "error", "util"]),
    ("eval", &["model", "graph", "io", "error", "util"]),
    ("serve", &["model", "graph", "io", "error", "util"]),
    ("bundle", &["model", "graph", "io", "error", "util"]),
    (
        "cli",
        &[
            "eval", "serve", "bundle", "synth", "model", "cpu", "gpu", "graph", "io", "error",
            "util",
        ],
    ),
];

/// What the crate root re-exports, and from where (`crate::Result` is `error`'s).
const ROOT_REEXPORTS: &[(&str, &str)] = &[
    ("Error", "error"),
    ("Result", "error"),
    ("AnomalyMap", "model"),
    ("Engine", "model"),
    ("EngineOptions", "model"),
    ("PromptBank", "model"),
    ("PromptFeatures", "model"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The layer a file belongs to: its first folder under `src/` or its stem (`main.rs` is the
/// command line); `None` for the crate root and for test-only files.
fn layer_of(rel: &Path) -> Option<String> {
    let stem = rel.file_stem()?.to_str()?;
    if stem == "tests" || stem.ends_with("_tests") {
        return None;
    }
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" => None,
        "main.rs" => Some("cli".into()),
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// The file's product code: without its trailing `#[cfg(test)] mod ...` and without comments.
fn product_code(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let next = lines.peek().map(|l| l.trim_start()).unwrap_or("");
        if line.trim() == "#[cfg(test)]" && next.starts_with("mod ") && !next.ends_with(';') {
            break;
        }
        let line = line.split("//").next().unwrap_or("");
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// Top-level modules named after `prefix::` (also in `prefix::{a, b::c}`).
fn referenced(code: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            found.extend(group.split(',').map(ident).filter(|s| !s.is_empty()));
        } else {
            found.insert(ident(rest));
        }
    }
    found.remove("self");
    found
}

fn violations(src: &Path) -> (Vec<String>, usize) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    let mut checked = 0;
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let Some(layer) = layer_of(rel) else {
            continue;
        };
        let allowed = MAY_USE
            .iter()
            .find(|(name, _)| *name == layer)
            .map(|(_, allowed)| *allowed)
            .unwrap_or_else(|| panic!("{}: layer `{layer}` is not in MAY_USE", rel.display()));
        let code = product_code(&std::fs::read_to_string(&file).expect("read source"));
        let prefix = if layer == "cli" {
            "metauas::"
        } else {
            "crate::"
        };
        for name in referenced(&code, prefix) {
            let module = ROOT_REEXPORTS
                .iter()
                .find(|(item, _)| *item == name)
                .map_or(name.clone(), |(_, module)| module.to_string());
            checked += 1;
            if module != layer && !allowed.contains(&module.as_str()) {
                bad.push(format!("{}: `{layer}` imports `{module}`", rel.display()));
            }
        }
    }
    (bad, checked)
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (bad, checked) = violations(&src);
    assert!(
        checked > 50,
        "only {checked} imports found: is the scan broken?"
    );
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
}

/// The scan itself: it sees plain, grouped and nested paths and skips comments and tests.
#[test]
fn the_scan_finds_what_it_must() {
    let code = product_code(
        "use crate::graph::Op;\nuse crate::{io::x, model};\n// crate::serve\n\
         fn f() { crate::cpu::run() }\nmy_crate::eval();\n\
         #[cfg(test)]\nmod tests {\n    use crate::synth;\n}\n",
    );
    let found: Vec<String> = referenced(&code, "crate::").into_iter().collect();
    assert_eq!(found, ["cpu", "graph", "io", "model"]);
}

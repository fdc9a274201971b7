//! Reference bundles: the taps of one prompt/query pair (`model::taps`) as a folder of
//! `.npy` files (float32, NCHW, one per tensor, named `<tap>.npy`) with `manifest.json`
//! (what each tensor is and where it came from: weights, inputs, backend). `compare` holds
//! two bundles against each other tensor by tensor, in graph order. Bundles written by other
//! engines are read too: a folder with our manifest, a folder of `.npy` named the same way
//! without one, or an `.npz` archive.

pub mod compare;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::io::output::{npy_f32_bytes, parse_npy, NpyArray};
use crate::model::taps::tap_names;
use crate::model::TapTensor;

pub use compare::{compare, CompareOptions, CompareReport, Metric, Outcome, TensorReport};

/// The manifest's file name inside a bundle folder.
pub const MANIFEST: &str = "manifest.json";
/// The manifest's `format` field.
pub const FORMAT: &str = "metauas-taps";
/// The manifest version this build writes and reads.
pub const VERSION: u64 = 1;
/// A tensor file larger than this is refused (the largest tap at 512 is ~50 MB).
const MAX_TENSOR_BYTES: u64 = 4 << 30;

/// Writes `tensors` as a bundle at `dir`: every file into a hidden sibling folder, then one
/// rename, so `dir` is either the old bundle or the complete new one. `head` holds the
/// manifest's fields besides `format`, `version` and `tensors` (backend, size, weights,
/// inputs). Returns the bytes written.
pub fn write_bundle(dir: &Path, head: Map<String, Value>, tensors: &[&TapTensor]) -> Result<u64> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::at(dir, "not a folder name"))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)
        .map_err(|e| Error::at(&parent, format!("cannot create folder: {e}")))?;
    let pid = std::process::id();
    let staging = parent.join(format!(".{name}.{pid}.partial"));
    let _ = fs::remove_dir_all(&staging);
    let result = fill(&staging, head, tensors).and_then(|bytes| {
        replace_dir(&staging, dir, &parent.join(format!(".{name}.{pid}.old")))?;
        Ok(bytes)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

fn fill(staging: &Path, head: Map<String, Value>, tensors: &[&TapTensor]) -> Result<u64> {
    fs::create_dir(staging).map_err(|e| Error::at(staging, format!("cannot create: {e}")))?;
    let mut entries = Vec::with_capacity(tensors.len());
    let mut total = 0u64;
    for t in tensors {
        let file = format!("{}.npy", t.name);
        let bytes = npy_f32_bytes(&t.data, &t.shape).map_err(|p| Error::new(p).context(&file))?;
        write_synced(&staging.join(&file), &bytes)?;
        total += bytes.len() as u64;
        entries.push(json!({
            "name": t.name,
            "module": t.module,
            "call": t.call,
            "shape": t.shape,
            "dtype": "float32",
            "layout": "NCHW",
            "file": file,
            "bytes": bytes.len(),
        }));
    }
    let mut manifest = Map::new();
    manifest.insert("format".into(), FORMAT.into());
    manifest.insert("version".into(), VERSION.into());
    manifest.extend(head);
    manifest.insert("tensors".into(), Value::Array(entries));
    let text = serde_json::to_string_pretty(&Value::Object(manifest)).expect("json") + "\n";
    write_synced(&staging.join(MANIFEST), text.as_bytes())?;
    Ok(total + text.len() as u64)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::at(path, format!("cannot create: {e}")))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::at(path, format!("cannot write: {e}")))
}

/// Moves `staging` to `dir`, an existing `dir` first aside to `old` (removed after).
fn replace_dir(staging: &Path, dir: &Path, old: &Path) -> Result<()> {
    let existed = dir.exists();
    if existed {
        let _ = fs::remove_dir_all(old);
        fs::rename(dir, old).map_err(|e| Error::at(dir, format!("cannot replace: {e}")))?;
    }
    if let Err(e) = fs::rename(staging, dir) {
        if existed {
            let _ = fs::rename(old, dir);
        }
        return Err(Error::at(dir, format!("cannot write: {e}")));
    }
    if existed {
        let _ = fs::remove_dir_all(old);
    }
    Ok(())
}

// ---------------------------------------------------------------- reading

/// Where a bundle's tensors live.
#[derive(Clone, Debug)]
enum Storage {
    Folder(PathBuf),
    Npz(PathBuf),
}

/// One tensor a bundle names, not yet read.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    /// From the manifest, when there is one.
    pub module: Option<String>,
    /// The shape the manifest declares (checked against the file's when read).
    pub declared_shape: Option<Vec<usize>>,
    /// File (in a folder) or member (in an `.npz`).
    file: String,
}

/// An opened bundle: its manifest (if any) and its tensors in its own order.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub path: PathBuf,
    pub manifest: Option<Value>,
    pub entries: Vec<Entry>,
    storage: Storage,
}

impl Bundle {
    /// Opens a bundle folder (with `manifest.json`, or `.npy` files alone) or an `.npz`.
    /// Problems with the whole bundle are one-line errors naming it; a single tensor's file
    /// is only read (and judged) by `read`.
    pub fn open(path: &Path) -> Result<Bundle> {
        let meta = fs::metadata(path).map_err(|e| Error::at(path, format!("cannot open: {e}")))?;
        if meta.is_file() {
            return open_npz(path);
        }
        let manifest_path = path.join(MANIFEST);
        if manifest_path.exists() {
            return open_with_manifest(path, &manifest_path);
        }
        let mut entries: Vec<Entry> = list_dir(path)?
            .into_iter()
            .filter_map(|f| {
                let name = f.strip_suffix(".npy")?.to_string();
                Some(Entry {
                    name,
                    module: None,
                    declared_shape: None,
                    file: f,
                })
            })
            .collect();
        if entries.is_empty() {
            return Err(Error::at(
                path,
                format!("not a bundle: no {MANIFEST} and no .npy files"),
            ));
        }
        sort_canonically(&mut entries);
        Ok(Bundle {
            path: path.to_path_buf(),
            manifest: None,
            entries,
            storage: Storage::Folder(path.to_path_buf()),
        })
    }

    /// A manifest field, if the bundle has a manifest holding it.
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.manifest.as_ref()?.get(key)
    }

    /// Reads one tensor. Its problems (missing, truncated, another shape than the manifest
    /// declares, not float) come back as one line.
    pub fn read(&self, entry: &Entry) -> std::result::Result<NpyArray, String> {
        let bytes = match &self.storage {
            Storage::Folder(dir) => read_limited(&dir.join(&entry.file))?,
            Storage::Npz(path) => read_member(path, &entry.file)?,
        };
        let array = parse_npy(&bytes).map_err(|p| format!("{}: {p}", entry.file))?;
        if let Some(declared) = &entry.declared_shape {
            if *declared != array.shape {
                return Err(format!(
                    "{}: shape {:?}, but the manifest declares {:?}",
                    entry.file, array.shape, declared
                ));
            }
        }
        Ok(array)
    }
}

fn read_limited(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let len = fs::metadata(path)
        .map_err(|e| format!("{name}: cannot read: {e}"))?
        .len();
    if len > MAX_TENSOR_BYTES {
        return Err(format!("{name}: {len} bytes is more than any tap"));
    }
    fs::read(path).map_err(|e| format!("{name}: cannot read: {e}"))
}

fn read_member(path: &Path, member: &str) -> std::result::Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("not an .npz: {e}"))?;
    let entry = zip
        .by_name(member)
        .map_err(|e| format!("{member}: cannot read: {e}"))?;
    if entry.size() > MAX_TENSOR_BYTES {
        return Err(format!(
            "{member}: {} bytes is more than any tap",
            entry.size()
        ));
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .take(MAX_TENSOR_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{member}: cannot read: {e}"))?;
    Ok(bytes)
}

fn list_dir(path: &Path) -> Result<Vec<String>> {
    let read = fs::read_dir(path).map_err(|e| Error::at(path, format!("cannot list: {e}")))?;
    let mut names = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| Error::at(path, format!("cannot list: {e}")))?;
        if let Some(name) = entry.file_name().to_str() {
            if !name.starts_with('.') {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Our tap names first, in graph order, then any others by name.
fn sort_canonically(entries: &mut [Entry]) {
    let order = tap_names();
    let rank = |n: &str| order.iter().position(|o| o == n).unwrap_or(usize::MAX);
    entries.sort_by(|a, b| (rank(&a.name), &a.name).cmp(&(rank(&b.name), &b.name)));
}

fn open_npz(path: &Path) -> Result<Bundle> {
    let file = File::open(path).map_err(|e| Error::at(path, format!("cannot open: {e}")))?;
    let zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::at(path, format!("not a bundle folder or an .npz archive: {e}")))?;
    let mut entries: Vec<Entry> = zip
        .file_names()
        .filter_map(|f| {
            Some(Entry {
                name: f.strip_suffix(".npy")?.to_string(),
                module: None,
                declared_shape: None,
                file: f.to_string(),
            })
        })
        .collect();
    if entries.is_empty() {
        return Err(Error::at(path, "the .npz archive holds no .npy arrays"));
    }
    sort_canonically(&mut entries);
    Ok(Bundle {
        path: path.to_path_buf(),
        manifest: None,
        entries,
        storage: Storage::Npz(path.to_path_buf()),
    })
}

fn open_with_manifest(dir: &Path, manifest_path: &Path) -> Result<Bundle> {
    let text = fs::read_to_string(manifest_path)
        .map_err(|e| Error::at(manifest_path, format!("cannot read: {e}")))?;
    let manifest: Value = serde_json::from_str(&text)
        .map_err(|e| Error::at(manifest_path, format!("not JSON: {e}")))?;
    let bad = |what: String| Error::at(manifest_path, what);
    if manifest.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err(bad(format!(
            "not a bundle manifest (format is not \"{FORMAT}\")"
        )));
    }
    match manifest.get("version").and_then(Value::as_u64) {
        Some(VERSION) => {}
        v => {
            return Err(bad(format!(
                "manifest version {v:?}: this build reads {VERSION}"
            )))
        }
    }
    let list = manifest
        .get("tensors")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no \"tensors\" list".into()))?;
    let mut entries = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let entry = manifest_entry(t).map_err(|p| bad(format!("tensors[{i}]: {p}")))?;
        if entries.iter().any(|e: &Entry| e.name == entry.name) {
            return Err(bad(format!(
                "tensors[{i}]: '{}' is listed twice",
                entry.name
            )));
        }
        entries.push(entry);
    }
    Ok(Bundle {
        path: dir.to_path_buf(),
        manifest: Some(manifest),
        entries,
        storage: Storage::Folder(dir.to_path_buf()),
    })
}

fn manifest_entry(t: &Value) -> std::result::Result<Entry, String> {
    let text = |key: &str| t.get(key).and_then(Value::as_str).map(str::to_string);
    let name = text("name").ok_or("no \"name\"")?;
    let file = text("file").unwrap_or_else(|| format!("{name}.npy"));
    // A plain file name: a manifest never makes us read outside its folder.
    let plain = !file.is_empty()
        && !file.starts_with('.')
        && !file.contains(['/', '\\'])
        && file.ends_with(".npy");
    if !plain {
        return Err(format!(
            "file {file:?} is not a plain .npy name in the bundle"
        ));
    }
    let declared_shape = match t.get("shape") {
        None | Some(Value::Null) => None,
        Some(Value::Array(dims)) => Some(
            dims.iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or("shape is not a list of sizes")?,
        ),
        Some(_) => return Err("shape is not a list of sizes".into()),
    };
    Ok(Entry {
        name,
        module: text("module"),
        declared_shape,
        file,
    })
}

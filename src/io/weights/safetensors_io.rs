//! safetensors: memory-mapped reading with a strict header check, and an atomic writer.
//!
//! The header is parsed here rather than by the `safetensors` crate because its validation
//! can overflow (and so panic in debug builds) on hostile offsets; this parser uses checked
//! arithmetic throughout and reports the offending entry.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::{Map, Value};

use super::strided::View;
use super::{element_count, DType, TensorData, TensorInfo, WeightLimits};
use crate::error::{Error, Result};

/// Largest safetensors JSON header, in bytes. The official weights need ~80 KB and a full
/// bank (4096 prompts) ~3 MB; the reference implementation allows 100 MB, but a hostile
/// header of that size parses into gigabytes of JSON values, so we stop at 16 MiB (room for
/// ~150,000 entries).
pub const MAX_HEADER_BYTES: u64 = 16 << 20;
const METADATA_KEY: &str = "__metadata__";

/// The whole file: memory-mapped, or held in memory.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

pub(crate) struct SafetensorsSource {
    mmap: Bytes,
    /// Absolute byte range of each entry, in the order of the sorted entry list.
    ranges: Vec<(usize, usize)>,
    metadata: Vec<(String, String)>,
}

impl SafetensorsSource {
    pub fn metadata(&self) -> &[(String, String)] {
        &self.metadata
    }

    /// The entry's bytes (validated at open) and its contiguous view.
    pub fn entry_bytes(&self, index: usize, shape: &[usize]) -> (&[u8], View) {
        let (start, end) = self.ranges[index];
        (&self.mmap[start..end], View::contiguous(shape))
    }
}

/// A safetensors file starts with an 8-byte header length and then the JSON header.
pub(crate) fn looks_like_safetensors(head: &[u8]) -> bool {
    head.len() > 8 && head[8] == b'{'
}

pub(crate) fn open(
    path: &Path,
    limits: &WeightLimits,
) -> Result<(Vec<TensorInfo>, SafetensorsSource)> {
    let file = File::open(path).map_err(|e| Error::at(path, format!("cannot open: {e}")))?;
    // SAFETY: the map is read-only; as with any memory-mapped input, another process
    // truncating or rewriting the file while it is open is outside what we can defend against.
    let mmap = unsafe { Mmap::map(&file) }
        .map_err(|e| Error::at(path, format!("cannot memory-map: {e}")))?;
    from_source(Bytes::Mapped(mmap), path, limits)
}

/// A safetensors file held in memory; `path` only names it in errors.
pub(crate) fn open_bytes(
    bytes: Vec<u8>,
    path: &Path,
    limits: &WeightLimits,
) -> Result<(Vec<TensorInfo>, SafetensorsSource)> {
    from_source(Bytes::Owned(bytes), path, limits)
}

fn from_source(
    mmap: Bytes,
    path: &Path,
    limits: &WeightLimits,
) -> Result<(Vec<TensorInfo>, SafetensorsSource)> {
    let header = parse(&mmap, limits.max_tensors)
        .map_err(|problem| Error::at(path, format!("not a valid safetensors file: {problem}")))?;
    let (infos, ranges) = header.entries.into_iter().unzip();
    Ok((
        infos,
        SafetensorsSource {
            mmap,
            ranges,
            metadata: header.metadata,
        },
    ))
}

pub(crate) struct Header {
    /// Sorted by name, with absolute byte ranges.
    pub entries: Vec<(TensorInfo, (usize, usize))>,
    pub metadata: Vec<(String, String)>,
}

/// Parses and validates a whole safetensors buffer.
pub(crate) fn parse(bytes: &[u8], max_tensors: usize) -> std::result::Result<Header, String> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("file of {} bytes is too short for a header", bytes.len()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} is larger than the limit of {MAX_HEADER_BYTES}"
        ));
    }
    let data_start = 8 + header_len as usize;
    if data_start > bytes.len() {
        return Err(format!(
            "header length {header_len} exceeds the file size of {} bytes (truncated?)",
            bytes.len()
        ));
    }
    let text = std::str::from_utf8(&bytes[8..data_start]).map_err(|_| "header is not UTF-8")?;
    // An entry has 8 separators; more than that per allowed tensor is not a table of
    // tensors, and parsing it could take ~40 bytes of memory per separator.
    let allowed = 16 * (max_tensors + 1) + 1024;
    if json_separators(text.as_bytes()) > allowed {
        return Err(format!(
            "header holds more JSON values than {max_tensors} tensors need (raise the tensor limit with {})",
            super::ENV_MAX_TENSORS
        ));
    }
    let json: Map<String, Value> =
        serde_json::from_str(text).map_err(|e| format!("header is not a JSON object: {e}"))?;
    let data_len = bytes.len() - data_start;
    let declared = json.len() - usize::from(json.contains_key(METADATA_KEY));
    if declared > max_tensors {
        return Err(format!(
            "header declares {declared} tensors, over the limit of {max_tensors} (raise it with {})",
            super::ENV_MAX_TENSORS
        ));
    }

    let mut metadata = Vec::new();
    let mut entries = Vec::new();
    for (name, value) in &json {
        if name == METADATA_KEY {
            metadata = parse_metadata(value)?;
        } else {
            let (info, (s, e)) = parse_entry(name, value)?;
            entries.push((info, (s, e)));
        }
    }
    check_coverage(&entries, data_len)?;
    for (_, range) in &mut entries {
        *range = (range.0 + data_start, range.1 + data_start);
    }
    entries.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    metadata.sort();
    Ok(Header { entries, metadata })
}

/// Commas and colons outside JSON strings (a cheap upper bound on the values it holds).
fn json_separators(text: &[u8]) -> usize {
    let (mut count, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b',' | b':' => count += 1,
                _ => {}
            }
        }
    }
    count
}

fn parse_metadata(value: &Value) -> std::result::Result<Vec<(String, String)>, String> {
    let map = value
        .as_object()
        .ok_or("`__metadata__` is not a JSON object")?;
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(format!(
                "metadata value of `{}` is not a string",
                k.escape_debug()
            )),
        })
        .collect()
}

fn parse_entry(
    name: &str,
    value: &Value,
) -> std::result::Result<(TensorInfo, (usize, usize)), String> {
    let raw_name = name;
    let name = name.escape_debug(); // names come from the file: keep messages on one line
    let obj = value
        .as_object()
        .ok_or_else(|| format!("entry `{name}` is not a JSON object"))?;
    let dtype_name = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("entry `{name}` has no dtype string"))?;
    let dtype = DType::from_safetensors_name(dtype_name).ok_or_else(|| {
        format!(
            "entry `{name}` has unsupported dtype `{}`",
            dtype_name.escape_debug()
        )
    })?;
    let shape = usize_array(obj.get("shape"))
        .ok_or_else(|| format!("entry `{name}` has no valid shape (a list of sizes)"))?;
    let offsets = usize_array(obj.get("data_offsets"))
        .filter(|o| o.len() == 2)
        .ok_or_else(|| format!("entry `{name}` has no valid data_offsets [start, end]"))?;
    let (start, end) = (offsets[0], offsets[1]);
    let nbytes = element_count(&shape)
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| format!("entry `{name}`: shape {shape:?} is too large"))?;
    if end < start || end - start != nbytes {
        return Err(format!(
            "entry `{name}`: data_offsets [{start}, {end}] do not hold {nbytes} bytes of {dtype:?} {shape:?}"
        ));
    }
    Ok((
        TensorInfo {
            name: raw_name.to_string(),
            dtype,
            shape,
        },
        (start, end),
    ))
}

fn usize_array(value: Option<&Value>) -> Option<Vec<usize>> {
    value?
        .as_array()?
        .iter()
        .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
        .collect()
}

/// The entries must tile the data section exactly: no overlap, no hole, nothing outside.
fn check_coverage(
    entries: &[(TensorInfo, (usize, usize))],
    data_len: usize,
) -> std::result::Result<(), String> {
    let mut by_offset: Vec<(&str, usize, usize)> = entries
        .iter()
        .map(|(info, (s, e))| (info.name.as_str(), *s, *e))
        .collect();
    by_offset.sort_by_key(|&(_, s, e)| (s, e));
    let mut expected_start = 0usize;
    for (name, s, e) in by_offset {
        let name = name.escape_debug();
        if e > data_len {
            return Err(format!(
                "entry `{name}`: data_offsets [{s}, {e}] reach past the {data_len} bytes of data (truncated?)"
            ));
        }
        if s != expected_start {
            let what = if s < expected_start {
                "overlap"
            } else {
                "leave a hole before"
            };
            return Err(format!(
                "entry `{name}`: data_offsets [{s}, {e}] {what} the previous entry (which ends at {expected_start})"
            ));
        }
        expected_start = e;
    }
    if expected_start != data_len {
        return Err(format!(
            "the entries cover {expected_start} bytes but the data section holds {data_len}"
        ));
    }
    Ok(())
}

/// Writes a safetensors file atomically (temp file in the same dir + rename). metadata may be
/// empty. Data is laid out by decreasing element size, then name, so every entry is aligned to
/// its element size.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, TensorData)],
    metadata: &[(String, String)],
) -> Result<()> {
    let order = layout_order(path, tensors)?;
    let header = header_json(tensors, &order, metadata);
    let tmp = temp_path(path);
    let result =
        write_file(&tmp, &header, tensors, &order).and_then(|()| std::fs::rename(&tmp, path));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::at(path, format!("cannot write safetensors file: {e}"))
    })
}

/// Validates names and sizes; returns the data order.
fn layout_order(path: &Path, tensors: &[(String, TensorData)]) -> Result<Vec<usize>> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (na, ta) = &tensors[a];
        let (nb, tb) = &tensors[b];
        tb.dtype().size().cmp(&ta.dtype().size()).then(na.cmp(nb))
    });
    let mut names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::at(path, format!("duplicate tensor name `{}`", w[0])));
    }
    for (name, data) in tensors {
        if name == METADATA_KEY {
            return Err(Error::at(
                path,
                format!("`{METADATA_KEY}` is not a valid tensor name"),
            ));
        }
        if element_count(data.shape()) != Some(data.len()) {
            return Err(Error::at(
                path,
                format!(
                    "tensor `{name}` has {} values but shape {:?}",
                    data.len(),
                    data.shape()
                ),
            ));
        }
    }
    Ok(order)
}

/// The JSON header, padded with spaces to a multiple of 8 bytes.
fn header_json(
    tensors: &[(String, TensorData)],
    order: &[usize],
    metadata: &[(String, String)],
) -> Vec<u8> {
    let mut map = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        map.insert(METADATA_KEY.to_string(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for &i in order {
        let (name, data) = &tensors[i];
        let nbytes = data.len() * data.dtype().size();
        let entry = serde_json::json!({
            "dtype": data.dtype().safetensors_name(),
            "shape": data.shape(),
            "data_offsets": [offset, offset + nbytes],
        });
        map.insert(name.clone(), entry);
        offset += nbytes;
    }
    let mut header = Value::Object(map).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    header
}

fn write_file(
    tmp: &Path,
    header: &[u8],
    tensors: &[(String, TensorData)],
    order: &[usize],
) -> std::io::Result<()> {
    let file = File::options().write(true).create_new(true).open(tmp)?;
    let mut out = BufWriter::new(file);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(header)?;
    for &i in order {
        out.write_all(&le_bytes(&tensors[i].1))?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

fn le_bytes(data: &TensorData) -> Vec<u8> {
    fn flat<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }
    match data {
        TensorData::F32 { data, .. } => flat(data, f32::to_le_bytes),
        TensorData::F64 { data, .. } => flat(data, f64::to_le_bytes),
        TensorData::F16 { data, .. } => flat(data, half::f16::to_le_bytes),
        TensorData::BF16 { data, .. } => flat(data, half::bf16::to_le_bytes),
        TensorData::I64 { data, .. } => flat(data, i64::to_le_bytes),
        TensorData::I32 { data, .. } => flat(data, i32::to_le_bytes),
        TensorData::I16 { data, .. } => flat(data, i16::to_le_bytes),
        TensorData::I8 { data, .. } => flat(data, i8::to_le_bytes),
        TensorData::U8 { data, .. } => data.clone(),
        TensorData::Bool { data, .. } => data.iter().map(|&b| u8::from(b)).collect(),
    }
}

/// A fresh name beside `path`, so the final rename stays on one file system.
fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let file_name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "weights".to_string());
    let tmp_name = format!(".{file_name}.tmp-{}-{n}", std::process::id());
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(tmp_name),
        _ => PathBuf::from(tmp_name),
    }
}

//! `torch.save` zip checkpoints: `<prefix>/data.pkl` (the pickled state dict),
//! `<prefix>/data/<key>` (one raw storage per key), `<prefix>/byteorder` (optional).
//!
//! Opening parses the pickle and checks every entry's view against its storage record, so a
//! file that opens can be read entry by entry without surprises other than I/O or CRC errors.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use zip::result::ZipError;
use zip::{CompressionMethod, ZipArchive};

use super::pickle::{self, TensorDecl};
use super::strided::{ByteOrder, View};
use super::{element_count, DType, TensorInfo, WeightLimits};
use crate::error::{Error, Result};
use crate::util::sync::lock;

/// A state dict's pickle is small (about 100 bytes per entry).
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Largest view (in elements) an entry may describe; far above any real layer.
const MAX_VIEW_ELEMENTS: usize = 1 << 32;
/// Deflate cannot expand data by more than ~1032x; a record claiming more is corrupt.
const MAX_DEFLATE_RATIO: u64 = 1100;

/// The archive's bytes: a file, or a buffer in memory.
pub(crate) enum Input {
    File(File),
    Memory(Cursor<Vec<u8>>),
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Input::File(f) => f.read(buf),
            Input::Memory(c) => c.read(buf),
        }
    }
}

impl Seek for Input {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            Input::File(f) => f.seek(pos),
            Input::Memory(c) => c.seek(pos),
        }
    }
}

pub(crate) struct TorchZipSource {
    archive: Mutex<ZipArchive<Input>>,
    /// Per entry, in the sorted entry order.
    tensors: Vec<TensorDecl>,
    /// Per storage of the pickle; `None` when no entry uses it.
    storages: Vec<Option<StorageRecord>>,
    /// Per storage: whether one read already went through the whole record and its CRC.
    verified: Vec<AtomicBool>,
    order: ByteOrder,
}

#[derive(Clone, Debug)]
struct StorageRecord {
    zip_name: String,
    dtype: DType,
    numel: usize,
}

pub(crate) fn open(
    path: &Path,
    limits: &WeightLimits,
) -> Result<(Vec<TensorInfo>, TorchZipSource)> {
    let file = File::open(path).map_err(|e| Error::at(path, format!("cannot open: {e}")))?;
    from_input(Input::File(file), path, limits)
}

/// A checkpoint held in memory; `path` only names it in errors.
pub(crate) fn open_bytes(
    bytes: Vec<u8>,
    path: &Path,
    limits: &WeightLimits,
) -> Result<(Vec<TensorInfo>, TorchZipSource)> {
    from_input(Input::Memory(Cursor::new(bytes)), path, limits)
}

fn from_input(
    input: Input,
    path: &Path,
    limits: &WeightLimits,
) -> Result<(Vec<TensorInfo>, TorchZipSource)> {
    let at = |problem: String| Error::at(path, problem);
    let mut archive = ZipArchive::new(input).map_err(|e| {
        at(format!(
            "not a readable zip archive (truncated or corrupt?): {e}"
        ))
    })?;
    let prefix = find_prefix(&archive).map_err(at)?;
    let order = read_byte_order(&mut archive, &prefix).map_err(at)?;
    let pickle_name = format!("{prefix}/data.pkl");
    let pickle = read_record(&mut archive, &pickle_name, MAX_PICKLE_BYTES).map_err(at)?;
    let state = pickle::load_state_dict(&pickle).map_err(at)?;
    limits.check_tensor_count(state.tensors.len()).map_err(at)?;

    let mut storages: Vec<Option<StorageRecord>> = vec![None; state.storages.len()];
    let mut entries = Vec::with_capacity(state.tensors.len());
    let mut tensors = Vec::with_capacity(state.tensors.len());
    for (name, decl) in state.tensors {
        let in_entry = |problem: String| at(format!("entry `{}`: {problem}", name.escape_debug()));
        let slot = storages
            .get_mut(decl.storage)
            .ok_or_else(|| in_entry("refers to an unknown storage".into()))?;
        if slot.is_none() {
            let storage = &state.storages[decl.storage];
            *slot = Some(storage_record(&mut archive, &prefix, storage).map_err(&in_entry)?);
        }
        let record = slot
            .as_ref()
            .ok_or_else(|| in_entry("storage missing".into()))?;
        check_view(&decl.view, record).map_err(&in_entry)?;
        entries.push(TensorInfo {
            name,
            dtype: record.dtype,
            shape: decl.view.shape.clone(),
        });
        tensors.push(decl);
    }
    let source = TorchZipSource {
        archive: Mutex::new(archive),
        tensors,
        verified: storages.iter().map(|_| AtomicBool::new(false)).collect(),
        storages,
        order,
    };
    Ok((entries, source))
}

impl TorchZipSource {
    /// The storage record name and view behind entry `index` (for tests of view handling).
    #[cfg(test)]
    pub fn view_of(&self, index: usize) -> Option<(&str, &View)> {
        let decl = self.tensors.get(index)?;
        let record = self.storages.get(decl.storage)?.as_ref()?;
        Some((record.zip_name.as_str(), &decl.view))
    }

    /// Reads the storage behind entry `index` and runs `f` on it with the entry's view.
    pub fn with_storage<R>(
        &self,
        index: usize,
        f: impl FnOnce(&[u8], &View, ByteOrder) -> std::result::Result<R, String>,
    ) -> std::result::Result<R, String> {
        let decl = self.tensors.get(index).ok_or("no such entry")?;
        let record = self
            .storages
            .get(decl.storage)
            .and_then(Option::as_ref)
            .ok_or("storage record was not checked at open")?;
        // Only the part of the storage the view reaches is kept in memory: a deflated record
        // may expand ~1000x, and a tiny view on a huge storage must not allocate all of it.
        let size = record.dtype.size();
        let wanted = decl
            .view
            .extent()
            .and_then(|e| e.checked_mul(size))
            .filter(|&b| b <= record.numel.saturating_mul(size))
            .ok_or("view reaches past its storage")?;
        let verified = &self.verified[decl.storage];
        let bytes = {
            // A panic elsewhere cannot leave the archive inconsistent: every read seeks afresh.
            let mut archive = lock(&self.archive);
            let verify = !verified.load(Ordering::Relaxed);
            read_record_prefix(&mut archive, &record.zip_name, wanted as u64, verify)?
        };
        verified.store(true, Ordering::Relaxed);
        f(&bytes, &decl.view, self.order)
    }
}

/// The first `wanted` bytes of a record. With `verify`, the rest is read too (into nothing)
/// so that the record's CRC is checked; the bytes kept stay `wanted`.
fn read_record_prefix(
    archive: &mut ZipArchive<Input>,
    name: &str,
    wanted: u64,
    verify: bool,
) -> std::result::Result<Vec<u8>, String> {
    let shown = name.escape_debug(); // names come from the archive: keep messages on one line
    let mut file = archive.by_name(name).map_err(|e| record_error(name, e))?;
    let mut buf = Vec::with_capacity(wanted.min(1 << 20) as usize);
    (&mut file)
        .take(wanted)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read record `{shown}`: {e}"))?;
    if (buf.len() as u64) < wanted {
        return Err(format!(
            "storage record `{shown}` holds {} bytes, {wanted} expected",
            buf.len()
        ));
    }
    if verify {
        std::io::copy(&mut file, &mut std::io::sink())
            .map_err(|e| format!("cannot read record `{shown}`: {e}"))?;
    }
    Ok(buf)
}

/// The archive's top folder: the one holding `data.pkl`.
fn find_prefix(archive: &ZipArchive<Input>) -> std::result::Result<String, String> {
    let mut prefixes: Vec<&str> = archive
        .file_names()
        .filter_map(|n| n.strip_suffix("/data.pkl"))
        .filter(|p| !p.contains('/'))
        .collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    match prefixes.as_slice() {
        [one] => Ok(one.to_string()),
        [] => {
            Err("zip archive has no `<name>/data.pkl` record: not a torch.save checkpoint".into())
        }
        _ => Err(format!(
            "zip archive has {} `data.pkl` records; expected one",
            prefixes.len()
        )),
    }
}

fn read_byte_order(
    archive: &mut ZipArchive<Input>,
    prefix: &str,
) -> std::result::Result<ByteOrder, String> {
    let name = format!("{prefix}/byteorder");
    if archive.index_for_name(&name).is_none() {
        return Ok(ByteOrder::Little); // files from before the record existed are little-endian
    }
    let text = read_record(archive, &name, 16)?;
    match text.as_slice() {
        b"little" => Ok(ByteOrder::Little),
        b"big" => Ok(ByteOrder::Big),
        other => Err(format!(
            "unknown byte order `{}`",
            String::from_utf8_lossy(other).escape_debug()
        )),
    }
}

/// Reads a whole record (verifying its CRC), refusing records larger than `limit` bytes.
fn read_record(
    archive: &mut ZipArchive<Input>,
    name: &str,
    limit: u64,
) -> std::result::Result<Vec<u8>, String> {
    let shown = name.escape_debug(); // names come from the archive: keep messages on one line
    let file = archive.by_name(name).map_err(|e| record_error(name, e))?;
    let size = file.size();
    if size > limit {
        return Err(format!(
            "record `{shown}` is {size} bytes, more than the {limit} expected"
        ));
    }
    // Grow with the data actually read, not with the size the header claims.
    let mut buf = Vec::with_capacity(size.min(1 << 20) as usize);
    file.take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read record `{shown}`: {e}"))?;
    if buf.len() as u64 != size {
        return Err(format!(
            "record `{shown}` holds {} bytes but its header says {size}",
            buf.len()
        ));
    }
    Ok(buf)
}

fn record_error(name: &str, e: ZipError) -> String {
    let shown = name.escape_debug();
    match e {
        ZipError::FileNotFound => format!("storage record `{shown}` is missing from the archive"),
        other => format!("cannot open record `{shown}`: {other}"),
    }
}

/// Finds a storage's record and checks that it holds the declared elements.
fn storage_record(
    archive: &mut ZipArchive<Input>,
    prefix: &str,
    storage: &pickle::StorageDecl,
) -> std::result::Result<StorageRecord, String> {
    let zip_name = format!("{prefix}/data/{}", storage.key);
    let zip_shown = zip_name.escape_debug();
    let file = archive
        .by_name(&zip_name)
        .map_err(|e| record_error(&zip_name, e))?;
    let (size, compressed, method) = (file.size(), file.compressed_size(), file.compression());
    drop(file);
    let plausible = match method {
        CompressionMethod::Stored => size == compressed,
        CompressionMethod::Deflated => size <= compressed.saturating_mul(MAX_DEFLATE_RATIO) + 64,
        _ => false,
    };
    if !plausible {
        return Err(format!(
            "storage record `{zip_shown}` ({method}, {compressed} -> {size} bytes) is not a plain storage"
        ));
    }
    let needed = storage
        .numel
        .checked_mul(storage.dtype.size())
        .ok_or_else(|| format!("storage `{}` size overflows", storage.key.escape_debug()))?;
    if (needed as u64) > size {
        return Err(format!(
            "storage record `{zip_shown}` holds {size} bytes but the checkpoint declares {} {:?} elements ({needed} bytes)",
            storage.numel, storage.dtype
        ));
    }
    Ok(StorageRecord {
        zip_name,
        dtype: storage.dtype,
        numel: storage.numel,
    })
}

fn check_view(view: &View, record: &StorageRecord) -> std::result::Result<(), String> {
    element_count(&view.shape)
        .filter(|&n| n <= MAX_VIEW_ELEMENTS)
        .ok_or_else(|| format!("shape {:?} has too many elements", view.shape))?;
    view.check_within(record.numel)
        .map_err(|e| format!("{e} (storage record `{}`)", record.zip_name.escape_debug()))
}

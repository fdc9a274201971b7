//! Weight files: safetensors (memory-mapped) and `torch.save` zip checkpoints (read through a
//! restricted unpickler that never runs code), behind one interface.
//!
//! A file is recognised by its content, not its extension. Every entry is listed with its dtype
//! and shape at open time; values are decoded on demand, converted to `f32` for the model, or
//! kept in their own dtype for [`convert_to_safetensors`].

mod pickle;
mod safetensors_io;
mod strided;
mod torch_zip;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub use safetensors_io::{write_safetensors, MAX_HEADER_BYTES};

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Whether [`WeightFile::tensor_f32`] accepts it.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    /// The dtype's name in a safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        const ALL: [DType; 10] = [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::F64,
            DType::I64,
            DType::I32,
            DType::I16,
            DType::I8,
            DType::U8,
            DType::Bool,
        ];
        ALL.into_iter().find(|d| d.safetensors_name() == name)
    }
}

/// Name, dtype and shape of one entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    TorchZip,
}

/// Row-major contiguous tensor values in their own dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32 {
        shape: Vec<usize>,
        data: Vec<f32>,
    },
    F64 {
        shape: Vec<usize>,
        data: Vec<f64>,
    },
    F16 {
        shape: Vec<usize>,
        data: Vec<half::f16>,
    },
    BF16 {
        shape: Vec<usize>,
        data: Vec<half::bf16>,
    },
    I64 {
        shape: Vec<usize>,
        data: Vec<i64>,
    },
    I32 {
        shape: Vec<usize>,
        data: Vec<i32>,
    },
    I16 {
        shape: Vec<usize>,
        data: Vec<i16>,
    },
    I8 {
        shape: Vec<usize>,
        data: Vec<i8>,
    },
    U8 {
        shape: Vec<usize>,
        data: Vec<u8>,
    },
    Bool {
        shape: Vec<usize>,
        data: Vec<bool>,
    },
}

impl TensorData {
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32 { .. } => DType::F32,
            TensorData::F64 { .. } => DType::F64,
            TensorData::F16 { .. } => DType::F16,
            TensorData::BF16 { .. } => DType::BF16,
            TensorData::I64 { .. } => DType::I64,
            TensorData::I32 { .. } => DType::I32,
            TensorData::I16 { .. } => DType::I16,
            TensorData::I8 { .. } => DType::I8,
            TensorData::U8 { .. } => DType::U8,
            TensorData::Bool { .. } => DType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            TensorData::F32 { shape, .. }
            | TensorData::F64 { shape, .. }
            | TensorData::F16 { shape, .. }
            | TensorData::BF16 { shape, .. }
            | TensorData::I64 { shape, .. }
            | TensorData::I32 { shape, .. }
            | TensorData::I16 { shape, .. }
            | TensorData::I8 { shape, .. }
            | TensorData::U8 { shape, .. }
            | TensorData::Bool { shape, .. } => shape,
        }
    }

    /// Number of stored elements (may disagree with the shape for hand-built values; the
    /// writer checks).
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32 { data, .. } => data.len(),
            TensorData::F64 { data, .. } => data.len(),
            TensorData::F16 { data, .. } => data.len(),
            TensorData::BF16 { data, .. } => data.len(),
            TensorData::I64 { data, .. } => data.len(),
            TensorData::I32 { data, .. } => data.len(),
            TensorData::I16 { data, .. } => data.len(),
            TensorData::I8 { data, .. } => data.len(),
            TensorData::U8 { data, .. } => data.len(),
            TensorData::Bool { data, .. } => data.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An open weights file.
pub struct WeightFile {
    path: PathBuf,
    entries: Vec<TensorInfo>,
    source: Source,
}

enum Source {
    Safetensors(safetensors_io::SafetensorsSource),
    TorchZip(torch_zip::TorchZipSource),
}

impl std::fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFile")
            .field("path", &self.path)
            .field("format", &self.format())
            .field("entries", &self.entries.len())
            .finish()
    }
}

const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";
const EMPTY_ZIP_MAGIC: &[u8; 4] = b"PK\x05\x06";

/// Default of [`WeightLimits::max_file_bytes`]: the official checkpoints are ~100 MB, a full
/// prompt bank at 512 ~20 GB would already be unusual.
pub const MAX_WEIGHTS_FILE_BYTES: u64 = 64 << 30;
/// Default of [`WeightLimits::max_tensors`]: the model has 820 entries, a full bank
/// (4096 prompts) 24576.
pub const MAX_TENSORS: usize = 100_000;
/// Environment variable overriding [`WeightLimits::max_file_bytes`].
pub const ENV_MAX_WEIGHTS_BYTES: &str = "METAUAS_MAX_WEIGHTS_BYTES";
/// Environment variable overriding [`WeightLimits::max_tensors`].
pub const ENV_MAX_TENSORS: &str = "METAUAS_MAX_TENSORS";

/// Resource bounds applied while opening a weights file (or a prompt bank). The fixed,
/// internal bounds (safetensors header size, pickle stack / memo / object counts) are listed
/// in the README's Limits section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightLimits {
    /// Largest file accepted, in bytes.
    pub max_file_bytes: u64,
    /// Most entries (tensors) a file may hold.
    pub max_tensors: usize,
}

impl Default for WeightLimits {
    fn default() -> Self {
        WeightLimits {
            max_file_bytes: MAX_WEIGHTS_FILE_BYTES,
            max_tensors: MAX_TENSORS,
        }
    }
}

impl WeightLimits {
    /// The defaults, with `METAUAS_MAX_WEIGHTS_BYTES` / `METAUAS_MAX_TENSORS` applied.
    pub fn from_env() -> Result<WeightLimits> {
        WeightLimits::from_lookup(|key| std::env::var(key).ok())
    }

    /// Like [`WeightLimits::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<WeightLimits> {
        let mut limits = WeightLimits::default();
        if let Some(v) = crate::io::env_limit(&lookup, ENV_MAX_WEIGHTS_BYTES)? {
            limits.max_file_bytes = v;
        }
        if let Some(v) = crate::io::env_limit(&lookup, ENV_MAX_TENSORS)? {
            limits.max_tensors = usize::try_from(v).unwrap_or(usize::MAX);
        }
        Ok(limits)
    }

    fn check_file_size(&self, len: u64) -> std::result::Result<(), String> {
        if len > self.max_file_bytes {
            return Err(format!(
                "file is {len} bytes, over the limit of {} bytes (raise it with {ENV_MAX_WEIGHTS_BYTES})",
                self.max_file_bytes
            ));
        }
        Ok(())
    }

    fn check_tensor_count(&self, count: usize) -> std::result::Result<(), String> {
        if count > self.max_tensors {
            return Err(format!(
                "file declares {count} tensors, over the limit of {} (raise it with {ENV_MAX_TENSORS})",
                self.max_tensors
            ));
        }
        Ok(())
    }
}

impl WeightFile {
    /// Opens by content (safetensors header vs zip magic "PK\x03\x04"), not by extension.
    /// safetensors is memory-mapped (memmap2); the torch zip is read through the `zip` crate.
    /// Applies [`WeightLimits::from_env`].
    pub fn open(path: &Path) -> Result<WeightFile> {
        let limits = WeightLimits::from_env()?;
        WeightFile::open_with(path, &limits)
    }

    /// [`WeightFile::open`] under explicit limits.
    pub fn open_with(path: &Path, limits: &WeightLimits) -> Result<WeightFile> {
        let len = std::fs::metadata(path)
            .map_err(|e| Error::at(path, format!("cannot open: {e}")))?
            .len();
        limits
            .check_file_size(len)
            .map_err(|p| Error::at(path, p))?;
        let head = read_head(path)?;
        let (entries, source) = if head.starts_with(ZIP_MAGIC) || head.starts_with(EMPTY_ZIP_MAGIC)
        {
            let (entries, src) = torch_zip::open(path, limits)?;
            (entries, Source::TorchZip(src))
        } else if safetensors_io::looks_like_safetensors(&head) {
            let (entries, src) = safetensors_io::open(path, limits)?;
            (entries, Source::Safetensors(src))
        } else {
            return Err(Error::at(path, unrecognized_format(&head)));
        };
        debug_assert!(entries.windows(2).all(|w| w[0].name < w[1].name));
        Ok(WeightFile {
            path: path.to_path_buf(),
            entries,
            source,
        })
    }

    /// A weights file held in memory (same formats and checks as [`WeightFile::open_with`]);
    /// `label` stands for the path in errors. Used by the fuzz targets and by callers that
    /// receive weights or banks over the network.
    pub fn from_bytes(bytes: Vec<u8>, label: &str, limits: &WeightLimits) -> Result<WeightFile> {
        let path = Path::new(label);
        limits
            .check_file_size(bytes.len() as u64)
            .map_err(|p| Error::at(path, p))?;
        let head = &bytes[..bytes.len().min(16)];
        let (entries, source) = if head.starts_with(ZIP_MAGIC) || head.starts_with(EMPTY_ZIP_MAGIC)
        {
            let (entries, src) = torch_zip::open_bytes(bytes, path, limits)?;
            (entries, Source::TorchZip(src))
        } else if safetensors_io::looks_like_safetensors(head) {
            let (entries, src) = safetensors_io::open_bytes(bytes, path, limits)?;
            (entries, Source::Safetensors(src))
        } else {
            return Err(Error::at(path, unrecognized_format(head)));
        };
        Ok(WeightFile {
            path: path.to_path_buf(),
            entries,
            source,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        match self.source {
            Source::Safetensors(_) => Format::Safetensors,
            Source::TorchZip(_) => Format::TorchZip,
        }
    }

    /// Every entry, sorted by name.
    pub fn entries(&self) -> &[TensorInfo] {
        &self.entries
    }

    /// The entry called `name`, if any.
    pub fn entry(&self, name: &str) -> Option<&TensorInfo> {
        self.index_of(name).map(|i| &self.entries[i])
    }

    /// String metadata of a safetensors file (`__metadata__`), sorted by key; empty for a
    /// torch checkpoint.
    pub fn metadata(&self) -> &[(String, String)] {
        match &self.source {
            Source::Safetensors(src) => src.metadata(),
            Source::TorchZip(_) => &[],
        }
    }

    /// Row-major contiguous f32 copy of a float entry (f32/f16/bf16/f64 converted).
    pub fn tensor_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let index = self.index_of(name);
        let name = name.escape_debug(); // messages stay on one line
        let index = index.ok_or_else(|| {
            Error::at(
                &self.path,
                format!("missing entry `{name}` (expected shape {expected_shape:?})"),
            )
        })?;
        let info = &self.entries[index];
        if info.shape != expected_shape {
            return Err(Error::at(
                &self.path,
                format!(
                    "entry `{name}` has shape {:?}, expected {expected_shape:?}",
                    info.shape
                ),
            ));
        }
        if !info.dtype.is_float() {
            return Err(Error::at(
                &self.path,
                format!(
                    "entry `{name}` has dtype {:?}, not a floating-point type",
                    info.dtype
                ),
            ));
        }
        self.with_view(index, |bytes, view, order| {
            strided::gather_f32(bytes, info.dtype, view, order)
        })
    }

    /// Row-major contiguous copy of any entry in its own dtype.
    pub fn tensor_data(&self, name: &str) -> Result<TensorData> {
        let index = self.index_of(name).ok_or_else(|| {
            Error::at(
                &self.path,
                format!("missing entry `{}`", name.escape_debug()),
            )
        })?;
        let dtype = self.entries[index].dtype;
        self.with_view(index, |bytes, view, order| {
            strided::gather_data(bytes, dtype, view, order)
        })
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()
    }

    /// Runs `f` on the bytes holding entry `index` and the view that picks its elements.
    fn with_view<R>(
        &self,
        index: usize,
        f: impl FnOnce(&[u8], &strided::View, strided::ByteOrder) -> std::result::Result<R, String>,
    ) -> Result<R> {
        let name = self.entries[index].name.escape_debug();
        let result = match &self.source {
            Source::Safetensors(src) => {
                let (bytes, view) = src.entry_bytes(index, &self.entries[index].shape);
                f(bytes, &view, strided::ByteOrder::Little)
            }
            Source::TorchZip(src) => src.with_storage(index, f),
        };
        result.map_err(|problem| Error::at(&self.path, format!("entry `{name}`: {problem}")))
    }
}

/// Safetensors output may be this many times the input's size (or 1 GiB, if larger): a tiny
/// checkpoint can legitimately expand (shared storages, zero strides), but not without limit.
const CONVERT_EXPANSION_LIMIT: u64 = 8;
const CONVERT_MIN_BUDGET: u64 = 1 << 30;

/// `metauas convert`: any readable weights file -> safetensors, keeping every entry and its
/// dtype (float16 and bfloat16 stay as they are, nothing is widened). Views are written as
/// contiguous copies. A safetensors input keeps its string metadata. Returns the number of
/// entries.
pub fn convert_to_safetensors(input: &Path, output: &Path) -> Result<usize> {
    let file = WeightFile::open(input)?;
    let input_len = std::fs::metadata(input)
        .map_err(|e| Error::at(input, format!("cannot read file size: {e}")))?
        .len();
    let budget = input_len
        .saturating_mul(CONVERT_EXPANSION_LIMIT)
        .max(CONVERT_MIN_BUDGET);
    let mut total: u64 = 0;
    for info in file.entries() {
        let bytes = element_count(&info.shape)
            .and_then(|n| n.checked_mul(info.dtype.size()))
            .ok_or_else(|| {
                Error::at(
                    input,
                    format!("entry `{}` is too large", info.name.escape_debug()),
                )
            })?;
        total = total.saturating_add(bytes as u64);
    }
    if total > budget {
        return Err(Error::at(
            input,
            format!("converting would write {total} bytes of tensors, more than the limit of {budget} for this input"),
        ));
    }
    let mut tensors = Vec::with_capacity(file.entries().len());
    for info in file.entries() {
        tensors.push((info.name.clone(), file.tensor_data(&info.name)?));
    }
    write_safetensors(output, &tensors, file.metadata())?;
    Ok(tensors.len())
}

/// Product of the dims, `None` on overflow.
pub(crate) fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// The first bytes of the file, enough to tell the formats apart.
fn read_head(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| Error::at(path, format!("cannot open: {e}")))?;
    let mut head = Vec::with_capacity(16);
    file.take(16)
        .read_to_end(&mut head)
        .map_err(|e| Error::at(path, format!("cannot read: {e}")))?;
    Ok(head)
}

fn unrecognized_format(head: &[u8]) -> String {
    if head.is_empty() {
        "the file is empty, not a weights file".to_string()
    } else if head.first() == Some(&0x80) {
        "looks like a legacy (pre-zip) torch.save pickle, which is not supported; \
         re-save it with a current PyTorch or convert it to safetensors"
            .to_string()
    } else {
        "unrecognized weights format (neither safetensors nor a torch.save zip archive)".to_string()
    }
}

//! Python bindings of metauas: `metauas._metauas`, re-exported by the `metauas` package.
//! numpy arrays in and out; the GIL is released while the engine runs; every library error
//! is a `metauas.Error` (a `ValueError`) with its one-line message, a missing file a
//! `FileNotFoundError`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use metauas::io::image::{decode_image_bytes, decode_image_file, RgbImage8};
use metauas::model::decision::{
    parse_selection, resize_map, Calibrator, Decision, Policy, RoiMask, Rule,
};
use metauas::model::{
    BackendChoice, BankEntry, EngineOptions, PromptFeatures, PromptSelection, PromptSet,
};
use numpy::{
    IntoPyArray, PyArray2, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

create_exception!(
    _metauas,
    Error,
    PyValueError,
    "A metauas error: one line naming the file or field and the problem."
);

fn err(e: metauas::Error) -> PyErr {
    Error::new_err(e.to_string())
}

fn bad(msg: impl Into<String>) -> PyErr {
    Error::new_err(msg.into())
}

fn existing(path: &Path, what: &str) -> PyResult<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(PyFileNotFoundError::new_err(format!(
            "{}: no such file ({what})",
            path.display()
        )))
    }
}

/// An image argument, taken from Python with the GIL held; decoded without it.
enum ImageSource {
    Pixels(RgbImage8),
    Encoded(Vec<u8>),
    File(PathBuf),
}

impl ImageSource {
    fn decode(self) -> metauas::Result<RgbImage8> {
        match self {
            ImageSource::Pixels(img) => Ok(img),
            ImageSource::Encoded(bytes) => decode_image_bytes(&bytes, "image bytes"),
            ImageSource::File(path) => decode_image_file(&path),
        }
    }
}

/// An image argument, decoded with the GIL released.
fn image_arg(obj: &Bound<'_, PyAny>) -> PyResult<RgbImage8> {
    let source = image_source(obj)?;
    obj.py().allow_threads(|| source.decode()).map_err(err)
}

/// An image argument: a numpy `uint8` array `(H, W, 3)` (RGB) or `(H, W)` (gray), a path
/// (`str` or `os.PathLike`), or the bytes of an encoded image.
fn image_source(obj: &Bound<'_, PyAny>) -> PyResult<ImageSource> {
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return Ok(ImageSource::Encoded(b.as_bytes().to_vec()));
    }
    if obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__")? {
        let path: PathBuf = obj.extract()?;
        existing(&path, "image")?;
        return Ok(ImageSource::File(path));
    }
    if let Ok(untyped) = obj.downcast::<PyUntypedArray>() {
        let Ok(arr) = obj.downcast::<PyArrayDyn<u8>>() else {
            return Err(bad(format!(
                "image array has dtype {}, expected uint8",
                untyped.dtype()
            )));
        };
        return array_image(arr).map(ImageSource::Pixels);
    }
    Err(bad(format!(
        "image: expected a numpy uint8 array (H, W, 3) or (H, W), a path or encoded bytes, not {}",
        obj.get_type().name()?
    )))
}

fn array_image(arr: &Bound<'_, PyArrayDyn<u8>>) -> PyResult<RgbImage8> {
    let shape = arr.shape().to_vec();
    let (h, w, channels) = match shape.as_slice() {
        [h, w] => (*h, *w, 1),
        [h, w, 3] => (*h, *w, 3),
        [_, _, c] => {
            return Err(bad(format!(
                "image array has {c} channels, expected 3 (RGB) or a 2-D gray array"
            )))
        }
        _ => {
            return Err(bad(format!(
                "image array has shape {shape:?}, expected (H, W, 3) or (H, W)"
            )))
        }
    };
    if h == 0 || w == 0 {
        return Err(bad(format!("image array is empty ({h} x {w})")));
    }
    if !arr.is_c_contiguous() {
        return Err(bad(
            "image array is not C-contiguous: pass numpy.ascontiguousarray(image)",
        ));
    }
    let readonly = arr.readonly();
    let pixels = readonly
        .as_slice()
        .map_err(|e| bad(format!("image array: {e}")))?;
    let data = if channels == 3 {
        pixels.to_vec()
    } else {
        pixels.iter().flat_map(|&v| [v, v, v]).collect()
    };
    Ok(RgbImage8 {
        width: w,
        height: h,
        data,
    })
}

/// A JSON value as Python objects (dicts, lists, floats, ints, str, None).
fn to_py(py: Python<'_>, v: &serde_json::Value) -> PyResult<PyObject> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => py.None(),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any().unbind(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into_pyobject(py)?.into_any().unbind(),
            None => n
                .as_f64()
                .unwrap_or(f64::NAN)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any().unbind(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any().unbind()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, item) in map {
                dict.set_item(k, to_py(py, item)?)?;
            }
            dict.into_any().unbind()
        }
    })
}

fn selection_arg(multi: Option<&str>) -> PyResult<Option<PromptSelection>> {
    multi
        .map(|m| {
            parse_selection(m).ok_or_else(|| bad(format!("multi `{m}`: must be best, mean or min")))
        })
        .transpose()
}

// ---------------------------------------------------------------- Engine

/// MetaUAS on one backend at one size. Safe to use from several threads at once; every
/// call that runs the model releases the GIL.
#[pyclass(module = "metauas", frozen)]
struct Engine {
    inner: Arc<metauas::Engine>,
}

#[pymethods]
impl Engine {
    /// Loads weights (an official `.ckpt` or safetensors) for `size` (a multiple of 32;
    /// the official checkpoints use 256 and 512). `backend`: `auto` (a hardware GPU when
    /// there is one, else the CPU), `cpu` or `gpu`; `precision`: `f32` or `f16` (GPU only).
    #[new]
    #[pyo3(signature = (weights, size = 256, backend = "auto", precision = "f32"))]
    fn new(
        py: Python<'_>,
        weights: PathBuf,
        size: usize,
        backend: &str,
        precision: &str,
    ) -> PyResult<Engine> {
        existing(&weights, "weights")?;
        let options = options(backend, precision)?;
        let engine = py
            .allow_threads(|| metauas::Engine::from_file_with(&weights, size, options))
            .map_err(err)?;
        Ok(Engine {
            inner: Arc::new(engine),
        })
    }

    /// An engine with deterministic synthetic weights (`docs/SYNTHETIC.md`): to try the API
    /// without a checkpoint. Its maps mean nothing.
    #[staticmethod]
    #[pyo3(signature = (size = 256, seed = 1, backend = "cpu", gain_encoder = 1.0, gain_alignment = 1.0, gain_decoder = 1.0, gain_head = 1.0))]
    #[allow(clippy::too_many_arguments)]
    fn synthetic(
        py: Python<'_>,
        size: usize,
        seed: u64,
        backend: &str,
        gain_encoder: f64,
        gain_alignment: f64,
        gain_decoder: f64,
        gain_head: f64,
    ) -> PyResult<Engine> {
        use metauas::synth::{synthetic_weights, WeightRecipe};
        let recipe = WeightRecipe {
            seed,
            gain_encoder,
            gain_alignment,
            gain_decoder,
            gain_head,
        };
        let options = options(backend, "f32")?;
        let engine = py
            .allow_threads(|| {
                metauas::Engine::with_options(&synthetic_weights(&recipe), size, options)
            })
            .map_err(err)?;
        Ok(Engine {
            inner: Arc::new(engine),
        })
    }

    /// Where the engine runs, e.g. `cpu (avx2, 8 threads)`.
    #[getter]
    fn backend(&self) -> String {
        self.inner.backend_description()
    }

    /// The model resolution.
    #[getter]
    fn size(&self) -> usize {
        self.inner.size()
    }

    /// The weights' fingerprint (`mw64:...`), as banks record it.
    #[getter]
    fn weights_hash(&self) -> String {
        self.inner.weights_hash()
    }

    /// Encodes a normal image once, for any number of `segment` calls.
    fn encode_prompt(&self, py: Python<'_>, image: &Bound<'_, PyAny>) -> PyResult<Prompt> {
        let image = image_arg(image)?;
        let engine = self.inner.clone();
        let features = py
            .allow_threads(|| engine.encode_prompt(&image))
            .map_err(err)?;
        Ok(Prompt {
            features: Arc::new(features),
            weights_hash: self.inner.weights_hash(),
        })
    }

    /// Segments `query` against a `Prompt` or a `PromptBank` (with `multi`: `best`, `mean`
    /// or `min`; default: the bank's calibration mode, else `best`). A calibrated bank
    /// gives the verdict and regions too.
    #[pyo3(signature = (prompt, query, multi = None))]
    fn segment(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        query: &Bound<'_, PyAny>,
        multi: Option<&str>,
    ) -> PyResult<SegmentResult> {
        let query = image_arg(query)?;
        let selection = selection_arg(multi)?;
        let engine = self.inner.clone();
        if let Ok(p) = prompt.downcast::<Prompt>() {
            if selection.is_some() {
                return Err(bad("multi applies to a PromptBank only"));
            }
            let p = p.get();
            p.check(&engine)?;
            let features = p.features.clone();
            let frame = (query.width, query.height);
            let map = py
                .allow_threads(|| engine.segment(&features, &query))
                .map_err(err)?;
            let decision = Policy::default()
                .decide(&mut map.clone(), frame)
                .map_err(err)?;
            return SegmentResult::new(py, map.data, map.size, decision);
        }
        if let Ok(bank) = prompt.downcast::<PromptBank>() {
            return bank.get().judge(py, &engine, query, selection);
        }
        Err(bad(
            "prompt: expected a metauas.Prompt or a metauas.PromptBank",
        ))
    }

    /// `segment` for a `Prompt`, also returning the milliseconds spent inside the Rust
    /// `Engine::segment` call: what the Python layer adds is the rest (for measuring it).
    fn _segment_timed(
        &self,
        py: Python<'_>,
        prompt: &Prompt,
        query: &Bound<'_, PyAny>,
    ) -> PyResult<(SegmentResult, f64)> {
        prompt.check(&self.inner)?;
        let query = image_arg(query)?;
        let engine = self.inner.clone();
        let features = prompt.features.clone();
        let (map, ms) = py.allow_threads(|| {
            let t = std::time::Instant::now();
            let map = engine.segment(&features, &query);
            (map, t.elapsed().as_secs_f64() * 1e3)
        });
        let map = map.map_err(err)?;
        let decision = Policy::default()
            .decide(&mut map.clone(), (query.width, query.height))
            .map_err(err)?;
        Ok((SegmentResult::new(py, map.data, map.size, decision)?, ms))
    }

    /// Segments several queries against one `Prompt` (one GPU submission per chunk; on the
    /// CPU one after another, each on every core). The maps equal `segment`'s.
    fn segment_batch(
        &self,
        py: Python<'_>,
        prompt: &Prompt,
        queries: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<SegmentResult>> {
        prompt.check(&self.inner)?;
        let images = queries
            .iter()
            .map(image_arg)
            .collect::<PyResult<Vec<RgbImage8>>>()?;
        let engine = self.inner.clone();
        let features = prompt.features.clone();
        let maps = py
            .allow_threads(|| {
                let refs: Vec<&RgbImage8> = images.iter().collect();
                engine.segment_batch(&features, &refs)
            })
            .map_err(err)?;
        maps.into_iter()
            .zip(&images)
            .map(|(map, img)| {
                let decision = Policy::default()
                    .decide(&mut map.clone(), (img.width, img.height))
                    .map_err(err)?;
                SegmentResult::new(py, map.data, map.size, decision)
            })
            .collect()
    }

    /// Encodes `prompt_image` and segments `query_image` against it in one call (on the CPU
    /// both encoders at once); returns `(Prompt, Result)`, equal to `encode_prompt` then
    /// `segment`.
    fn segment_pair(
        &self,
        py: Python<'_>,
        prompt_image: &Bound<'_, PyAny>,
        query_image: &Bound<'_, PyAny>,
    ) -> PyResult<(Prompt, SegmentResult)> {
        let prompt = image_arg(prompt_image)?;
        let query = image_arg(query_image)?;
        let engine = self.inner.clone();
        let (features, map) = py
            .allow_threads(|| engine.segment_pair(&prompt, &query))
            .map_err(err)?;
        let decision = Policy::default()
            .decide(&mut map.clone(), (query.width, query.height))
            .map_err(err)?;
        let prompt = Prompt {
            features: Arc::new(features),
            weights_hash: self.inner.weights_hash(),
        };
        Ok((
            prompt,
            SegmentResult::new(py, map.data, map.size, decision)?,
        ))
    }

    /// Every intermediate tensor of a prompt/query pair, as `metauas segment --taps` writes
    /// them: a dict from tap name (after the PyTorch module, in graph order) to a float32
    /// NCHW array, the map (`"map"`) included. For checking another engine layer by layer.
    fn segment_with_taps<'py>(
        &self,
        py: Python<'py>,
        prompt_image: &Bound<'py, PyAny>,
        query_image: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let prompt = image_arg(prompt_image)?;
        let query = image_arg(query_image)?;
        let engine = self.inner.clone();
        let (_, taps) = py
            .allow_threads(|| engine.segment_with_taps(&prompt, &query))
            .map_err(err)?;
        let out = PyDict::new(py);
        for tap in taps {
            let array = tap
                .data
                .into_pyarray(py)
                .reshape(tap.shape.to_vec())
                .map_err(|e| bad(format!("{}: {e}", tap.name)))?;
            out.set_item(tap.name, array)?;
        }
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "Engine(size={}, backend='{}', weights='{}')",
            self.inner.size(),
            self.inner.backend_description(),
            self.inner.weights_hash()
        )
    }
}

fn options(backend: &str, precision: &str) -> PyResult<EngineOptions> {
    let backend = match backend {
        "auto" => BackendChoice::Auto,
        "cpu" => BackendChoice::Cpu,
        "gpu" => BackendChoice::Gpu,
        other => return Err(bad(format!("backend `{other}`: must be auto, cpu or gpu"))),
    };
    let precision = match precision {
        "f32" => metauas::graph::Precision::F32,
        "f16" => metauas::graph::Precision::F16,
        other => return Err(bad(format!("precision `{other}`: must be f32 or f16"))),
    };
    Ok(EngineOptions { backend, precision })
}

// ---------------------------------------------------------------- Prompt, Result

/// A normal image encoded by an engine (`Engine.encode_prompt`).
#[pyclass(module = "metauas", frozen)]
struct Prompt {
    features: Arc<PromptFeatures>,
    weights_hash: String,
}

impl Prompt {
    fn check(&self, engine: &metauas::Engine) -> PyResult<()> {
        if self.weights_hash != engine.weights_hash() || self.features.size != engine.size() {
            return Err(bad(format!(
                "prompt was encoded by another engine ({} at size {}; this one is {} at size {})",
                self.weights_hash,
                self.features.size,
                engine.weights_hash(),
                engine.size()
            )));
        }
        Ok(())
    }
}

#[pymethods]
impl Prompt {
    /// The model resolution it was encoded at.
    #[getter]
    fn size(&self) -> usize {
        self.features.size
    }

    fn __repr__(&self) -> String {
        format!("Prompt(size={})", self.features.size)
    }
}

/// One query's outcome: the map, its score, and with a calibrated bank the verdict and the
/// defect regions.
#[pyclass(module = "metauas", name = "Result", frozen)]
struct SegmentResult {
    map: Py<PyArray2<f32>>,
    size: usize,
    decision: Decision,
}

impl SegmentResult {
    fn new(py: Python<'_>, data: Vec<f32>, size: usize, decision: Decision) -> PyResult<Self> {
        // The Vec becomes the array's buffer: no copy.
        let map = data.into_pyarray(py).reshape([size, size])?.unbind();
        Ok(SegmentResult {
            map,
            size,
            decision,
        })
    }
}

#[pymethods]
impl SegmentResult {
    /// The anomaly map, `float32 (S, S)`, values in (0, 1), zero outside an inspection mask.
    #[getter]
    fn map(&self, py: Python<'_>) -> Py<PyArray2<f32>> {
        self.map.clone_ref(py)
    }

    /// The map's maximum (the authors' image-level score).
    #[getter]
    fn score(&self) -> f32 {
        self.decision.score
    }

    /// `score >= image threshold`, or None without a calibrated bank.
    #[getter]
    fn anomalous(&self) -> Option<bool> {
        self.decision.anomalous
    }

    /// `{"anomalous", "score", "image_threshold", "pixel_threshold"}` (as in the CLI's
    /// JSON line), or None without thresholds.
    #[getter]
    fn verdict(&self, py: Python<'_>) -> PyResult<PyObject> {
        if self.decision.image_threshold.is_none() && self.decision.pixel_threshold.is_none() {
            return Ok(py.None());
        }
        to_py(py, &self.decision.verdict_json())
    }

    /// Defect regions (dicts with `box` in the frame's pixels, `map_box`, `area_px`,
    /// `area_fraction`, `max`, `mean`, `centroid`), highest max first; empty without a
    /// pixel threshold.
    #[getter]
    fn regions(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.decision.regions_json())
    }

    /// The query's `(width, height)`.
    #[getter]
    fn frame(&self) -> (usize, usize) {
        self.decision.frame
    }

    /// The map resized to `width x height` (OpenCV's INTER_LINEAR, the authors' visualizer);
    /// by default the query's own size.
    #[pyo3(signature = (width = None, height = None))]
    fn map_at<'py>(
        &self,
        py: Python<'py>,
        width: Option<usize>,
        height: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (w, h) = (
            width.unwrap_or(self.decision.frame.0),
            height.unwrap_or(self.decision.frame.1),
        );
        if w == 0 || h == 0 {
            return Err(bad(format!("map_at: size {w} x {h} is empty")));
        }
        let pixels = w
            .checked_mul(h)
            .filter(|&p| p as u64 <= metauas::io::image::MAX_IMAGE_PIXELS);
        if pixels.is_none() {
            return Err(bad(format!(
                "map_at: {w} x {h} is more than {} pixels",
                metauas::io::image::MAX_IMAGE_PIXELS
            )));
        }
        let map = self.map.bind(py).readonly();
        let data = map
            .as_slice()
            .map_err(|e| bad(format!("map: {e}")))?
            .to_vec();
        let size = self.size;
        let big = py.allow_threads(|| resize_map(&data, size, w, h));
        big.into_pyarray(py).reshape([h, w])
    }

    fn __repr__(&self) -> String {
        format!(
            "Result(score={}, anomalous={:?}, regions={})",
            self.decision.score,
            self.decision.anomalous,
            self.decision.regions.len()
        )
    }
}

// ---------------------------------------------------------------- PromptBank

/// Normal images encoded once, with an optional inspection mask and calibration; saved as
/// safetensors (the CLI's `bank` files).
#[pyclass(module = "metauas", frozen)]
struct PromptBank {
    // A lock, not PyO3's borrow flag: the bank is read by `segment` and written by
    // `calibrate` from several threads, with the GIL released.
    inner: RwLock<metauas::model::PromptBank>,
}

impl PromptBank {
    fn of(bank: metauas::model::PromptBank) -> PromptBank {
        PromptBank {
            inner: RwLock::new(bank),
        }
    }

    fn bank(&self) -> std::sync::RwLockReadGuard<'_, metauas::model::PromptBank> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, engine: &metauas::Engine) -> PyResult<()> {
        let bank = self.bank();
        if bank.weights_hash() != engine.weights_hash() || bank.size() != engine.size() {
            return Err(bad(format!(
                "bank was built with other weights or size ({} at {}; this engine is {} at {})",
                bank.weights_hash(),
                bank.size(),
                engine.weights_hash(),
                engine.size()
            )));
        }
        Ok(())
    }

    fn prompt_set(&self, selection: Option<PromptSelection>) -> PyResult<PromptSet> {
        let bank = self.bank();
        let selection = selection
            .or(bank.calibration().map(|c| c.selection))
            .unwrap_or_default();
        PromptSet::from_bank(&bank, selection).map_err(err)
    }

    fn judge(
        &self,
        py: Python<'_>,
        engine: &Arc<metauas::Engine>,
        query: RgbImage8,
        selection: Option<PromptSelection>,
    ) -> PyResult<SegmentResult> {
        self.check(engine)?;
        let set = self.prompt_set(selection)?;
        let policy = {
            let bank = self.bank();
            match bank.calibration() {
                Some(c) => Policy::calibrated(c, bank.roi().cloned()),
                None => Policy {
                    roi: bank.roi().cloned(),
                    ..Policy::default()
                },
            }
        };
        let engine = engine.clone();
        let (map, decision) = py
            .allow_threads(|| -> metauas::Result<_> {
                let (mut map, _) = set.segment(&engine, &query)?;
                let decision = policy.decide(&mut map, (query.width, query.height))?;
                Ok((map, decision))
            })
            .map_err(err)?;
        SegmentResult::new(py, map.data, map.size, decision)
    }
}

#[pymethods]
impl PromptBank {
    /// Encodes `images` (arrays, paths or bytes) with `engine`; `names` default to
    /// `prompt1`, `prompt2`, ... (file stems for paths); `roi` is an inspection mask image
    /// (white = inspect) of the images' size.
    #[staticmethod]
    #[pyo3(signature = (engine, images, names = None, roi = None))]
    fn build(
        py: Python<'_>,
        engine: &Engine,
        images: Vec<Bound<'_, PyAny>>,
        names: Option<Vec<String>>,
        roi: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PromptBank> {
        if images.is_empty() {
            return Err(bad("PromptBank.build: no images"));
        }
        if let Some(n) = &names {
            if n.len() != images.len() {
                return Err(bad(format!(
                    "PromptBank.build: {} names for {} images",
                    n.len(),
                    images.len()
                )));
            }
        }
        let mut bank = metauas::model::PromptBank::new(&engine.inner);
        let roi = match roi {
            Some(r) => Some(RoiMask::from_image(&image_arg(r)?, engine.inner.size()).map_err(err)?),
            None => None,
        };
        for (i, obj) in images.iter().enumerate() {
            let stem = obj
                .extract::<PathBuf>()
                .ok()
                .filter(|_| !obj.is_instance_of::<PyBytes>())
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()));
            let name = match &names {
                Some(n) => n[i].clone(),
                None => stem.clone().unwrap_or_else(|| format!("prompt{}", i + 1)),
            };
            let image = image_arg(obj)?;
            if let Some(r) = &roi {
                r.check_frame(image.width, image.height)
                    .map_err(|e| bad(format!("image {i}: {e}")))?;
            }
            let e = engine.inner.clone();
            let features = py.allow_threads(|| e.encode_prompt(&image)).map_err(err)?;
            let source = stem.unwrap_or_else(|| format!("image {i}"));
            bank.push(BankEntry {
                name,
                source,
                features,
            })
            .map_err(err)?;
        }
        bank.set_roi(roi).map_err(err)?;
        Ok(PromptBank::of(bank))
    }

    /// Reads a bank file; with `engine`, also checks it belongs to it (same weights and
    /// size), as `segment` does anyway.
    #[staticmethod]
    #[pyo3(signature = (path, engine = None))]
    fn load(path: PathBuf, engine: Option<&Engine>) -> PyResult<PromptBank> {
        existing(&path, "prompt bank")?;
        let bank = match engine {
            Some(e) => metauas::model::PromptBank::load(&path, &e.inner).map_err(err)?,
            None => {
                let file = metauas::io::weights::WeightFile::open(&path).map_err(err)?;
                metauas::model::PromptBank::from_weight_file(&file).map_err(err)?
            }
        };
        Ok(PromptBank::of(bank))
    }

    /// Writes the bank (atomically: a temporary file, then a rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let bank = self.bank().clone();
        py.allow_threads(|| bank.save(&path)).map_err(err)
    }

    /// Finds thresholds from held-out normal `images` (see the README's "From maps to
    /// decisions"): `method` over the image scores times `1 + margin`, `pixel_method` over
    /// every inspected pixel; stored in the bank (save it to keep them). Returns them.
    #[pyo3(signature = (engine, images, method = "max", margin = 0.05, pixel_method = "quantile:0.999", multi = "best"))]
    #[allow(clippy::too_many_arguments)]
    fn calibrate(
        &self,
        py: Python<'_>,
        engine: &Engine,
        images: Vec<Bound<'_, PyAny>>,
        method: &str,
        margin: f64,
        pixel_method: &str,
        multi: &str,
    ) -> PyResult<PyObject> {
        self.check(&engine.inner)?;
        let image_rule: Rule = method.parse().map_err(err)?;
        let pixel_rule: Rule = pixel_method.parse().map_err(err)?;
        let selection = selection_arg(Some(multi))?.unwrap_or_default();
        let (set, roi) = {
            let bank = self.bank();
            (
                PromptSet::from_bank(&bank, selection).map_err(err)?,
                bank.roi().cloned(),
            )
        };
        let mut calibrator = Calibrator::new(roi.clone());
        for (i, obj) in images.iter().enumerate() {
            let image = image_arg(obj)?;
            let e = engine.inner.clone();
            let map = py
                .allow_threads(|| -> metauas::Result<_> {
                    let (mut map, _) = set.segment(&e, &image)?;
                    if let Some(r) = &roi {
                        r.check_frame(image.width, image.height)?;
                        r.apply(&mut map)?;
                    }
                    Ok(map)
                })
                .map_err(|e| bad(format!("image {i}: {e}")))?;
            calibrator.add(&format!("image {i}"), &map).map_err(err)?;
        }
        let calibration = calibrator
            .finish(image_rule, margin, pixel_rule, selection)
            .map_err(err)?;
        let json = calibration.to_json();
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set_calibration(Some(calibration));
        to_py(py, &json)
    }

    /// Prompt names, in order.
    #[getter]
    fn names(&self) -> Vec<String> {
        self.bank()
            .entries()
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    #[getter]
    fn size(&self) -> usize {
        self.bank().size()
    }

    #[getter]
    fn weights_hash(&self) -> String {
        self.bank().weights_hash().to_string()
    }

    /// The calibration (thresholds, rules, statistics) as a dict, or None.
    #[getter]
    fn calibration(&self, py: Python<'_>) -> PyResult<PyObject> {
        match self.bank().calibration() {
            Some(c) => to_py(py, &c.to_json()),
            None => Ok(py.None()),
        }
    }

    fn __len__(&self) -> usize {
        self.bank().len()
    }

    fn __repr__(&self) -> String {
        let bank = self.bank();
        format!(
            "PromptBank({} prompts, size {}, calibrated={})",
            bank.len(),
            bank.size(),
            bank.calibration().is_some()
        )
    }
}

#[pymodule]
fn _metauas(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Prompt>()?;
    m.add_class::<SegmentResult>()?;
    m.add_class::<PromptBank>()?;
    m.add("Error", m.py().get_type::<Error>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

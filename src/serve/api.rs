//! Routes and handlers: prompts (with inspection masks), products (banks with their
//! calibration), segmentation with verdicts and regions, health and metrics. Every error is
//! a JSON `{"error": "one line"}` with its status.

use crate::model::decision::selection_name;
use std::io::Cursor;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use serde_json::json;

use super::base64;
use super::batcher::{Batcher, Job, SubmitError};
use super::http::{parse_query, percent_decode, printable, RequestHead, Response};
use super::metrics::Metrics;
use super::models::{Lookup, Models, Origin};
use super::repository::{check_product_name, Repository};
use crate::io::image::{decode_image_bytes, RgbImage8};
use crate::io::output::{
    blend_half, gray_png_bytes_wh, heatmap_png, heatmap_rgb, npy_f32_bytes, rgb_png_bytes,
    threshold_mask, HeatmapScale,
};
use crate::model::decision::{
    parse_selection, resize_map, Calibration, Calibrator, Decision, Policy, RoiMask, Rule,
    Threshold,
};
use crate::model::{
    AnomalyMap, BankEntry, Engine, PromptBank, PromptFeatures, PromptSelection, PromptSet,
};

/// Numbers the temporary files of bank uploads.
static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
use crate::util::sync::{lock, read, wait, write};

/// Largest image (width x height) the server decodes: 8192 x 8192.
pub const MAX_IMAGE_PIXELS: u64 = 8192 * 8192;
/// Longest prompt name.
const MAX_NAME_CHARS: usize = 128;

/// A request with its whole body.
pub struct Request {
    pub head: RequestHead,
    pub body: Vec<u8>,
}

struct PromptEntry {
    id: String,
    name: String,
    features: Arc<PromptFeatures>,
    /// The prompt image's width and height (unknown for bank prompts).
    frame: Option<(usize, usize)>,
    roi: Option<Arc<RoiMask>>,
}

/// A product: a bank's prompts, its calibration and its inspection mask.
pub struct Product {
    pub name: String,
    pub prompts: PromptSet,
    pub calibration: Option<Calibration>,
    pub roi: Option<RoiMask>,
}

impl Product {
    /// A bank as a product; queries use `selection`, by default the calibration's.
    pub fn from_bank(
        name: &str,
        bank: &PromptBank,
        selection: Option<PromptSelection>,
    ) -> crate::Result<Product> {
        let calibration = bank.calibration().cloned();
        let selection = selection
            .or(calibration.as_ref().map(|c| c.selection))
            .unwrap_or_default();
        Ok(Product {
            name: name.to_string(),
            prompts: PromptSet::from_bank(bank, selection)?,
            calibration,
            roi: bank.roi().cloned(),
        })
    }

    /// The product's prompts used with another selection.
    fn with_selection(&self, selection: PromptSelection) -> PromptSet {
        let prompts = (0..self.prompts.len())
            .map(|i| {
                let name = self.prompts.name(i).to_string();
                (name, self.prompts.features(i).clone())
            })
            .collect();
        PromptSet::new(prompts, selection).expect("a product holds prompts")
    }
}

#[derive(Default)]
struct Registry {
    /// In insertion order.
    entries: Vec<PromptEntry>,
    /// The number of the last id handed out (`p<N>`); ids are never reused.
    last: u64,
}

impl Registry {
    /// By id first, then by name.
    fn find(&self, key: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.id == key)
            .or_else(|| self.entries.iter().position(|e| e.name == key))
    }

    fn add(
        &mut self,
        name: Option<String>,
        features: PromptFeatures,
        frame: Option<(usize, usize)>,
    ) -> (String, String) {
        self.last += 1;
        let id = format!("p{}", self.last);
        let name = name.unwrap_or_else(|| id.clone());
        self.entries.push(PromptEntry {
            id: id.clone(),
            name: name.clone(),
            features: Arc::new(features),
            frame,
            roi: None,
        });
        (id, name)
    }
}

/// A counting semaphore: bounds how many images are decoded at once (memory).
struct Permits {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Permits {
    fn acquire(&self) -> PermitGuard<'_> {
        let mut free = lock(&self.free);
        while *free == 0 {
            free = wait(&self.cv, free);
        }
        *free -= 1;
        PermitGuard(self)
    }
}

struct PermitGuard<'a>(&'a Permits);

impl Drop for PermitGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.free) += 1;
        self.0.cv.notify_one();
    }
}

/// The application: engine, prompt registry, segment queue, metrics.
pub struct Api {
    engine: Arc<Engine>,
    registry: RwLock<Registry>,
    batcher: Batcher,
    metrics: Arc<Metrics>,
    decoders: Permits,
    max_prompts: usize,
    models: Models,
    repository: Option<Repository>,
}

/// What a segment request runs against.
pub(super) enum Target {
    Prompt {
        id: String,
        features: Arc<PromptFeatures>,
        roi: Option<Arc<RoiMask>>,
    },
    Product {
        product: Arc<Product>,
        prompts: PromptSet,
    },
}

/// The options of one segment request.
struct SegmentOptions {
    format: &'static str,
    scale: HeatmapScale,
    frame_size: bool,
    overlay: bool,
    given: Option<f64>,
}

impl Api {
    pub fn new(
        engine: Arc<Engine>,
        batcher: Batcher,
        metrics: Arc<Metrics>,
        max_prompts: usize,
    ) -> Api {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Api {
            engine,
            registry: RwLock::new(Registry::default()),
            batcher,
            metrics,
            decoders: Permits {
                free: Mutex::new(cores.max(2)),
                cv: Condvar::new(),
            },
            max_prompts,
            models: Models::default(),
            repository: None,
        }
    }

    /// Adds a `--bank` product (before serving starts); names must be unique.
    pub fn add_product(&mut self, product: Product) -> crate::Result<()> {
        self.models.add_bank(product)
    }

    /// Serves the products of a model repository (loaded now; `sync_repository` again).
    pub fn set_repository(&mut self, repository: Repository) {
        self.models.sync(&repository, &self.engine, None, false);
        self.repository = Some(repository);
    }

    /// Brings the repository's changes in (the `--poll-s` thread).
    pub fn sync_repository(&self) {
        if let Some(repo) = &self.repository {
            self.models.sync(repo, &self.engine, None, false);
        }
    }

    pub(super) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(super) fn models(&self) -> &Models {
        &self.models
    }

    pub(super) fn repository(&self) -> Option<&Repository> {
        self.repository.as_ref()
    }

    pub fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Registers an already encoded prompt (bank preload); returns its id.
    pub fn preload(&self, name: &str, features: PromptFeatures) -> crate::Result<String> {
        let mut reg = write(&self.registry);
        if reg.entries.len() >= self.max_prompts {
            return Err(crate::Error::new(format!(
                "more prompts than the server holds ({})",
                self.max_prompts
            )));
        }
        if reg.entries.iter().any(|e| e.name == name) {
            return Err(crate::Error::new(format!("prompt name `{name}` twice")));
        }
        Ok(reg.add(Some(name.to_string()), features, None).0)
    }

    pub fn product_count(&self) -> usize {
        self.models.ready_count()
    }

    pub fn prompt_count(&self) -> usize {
        read(&self.registry).entries.len()
    }

    /// Routes one request; returns the response and the route's label for metrics.
    pub fn handle(&self, req: &Request) -> (Response, &'static str) {
        let method = req.head.method.as_str();
        let path = req.head.path.as_str();
        let (route, result) = match path {
            "/" => ("/", only(method, &["GET"], || Ok(super::page::index()))),
            "/healthz" => ("/healthz", only(method, &["GET"], || self.healthz())),
            "/metrics" => ("/metrics", only(method, &["GET"], || self.metrics_text())),
            "/v1/prompts" => (
                "/v1/prompts",
                match method {
                    "GET" => self.list_prompts(req),
                    "POST" => self.add_prompt(req),
                    _ => Err(not_allowed(&["GET", "POST"])),
                },
            ),
            "/v1/segment" => ("/v1/segment", only(method, &["POST"], || self.segment(req))),
            "/v1/products" => (
                "/v1/products",
                only(method, &["GET"], || self.list_products(req)),
            ),
            _ if path == "/v2" || path.starts_with("/v2/") => super::oip::route(self, req),
            _ if path.starts_with("/v1/products/") => self.product_routes(req),
            _ => match path.strip_prefix("/v1/prompts/") {
                Some(rest) if rest.strip_suffix("/roi").is_some_and(valid_key) => (
                    "/v1/prompts/{id}/roi",
                    match method {
                        "PUT" => self.put_roi(rest.strip_suffix("/roi").unwrap_or(rest), req),
                        "DELETE" => self.delete_roi(rest.strip_suffix("/roi").unwrap_or(rest)),
                        _ => Err(not_allowed(&["PUT", "DELETE"])),
                    },
                ),
                Some(key) if valid_key(key) => (
                    "/v1/prompts/{id}",
                    match method {
                        "GET" => self.get_prompt(key),
                        "DELETE" => self.delete_prompt(key),
                        _ => Err(not_allowed(&["GET", "DELETE"])),
                    },
                ),
                _ => (
                    "other",
                    Err(Response::error(
                        404,
                        format!("no such route `{}`", printable(path)),
                    )),
                ),
            },
        };
        (result.unwrap_or_else(|e| e), route)
    }

    fn healthz(&self) -> Result<Response, Response> {
        Ok(Response::json(
            200,
            &json!({
                "status": "ok",
                "backend": self.engine.backend_kind(),
                "size": self.engine.size(),
                "weights": self.engine.weights_hash(),
                "prompts": self.prompt_count(),
                "products": self.models.ready_count(),
            }),
        ))
    }

    fn metrics_text(&self) -> Result<Response, Response> {
        Ok(Response::text(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            self.metrics.render(self.prompt_count()),
        ))
    }

    fn list_prompts(&self, req: &Request) -> Result<Response, Response> {
        params(&req.head, &[])?;
        let reg = read(&self.registry);
        let list: Vec<_> = reg
            .entries
            .iter()
            .map(|e| json!({ "id": e.id, "name": e.name }))
            .collect();
        Ok(Response::json(200, &json!({ "prompts": list })))
    }

    fn get_prompt(&self, key: &str) -> Result<Response, Response> {
        let key = percent_decode(key, false)?;
        let reg = read(&self.registry);
        let i = reg.find(&key).ok_or_else(|| unknown_prompt(404, &key))?;
        let e = &reg.entries[i];
        let roi = e
            .roi
            .as_ref()
            .map(|r| json!({"width": r.frame.0, "height": r.frame.1, "pixels": r.pixels()}));
        Ok(Response::json(
            200,
            &json!({ "id": e.id, "name": e.name, "roi": roi }),
        ))
    }

    /// Sets a prompt's inspection mask from a PNG (white = inspect) of its frames' size.
    fn put_roi(&self, key: &str, req: &Request) -> Result<Response, Response> {
        params(&req.head, &[])?;
        let key = percent_decode(key, false)?;
        let mask = self.decode(&req.body, "inspection mask")?;
        let roi = RoiMask::from_image(&mask, self.engine.size())
            .map_err(|e| Response::error(400, format!("inspection mask: {e}")))?;
        let mut reg = write(&self.registry);
        let i = reg.find(&key).ok_or_else(|| unknown_prompt(404, &key))?;
        let e = &mut reg.entries[i];
        if let Some((w, h)) = e.frame.filter(|&f| f != roi.frame) {
            return Err(Response::error(
                400,
                format!(
                    "inspection mask is {}x{} but prompt `{}` is {w}x{h}: the mask must have the frames' size",
                    roi.frame.0, roi.frame.1, e.name
                ),
            ));
        }
        let body = json!({"id": e.id, "name": e.name, "roi": {"width": roi.frame.0, "height": roi.frame.1, "pixels": roi.pixels()}});
        e.roi = Some(Arc::new(roi));
        Ok(Response::json(200, &body))
    }

    fn delete_roi(&self, key: &str) -> Result<Response, Response> {
        let key = percent_decode(key, false)?;
        let mut reg = write(&self.registry);
        let i = reg.find(&key).ok_or_else(|| unknown_prompt(404, &key))?;
        let e = &mut reg.entries[i];
        let had = e.roi.take().is_some();
        Ok(Response::json(
            200,
            &json!({"id": e.id, "name": e.name, "deleted": had}),
        ))
    }

    fn list_products(&self, req: &Request) -> Result<Response, Response> {
        params(&req.head, &[])?;
        let list: Vec<_> = self
            .models
            .list()
            .iter()
            .map(|e| {
                let mut v = json!({
                    "name": e.name,
                    "version": e.version,
                    "state": if e.ready().is_some() { "READY" } else { "UNAVAILABLE" },
                });
                match &e.state {
                    Ok(p) => {
                        let names: Vec<&str> =
                            (0..p.prompts.len()).map(|i| p.prompts.name(i)).collect();
                        v["prompts"] = json!(names);
                        v["multi"] = json!(selection_name(p.prompts.selection()));
                        v["calibration"] = json!(p.calibration.as_ref().map(|c| json!({
                            "image_threshold": c.image.value,
                            "pixel_threshold": c.pixel.value,
                            "images": c.images.len(),
                        })));
                        v["roi"] = json!(p
                            .roi
                            .as_ref()
                            .map(|r| json!({"width": r.frame.0, "height": r.frame.1})));
                    }
                    Err(why) => v["reason"] = json!(why),
                }
                v
            })
            .collect();
        Ok(Response::json(200, &json!({ "products": list })))
    }

    /// `POST /v1/products/{name}/prompts[?name=P]` (an image: one more prompt) and
    /// `PUT /v1/products/{name}` (a whole bank): new versions in the model repository.
    fn product_routes(&self, req: &Request) -> (&'static str, Result<Response, Response>) {
        let rest = req.head.path.trim_start_matches("/v1/products/");
        let method = req.head.method.as_str();
        match rest.split_once('/') {
            Some((name, "prompts")) => (
                "/v1/products/{name}/prompts",
                only(method, &["POST"], || self.add_product_prompt(name, req)),
            ),
            Some((name, "calibrate")) => (
                "/v1/products/{name}/calibrate",
                only(method, &["POST"], || self.calibrate_product(name, req)),
            ),
            None if !rest.is_empty() => (
                "/v1/products/{name}",
                only(method, &["PUT"], || self.put_product_bank(rest, req)),
            ),
            _ => (
                "other",
                Err(Response::error(
                    404,
                    format!("no such route `{}`", printable(&req.head.path)),
                )),
            ),
        }
    }

    fn writable_repository(&self, name: &str) -> Result<&Repository, Response> {
        let repo = self.repository.as_ref().ok_or_else(|| {
            Response::error(
                409,
                "this server has no model repository to write products to (start it with a model repository)",
            )
        })?;
        check_product_name(name).map_err(|e| Response::error(400, e))?;
        if self
            .models
            .list()
            .iter()
            .any(|e| e.name == name && e.origin == Origin::Bank)
        {
            return Err(Response::error(
                409,
                format!(
                    "product `{name}` comes from a bank given at start, not from the repository"
                ),
            ));
        }
        Ok(repo)
    }

    fn add_product_prompt(&self, name: &str, req: &Request) -> Result<Response, Response> {
        let p = params(&req.head, &["name"])?;
        let repo = self.writable_repository(name)?;
        let image = self.decode(&req.body, "prompt image")?;
        let features = self
            .engine
            .encode_prompt(&image)
            .map_err(|e| Response::error(500, format!("cannot encode the prompt: {e}")))?;
        let prompt_name = p.get("name").map(|n| check_name(n)).transpose()?;
        let frame = (image.width, image.height);
        let (version, bank, (prompt_name, was_calibrated)) =
            self.update_product(repo, name, true, |bank| {
                let prompt_name = prompt_name
                    .clone()
                    .unwrap_or_else(|| format!("prompt{}", bank.len() + 1));
                if let Some(r) = bank.roi().filter(|r| r.frame != frame) {
                    return Err(Response::error(
                        400,
                        format!(
                            "prompt image is {}x{} but the product's inspection mask is {}x{}",
                            frame.0, frame.1, r.frame.0, r.frame.1
                        ),
                    ));
                }
                bank.push(BankEntry {
                    name: prompt_name.clone(),
                    source: format!("POST /v1/products/{name}/prompts"),
                    features: features.clone(),
                })
                .map_err(|e| Response::error(409, e))?;
                // Thresholds calibrated on the old prompts do not hold for the new set.
                let was_calibrated = bank.calibration().is_some();
                bank.set_calibration(None);
                Ok((prompt_name, was_calibrated))
            })?;
        Ok(Response::json(
            201,
            &json!({
                "product": name, "version": version, "prompt": prompt_name,
                "prompts": bank.len(), "calibrated": false,
                "calibration_dropped": was_calibrated,
            }),
        ))
    }

    /// Applies `change` to the latest version of `name` (a new bank when there is none and
    /// `create`) and publishes the result as exactly the next version. When another writer
    /// publishes first, rereads and applies `change` again: no update is lost.
    fn update_product<T>(
        &self,
        repo: &Repository,
        name: &str,
        create: bool,
        mut change: impl FnMut(&mut PromptBank) -> Result<T, Response>,
    ) -> Result<(u64, PromptBank, T), Response> {
        for _ in 0..16 {
            let (base, mut bank) = match repo.find(name).map(|f| f.latest) {
                Some(Ok((sig, path))) => {
                    let bank = repo.load(&path, &self.engine).map_err(|e| {
                        Response::error(
                            409,
                            format!("product `{name}`: its latest version does not load: {e}"),
                        )
                    })?;
                    (sig.version, bank)
                }
                _ if create => (repo.next_version(name) - 1, PromptBank::new(&self.engine)),
                _ => {
                    return Err(Response::error(
                        404,
                        format!("no product `{name}` in the repository"),
                    ))
                }
            };
            let out = change(&mut bank)?;
            let published = repo
                .publish_as(name, &bank, base + 1)
                .map_err(|e| Response::error(500, format!("cannot write the product: {e}")))?;
            if let Some(version) = published {
                self.models.sync(repo, &self.engine, Some(name), true);
                return Ok((version, bank, out));
            }
        }
        Err(Response::error(
            503,
            format!("product `{name}` keeps changing under this update: retry"),
        ))
    }

    /// `POST /v1/products/{name}/calibrate`, body `{"images": [base64 normal images...],
    /// "method", "margin", "pixel_method", "multi"}` (defaults as `metauas bank
    /// calibrate`): a new version of the product with the thresholds.
    fn calibrate_product(&self, name: &str, req: &Request) -> Result<Response, Response> {
        params(&req.head, &[])?;
        let repo = self.writable_repository(name)?;
        let body: serde_json::Value = serde_json::from_slice(&req.body)
            .map_err(|e| Response::error(400, format!("request body is not JSON: {e}")))?;
        let text = |key: &str, default: &str| -> Result<String, Response> {
            match body.get(key) {
                None => Ok(default.to_string()),
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(Response::error(400, format!("`{key}` must be a string"))),
            }
        };
        let rule = |key: &str, default: &str| -> Result<Rule, Response> {
            text(key, default)?
                .parse()
                .map_err(|e: crate::Error| Response::error(400, format!("`{key}`: {e}")))
        };
        let (image_rule, pixel_rule) = (
            rule("method", "max")?,
            rule("pixel_method", "quantile:0.999")?,
        );
        let margin = match body.get("margin") {
            None => 0.05,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Response::error(400, "`margin` must be a number"))?,
        };
        let multi = text("multi", "best")?;
        let selection = parse_selection(&multi).ok_or_else(|| {
            Response::error(
                400,
                format!("`multi` `{}`: must be best, mean or min", printable(&multi)),
            )
        })?;
        let images = body
            .get("images")
            .and_then(serde_json::Value::as_array)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                Response::error(400, "`images` must be a non-empty list of base64 images")
            })?;
        let mut decoded = Vec::with_capacity(images.len());
        for (i, item) in images.iter().enumerate() {
            let what = format!("images[{i}]");
            let bytes = item
                .as_str()
                .ok_or_else(|| Response::error(400, format!("{what} is not a string")))
                .and_then(|s| {
                    base64::decode(s).map_err(|e| Response::error(400, format!("{what}: {e}")))
                })?;
            decoded.push((what.clone(), self.decode(&bytes, &what)?));
        }
        let engine = &self.engine;
        let (version, _, json) = self.update_product(repo, name, false, |bank| {
            let set = PromptSet::from_bank(bank, selection).map_err(|e| Response::error(409, e))?;
            let roi = bank.roi().cloned();
            let mut calibrator = Calibrator::new(roi.clone());
            for (what, image) in &decoded {
                if let Some(r) = &roi {
                    r.check_frame(image.width, image.height)
                        .map_err(|e| Response::error(400, format!("{what}: {e}")))?;
                }
                let (mut map, _) = set
                    .segment(engine, image)
                    .map_err(|e| Response::error(500, format!("segmentation failed: {e}")))?;
                if let Some(r) = &roi {
                    r.apply(&mut map).map_err(|e| Response::error(500, e))?;
                }
                calibrator
                    .add(what, &map)
                    .map_err(|e| Response::error(400, e))?;
            }
            let calibration = calibrator
                .finish(image_rule, margin, pixel_rule, selection)
                .map_err(|e| Response::error(400, e))?;
            let json = calibration.to_json();
            bank.set_calibration(Some(calibration));
            Ok(json)
        })?;
        let mut answer = json!({"product": name, "version": version, "calibration": json});
        if images.len() < crate::model::decision::FEW_IMAGES {
            answer["warning"] = json!(format!(
                "only {} calibration image(s); thresholds from fewer than {} normal images are unreliable",
                images.len(),
                crate::model::decision::FEW_IMAGES
            ));
        }
        Ok(Response::json(201, &answer))
    }

    fn put_product_bank(&self, name: &str, req: &Request) -> Result<Response, Response> {
        params(&req.head, &[])?;
        let repo = self.writable_repository(name)?;
        if req.body.is_empty() {
            return Err(Response::error(
                400,
                "empty body: send a bank (.safetensors from `metauas bank build`)",
            ));
        }
        // Validated from a private temporary file before anything is published.
        let tmp = std::env::temp_dir().join(format!(
            "metauas-upload-{}-{}.safetensors",
            std::process::id(),
            UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let loaded = stage_upload(&tmp, &req.body)
            .map_err(|e| Response::error(500, format!("cannot stage the upload: {e}")))
            .and_then(|()| {
                PromptBank::load(&tmp, &self.engine).map_err(|e| {
                    Response::error(
                        400,
                        format!(
                            "bank: {}",
                            e.to_string().replace(&tmp.display().to_string(), "upload")
                        ),
                    )
                })
            });
        let _ = std::fs::remove_file(&tmp);
        let bank = loaded?;
        if bank.is_empty() {
            return Err(Response::error(400, "bank: holds no prompts"));
        }
        let version = repo
            .publish(name, &bank)
            .map_err(|e| Response::error(500, format!("cannot write the product: {e}")))?;
        self.models.sync(repo, &self.engine, Some(name), true);
        Ok(Response::json(
            201,
            &json!({"product": name, "version": version, "prompts": bank.len(),
                    "calibrated": bank.calibration().is_some()}),
        ))
    }

    fn delete_prompt(&self, key: &str) -> Result<Response, Response> {
        let key = percent_decode(key, false)?;
        let mut reg = write(&self.registry);
        let i = reg.find(&key).ok_or_else(|| unknown_prompt(404, &key))?;
        let e = reg.entries.remove(i);
        Ok(Response::json(
            200,
            &json!({ "id": e.id, "name": e.name, "deleted": true }),
        ))
    }

    fn add_prompt(&self, req: &Request) -> Result<Response, Response> {
        let p = params(&req.head, &["name"])?;
        let name = match p.get("name") {
            Some(n) => Some(check_name(n)?),
            None => None,
        };
        {
            let reg = read(&self.registry);
            self.check_room(&reg, name.as_deref())?;
        }
        let image = self.decode(&req.body, "prompt image")?;
        let features = self
            .engine
            .encode_prompt(&image)
            .map_err(|e| Response::error(500, format!("cannot encode the prompt: {e}")))?;
        let mut reg = write(&self.registry);
        // Checked again: another request may have taken the name or the room meanwhile.
        self.check_room(&reg, name.as_deref())?;
        let (id, name) = reg.add(name, features, Some((image.width, image.height)));
        Ok(Response::json(201, &json!({ "id": id, "name": name })))
    }

    fn check_room(&self, reg: &Registry, name: Option<&str>) -> Result<(), Response> {
        if reg.entries.len() >= self.max_prompts {
            return Err(Response::error(
                507,
                format!(
                    "the server holds its maximum of {} prompts: delete some first",
                    self.max_prompts
                ),
            ));
        }
        if let Some(name) = name {
            if reg.entries.iter().any(|e| e.name == name) {
                return Err(Response::error(
                    409,
                    format!("a prompt named `{name}` already exists"),
                ));
            }
        }
        Ok(())
    }

    fn segment(&self, req: &Request) -> Result<Response, Response> {
        let p = params(&req.head, SEGMENT_PARAMS)?;
        let target = self.target(&p)?;
        let options = segment_options(&p)?;
        let policy = self.policy(&p, &target, options.given)?;
        let scale = match options.scale {
            HeatmapScale::Calibrated(_) => match policy.pixel {
                Some(t) => HeatmapScale::Calibrated(t.value),
                None => return Err(Response::error(
                    400,
                    "heatmap=calibrated: no pixel threshold (a calibrated product, or threshold=)",
                )),
            },
            other => other,
        };
        let image = self.decode(&req.body, "query image")?;
        let frame = (image.width, image.height);
        if let Some(roi) = &policy.roi {
            roi.check_frame(frame.0, frame.1)
                .map_err(|e| Response::error(400, format!("query image: {e}")))?;
        }
        // The frame is kept for the overlay only when one is asked for.
        let frame_pixels = options.overlay.then(|| image.data.clone());
        let (mut map, used, ms, batch) = self.run(&target, image)?;
        let decision = policy
            .decide(&mut map, frame)
            .map_err(|e| Response::error(400, format!("query image: {e}")))?;
        let mut body = json!({
            "prompt": used,
            "score": decision.score,
            "verdict": decision.verdict_json(),
            "regions": decision.regions_json(),
            "frame": [frame.0, frame.1],
            "ms": (ms * 1000.0).round() / 1000.0,
            "size": map.size,
            "batch": batch,
            "format": options.format,
        });
        if let Target::Product { product, prompts } = &target {
            body["product"] = json!(product.name);
            body["multi"] = json!(selection_name(prompts.selection()));
        }
        encode_outputs(&mut body, &map, &decision, &options, scale)?;
        if let Some(pixels) = frame_pixels {
            let (overlay, heatmap) = frame_pictures(&map, &decision, &pixels, scale)?;
            body["overlay"] = json!(overlay);
            body["heatmap"] = json!(heatmap);
        }
        if let Some(t) = options.given {
            body["threshold"] = json!(t);
        }
        Ok(Response::json(200, &body))
    }

    /// `prompt=` (an id or name) or `product=` (a bank, with `multi=`).
    fn target(&self, p: &Params) -> Result<Target, Response> {
        match (p.get("prompt"), p.get("product")) {
            (Some(_), Some(_)) => Err(Response::error(400, "give `prompt` or `product`, not both")),
            (None, None) => Err(Response::error(
                400,
                "missing query parameter `prompt` (a prompt id) or `product` (a bank's name)",
            )),
            (Some(key), None) => {
                if p.contains_key("multi") {
                    return Err(Response::error(400, "`multi` applies to a product only"));
                }
                let reg = read(&self.registry);
                let i = reg.find(key).ok_or_else(|| unknown_prompt(400, key))?;
                let e = &reg.entries[i];
                Ok(Target::Prompt {
                    id: e.id.clone(),
                    features: e.features.clone(),
                    roi: e.roi.clone(),
                })
            }
            (None, Some(name)) => {
                let (product, _) = self.models.get(name).map_err(|e| match e {
                    Lookup::Unknown => Response::error(
                        400,
                        format!(
                            "unknown product `{}` (GET /v1/products lists them)",
                            printable(name)
                        ),
                    ),
                    Lookup::Unavailable(why) => Response::error(
                        503,
                        format!("product `{}` is unavailable: {why}", printable(name)),
                    ),
                })?;
                let prompts = match p.get("multi") {
                    None => product.prompts.clone(),
                    Some(m) => match parse_selection(m) {
                        Some(s) if s == product.prompts.selection() => product.prompts.clone(),
                        Some(s) => product.with_selection(s),
                        None => {
                            return Err(Response::error(
                                400,
                                format!("multi=`{}`: must be best, mean or min", printable(m)),
                            ))
                        }
                    },
                };
                Ok(Target::Product { product, prompts })
            }
        }
    }

    /// Thresholds: given ones (`threshold=`, `pixel_threshold=`) over the product's
    /// calibration; the ROI of the prompt or product.
    fn policy(&self, p: &Params, target: &Target, given: Option<f64>) -> Result<Policy, Response> {
        let pixel_given = finite_param(p, "pixel_threshold")?;
        let min_region_area = match p.get("min_region_area") {
            None => 1,
            Some(v) => v.parse::<usize>().map_err(|_| {
                Response::error(
                    400,
                    format!("min_region_area=`{}`: must be a whole number", printable(v)),
                )
            })?,
        };
        let (calibration, roi) = match target {
            Target::Prompt { roi, .. } => (None, roi.as_deref().cloned()),
            Target::Product { product, .. } => (product.calibration.as_ref(), product.roi.clone()),
        };
        let given_t = |t: Option<f64>| t.map(Threshold::given);
        Ok(Policy {
            image: given_t(given)
                .or_else(|| calibration.map(|c| Threshold::calibrated(c.image.value))),
            pixel: given_t(pixel_given)
                .or(given_t(given))
                .or_else(|| calibration.map(|c| Threshold::calibrated(c.pixel.value))),
            roi,
            min_region_area,
        })
    }

    /// Runs the query: one job for a prompt or a product's chosen prompt, one job per prompt
    /// for `mean`/`min` (queued together, so they may share a batch). Returns the map, the
    /// prompt(s) used, the engine time and the largest batch.
    pub(super) fn run(
        &self,
        target: &Target,
        image: RgbImage8,
    ) -> Result<(AnomalyMap, serde_json::Value, f64, usize), Response> {
        let failed = |e: String| Response::error(500, format!("segmentation failed: {e}"));
        match target {
            Target::Prompt { id, features, .. } => {
                let rx = self.submit(features.clone(), image)?;
                let (map, ms, batch) = self.receive(rx)?;
                Ok((map, json!(id), ms, batch))
            }
            Target::Product { prompts, .. } if prompts.uses_one() => {
                let chosen = prompts
                    .choose(&self.engine, &image)
                    .map_err(|e| failed(e.to_string()))?;
                let rx = self.submit(prompts.shared_features(chosen), image)?;
                let (map, ms, batch) = self.receive(rx)?;
                Ok((map, json!(prompts.name(chosen)), ms, batch))
            }
            Target::Product { prompts, .. } => {
                // A window of prompts at a time: the queue is bounded.
                let (mut maps, mut ms, mut batch) = (Vec::new(), 0.0, 0);
                let all: Vec<usize> = (0..prompts.len()).collect();
                for window in all.chunks(8) {
                    let mut pending = Vec::with_capacity(window.len());
                    for &i in window {
                        pending.push(self.submit(prompts.shared_features(i), image.clone())?);
                    }
                    for rx in pending {
                        let (map, t, b) = self.receive(rx)?;
                        maps.push(map);
                        ms += t;
                        batch = batch.max(b);
                    }
                }
                let names: Vec<&str> = (0..prompts.len()).map(|i| prompts.name(i)).collect();
                let map = prompts.combine(maps).map_err(|e| failed(e.to_string()))?;
                Ok((map, json!(names), ms, batch))
            }
        }
    }

    pub(super) fn submit(
        &self,
        prompt: Arc<PromptFeatures>,
        image: RgbImage8,
    ) -> Result<mpsc::Receiver<super::batcher::JobOutcome>, Response> {
        let (reply, outcome) = mpsc::channel();
        let job = Job {
            prompt,
            image,
            reply,
        };
        self.batcher.submit(job).map_err(|e| match e {
            SubmitError::Full => {
                Response::error(503, "queue full: the server is busy, retry later")
            }
            SubmitError::Closed => Response::error(503, "the server is shutting down"),
        })?;
        Ok(outcome)
    }

    pub(super) fn receive(
        &self,
        outcome: mpsc::Receiver<super::batcher::JobOutcome>,
    ) -> Result<(AnomalyMap, f64, usize), Response> {
        let outcome = outcome
            .recv()
            .map_err(|_| Response::error(503, "the server stopped before this query ran"))?;
        let map = outcome
            .result
            .map_err(|e| Response::error(500, format!("segmentation failed: {e}")))?;
        Ok((map, outcome.ms, outcome.batch))
    }

    /// Decodes a request body as an image: 400 when empty, undecodable or too large.
    pub(super) fn decode(&self, body: &[u8], what: &str) -> Result<RgbImage8, Response> {
        if body.is_empty() {
            return Err(Response::error(
                400,
                format!("empty body: send the {what} bytes (PNG, JPEG, BMP or TIFF)"),
            ));
        }
        let _permit = self.decoders.acquire();
        if let Some((w, h)) = peek_dimensions(body) {
            if u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
                return Err(Response::error(
                    400,
                    format!("{what}: {w} x {h} pixels is more than the server accepts ({MAX_IMAGE_PIXELS} pixels)"),
                ));
            }
        }
        decode_image_bytes(body, what).map_err(|e| Response::error(400, e))
    }
}

/// The size from an image's header, without decoding it (None when unreadable: the decoder
/// then says what is wrong).
pub(super) fn peek_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
}

type Params = std::collections::HashMap<String, String>;

const SEGMENT_PARAMS: &[&str] = &[
    "prompt",
    "product",
    "multi",
    "map",
    "threshold",
    "pixel_threshold",
    "min_region_area",
    "heatmap",
    "output_size",
    "overlay",
];

/// A prompt id or name in a path: not empty, no `/`.
fn valid_key(key: &str) -> bool {
    !key.is_empty() && !key.contains('/')
}

fn finite_param(p: &Params, key: &str) -> Result<Option<f64>, Response> {
    match p.get(key) {
        None => Ok(None),
        Some(t) => match t.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(Response::error(
                400,
                format!("{key}=`{}`: must be a finite number", printable(t)),
            )),
        },
    }
}

/// `map=png|npy|none`, `heatmap=fixed|calibrated|minmax`, `output_size=model|original`,
/// `threshold=`. A calibrated scale gets its threshold from the policy.
fn segment_options(p: &Params) -> Result<SegmentOptions, Response> {
    let choice = |key: &str, default: &'static str, allowed: &[&'static str]| {
        let value = p.get(key).map(String::as_str).unwrap_or(default);
        allowed
            .iter()
            .find(|&&a| a == value)
            .copied()
            .ok_or_else(|| {
                Response::error(
                    400,
                    format!(
                        "{key}=`{}`: must be {}",
                        printable(value),
                        allowed.join(", ")
                    ),
                )
            })
    };
    let format = choice("map", "png", &["png", "npy", "none"])?;
    let scale = match choice("heatmap", "fixed", &["fixed", "calibrated", "minmax"])? {
        "fixed" => HeatmapScale::Fixed,
        "minmax" => HeatmapScale::MinMax,
        _ => HeatmapScale::Calibrated(0.5),
    };
    let frame_size = choice("output_size", "model", &["model", "original"])? == "original";
    let overlay = choice("overlay", "0", &["0", "1"])? == "1";
    Ok(SegmentOptions {
        format,
        scale,
        frame_size,
        overlay,
        given: finite_param(p, "threshold")?,
    })
}

/// The map (PNG heatmap or .npy) and the mask (when there is a pixel threshold), base64, at
/// the model's size or the frame's.
/// Writes an upload to a new private file (never through an existing name or a link).
fn stage_upload(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}

/// The overlay (the heatmap blended 50/50 over the query frame) and the heatmap, at the
/// frame's size, as base64 PNGs: what `metauas segment` writes as `_overlay.png` and
/// `_heatmap.png`.
fn frame_pictures(
    map: &AnomalyMap,
    decision: &Decision,
    pixels: &[u8],
    scale: HeatmapScale,
) -> Result<(String, String), Response> {
    let (w, h) = decision.frame;
    let big = resize_map(&map.data, map.size, w, h);
    let internal = |e: String| Response::error(500, format!("cannot encode the overlay: {e}"));
    let blended = blend_half(&heatmap_rgb(&big, scale), pixels);
    let overlay = rgb_png_bytes(&blended, w, h).map_err(internal)?;
    let heatmap = heatmap_png(&big, w, h, scale).map_err(internal)?;
    Ok((base64::encode(&overlay), base64::encode(&heatmap)))
}

fn encode_outputs(
    body: &mut serde_json::Value,
    map: &AnomalyMap,
    decision: &Decision,
    options: &SegmentOptions,
    scale: HeatmapScale,
) -> Result<(), Response> {
    let internal = |e: String| Response::error(500, format!("cannot encode the map: {e}"));
    let n = map.size;
    let (w, h) = if options.frame_size {
        decision.frame
    } else {
        (n, n)
    };
    let resized;
    let data: &[f32] = if (w, h) == (n, n) {
        &map.data
    } else {
        resized = resize_map(&map.data, n, w, h);
        &resized
    };
    let encoded = match options.format {
        "png" => Some(base64::encode(
            &heatmap_png(data, w, h, scale).map_err(internal)?,
        )),
        "npy" => Some(base64::encode(
            &npy_f32_bytes(data, &[h, w]).map_err(internal)?,
        )),
        _ => None,
    };
    body["map"] = json!(encoded);
    body["map_size"] = json!([w, h]);
    if let Some(t) = decision.pixel_threshold {
        let mask = gray_png_bytes_wh(&threshold_mask(data, t.value), w, h).map_err(internal)?;
        body["mask"] = json!(base64::encode(&mask));
    }
    Ok(())
}

fn only(
    method: &str,
    allowed: &[&'static str],
    f: impl FnOnce() -> Result<Response, Response>,
) -> Result<Response, Response> {
    if allowed.contains(&method) {
        f()
    } else {
        Err(not_allowed(allowed))
    }
}

fn not_allowed(allowed: &[&'static str]) -> Response {
    let list = allowed.join(", ");
    let mut r = Response::error(405, format!("method not allowed here (allowed: {list})"));
    r.headers.push(("Allow", list));
    r
}

fn unknown_prompt(status: u16, key: &str) -> Response {
    Response::error(
        status,
        format!(
            "unknown prompt `{}` (GET /v1/prompts lists them)",
            printable(key)
        ),
    )
}

/// The query parameters, each at most once and all among `allowed`.
fn params(
    head: &RequestHead,
    allowed: &[&str],
) -> Result<std::collections::HashMap<String, String>, Response> {
    let mut out = std::collections::HashMap::new();
    for (k, v) in parse_query(&head.query).map_err(Response::from)? {
        if !allowed.contains(&k.as_str()) {
            let hint = if allowed.is_empty() {
                "this route takes none".to_string()
            } else {
                format!("expected {}", allowed.join(", "))
            };
            return Err(Response::error(
                400,
                format!("unknown query parameter `{}` ({hint})", printable(&k)),
            ));
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(Response::error(
                400,
                format!("query parameter `{}` given twice", printable(&k)),
            ));
        }
    }
    Ok(out)
}

/// A prompt name: 1 to 128 printable characters, not of the form of an id (`p<digits>`), so
/// that `prompt=` finds one prompt only.
fn check_name(name: &str) -> Result<String, Response> {
    let bad = |why: &str| Response::error(400, format!("name=`{}`: {why}", printable(name)));
    if name.is_empty() {
        return Err(bad("must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(bad("longer than 128 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(bad("must not hold control characters"));
    }
    if name.contains('/') {
        return Err(bad("must not hold `/`"));
    }
    if looks_like_id(name) {
        return Err(bad("`p<number>` is reserved for ids"));
    }
    Ok(name.to_string())
}

fn looks_like_id(name: &str) -> bool {
    name.strip_prefix('p')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("bottle-01 top").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("p12").is_err());
        assert!(check_name("p").is_ok());
        assert!(check_name("p1x").is_ok());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_name(&"x".repeat(129)).is_err());
    }
}

//! Routes and handlers: prompts, segmentation, health and metrics. Every error is a JSON
//! `{"error": "one line"}` with its status.

use std::io::Cursor;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use serde_json::json;

use super::base64;
use super::batcher::{Batcher, Job, SubmitError};
use super::http::{parse_query, percent_decode, printable, RequestHead, Response};
use super::metrics::Metrics;
use crate::io::image::{decode_image_bytes, RgbImage8};
use crate::io::output::{gray_png_bytes, heatmap_png_bytes, npy_f32_bytes, threshold_mask};
use crate::model::{Engine, PromptFeatures};
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

    fn add(&mut self, name: Option<String>, features: PromptFeatures) -> (String, String) {
        self.last += 1;
        let id = format!("p{}", self.last);
        let name = name.unwrap_or_else(|| id.clone());
        self.entries.push(PromptEntry {
            id: id.clone(),
            name: name.clone(),
            features: Arc::new(features),
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
        }
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
                "more prompts than --max-prompts {}",
                self.max_prompts
            )));
        }
        if reg.entries.iter().any(|e| e.name == name) {
            return Err(crate::Error::new(format!("prompt name `{name}` twice")));
        }
        Ok(reg.add(Some(name.to_string()), features).0)
    }

    pub fn prompt_count(&self) -> usize {
        read(&self.registry).entries.len()
    }

    /// Routes one request; returns the response and the route's label for metrics.
    pub fn handle(&self, req: &Request) -> (Response, &'static str) {
        let method = req.head.method.as_str();
        let path = req.head.path.as_str();
        let (route, result) = match path {
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
            _ => match path.strip_prefix("/v1/prompts/") {
                Some(key) if !key.is_empty() && !key.contains('/') => (
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
        Ok(Response::json(200, &json!({ "id": e.id, "name": e.name })))
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
        let (id, name) = reg.add(name, features);
        Ok(Response::json(201, &json!({ "id": id, "name": name })))
    }

    fn check_room(&self, reg: &Registry, name: Option<&str>) -> Result<(), Response> {
        if reg.entries.len() >= self.max_prompts {
            return Err(Response::error(
                507,
                format!(
                    "the server holds its maximum of {} prompts (--max-prompts): delete some first",
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
        let p = params(&req.head, &["prompt", "map", "threshold"])?;
        let key = p.get("prompt").ok_or_else(|| {
            Response::error(400, "missing query parameter `prompt` (a prompt id)")
        })?;
        let format = match p.get("map").map(String::as_str).unwrap_or("png") {
            f @ ("png" | "npy" | "none") => f.to_string(),
            other => {
                return Err(Response::error(
                    400,
                    format!("map=`{}`: must be png, npy or none", printable(other)),
                ))
            }
        };
        let threshold = match p.get("threshold") {
            None => None,
            Some(t) => match t.parse::<f32>() {
                Ok(v) if v.is_finite() => Some(v),
                _ => {
                    return Err(Response::error(
                        400,
                        format!("threshold=`{}`: must be a finite number", printable(t)),
                    ))
                }
            },
        };
        let (id, features) = {
            let reg = read(&self.registry);
            let i = reg.find(key).ok_or_else(|| unknown_prompt(400, key))?;
            (reg.entries[i].id.clone(), reg.entries[i].features.clone())
        };
        let image = self.decode(&req.body, "query image")?;
        let (reply, outcome) = mpsc::channel();
        let job = Job {
            prompt: features,
            image,
            reply,
        };
        self.batcher.submit(job).map_err(|e| match e {
            SubmitError::Full => {
                Response::error(503, "queue full: the server is busy, retry later (--queue)")
            }
            SubmitError::Closed => Response::error(503, "the server is shutting down"),
        })?;
        let outcome = outcome
            .recv()
            .map_err(|_| Response::error(503, "the server stopped before this query ran"))?;
        let map = outcome
            .result
            .map_err(|e| Response::error(500, format!("segmentation failed: {e}")))?;
        let n = map.size;
        let internal = |e: String| Response::error(500, format!("cannot encode the map: {e}"));
        let encoded = match format.as_str() {
            "png" => Some(base64::encode(
                &heatmap_png_bytes(&map.data, n).map_err(internal)?,
            )),
            "npy" => Some(base64::encode(
                &npy_f32_bytes(&map.data, &[n, n]).map_err(internal)?,
            )),
            _ => None,
        };
        let mut body = json!({
            "prompt": id,
            "score": map.score(),
            "ms": (outcome.ms * 1000.0).round() / 1000.0,
            "size": n,
            "batch": outcome.batch,
            "format": format,
            "map": encoded,
        });
        if let Some(t) = threshold {
            let mask = gray_png_bytes(&threshold_mask(&map.data, t), n).map_err(internal)?;
            // The f32 as written (0.55, not 0.550000011920929).
            body["threshold"] = json!(t.to_string().parse::<f64>().unwrap_or(f64::from(t)));
            body["mask"] = json!(base64::encode(&mask));
        }
        Ok(Response::json(200, &body))
    }

    /// Decodes a request body as an image: 400 when empty, undecodable or too large.
    fn decode(&self, body: &[u8], what: &str) -> Result<RgbImage8, Response> {
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
fn peek_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
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

//! The Open Inference Protocol (v2) REST API, as KServe and Triton speak it
//! (kserve/open-inference-protocol, `specification/protocol/inference_rest.md`), with the
//! binary tensor data extension and the model repository extension. Models are products.
//!
//! Inference inputs: `image` (`BYTES`, shape `[N]`: encoded PNG/JPEG/BMP/TIFF; in the JSON
//! form each element is base64) or `pixels` (`UINT8`, `[N, H, W, 3]` or `[H, W, 3]`).
//! Outputs: `anomaly_map` (`FP32 [N, S, S]`), `score` (`FP32 [N]`) and, for a calibrated
//! product, `anomalous` (`BOOL [N]`) and `regions` (`BYTES [N]`, each a JSON list).

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::api::{Api, Product, Request, Target};
use super::http::{printable, Response};
use super::models::{Lookup, Origin};
use crate::io::image::RgbImage8;
use crate::model::decision::{Decision, Policy};
use crate::model::AnomalyMap;

/// Most images one inference request may carry.
pub const MAX_BATCH_ELEMENTS: usize = 256;
/// Most pixels the images of one request may hold decoded (2^28: 768 MiB of RGB).
pub const MAX_REQUEST_PIXELS: u64 = 1 << 28;
/// Images of one request in flight at once: the queue is bounded, so a large request is
/// fed to it a window at a time instead of being refused as "queue full".
const WINDOW: usize = 8;

const OUTPUTS: [&str; 4] = ["anomaly_map", "score", "anomalous", "regions"];

/// Routes `/v2...`; returns the metrics label and the answer.
pub fn route(api: &Api, req: &Request) -> (&'static str, Result<Response, Response>) {
    let method = req.head.method.as_str();
    let path = req.head.path.as_str();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(2).collect();
    let get = |label, f: &dyn Fn() -> Result<Response, Response>| (label, only(method, "GET", f));
    let post = |label, f: &dyn Fn() -> Result<Response, Response>| (label, only(method, "POST", f));
    match parts.as_slice() {
        [] => get("/v2", &|| Ok(server_metadata())),
        ["health", "live"] => get("/v2/health/live", &|| {
            Ok(Response::json(200, &json!({"live": true})))
        }),
        ["health", "ready"] => get("/v2/health/ready", &|| {
            Ok(Response::json(200, &json!({"ready": true})))
        }),
        ["models", m] => get("/v2/models/{m}", &|| model_metadata(api, m, None)),
        ["models", m, "versions", v] => get("/v2/models/{m}/versions/{v}", &|| {
            model_metadata(api, m, Some(v))
        }),
        ["models", m, "ready"] => get("/v2/models/{m}/ready", &|| model_ready(api, m, None)),
        ["models", m, "versions", v, "ready"] => get("/v2/models/{m}/versions/{v}/ready", &|| {
            model_ready(api, m, Some(v))
        }),
        ["models", m, "infer"] => post("/v2/models/{m}/infer", &|| infer(api, req, m, None)),
        ["models", m, "versions", v, "infer"] => post("/v2/models/{m}/versions/{v}/infer", &|| {
            infer(api, req, m, Some(v))
        }),
        ["repository", "index"] => post("/v2/repository/index", &|| repository_index(api, req)),
        ["repository", "models", m, "load"] => {
            post("/v2/repository/models/{m}/load", &|| load(api, m))
        }
        ["repository", "models", m, "unload"] => {
            post("/v2/repository/models/{m}/unload", &|| unload(api, m))
        }
        _ => (
            "other",
            Err(Response::error(
                404,
                format!("no such route `{}`", printable(path)),
            )),
        ),
    }
}

fn only(
    method: &str,
    allowed: &'static str,
    f: &dyn Fn() -> Result<Response, Response>,
) -> Result<Response, Response> {
    if method == allowed {
        f()
    } else {
        let mut r = Response::error(405, format!("method not allowed here (allowed: {allowed})"));
        r.headers.push(("Allow", allowed.to_string()));
        Err(r)
    }
}

fn server_metadata() -> Response {
    Response::json(
        200,
        &json!({
            "name": "metauas",
            "version": env!("CARGO_PKG_VERSION"),
            "extensions": ["binary_tensor_data", "model_repository"],
        }),
    )
}

/// The product `name` at `version` (the served one when `None`).
fn product(api: &Api, name: &str, version: Option<&str>) -> Result<(Arc<Product>, u64), Response> {
    let name = percent(name)?;
    let (product, served) = api.models().get(&name).map_err(|e| match e {
        Lookup::Unknown => Response::error(
            404,
            format!(
                "unknown model `{}` (POST /v2/repository/index lists them)",
                printable(&name)
            ),
        ),
        Lookup::Unavailable(why) => Response::error(
            503,
            format!("model `{}` is unavailable: {why}", printable(&name)),
        ),
    })?;
    if let Some(v) = version {
        if v != served.to_string() {
            return Err(Response::error(
                404,
                format!(
                    "model `{}` version `{}` is not served (version {served} is)",
                    printable(&name),
                    printable(v)
                ),
            ));
        }
    }
    Ok((product, served))
}

fn percent(s: &str) -> Result<String, Response> {
    super::http::percent_decode(s, false).map_err(Response::from)
}

fn tensor_meta(name: &str, datatype: &str, shape: Value) -> Value {
    json!({"name": name, "datatype": datatype, "shape": shape})
}

fn model_metadata(api: &Api, name: &str, version: Option<&str>) -> Result<Response, Response> {
    let (p, served) = product(api, name, version)?;
    let s = api.engine().size();
    let mut outputs = vec![
        tensor_meta("anomaly_map", "FP32", json!([-1, s, s])),
        tensor_meta("score", "FP32", json!([-1])),
    ];
    if p.calibration.is_some() {
        outputs.push(tensor_meta("anomalous", "BOOL", json!([-1])));
        outputs.push(tensor_meta("regions", "BYTES", json!([-1])));
    }
    Ok(Response::json(
        200,
        &json!({
            "name": p.name,
            "versions": [served.to_string()],
            "platform": "metauas",
            "inputs": [
                tensor_meta("image", "BYTES", json!([-1])),
                tensor_meta("pixels", "UINT8", json!([-1, -1, -1, 3])),
            ],
            "outputs": outputs,
        }),
    ))
}

fn model_ready(api: &Api, name: &str, version: Option<&str>) -> Result<Response, Response> {
    let (p, _) = product(api, name, version)?;
    Ok(Response::json(200, &json!({"name": p.name, "ready": true})))
}

fn repository_index(api: &Api, req: &Request) -> Result<Response, Response> {
    let only_ready = if req.body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        let v: Value = serde_json::from_slice(&req.body)
            .map_err(|e| Response::error(400, format!("request body is not JSON: {e}")))?;
        v.get("ready").and_then(Value::as_bool).unwrap_or(false)
    };
    let list: Vec<Value> = api
        .models()
        .list()
        .iter()
        .filter(|e| !only_ready || e.ready().is_some())
        .map(|e| {
            let mut v = json!({
                "name": e.name,
                "state": if e.ready().is_some() { "READY" } else { "UNAVAILABLE" },
            });
            if let Some(version) = e.version {
                v["version"] = json!(version.to_string());
            }
            if let Err(why) = &e.state {
                v["reason"] = json!(why);
            }
            v
        })
        .collect();
    Ok(Response::json(200, &Value::Array(list)))
}

fn load(api: &Api, name: &str) -> Result<Response, Response> {
    let name = percent(name)?;
    let repo = api
        .repository()
        .ok_or_else(|| Response::error(400, "this server has no model repository"))?;
    if api
        .models()
        .list()
        .iter()
        .any(|e| e.name == name && e.origin == Origin::Bank)
    {
        return Err(Response::error(
            400,
            format!(
                "model `{}` comes from a bank given at start",
                printable(&name)
            ),
        ));
    }
    api.models().sync(repo, api.engine(), Some(&name), true);
    match api.models().get(&name) {
        Ok(_) => Ok(Response::json(200, &json!({}))),
        Err(Lookup::Unknown) => Err(Response::error(
            400,
            format!("no model `{}` in the repository", printable(&name)),
        )),
        Err(Lookup::Unavailable(why)) => Err(Response::error(
            400,
            format!("model `{}` does not load: {why}", printable(&name)),
        )),
    }
}

fn unload(api: &Api, name: &str) -> Result<Response, Response> {
    let name = percent(name)?;
    match api.models().unload(&name) {
        Ok(()) => Ok(Response::json(200, &json!({}))),
        Err(why) => Err(Response::error(400, printable(&why))),
    }
}

// ---------------------------------------------------------------- inference

/// A request split into its JSON header and binary tensor section.
fn split_body(req: &Request) -> Result<(Value, &[u8]), Response> {
    let header_len = req
        .head
        .headers
        .iter()
        .find(|(k, _)| k == "inference-header-content-length")
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .map_err(|_| Response::error(400, "Inference-Header-Content-Length is not a number"))?;
    let (json_part, binary) = match header_len {
        Some(n) if n > req.body.len() => {
            return Err(Response::error(
                400,
                format!(
                    "Inference-Header-Content-Length {n} is more than the body's {} bytes",
                    req.body.len()
                ),
            ))
        }
        Some(n) => req.body.split_at(n),
        None => (&req.body[..], &[][..]),
    };
    let header: Value = serde_json::from_slice(json_part)
        .map_err(|e| Response::error(400, format!("inference request is not JSON: {e}")))?;
    if !header.is_object() {
        return Err(Response::error(
            400,
            "inference request is not a JSON object",
        ));
    }
    Ok((header, binary))
}

fn bad(msg: impl std::fmt::Display) -> Response {
    Response::error(400, msg)
}

/// Reads the shape of an input as non-negative sizes.
fn shape_of(input: &Value, name: &str) -> Result<Vec<usize>, Response> {
    input
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("input `{name}`: no `shape` list")))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| {
            bad(format!(
                "input `{name}`: `shape` must hold non-negative integers"
            ))
        })
}

/// The flattened elements of a JSON `data` (nested lists allowed).
fn flatten<'a>(data: &'a Value, out: &mut Vec<&'a Value>) {
    match data {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        v => out.push(v),
    }
}

/// The images of the request, decoded, with the binary bytes it used.
fn read_images(api: &Api, header: &Value, binary: &[u8]) -> Result<Vec<RgbImage8>, Response> {
    let inputs = header
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("inference request has no `inputs` list"))?;
    if inputs.len() != 1 {
        return Err(bad(format!(
            "expected exactly one input (`image` or `pixels`), got {}",
            inputs.len()
        )));
    }
    let input = &inputs[0];
    let name = input.get("name").and_then(Value::as_str).unwrap_or("");
    let datatype = input.get("datatype").and_then(Value::as_str).unwrap_or("");
    let shape = shape_of(input, name)?;
    let binary_size = input
        .get("parameters")
        .and_then(|p| p.get("binary_data_size"))
        .map(|v| {
            v.as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("input `{name}`: binary_data_size is not a number")))
        })
        .transpose()?;
    let raw = match binary_size {
        Some(n) if n != binary.len() => {
            return Err(bad(format!(
                "input `{name}`: binary_data_size {n} but {} binary bytes follow the header",
                binary.len()
            )))
        }
        Some(_) => Some(binary),
        None if !binary.is_empty() => {
            return Err(bad(
                "binary data follows the header but no input has binary_data_size",
            ))
        }
        None => None,
    };
    let images = match (name, datatype) {
        ("image", "BYTES") => encoded_images(api, &shape, raw, input)?,
        ("pixels", "UINT8") => pixel_images(&shape, raw, input)?,
        ("image" | "pixels", other) => {
            let want = if name == "image" { "BYTES" } else { "UINT8" };
            return Err(bad(format!(
                "input `{name}` must be {want}, not `{}`",
                printable(other)
            )));
        }
        (other, _) => {
            return Err(bad(format!(
                "unknown input `{}` (expected `image` or `pixels`)",
                printable(other)
            )))
        }
    };
    if images.is_empty() || images.len() > MAX_BATCH_ELEMENTS {
        return Err(bad(format!(
            "a request carries 1 to {MAX_BATCH_ELEMENTS} images, not {}",
            images.len()
        )));
    }
    Ok(images)
}

fn encoded_images(
    api: &Api,
    shape: &[usize],
    raw: Option<&[u8]>,
    input: &Value,
) -> Result<Vec<RgbImage8>, Response> {
    if shape.is_empty() || shape.len() > 2 || (shape.len() == 2 && shape[1] != 1) {
        return Err(bad("input `image`: shape must be [N] (or [N, 1])"));
    }
    let count = shape[0];
    if count == 0 || count > MAX_BATCH_ELEMENTS {
        return Err(bad(format!(
            "a request carries 1 to {MAX_BATCH_ELEMENTS} images, not {count}"
        )));
    }
    let mut blobs: Vec<Vec<u8>> = Vec::with_capacity(count.min(MAX_BATCH_ELEMENTS));
    match raw {
        Some(mut bytes) => {
            while !bytes.is_empty() {
                if bytes.len() < 4 {
                    return Err(bad(
                        "input `image`: binary BYTES element cut inside its length",
                    ));
                }
                let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                if bytes.len() - 4 < len {
                    return Err(bad(
                        "input `image`: binary BYTES element longer than the data",
                    ));
                }
                blobs.push(bytes[4..4 + len].to_vec());
                bytes = &bytes[4 + len..];
            }
        }
        None => {
            let data = input
                .get("data")
                .ok_or_else(|| bad("input `image`: no `data`"))?;
            let mut items = Vec::new();
            flatten(data, &mut items);
            for item in items {
                let text = item
                    .as_str()
                    .ok_or_else(|| bad("input `image`: JSON elements must be base64 strings"))?;
                blobs.push(
                    super::base64::decode(text).map_err(|e| bad(format!("input `image`: {e}")))?,
                );
            }
        }
    }
    if blobs.len() != count {
        return Err(bad(format!(
            "input `image`: shape says {count} elements, the data holds {}",
            blobs.len()
        )));
    }
    // What the images will take decoded, from their headers, before any is decoded.
    let pixels: u64 = blobs
        .iter()
        .filter_map(|b| super::api::peek_dimensions(b))
        .map(|(w, h)| u64::from(w) * u64::from(h))
        .sum();
    if pixels > MAX_REQUEST_PIXELS {
        return Err(bad(format!(
            "input `image`: {pixels} pixels in all, more than a request may decode ({MAX_REQUEST_PIXELS})"
        )));
    }
    blobs
        .iter()
        .enumerate()
        .map(|(i, b)| api.decode(b, &format!("input `image` element {i}")))
        .collect()
}

fn pixel_images(
    shape: &[usize],
    raw: Option<&[u8]>,
    input: &Value,
) -> Result<Vec<RgbImage8>, Response> {
    let (n, h, w) = match *shape {
        [n, h, w, 3] => (n, h, w),
        [h, w, 3] => (1, h, w),
        _ => {
            return Err(bad(
                "input `pixels`: shape must be [N, H, W, 3] or [H, W, 3]",
            ))
        }
    };
    if n == 0 || n > MAX_BATCH_ELEMENTS {
        return Err(bad(format!(
            "a request carries 1 to {MAX_BATCH_ELEMENTS} images, not {n}"
        )));
    }
    if h == 0 || w == 0 || h.saturating_mul(w) as u64 > super::api::MAX_IMAGE_PIXELS {
        return Err(bad(format!(
            "input `pixels`: {w} x {h} is not an image the server accepts"
        )));
    }
    // Bounded above: n <= 256 and h * w <= 8192^2.
    let len = n * h * w * 3;
    let bytes: Vec<u8> = match raw {
        Some(b) => b.to_vec(),
        None => {
            let data = input
                .get("data")
                .ok_or_else(|| bad("input `pixels`: no `data`"))?;
            let mut items = Vec::new();
            flatten(data, &mut items);
            items
                .iter()
                .map(|v| v.as_u64().filter(|&x| x <= 255).map(|x| x as u8))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| bad("input `pixels`: data must be integers 0-255"))?
        }
    };
    if bytes.len() != len {
        return Err(bad(format!(
            "input `pixels`: shape [{n}, {h}, {w}, 3] needs {len} values, the data holds {}",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(h * w * 3)
        .map(|c| RgbImage8 {
            width: w,
            height: h,
            data: c.to_vec(),
        })
        .collect())
}

/// Which outputs, and which of them binary.
fn requested_outputs(
    header: &Value,
    calibrated: bool,
) -> Result<Vec<(&'static str, bool)>, Response> {
    let binary_default = header
        .get("parameters")
        .and_then(|p| p.get("binary_data_output"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let available: Vec<&'static str> = OUTPUTS
        .iter()
        .copied()
        .filter(|o| calibrated || !matches!(*o, "anomalous" | "regions"))
        .collect();
    let Some(list) = header.get("outputs") else {
        return Ok(available.iter().map(|&o| (o, binary_default)).collect());
    };
    let list = list
        .as_array()
        .ok_or_else(|| bad("`outputs` is not a list"))?;
    let mut out = Vec::new();
    for o in list {
        let name = o
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("an output has no `name`"))?;
        let known = OUTPUTS
            .iter()
            .copied()
            .find(|k| *k == name)
            .ok_or_else(|| {
                bad(format!(
                    "unknown output `{}` (outputs: {})",
                    printable(name),
                    OUTPUTS.join(", ")
                ))
            })?;
        if !available.contains(&known) {
            return Err(bad(format!(
                "output `{known}` needs a calibrated product (`metauas bank calibrate`)"
            )));
        }
        let binary = o
            .get("parameters")
            .and_then(|p| p.get("binary_data"))
            .and_then(Value::as_bool)
            .unwrap_or(binary_default);
        out.push((known, binary));
    }
    Ok(out)
}

fn infer(
    api: &Api,
    req: &Request,
    name: &str,
    version: Option<&str>,
) -> Result<Response, Response> {
    let (p, served) = product(api, name, version)?;
    let (header, binary) = split_body(req)?;
    let outputs = requested_outputs(&header, p.calibration.is_some())?;
    let images = read_images(api, &header, binary)?;
    let policy = match &p.calibration {
        Some(c) => Policy::calibrated(c, p.roi.clone()),
        None => Policy {
            roi: p.roi.clone(),
            ..Policy::default()
        },
    };
    for (i, img) in images.iter().enumerate() {
        if let Some(roi) = &policy.roi {
            roi.check_frame(img.width, img.height)
                .map_err(|e| bad(format!("image {i}: {e}")))?;
        }
    }
    // One thread per image of a window, so that the images of a request share the
    // batcher's batches without filling its queue.
    let target = Target::Product {
        product: p.clone(),
        prompts: p.prompts.clone(),
    };
    let mut results: Vec<Result<(AnomalyMap, Decision), Response>> = Vec::new();
    let mut images = images.into_iter().peekable();
    while images.peek().is_some() {
        let window: Vec<RgbImage8> = images.by_ref().take(WINDOW).collect();
        results.extend(std::thread::scope(|s| {
            let handles: Vec<_> = window
                .into_iter()
                .map(|img| {
                    let (target, policy) = (&target, &policy);
                    s.spawn(move || {
                        let frame = (img.width, img.height);
                        let (mut map, _, _, _) = api.run(target, img)?;
                        let decision = policy.decide(&mut map, frame).map_err(bad)?;
                        Ok((map, decision))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Response::error(500, "an inference thread failed")))
                })
                .collect::<Vec<_>>()
        }));
    }
    let results = results.into_iter().collect::<Result<Vec<_>, Response>>()?;
    respond(
        &header,
        &p.name,
        served,
        api.engine().size(),
        &results,
        &outputs,
    )
}

/// Encodes the outputs: JSON `data`, or binary after the JSON header.
fn respond(
    header: &Value,
    model: &str,
    version: u64,
    size: usize,
    results: &[(AnomalyMap, Decision)],
    outputs: &[(&'static str, bool)],
) -> Result<Response, Response> {
    let n = results.len();
    let mut binary = Vec::new();
    let mut tensors = Vec::new();
    for &(name, as_binary) in outputs {
        let (datatype, shape, json_data, bytes): (&str, Value, Value, Vec<u8>) = match name {
            "anomaly_map" => {
                let values: Vec<f32> = results
                    .iter()
                    .flat_map(|(m, _)| m.data.iter().copied())
                    .collect();
                let bytes = if as_binary {
                    values.iter().flat_map(|v| v.to_le_bytes()).collect()
                } else {
                    Vec::new()
                };
                (
                    "FP32",
                    json!([n, size, size]),
                    if as_binary {
                        Value::Null
                    } else {
                        json!(values)
                    },
                    bytes,
                )
            }
            "score" => {
                let values: Vec<f32> = results.iter().map(|(_, d)| d.score).collect();
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                ("FP32", json!([n]), json!(values), bytes)
            }
            "anomalous" => {
                let values: Vec<bool> = results
                    .iter()
                    .map(|(_, d)| d.anomalous.unwrap_or(false))
                    .collect();
                let bytes = values.iter().map(|&b| u8::from(b)).collect();
                ("BOOL", json!([n]), json!(values), bytes)
            }
            _ => {
                let texts: Vec<String> = results
                    .iter()
                    .map(|(_, d)| d.regions_json().to_string())
                    .collect();
                let mut bytes = Vec::new();
                for t in &texts {
                    bytes.extend_from_slice(&(t.len() as u32).to_le_bytes());
                    bytes.extend_from_slice(t.as_bytes());
                }
                ("BYTES", json!([n]), json!(texts), bytes)
            }
        };
        let mut t = Map::new();
        t.insert("name".into(), json!(name));
        t.insert("datatype".into(), json!(datatype));
        t.insert("shape".into(), shape);
        if as_binary {
            t.insert(
                "parameters".into(),
                json!({"binary_data_size": bytes.len()}),
            );
            binary.extend_from_slice(&bytes);
        } else {
            t.insert("data".into(), json_data);
        }
        tensors.push(Value::Object(t));
    }
    let mut answer =
        json!({"model_name": model, "model_version": version.to_string(), "outputs": tensors});
    if let Some(id) = header.get("id") {
        answer["id"] = id.clone();
    }
    let mut text = answer.to_string().into_bytes();
    if binary.is_empty() && !outputs.iter().any(|o| o.1) {
        text.push(b'\n');
        return Ok(Response {
            status: 200,
            content_type: "application/json",
            body: text,
            headers: Vec::new(),
        });
    }
    let json_len = text.len();
    text.extend_from_slice(&binary);
    Ok(Response {
        status: 200,
        content_type: "application/octet-stream",
        body: text,
        headers: vec![("Inference-Header-Content-Length", json_len.to_string())],
    })
}

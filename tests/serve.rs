//! `metauas serve` against the real binary: start it on a loopback port, talk to it with a
//! real HTTP client (ureq) and with raw sockets for malformed requests.
//!
//! Each test starts its own server (size 64, CPU, synthetic weights) and kills it on drop.
//! Waits are on conditions (the listening line, metrics values), never bare sleeps.

mod common;

use common::crc32;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metauas::io::image::decode_image_bytes;
use metauas::io::image::RgbImage8;
use metauas::io::output::{
    gray_png_bytes, heatmap_png, heatmap_png_bytes, threshold_mask, HeatmapScale,
};
use metauas::model::decision::{resize_map, Calibrator, Policy, RoiMask, Rule};
use metauas::model::{
    AnomalyMap, BankEntry, Engine, PromptBank, PromptFeatures, PromptSelection, PromptSet,
};
use metauas::synth::synthetic_image;
use serde_json::Value;

const SIZE: usize = 64;

struct Fixture {
    dir: PathBuf,
    weights: PathBuf,
    prompt_png: Vec<u8>,
    /// Two different query images.
    queries: [Vec<u8>; 2],
    engine: Engine,
    prompt: PromptFeatures,
    /// The library's maps for `queries`, against `prompt`.
    expected: [AnomalyMap; 2],
}

fn png_bytes(img: &metauas::io::image::RgbImage8) -> Vec<u8> {
    let mut out = Vec::new();
    image::write_buffer_with_format(
        &mut std::io::Cursor::new(&mut out),
        &img.data,
        img.width as u32,
        img.height as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .unwrap();
    out
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = common::temp_dir("serve");
        let weights = dir.join("weights.safetensors");
        common::write_synthetic_weights(&weights, &common::default_recipe(3));
        let prompt_png = png_bytes(&synthetic_image(1, 90, 70, None));
        let queries = [
            png_bytes(&synthetic_image(2, 80, 64, Some((20, 20, 16)))),
            png_bytes(&synthetic_image(5, 64, 96, Some((8, 30, 12)))),
        ];
        let engine = Engine::from_file(&weights, SIZE).unwrap();
        let prompt = engine
            .encode_prompt(&decode_image_bytes(&prompt_png, "prompt").unwrap())
            .unwrap();
        let expected = [0, 1].map(|i| {
            engine
                .segment(&prompt, &decode_image_bytes(&queries[i], "q").unwrap())
                .unwrap()
        });
        Fixture {
            dir,
            weights,
            prompt_png,
            queries,
            engine,
            prompt,
            expected,
        }
    })
}

/// A running `metauas serve`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::try_start(extra).unwrap_or_else(|log| panic!("server did not start:\n{log}"))
    }

    /// The server, or its stderr when it exited before listening.
    fn try_start(extra: &[&str]) -> Result<Server, String> {
        let f = fixture();
        let mut child = Command::new(env!("CARGO_BIN_EXE_metauas"))
            .args(["serve", "--weights", f.weights.to_str().unwrap()])
            .args(["--size", "64", "--backend", "cpu"])
            .args(if extra.contains(&"--bind") {
                &[][..]
            } else {
                &["--bind", "127.0.0.1:0"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run metauas serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    log.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("metauas: listening on http://") {
                        let addr = rest.split(' ').next().unwrap().to_string();
                        return Ok(Server { child, addr, log });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(log.lock().unwrap().join("\n"));
                }
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Polls /metrics until `line` (a full exposition line) appears.
    fn await_metric(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.metrics();
            if text.lines().any(|l| l == line) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "metric `{line}` never appeared:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// /metrics over a fresh connection that asks to be closed.
    fn metrics(&self) -> String {
        let (status, body) = raw(
            &self.addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status, 200, "{body}");
        body
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn answer(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    let mut resp = resp.expect("HTTP exchange");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().expect("read body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text}"));
    (status, value)
}

fn post(agent: &ureq::Agent, url: &str, body: &[u8]) -> (u16, Value) {
    answer(agent.post(url).send(body))
}

fn get(agent: &ureq::Agent, url: &str) -> (u16, Value) {
    answer(agent.get(url).call())
}

/// Asserts a JSON error: the status and a one-line message containing `needle`.
fn assert_error((status, v): (u16, Value), want: u16, needle: &str) {
    assert_eq!(status, want, "{v}");
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {v}"));
    assert!(!msg.contains('\n'), "{msg}");
    assert!(
        msg.contains(needle),
        "error `{msg}` should mention `{needle}`"
    );
}

/// Sends `bytes` on a new connection and reads until the server closes it: (status, body).
fn raw(addr: &str, bytes: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    split_response(&out)
}

fn split_response(bytes: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A connection the server has accepted and keeps open: it answered a keep-alive request
/// on it with 200 (a connection refused for want of a slot is retried).
fn held_connection(addr: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if text.starts_with("http/1.1 200") {
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).unwrap();
            return s;
        }
        assert!(Instant::now() < deadline, "no slot freed: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Holds `slots` connections, each proven counted by an answered keep-alive request (the
/// metrics connection may still take a slot for a moment), then asks once more: `true` on
/// a 503 with a JSON error. Under load a held connection can pass the idle timeout, or the
/// refusal's close can reset the connection before its answer is read: then retried.
fn refused_when_full(addr: &str, slots: usize) -> bool {
    for _ in 0..5 {
        let held: Vec<TcpStream> = (0..slots).map(|_| held_connection(addr)).collect();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        drop(held);
        if out.starts_with(b"HTTP/1.1 503") {
            let (_, body) = split_response(&out);
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
            assert!(v["error"].is_string(), "{body}");
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn raw_error(addr: &str, bytes: &[u8], want: u16) {
    let (status, body) = raw(addr, bytes);
    assert_eq!(status, want, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(v["error"].is_string(), "{body}");
}

fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 symbol {c}"),
    };
    let bytes = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(val(c)) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn npy_values(bytes: &[u8]) -> Vec<f32> {
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + header_len]);
    assert!(header.contains(&format!("({SIZE}, {SIZE})")), "{header}");
    bytes[10 + header_len..]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Registers the fixture's prompt and returns its id.
fn add_prompt(agent: &ureq::Agent, server: &Server, name: &str) -> String {
    let (status, v) = post(
        agent,
        &server.url(&format!("/v1/prompts?name={name}")),
        &fixture().prompt_png,
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["name"], name);
    v["id"].as_str().unwrap().to_string()
}

/// A segment answer must carry exactly the library's map for query `q`.
fn check_npy_answer(v: &Value, q: usize) {
    let f = fixture();
    assert_eq!(v["format"], "npy", "{v}");
    let map = npy_values(&b64decode(v["map"].as_str().unwrap()));
    assert_eq!(
        map, f.expected[q].data,
        "served map differs from Engine::segment"
    );
    assert_eq!(v["score"].as_f64().unwrap() as f32, f.expected[q].score());
}

#[test]
fn health_prompts_and_segmentation() {
    let f = fixture();
    let server = Server::start(&[]);
    let a = agent();

    let (status, v) = get(&a, &server.url("/healthz"));
    assert_eq!(status, 200);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["backend"], "cpu");
    assert_eq!(v["size"], 64);
    assert_eq!(v["weights"], f.engine.weights_hash());

    // Prompts: add (named and unnamed), list, get, delete.
    let id = add_prompt(&a, &server, "bottle");
    assert_eq!(id, "p1");
    let (status, v) = post(&a, &server.url("/v1/prompts"), &f.prompt_png);
    assert_eq!(status, 201);
    assert_eq!(v, serde_json::json!({"id": "p2", "name": "p2"}));
    let (status, v) = get(&a, &server.url("/v1/prompts"));
    assert_eq!(status, 200);
    assert_eq!(
        v,
        serde_json::json!({"prompts": [{"id": "p1", "name": "bottle"}, {"id": "p2", "name": "p2"}]})
    );
    let (status, v) = get(&a, &server.url("/v1/prompts/bottle"));
    assert_eq!((status, v["id"].as_str()), (200, Some("p1")));
    let (status, v) = answer(a.delete(server.url("/v1/prompts/p2")).call());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["deleted"], true);
    assert_error(
        answer(a.delete(server.url("/v1/prompts/p2")).call()),
        404,
        "unknown prompt",
    );
    let (_, v) = get(&a, &server.url("/v1/prompts"));
    assert_eq!(v["prompts"].as_array().unwrap().len(), 1);

    // npy: the exact float32 map of the library, by id and by name.
    let (status, v) = post(
        &a,
        &server.url("/v1/segment?prompt=p1&map=npy"),
        &f.queries[0],
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["prompt"], "p1");
    assert!(v["ms"].as_f64().unwrap() > 0.0);
    assert!(v.get("mask").is_none());
    check_npy_answer(&v, 0);
    let (_, v) = post(
        &a,
        &server.url("/v1/segment?prompt=bottle&map=npy"),
        &f.queries[1],
    );
    check_npy_answer(&v, 1);

    // png (the default): the JET heatmap of the raw map (fixed scale); with a threshold,
    // the verdict and the binary mask too.
    let (status, v) = post(
        &a,
        &server.url("/v1/segment?prompt=p1&threshold=0.5"),
        &f.queries[0],
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["format"], "png");
    let map = &f.expected[0].data;
    let fixed = heatmap_png(map, SIZE, SIZE, HeatmapScale::Fixed).unwrap();
    assert_eq!(b64decode(v["map"].as_str().unwrap()), fixed);
    assert_eq!(v["threshold"], 0.5);
    let score = f.expected[0].score();
    assert_eq!(v["verdict"]["anomalous"], f64::from(score) >= 0.5);
    assert_eq!(v["verdict"]["image_threshold"]["source"], "given");
    assert_eq!(v["frame"], serde_json::json!([80, 64]));
    let (_, v2) = post(
        &a,
        &server.url("/v1/segment?prompt=p1&threshold=0.5&heatmap=minmax"),
        &f.queries[0],
    );
    assert_eq!(
        b64decode(v2["map"].as_str().unwrap()),
        heatmap_png_bytes(map, SIZE).unwrap()
    );
    assert_eq!(
        b64decode(v["mask"].as_str().unwrap()),
        gray_png_bytes(&threshold_mask(map, 0.5), SIZE).unwrap()
    );

    // none: score only.
    let (status, v) = post(
        &a,
        &server.url("/v1/segment?prompt=p1&map=none"),
        &f.queries[1],
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["format"], "none");
    assert!(v["map"].is_null());
    assert_eq!(v["score"].as_f64().unwrap() as f32, f.expected[1].score());

    // Metrics in the exposition format.
    let text = server.metrics();
    for needle in [
        "# TYPE metauas_requests_total counter",
        "metauas_requests_total{route=\"/v1/segment\",status=\"200\"} 5",
        "metauas_requests_total{route=\"/v1/prompts\",status=\"201\"} 2",
        "metauas_requests_total{route=\"/v1/prompts/{id}\",status=\"404\"} 1",
        "# TYPE metauas_request_duration_seconds histogram",
        "metauas_request_duration_seconds_count{route=\"/v1/segment\"} 5",
        "metauas_batch_size_count 5",
        "metauas_queue_depth 0",
        "metauas_prompts 1",
    ] {
        assert!(
            text.lines().any(|l| l == needle),
            "no `{needle}` in\n{text}"
        );
    }
    assert!(!server.log().contains("internal error"), "{}", server.log());
}

#[test]
fn bad_requests_get_json_errors() {
    let f = fixture();
    let server = Server::start(&["--max-prompts", "2", "--max-body-mb", "1"]);
    let a = agent();
    let u = |p: &str| server.url(p);
    add_prompt(&a, &server, "good");

    // 400: undecodable, empty, oversized image; unknown prompt; bad parameters.
    assert_error(
        post(&a, &u("/v1/segment?prompt=p1"), b"not an image at all"),
        400,
        "not a decodable image",
    );
    assert_error(
        post(&a, &u("/v1/segment?prompt=p1"), b""),
        400,
        "empty body",
    );
    let mut truncated = f.queries[0].clone();
    truncated.truncate(truncated.len() / 2);
    assert_error(
        post(&a, &u("/v1/segment?prompt=p1"), &truncated),
        400,
        "query image",
    );
    let huge = {
        // A PNG whose header claims 9000 x 9000 pixels (more than the server's 8192 x 8192,
        // less than the decoder's own limit), with a correct header checksum.
        let mut png = f.queries[0].clone();
        png[16..20].copy_from_slice(&9000u32.to_be_bytes());
        png[20..24].copy_from_slice(&9000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    };
    assert_error(post(&a, &u("/v1/segment?prompt=p1"), &huge), 400, "pixels");
    assert_error(
        post(&a, &u("/v1/segment?prompt=nope"), &f.queries[0]),
        400,
        "unknown prompt `nope`",
    );
    assert_error(
        post(&a, &u("/v1/segment"), &f.queries[0]),
        400,
        "missing query parameter `prompt`",
    );
    for (query, needle) in [
        ("prompt=p1&map=jpg", "map=`jpg`"),
        ("prompt=p1&threshold=abc", "threshold=`abc`"),
        ("prompt=p1&threshold=NaN", "threshold=`NaN`"),
        ("prompt=p1&threshold=inf", "threshold=`inf`"),
        ("prompt=p1&colour=red", "unknown query parameter `colour`"),
        ("prompt=p1&prompt=p1", "given twice"),
        ("prompt=%zz", "percent-escape"),
    ] {
        assert_error(
            post(&a, &u(&format!("/v1/segment?{query}")), &f.queries[0]),
            400,
            needle,
        );
    }
    // Prompts: undecodable, bad and duplicate names, the prompt limit.
    assert_error(
        post(&a, &u("/v1/prompts"), b"GIF89a nonsense"),
        400,
        "prompt image",
    );
    assert_error(
        post(&a, &u("/v1/prompts?name=p7"), &f.prompt_png),
        400,
        "reserved for ids",
    );
    assert_error(
        post(&a, &u("/v1/prompts?name=good"), &f.prompt_png),
        409,
        "already exists",
    );
    add_prompt(&a, &server, "second");
    assert_error(
        post(&a, &u("/v1/prompts?name=third"), &f.prompt_png),
        507,
        "maximum of 2 prompts",
    );
    // Routes and methods.
    assert_error(get(&a, &u("/v2/anything")), 404, "no such route");
    assert_error(get(&a, &u("/v1/prompts/nope")), 404, "unknown prompt");
    assert_error(get(&a, &u("/v1/segment?prompt=p1")), 405, "allowed: POST");
    assert_error(
        answer(a.put(u("/v1/prompts")).send(&b"x"[..])),
        405,
        "allowed: GET, POST",
    );
    assert_error(answer(a.delete(u("/healthz")).call()), 405, "allowed: GET");
    // 413 with a body actually sent (the server drains it so the client reads the answer).
    let big = vec![0u8; 2 << 20];
    assert_error(
        post(&a, &u("/v1/segment?prompt=p1"), &big),
        413,
        "larger than the limit of 1048576 bytes",
    );

    // After all that, a valid request is still answered correctly on the same agent.
    let (status, v) = post(&a, &u("/v1/segment?prompt=good&map=npy"), &f.queries[0]);
    assert_eq!(status, 200, "{v}");
    check_npy_answer(&v, 0);
    assert!(!server.log().contains("internal error"), "{}", server.log());
}

#[test]
fn malformed_http_and_slow_clients() {
    let f = fixture();
    let server = Server::start(&[
        "--max-body-mb",
        "1",
        "--idle-timeout-s",
        "2",
        "--max-connections",
        "16",
        "--body-timeout-s",
        "1",
    ]);
    let addr = server.addr.as_str();
    let a = agent();
    add_prompt(&a, &server, "good");

    raw_error(addr, b"GARBAGE\r\n\r\n", 400);
    raw_error(addr, b"GET / HTTP/9.9\r\n\r\n", 400);
    raw_error(addr, b"GET http://elsewhere/ HTTP/1.1\r\n\r\n", 400);
    raw_error(addr, b"\x00\x01\x02\xff\xfe binary\r\n\r\n", 400);
    raw_error(
        addr,
        b"POST /v1/segment?prompt=p1 HTTP/1.1\r\nHost: x\r\n\r\n",
        411,
    );
    raw_error(
        addr,
        b"POST /v1/segment?prompt=p1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        501,
    );
    raw_error(
        addr,
        b"POST /v1/segment?prompt=p1 HTTP/1.1\r\nContent-Length: 5000000\r\n\r\n",
        413,
    );
    raw_error(
        addr,
        b"POST /v1/segment?prompt=p1 HTTP/1.1\r\nContent-Length: 12, 13\r\n\r\n",
        400,
    );
    raw_error(addr, b"POST / HTTP/1.1\r\nExpect: magic\r\n\r\n", 417);
    let long = format!(
        "GET /healthz HTTP/1.1\r\nX-Long: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    raw_error(addr, long.as_bytes(), 431);
    let many: String = (0..100).map(|i| format!("X-{i}: v\r\n")).collect();
    raw_error(
        addr,
        format!("GET /healthz HTTP/1.1\r\n{many}\r\n").as_bytes(),
        431,
    );

    // A slow client: half a head, then nothing. 408 after the idle timeout.
    let started = Instant::now();
    raw_error(addr, b"GET /healthz HTTP/1.1\r\nHost:", 408);
    assert!(started.elapsed() < Duration::from_secs(30));
    // A silent connection is closed after the idle timeout, without an answer.
    let mut silent = TcpStream::connect(addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(silent.read_to_end(&mut buf).unwrap(), 0);
    // A body that stops halfway: 408 after the body timeout.
    raw_error(
        addr,
        b"POST /v1/segment?prompt=p1 HTTP/1.1\r\nContent-Length: 1000\r\n\r\nabc",
        408,
    );
    // A client that leaves halfway through its body must not disturb anything.
    {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /v1/segment?prompt=p1 HTTP/1.1\r\nContent-Length: 1000\r\n\r\nabc")
            .unwrap();
    }

    // Keep-alive: two pipelined requests on one connection, the second closing it.
    let (status, body) = raw(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/prompts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert_eq!(body.matches("HTTP/1.1 200 OK").count(), 1, "{body}");
    assert!(body.contains("\"prompts\""), "{body}");

    // Expect: 100-continue gets its go-ahead before the body is sent.
    {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let body = &f.queries[0];
        write!(
            s,
            "POST /v1/segment?prompt=p1&map=none HTTP/1.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        let mut first = [0u8; 25];
        s.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(body).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        let (status, body) = split_response(&rest);
        assert_eq!(status, 200, "{body}");
    }

    // Several hostile clients at once, then a valid request is answered correctly.
    let hostile: Vec<Vec<u8>> = vec![
        b"\xde\xad\xbe\xef\r\n\r\n".to_vec(),
        b"POST /v1/segment?prompt=p1 HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
        format!("GET /{} HTTP/1.1\r\n", "x".repeat(30_000)).into_bytes(),
        b"POST /v1/segment?prompt=p1 HTTP/1.1\r\nContent-Length: 20\r\n\r\nnot-an-image-at-all!"
            .to_vec(),
        b"GET /healthz HTTP/1.1\r\nBad Header Line\r\n\r\n".to_vec(),
        b"POST /v1/prompts HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
    ];
    let threads: Vec<_> = (0..12)
        .map(|i| {
            let bytes = hostile[i % hostile.len()].clone();
            let addr = addr.to_string();
            std::thread::spawn(move || {
                let (status, _) = raw(&addr, &bytes);
                assert!((400..500).contains(&status) || status == 501, "{status}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (status, v) = post(
        &a,
        &server.url("/v1/segment?prompt=p1&map=npy"),
        &f.queries[1],
    );
    assert_eq!(status, 200, "{v}");
    check_npy_answer(&v, 1);

    // Connection cap: with every slot held, one more connection is answered 503.
    drop(a); // its pooled connection would hold a slot
    server.await_metric("metauas_connections 1"); // only the metrics request itself
    assert!(
        refused_when_full(addr, 16),
        "never answered 503 with every slot held"
    );
    // Their threads see the closes within a moment; until then a new connection may still
    // be refused.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = raw(addr, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "slots never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!server.log().contains("internal error"), "{}", server.log());
}

#[test]
fn concurrent_clients_are_batched_and_all_correct() {
    let f = fixture();
    let server = Server::start(&["--max-batch", "8", "--batch-window-ms", "1000"]);
    let id = add_prompt(&agent(), &server, "good");
    let url = server.url(&format!("/v1/segment?prompt={id}&map=npy"));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let url = url.clone();
            std::thread::spawn(move || {
                let a = agent();
                for r in 0..3 {
                    let q = (t + r) % 2;
                    let (status, v) = post(&a, &url, &fixture().queries[q]);
                    assert_eq!(status, 200, "{v}");
                    check_npy_answer(&v, q);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let text = server.metrics();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(
        value("metauas_requests_total{route=\"/v1/segment\",status=\"200\"}"),
        18.0
    );
    assert_eq!(value("metauas_batch_size_sum"), 18.0);
    let batches = value("metauas_batch_size_count");
    let singles = value("metauas_batch_size_bucket{le=\"1\"}");
    assert!(
        batches > singles && batches < 18.0,
        "no batch held more than one query: {batches} batches, {singles} of size 1"
    );
    let _ = f;
}

#[test]
fn full_queue_is_503_and_the_queued_requests_still_finish() {
    let f = fixture();
    let server = Server::start(&[
        "--queue",
        "1",
        "--max-batch",
        "1",
        "--batch-window-ms",
        "0",
        "--debug-job-delay-ms",
        "4000",
    ]);
    let id = add_prompt(&agent(), &server, "good");
    let url = server.url(&format!("/v1/segment?prompt={id}&map=npy"));
    let send = |q: usize| {
        let url = url.clone();
        std::thread::spawn(move || post(&agent(), &url, &fixture().queries[q]))
    };
    let first = send(0); // taken by the worker, which then waits 4 s
    server.await_metric("metauas_batch_size_count 1");
    let second = send(1); // waits in the queue
    server.await_metric("metauas_queue_depth 1");
    assert_error(post(&agent(), &url, &f.queries[0]), 503, "queue full");
    for (t, q) in [(first, 0), (second, 1)] {
        let (status, v) = t.join().unwrap();
        assert_eq!(status, 200, "{v}");
        check_npy_answer(&v, q);
    }
    assert!(server
        .metrics()
        .lines()
        .any(|l| l == "metauas_requests_total{route=\"/v1/segment\",status=\"503\"} 1"));
}

/// A white-left-half mask of `width x height`.
fn left_half_mask(width: usize, height: usize) -> RgbImage8 {
    let mut data = vec![0u8; width * height * 3];
    for y in 0..height {
        for x in 0..width / 2 {
            data[(y * width + x) * 3..][..3].copy_from_slice(&[255; 3]);
        }
    }
    RgbImage8 {
        width,
        height,
        data,
    }
}

#[test]
fn products_judge_with_calibration_mask_and_multi_prompt() {
    let f = fixture();
    let second = f
        .engine
        .encode_prompt(&synthetic_image(9, 90, 70, None))
        .unwrap();
    let mut bank = PromptBank::new(&f.engine);
    for (name, features) in [("top", f.prompt.clone()), ("side", second)] {
        let source = format!("{name}.png");
        bank.push(BankEntry {
            name: name.into(),
            source,
            features,
        })
        .unwrap();
    }
    // The mask has the size of query 0 (80 x 64); query 1 (64 x 96) is refused.
    let roi = RoiMask::from_image(&left_half_mask(80, 64), SIZE).unwrap();
    bank.set_roi(Some(roi.clone())).unwrap();
    let set = PromptSet::from_bank(&bank, PromptSelection::Best).unwrap();
    let mut calibrator = Calibrator::new(Some(roi.clone()));
    for seed in 20..26 {
        let (map, _) = set
            .segment(&f.engine, &synthetic_image(seed, 80, 64, None))
            .unwrap();
        calibrator.add(&format!("n{seed}"), &map).unwrap();
    }
    let cal = calibrator
        .finish(Rule::Max, 0.0, Rule::Quantile(0.99), PromptSelection::Best)
        .unwrap();
    bank.set_calibration(Some(cal.clone()));
    let path = f.dir.join("product.safetensors");
    bank.save(&path).unwrap();

    let server = Server::start(&["--bank", &format!("cable={}", path.display())]);
    assert!(server.log().contains("1 products"), "{}", server.log());
    let a = agent();
    let (_, v) = get(&a, &server.url("/v1/products"));
    let p = &v["products"][0];
    assert_eq!(p["name"], "cable");
    assert_eq!(p["prompts"], serde_json::json!(["top", "side"]));
    assert_eq!(
        p["calibration"]["image_threshold"].as_f64().unwrap(),
        cal.image.value
    );
    assert_eq!(p["roi"], serde_json::json!({"width": 80, "height": 64}));

    // Each mode gives the library's map (mask applied) and the library's decision.
    let query = decode_image_bytes(&f.queries[0], "q").unwrap();
    for multi in ["best", "mean", "min"] {
        let selection = metauas::model::decision::parse_selection(multi).unwrap();
        let (mut want, _) = PromptSet::from_bank(&bank, selection)
            .unwrap()
            .segment(&f.engine, &query)
            .unwrap();
        let decision = Policy::calibrated(&cal, Some(roi.clone()))
            .decide(&mut want, (80, 64))
            .unwrap();
        let url = format!("/v1/segment?product=cable&multi={multi}&map=npy&min_region_area=0");
        let (status, v) = post(&a, &server.url(&url), &f.queries[0]);
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            npy_values(&b64decode(v["map"].as_str().unwrap())),
            want.data,
            "{multi}"
        );
        assert_eq!(v["verdict"], decision.verdict_json(), "{multi}");
        assert_eq!(v["regions"], decision.regions_json(), "{multi}");
        assert_eq!(v["product"], "cable");
        assert_eq!(v["multi"], multi);
        if multi == "best" {
            assert!(v["prompt"].is_string(), "{v}");
            // The calibrated scale and the frame-size outputs.
            let url = "/v1/segment?product=cable&heatmap=calibrated&output_size=original";
            let (_, v) = post(&a, &server.url(url), &f.queries[0]);
            let big = resize_map(&want.data, SIZE, 80, 64);
            let scale = HeatmapScale::Calibrated(cal.pixel.value);
            let png = heatmap_png(&big, 80, 64, scale).unwrap();
            assert_eq!(b64decode(v["map"].as_str().unwrap()), png);
            assert_eq!(v["map_size"], serde_json::json!([80, 64]));
            assert!(v["mask"].is_string());
        } else {
            assert_eq!(v["prompt"], serde_json::json!(["top", "side"]));
        }
    }
    let u = |p: &str| server.url(p);
    assert_error(
        post(&a, &u("/v1/segment?product=cable"), &f.queries[1]),
        400,
        "the image is 64x96 but the inspection mask is 80x64",
    );
    assert_error(
        post(&a, &u("/v1/segment?product=cable&multi=all"), &f.queries[0]),
        400,
        "multi=",
    );
    assert_error(
        post(&a, &u("/v1/segment?product=nope"), &f.queries[0]),
        400,
        "unknown product",
    );
    assert_error(
        post(
            &a,
            &u("/v1/segment?product=cable&prompt=top"),
            &f.queries[0],
        ),
        400,
        "not both",
    );
    assert_error(
        post(&a, &u("/v1/segment?prompt=top&multi=mean"), &f.queries[0]),
        400,
        "product only",
    );
    assert_error(
        post(
            &a,
            &u("/v1/segment?prompt=top&heatmap=calibrated"),
            &f.queries[0],
        ),
        400,
        "no pixel threshold",
    );
    assert_error(
        post(
            &a,
            &u("/v1/segment?prompt=top&min_region_area=-1"),
            &f.queries[0],
        ),
        400,
        "min_region_area",
    );

    // A prompt's own mask: refused when it is not the prompt image's size (90 x 70).
    let id = add_prompt(&a, &server, "fresh");
    let put = |body: Vec<u8>| answer(a.put(&u(&format!("/v1/prompts/{id}/roi"))).send(&body[..]));
    assert_error(
        put(png_bytes(&left_half_mask(80, 64))),
        400,
        "must have the frames' size",
    );
    let (status, v) = put(png_bytes(&left_half_mask(90, 70)));
    assert_eq!(status, 200, "{v}");
    let (_, v) = get(&a, &u(&format!("/v1/prompts/{id}")));
    assert_eq!(v["roi"]["width"], 90);
    // Queries of 80 x 64 no longer fit this prompt.
    assert_error(
        post(&a, &u("/v1/segment?prompt=fresh"), &f.queries[0]),
        400,
        "inspection mask is 90x70",
    );
    let (status, _) = answer(a.delete(&u(&format!("/v1/prompts/{id}/roi"))).call());
    assert_eq!(status, 200);
    let (status, _) = post(&a, &u("/v1/segment?prompt=fresh&map=none"), &f.queries[0]);
    assert_eq!(status, 200);
}

#[test]
fn bank_preload_and_startup_errors() {
    let f = fixture();
    let mut bank = PromptBank::new(&f.engine);
    bank.push(BankEntry {
        name: "cable".into(),
        source: "good.png".into(),
        features: f.prompt.clone(),
    })
    .unwrap();
    let path = f.dir.join("bank.safetensors");
    bank.save(&path).unwrap();
    let server = Server::start(&["--bank", path.to_str().unwrap()]);
    assert!(server.log().contains("1 prompts"), "{}", server.log());
    let a = agent();
    let (_, v) = get(&a, &server.url("/v1/prompts"));
    assert_eq!(
        v,
        serde_json::json!({"prompts": [{"id": "p1", "name": "cable"}]})
    );
    let (status, v) = post(
        &a,
        &server.url("/v1/segment?prompt=cable&map=npy"),
        &f.queries[1],
    );
    assert_eq!(status, 200, "{v}");
    check_npy_answer(&v, 1);

    // The same port twice: one line, non-zero exit.
    let err = Server::try_start(&["--bind", &server.addr])
        .err()
        .expect("second bind fails");
    assert!(err.contains("cannot listen on"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // A bank that is not a bank.
    let not_bank = f.dir.join("not-a-bank.safetensors");
    std::fs::write(&not_bank, b"garbage").unwrap();
    let err = Server::try_start(&["--bank", not_bank.to_str().unwrap()])
        .err()
        .expect("bad bank fails");
    assert!(err.contains("not-a-bank"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_zero() {
    let f = fixture();
    let mut server = Server::start(&["--debug-job-delay-ms", "1500"]);
    let id = add_prompt(&agent(), &server, "good");
    // An idle keep-alive connection must not hold the shutdown up.
    let idle = TcpStream::connect(&server.addr).unwrap();
    let url = server.url(&format!("/v1/segment?prompt={id}&map=npy"));
    let in_flight = std::thread::spawn(move || post(&agent(), &url, &fixture().queries[0]));
    server.await_metric("metauas_batch_size_count 1");
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, v) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{v}");
    check_npy_answer(&v, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(code) = server.child.try_wait().unwrap() {
            break code;
        }
        assert!(Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "exit {code:?}: {}", server.log());
    // The stderr reader sees the last lines once the pipe closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("metauas: stopped") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        server.log().contains("metauas: stopped"),
        "{}",
        server.log()
    );
    assert!(TcpStream::connect(&server.addr).is_err());
    drop(idle);
    let _ = f;
}

/// Bodies held by all connections together are bounded: while one client holds a claimed
/// 0.8 MB body, a second such request is 503; once the first is gone, requests go through.
#[test]
fn request_bodies_in_flight_are_bounded_across_connections() {
    let server = Server::start(&[
        "--max-body-mb",
        "1",
        "--max-inflight-body-mb",
        "1",
        "--body-timeout-s",
        "30",
    ]);
    let addr = server.addr.as_str();
    let head = b"POST /v1/prompts?name=slow HTTP/1.1\r\nContent-Length: 800000\r\n\r\n";
    let mut holder = TcpStream::connect(addr).unwrap();
    holder.write_all(head).unwrap();
    holder.write_all(&[0u8; 1000]).unwrap(); // part of the body, then nothing
    server.await_metric("metauas_inflight_body_bytes 800000");
    let second = b"POST /v1/prompts?name=other HTTP/1.1\r\nContent-Length: 800000\r\n\r\n";
    let (status, body) = raw(addr, second);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("request bytes in flight"), "{body}");
    drop(holder);
    server.await_metric("metauas_inflight_body_bytes 0");
    let a = agent();
    add_prompt(&a, &server, "after");
    let (status, v) = get(&a, &server.url("/healthz"));
    assert_eq!((status, v["prompts"].as_u64()), (200, Some(1)), "{v}");
}

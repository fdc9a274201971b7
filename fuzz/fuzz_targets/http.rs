//! The server's request handling: the bytes of one connection's first request go through the
//! head parser (request line, path, headers, Content-Length, Expect, Transfer-Encoding), the
//! query-string parser, and, when the head is valid, the router with its body (prompt
//! registration, segmentation with `map`/`threshold`, deletion, health, metrics) on a tiny
//! engine (size 32, synthetic weights) with one registered prompt, as `serve` would.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use metauas::serve::api::{Api, Request};
use metauas::serve::batcher::{BatchConfig, Batcher};
use metauas::serve::http::{parse_query, parse_request_head, response_bytes, Limits};
use metauas::serve::metrics::Metrics;
use metauas::synth::{synthetic_image, synthetic_weights, WeightRecipe};
use metauas::Engine;

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        let weights = synthetic_weights(&WeightRecipe::unit(1));
        let engine = Arc::new(Engine::new(&weights, 32).expect("engine"));
        let metrics = Arc::new(Metrics::default());
        let config = BatchConfig {
            queue: 4,
            max_batch: 2,
            window: Duration::ZERO,
            job_delay: Duration::ZERO,
        };
        let batcher = Batcher::start(engine.clone(), metrics.clone(), config).expect("batcher");
        let prompt = engine
            .encode_prompt(&synthetic_image(1, 32, 32, None))
            .expect("prompt");
        let api = Api::new(engine, batcher, metrics, 8);
        api.preload("bottle", prompt).expect("preload");
        api
    })
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let head = match parse_request_head(data, &limits) {
        Ok(Some(head)) => head,
        Ok(None) => return,
        Err(e) => {
            assert!((400..600).contains(&e.status), "{e}");
            assert!(!e.message.contains('\n'), "{e}");
            return;
        }
    };
    assert!(head.head_len <= data.len());
    let _ = parse_query(&head.query);
    let claimed = head.content_length.unwrap_or(0).min(data.len() as u64) as usize;
    let end = head.head_len.saturating_add(claimed).min(data.len());
    let body = data[head.head_len..end].to_vec();
    let (response, _route) = api().handle(&Request { head, body });
    if response.status >= 400 {
        let text = String::from_utf8_lossy(&response.body);
        assert!(!text.trim_end().contains('\n'), "multi-line error: {text}");
    }
    let bytes = response_bytes(&response, false);
    assert!(bytes.starts_with(b"HTTP/1.1 "));
});

//! Server metrics, rendered in the Prometheus text exposition format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::util::sync::lock;

/// Request latency buckets, seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Batch size buckets.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0];

#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative (made cumulative when rendered).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    batches: Option<Histogram>,
}

/// Counters, histograms and gauges of one server.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Segment jobs waiting in the queue (shared with the batcher).
    pub queue_depth: Arc<AtomicUsize>,
    /// Open client connections.
    pub connections: AtomicUsize,
    /// Bytes of request bodies claimed (by Content-Length) by requests in flight.
    pub body_bytes: std::sync::atomic::AtomicU64,
}

impl Metrics {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// One answered request: its route (a fixed pattern, not the raw path), status and
    /// latency from the end of its head to the end of its response.
    pub fn record_request(&self, route: &str, status: u16, seconds: f64) {
        let mut inner = self.inner();
        *inner
            .requests
            .entry((route.to_string(), status))
            .or_insert(0) += 1;
        inner
            .latency
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS))
            .observe(seconds);
    }

    /// One batch taken by the worker.
    pub fn record_batch(&self, size: usize) {
        self.inner()
            .batches
            .get_or_insert_with(|| Histogram::new(&BATCH_BUCKETS))
            .observe(size as f64);
    }

    /// The exposition text; `prompts` is the number of registered prompts.
    pub fn render(&self, prompts: usize) -> String {
        let inner = self.inner();
        let mut out = String::new();
        out.push_str(
            "# HELP metauas_requests_total HTTP requests answered, by route and status.\n",
        );
        out.push_str("# TYPE metauas_requests_total counter\n");
        for ((route, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "metauas_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP metauas_request_duration_seconds Time from a request's head to its response, by route.\n");
        out.push_str("# TYPE metauas_request_duration_seconds histogram\n");
        for (route, h) in &inner.latency {
            h.render(
                &mut out,
                "metauas_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        out.push_str("# HELP metauas_batch_size Segment jobs per batch taken by the worker.\n");
        out.push_str("# TYPE metauas_batch_size histogram\n");
        inner
            .batches
            .clone()
            .unwrap_or_else(|| Histogram::new(&BATCH_BUCKETS))
            .render(&mut out, "metauas_batch_size", "");
        let queue = self.queue_depth.load(Ordering::SeqCst) as u64;
        let connections = self.connections.load(Ordering::SeqCst) as u64;
        let body_bytes = self.body_bytes.load(Ordering::SeqCst);
        let gauges = [
            (
                "metauas_queue_depth",
                "Segment jobs waiting for the worker.",
                queue,
            ),
            (
                "metauas_connections",
                "Open client connections.",
                connections,
            ),
            (
                "metauas_inflight_body_bytes",
                "Request body bytes claimed by requests in flight.",
                body_bytes,
            ),
            ("metauas_prompts", "Registered prompts.", prompts as u64),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_text() {
        let m = Metrics::default();
        m.record_request("/v1/segment", 200, 0.003);
        m.record_request("/v1/segment", 200, 0.2);
        m.record_request("/v1/segment", 503, 0.0001);
        m.record_batch(1);
        m.record_batch(3);
        let text = m.render(2);
        for line in [
            "metauas_requests_total{route=\"/v1/segment\",status=\"200\"} 2",
            "metauas_requests_total{route=\"/v1/segment\",status=\"503\"} 1",
            "metauas_request_duration_seconds_bucket{route=\"/v1/segment\",le=\"0.001\"} 1",
            "metauas_request_duration_seconds_bucket{route=\"/v1/segment\",le=\"0.005\"} 2",
            "metauas_request_duration_seconds_bucket{route=\"/v1/segment\",le=\"+Inf\"} 3",
            "metauas_request_duration_seconds_count{route=\"/v1/segment\"} 3",
            "metauas_batch_size_bucket{le=\"1\"} 1",
            "metauas_batch_size_bucket{le=\"2\"} 1",
            "metauas_batch_size_bucket{le=\"3\"} 2",
            "metauas_batch_size_sum 4",
            "metauas_batch_size_count 2",
            "metauas_queue_depth 0",
            "metauas_prompts 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        assert_eq!(escape("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}

//! `metauas serve`: an HTTP/1.1 JSON server around one engine.
//!
//! Threads: one accepts connections (at most `max_connections` open, each served by its own
//! thread), one worker runs segment jobs from a bounded queue in dynamic batches (see
//! `batcher`). Connection threads parse requests, decode images and encode responses, so
//! the worker only runs the engine. Every connection has deadlines (idle, head, body,
//! writes), so a slow or silent client holds only its own thread, and only for a while.
//!
//! Shutdown (`Stopper::stop`, e.g. from SIGTERM): stop accepting, let requests in flight and
//! queued jobs finish (at most `shutdown_grace`), close idle connections, join everything.

pub mod api;
pub mod base64;
pub mod batcher;
pub mod http;
pub mod metrics;
pub mod models;
pub mod oip;
mod page;
pub mod repository;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::{Engine, PromptFeatures};
use crate::util::sync::{lock, wait_timeout};
pub use api::Product;
use api::{Api, Request};
use batcher::{panic_message, BatchConfig, Batcher};
use http::{parse_request_head, response_bytes, HttpError, Limits, RequestHead, Response};
use metrics::Metrics;

/// How often a blocked read wakes up to check deadlines and shutdown.
const TICK: Duration = Duration::from_millis(100);
/// After an error response, how long unread request bytes are drained before closing (so
/// that the client reads the response instead of a connection reset).
const LINGER: Duration = Duration::from_secs(2);
/// Route label for responses given before a request could be routed.
const NO_ROUTE: &str = "none";

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub bind: SocketAddr,
    pub limits: Limits,
    pub batch: BatchConfig,
    /// Open connections; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Registered prompts; one more is answered 507.
    pub max_prompts: usize,
    /// Request bodies all connections together may hold at once, in bytes: a body whose
    /// Content-Length would pass it is answered 503 (so 256 connections cannot claim 256 x
    /// the body limit of memory).
    pub max_inflight_body_bytes: u64,
    /// A connection with no request for this long is closed; a request head must arrive
    /// within this long of its first byte (else 408).
    pub idle_timeout: Duration,
    /// A request body must arrive within this long of its head (else 408).
    pub body_timeout: Duration,
    /// A response write that makes no progress for this long drops the connection.
    pub write_timeout: Duration,
    /// On shutdown, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
    /// A model repository (Triton's layout) whose products are served and written to.
    pub model_repository: Option<std::path::PathBuf>,
    /// How often the repository is scanned for added, changed and removed products.
    pub poll: Option<Duration>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            limits: Limits::default(),
            batch: BatchConfig {
                queue: 64,
                max_batch: 8,
                window: Duration::from_millis(2),
                job_delay: Duration::ZERO,
            },
            max_connections: 256,
            max_prompts: 1024,
            max_inflight_body_bytes: 1 << 30,
            idle_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            model_repository: None,
            poll: None,
        }
    }
}

struct Shared {
    api: Api,
    config: ServeConfig,
    stopping: AtomicBool,
    connections: Mutex<usize>,
    connections_changed: Condvar,
}

/// A claim on `Shared::body_bytes`, given back when the request is done.
struct BodyClaim<'a> {
    shared: &'a Shared,
    bytes: u64,
}

impl<'a> BodyClaim<'a> {
    fn take(shared: &'a Shared, bytes: u64) -> Option<BodyClaim<'a>> {
        let limit = shared.config.max_inflight_body_bytes;
        let inflight = &shared.api.metrics().body_bytes;
        let before = inflight.fetch_add(bytes, Ordering::SeqCst);
        // One body alone is always allowed (the per-request limit bounds it).
        if before > 0 && before + bytes > limit {
            inflight.fetch_sub(bytes, Ordering::SeqCst);
            return None;
        }
        Some(BodyClaim { shared, bytes })
    }
}

impl Drop for BodyClaim<'_> {
    fn drop(&mut self) {
        let inflight = &self.shared.api.metrics().body_bytes;
        inflight.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, usize> {
        lock(&self.connections)
    }
}

pub struct Server;

impl Server {
    /// Binds, preloads `prompts` (name, features) and starts serving in background threads.
    pub fn start(
        engine: Arc<Engine>,
        config: ServeConfig,
        prompts: Vec<(String, PromptFeatures)>,
    ) -> Result<ServerHandle> {
        Server::start_with(engine, config, prompts, Vec::new())
    }

    /// `start`, with products (banks with their calibration and inspection mask) that
    /// `/v1/segment?product=NAME` judges queries with.
    pub fn start_with(
        engine: Arc<Engine>,
        config: ServeConfig,
        prompts: Vec<(String, PromptFeatures)>,
        products: Vec<Product>,
    ) -> Result<ServerHandle> {
        if config.batch.max_batch == 0 || config.batch.queue == 0 || config.max_connections == 0 {
            return Err(Error::new(
                "the batch size, the queue length and the connection limit must be at least 1",
            ));
        }
        let listener = TcpListener::bind(config.bind)
            .map_err(|e| Error::new(format!("cannot listen on {}: {e}", config.bind)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::new(format!("cannot listen on {}: {e}", config.bind)))?;
        let metrics = Arc::new(Metrics::default());
        let batcher = Batcher::start(engine.clone(), metrics.clone(), config.batch)
            .map_err(|e| Error::new(format!("cannot start the worker thread: {e}")))?;
        let mut api = Api::new(engine, batcher, metrics, config.max_prompts);
        for product in products {
            api.add_product(product)?;
        }
        if let Some(dir) = &config.model_repository {
            api.set_repository(repository::Repository::open(dir)?);
        }
        for (name, features) in prompts {
            api.preload(&name, features)?;
        }
        let shared = Arc::new(Shared {
            api,
            config,
            stopping: AtomicBool::new(false),
            connections: Mutex::new(0),
            connections_changed: Condvar::new(),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("metauas-accept".into())
                .spawn(move || accept_loop(listener, &shared))
                .map_err(|e| Error::new(format!("cannot start the accept thread: {e}")))?
        };
        let poller = match config_poll(&shared) {
            Some(every) => {
                let shared = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("metauas-poll".into())
                        .spawn(move || poll_loop(&shared, every))
                        .map_err(|e| Error::new(format!("cannot start the poll thread: {e}")))?,
                )
            }
            None => None,
        };
        Ok(ServerHandle {
            addr,
            shared,
            accept: Some(accept),
            poller,
        })
    }
}

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    poller: Option<JoinHandle<()>>,
}

fn config_poll(shared: &Shared) -> Option<Duration> {
    shared.config.model_repository.as_ref()?;
    shared.config.poll.filter(|d| !d.is_zero())
}

/// Rescans the repository every `every` until the server stops.
fn poll_loop(shared: &Shared, every: Duration) {
    let mut next = Instant::now() + every;
    while !shared.stopping() {
        std::thread::sleep(TICK.min(next.saturating_duration_since(Instant::now())));
        if Instant::now() >= next {
            shared.api.sync_repository();
            next = Instant::now() + every;
        }
    }
}

/// Asks a server to stop; clonable, usable from a signal handler thread.
#[derive(Clone)]
pub struct Stopper {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Stopper {
    /// Stops accepting connections; requests in flight go on. Returns at once.
    pub fn stop(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the accept thread with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
    }
}

impl ServerHandle {
    /// The address actually bound (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stopper(&self) -> Stopper {
        Stopper {
            addr: self.addr,
            shared: self.shared.clone(),
        }
    }

    /// Registered prompts.
    pub fn prompt_count(&self) -> usize {
        self.shared.api.prompt_count()
    }

    /// Products ready to serve (banks and repository).
    pub fn product_count(&self) -> usize {
        self.shared.api.product_count()
    }

    /// Stops the server and waits for it (see `wait`).
    pub fn shutdown(self) -> bool {
        self.stopper().stop();
        self.wait()
    }

    /// Blocks until the server has been stopped (by a `Stopper`) and has finished: requests
    /// in flight answered, queued jobs run, threads joined. Returns false when the grace
    /// period ran out first (connections still open then are abandoned).
    pub fn wait(mut self) -> bool {
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
        let deadline = Instant::now() + self.shared.config.shutdown_grace;
        let mut open = self.shared.connections();
        while *open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            open = wait_timeout(&self.shared.connections_changed, open, left).0;
        }
        let finished = *open == 0;
        drop(open);
        self.shared.api.batcher().close(!finished);
        finished
    }
}

fn accept_loop(listener: TcpListener, shared: &Arc<Shared>) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if shared.stopping() => return,
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                if e.kind() != ErrorKind::Interrupted {
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        if shared.stopping() {
            return;
        }
        {
            let mut open = shared.connections();
            if *open >= shared.config.max_connections {
                drop(open);
                refuse_overload(stream, shared);
                continue;
            }
            *open += 1;
            shared
                .api
                .metrics()
                .connections
                .store(*open, Ordering::SeqCst);
        }
        let worker = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("metauas-conn".into())
            .spawn(move || {
                let _guard = ConnectionGuard(&worker);
                let _ = catch_unwind(AssertUnwindSafe(|| serve_connection(stream, &worker)));
            });
        if spawned.is_err() {
            let mut open = shared.connections();
            *open -= 1;
            shared
                .api
                .metrics()
                .connections
                .store(*open, Ordering::SeqCst);
        }
    }
}

/// Counts a connection thread out, even when it panics.
struct ConnectionGuard<'a>(&'a Shared);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        let mut open = self.0.connections();
        *open -= 1;
        self.0
            .api
            .metrics()
            .connections
            .store(*open, Ordering::SeqCst);
        self.0.connections_changed.notify_all();
    }
}

fn refuse_overload(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let resp = Response::error(
        503,
        format!(
            "too many open connections (at most {}): retry later",
            shared.config.max_connections
        ),
    );
    let _ = stream.write_all(&response_bytes(&resp, false));
    let _ = stream.shutdown(Shutdown::Write);
    shared.api.metrics().record_request(NO_ROUTE, 503, 0.0);
}

enum Read1 {
    /// More bytes were appended.
    Data,
    /// No byte within one tick.
    Tick,
    /// End of stream or a broken connection.
    Closed,
}

fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>, chunk: &mut [u8]) -> Read1 {
    match stream.read(chunk) {
        Ok(0) => Read1::Closed,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Read1::Data
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Read1::Tick,
        Err(e) if e.kind() == ErrorKind::Interrupted => Read1::Tick,
        Err(_) => Read1::Closed,
    }
}

enum HeadOutcome {
    Head(RequestHead),
    /// Close silently: the client left, or idled out between requests, or we are stopping.
    Close,
    Fail(HttpError),
}

fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>, shared: &Shared) -> HeadOutcome {
    let limits = &shared.config.limits;
    let timeout = shared.config.idle_timeout;
    let mut chunk = [0u8; 16 * 1024];
    let mut since = Instant::now(); // idle start, then the head's first byte
    let mut partial = !buf.is_empty();
    loop {
        if !buf.is_empty() {
            match parse_request_head(buf, limits) {
                Ok(Some(head)) => return HeadOutcome::Head(head),
                Ok(None) => {}
                Err(e) => return HeadOutcome::Fail(e),
            }
        }
        if buf.is_empty() && shared.stopping() {
            return HeadOutcome::Close;
        }
        if since.elapsed() >= timeout {
            return if partial {
                HeadOutcome::Fail(HttpError::new(
                    408,
                    format!(
                        "request head not received within {} s",
                        timeout.as_secs_f64()
                    ),
                ))
            } else {
                HeadOutcome::Close
            };
        }
        match read_some(stream, buf, &mut chunk) {
            Read1::Data => {
                if !partial {
                    partial = true;
                    since = Instant::now();
                }
            }
            Read1::Tick => {}
            Read1::Closed => return HeadOutcome::Close,
        }
    }
}

fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(TICK));
    let _ = stream.set_write_timeout(Some(shared.config.write_timeout));
    let mut buf: Vec<u8> = Vec::new();
    let metrics = shared.api.metrics();
    loop {
        let head = match read_head(&mut stream, &mut buf, shared) {
            HeadOutcome::Head(h) => h,
            HeadOutcome::Close => return,
            HeadOutcome::Fail(e) => {
                metrics.record_request(NO_ROUTE, e.status, 0.0);
                return fail_and_close(stream, e.into());
            }
        };
        let started = Instant::now();
        let needs_length = matches!(head.method.as_str(), "POST" | "PUT" | "PATCH");
        if needs_length && head.content_length.is_none() {
            metrics.record_request(NO_ROUTE, 411, 0.0);
            return fail_and_close(
                stream,
                Response::error(411, "a request body needs a Content-Length header"),
            );
        }
        let claimed = head.content_length.unwrap_or(0);
        let Some(_claim) = BodyClaim::take(shared, claimed) else {
            metrics.record_request(NO_ROUTE, 503, 0.0);
            let msg = "server busy: too many request bytes in flight, retry later";
            return fail_and_close(stream, Response::error(503, msg));
        };
        let end = head.head_len + claimed as usize;
        if head.expect_continue && buf.len() < end {
            let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        if let Err(outcome) = read_body(&mut stream, &mut buf, end, shared) {
            if let Some(e) = outcome {
                metrics.record_request(NO_ROUTE, e.status, started.elapsed().as_secs_f64());
                fail_and_close(stream, e.into());
            }
            return;
        }
        let body = buf[head.head_len..end].to_vec();
        buf.drain(..end);
        let req = Request { head, body };
        let (resp, route) = match catch_unwind(AssertUnwindSafe(|| shared.api.handle(&req))) {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic_message(&panic);
                eprintln!(
                    "metauas: internal error on {} {}: {msg}",
                    req.head.method, req.head.path
                );
                (
                    Response::error(500, format!("internal error: {msg}")),
                    NO_ROUTE,
                )
            }
        };
        let keep_alive = req.head.keep_alive && !shared.stopping();
        let written = stream.write_all(&response_bytes(&resp, keep_alive));
        metrics.record_request(route, resp.status, started.elapsed().as_secs_f64());
        if written.is_err() {
            return;
        }
        if !keep_alive {
            let _ = stream.shutdown(Shutdown::Write);
            linger(&mut stream);
            return;
        }
    }
}

/// Reads until `buf` holds `end` bytes. `Err(Some)`: answer that error and close;
/// `Err(None)`: the client left.
fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    end: usize,
    shared: &Shared,
) -> std::result::Result<(), Option<HttpError>> {
    let deadline = Instant::now() + shared.config.body_timeout;
    let mut chunk = vec![0u8; 64 * 1024];
    // No reservation up front: a claimed Content-Length costs memory only as bytes arrive.
    while buf.len() < end {
        if Instant::now() >= deadline {
            return Err(Some(HttpError::new(
                408,
                format!(
                    "request body not received within {} s",
                    shared.config.body_timeout.as_secs_f64()
                ),
            )));
        }
        let want = (end - buf.len()).min(chunk.len());
        match read_some(stream, buf, &mut chunk[..want]) {
            Read1::Data | Read1::Tick => {}
            Read1::Closed => return Err(None),
        }
    }
    Ok(())
}

/// Answers an error and closes the connection, draining what the client still sends for a
/// moment so that it sees the answer rather than a reset.
fn fail_and_close(mut stream: TcpStream, resp: Response) {
    if stream.write_all(&response_bytes(&resp, false)).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    linger(&mut stream);
}

fn linger(stream: &mut TcpStream) {
    let deadline = Instant::now() + LINGER;
    let mut chunk = [0u8; 64 * 1024];
    let mut sink = Vec::new();
    while Instant::now() < deadline {
        sink.clear();
        match read_some(stream, &mut sink, &mut chunk) {
            Read1::Data | Read1::Tick => {}
            Read1::Closed => return,
        }
    }
}

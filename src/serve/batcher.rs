//! The segment queue and its worker: a bounded queue of jobs, one worker thread that takes the
//! first waiting job, gathers more for up to `window` (at most `max_batch` in all), then runs
//! them on the shared engine and answers each through its own channel.
//!
//! Jobs of a batch that share a prompt run as one `Engine::segment_batch`: on the GPU one
//! submission (one upload, one readback), on the CPU two queries at a time sharing the cores
//! op by op. A failing (or panicking) job answers its own error and the others in its batch
//! still get their maps.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::metrics::Metrics;
use crate::io::image::RgbImage8;
use crate::model::{AnomalyMap, Engine, PromptFeatures};
use crate::util::sync::lock;

/// Total bytes of decoded images the queue may hold; past it a new job is refused like a full
/// queue, unless the queue is empty (so that one large image is always served).
const MAX_QUEUED_IMAGE_BYTES: usize = 1 << 30;

/// One query to segment.
pub struct Job {
    pub prompt: Arc<PromptFeatures>,
    pub image: RgbImage8,
    pub reply: mpsc::Sender<JobOutcome>,
}

/// The answer to one job.
#[derive(Debug)]
pub struct JobOutcome {
    pub result: Result<AnomalyMap, String>,
    /// Engine time for this job, milliseconds.
    pub ms: f64,
    /// Jobs in the batch this one ran in.
    pub batch: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    pub queue: usize,
    pub max_batch: usize,
    pub window: Duration,
    /// Testing aid: sleep this long before each job (0 in production).
    pub job_delay: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is at capacity (or holds too many image bytes).
    Full,
    /// The worker has stopped (shutting down).
    Closed,
}

pub struct Batcher {
    tx: Mutex<Option<SyncSender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    depth: Arc<AtomicUsize>,
    queued_bytes: Arc<AtomicUsize>,
    /// Set when the grace period is over: queued jobs are dropped, not run.
    abandon: Arc<AtomicBool>,
}

impl Batcher {
    pub fn start(
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        config: BatchConfig,
    ) -> std::io::Result<Batcher> {
        let (tx, rx) = mpsc::sync_channel::<Job>(config.queue.max(1));
        let depth = metrics.queue_depth.clone();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let abandon = Arc::new(AtomicBool::new(false));
        let worker = {
            let (depth, queued_bytes, abandon) =
                (depth.clone(), queued_bytes.clone(), abandon.clone());
            std::thread::Builder::new()
                .name("metauas-batcher".into())
                .spawn(move || {
                    let taken = |job: &Job| {
                        depth.fetch_sub(1, Ordering::SeqCst);
                        queued_bytes.fetch_sub(job.image.data.len(), Ordering::SeqCst);
                    };
                    work(&engine, &metrics, &rx, &config, &abandon, taken)
                })?
        };
        Ok(Batcher {
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
            depth,
            queued_bytes,
            abandon,
        })
    }

    /// Queues a job without waiting; its outcome comes on `job.reply`.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let tx = match &*lock(&self.tx) {
            Some(tx) => tx.clone(),
            None => return Err(SubmitError::Closed),
        };
        let bytes = job.image.data.len();
        let before = self.queued_bytes.fetch_add(bytes, Ordering::SeqCst);
        if before > 0 && before + bytes > MAX_QUEUED_IMAGE_BYTES {
            self.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
            return Err(SubmitError::Full);
        }
        // Counted before the send so that the worker's decrement never runs first.
        self.depth.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                self.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Full,
                    TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Stops taking jobs and joins the worker. With `abandon`, jobs still queued are dropped
    /// (their clients get an error); otherwise they run first.
    pub fn close(&self, abandon: bool) {
        self.abandon.store(abandon, Ordering::SeqCst);
        lock(&self.tx).take();
        if let Some(worker) = lock(&self.worker).take() {
            let _ = worker.join();
        }
    }
}

fn work(
    engine: &Engine,
    metrics: &Metrics,
    rx: &Receiver<Job>,
    config: &BatchConfig,
    abandon: &AtomicBool,
    taken: impl Fn(&Job),
) {
    while let Ok(first) = rx.recv() {
        taken(&first);
        let mut batch = vec![first];
        let deadline = Instant::now() + config.window;
        while batch.len() < config.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(job) => {
                    taken(&job);
                    batch.push(job);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics.record_batch(batch.len());
        let size = batch.len();
        for group in group_by_prompt(batch) {
            if abandon.load(Ordering::SeqCst) {
                break; // dropping the jobs' `reply` tells their clients
            }
            run_group(engine, config, group, size);
        }
    }
}

/// Splits a batch into runs of jobs for the same prompt, keeping arrival order within each.
fn group_by_prompt(batch: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in batch {
        match groups
            .iter_mut()
            .find(|g| Arc::ptr_eq(&g[0].prompt, &job.prompt))
        {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

/// Runs jobs that share a prompt as one `Engine::segment_batch` where the backend batches
/// (the GPU: one submission; the CPU: two queries at a time); if that fails, or with a
/// test delay, they run one by one so that each job gets its own answer.
fn run_group(engine: &Engine, config: &BatchConfig, jobs: Vec<Job>, size: usize) {
    if jobs.len() > 1 && engine.batches_queries() && config.job_delay.is_zero() {
        let images: Vec<&RgbImage8> = jobs.iter().map(|j| &j.image).collect();
        let start = Instant::now();
        let run = catch_unwind(AssertUnwindSafe(|| {
            engine.segment_batch(&jobs[0].prompt, &images)
        }));
        if let Ok(Ok(maps)) = run {
            let ms = start.elapsed().as_secs_f64() * 1e3;
            for (job, map) in jobs.into_iter().zip(maps) {
                let _ = job.reply.send(JobOutcome {
                    result: Ok(map),
                    ms,
                    batch: size,
                });
            }
            return;
        }
    }
    for job in jobs {
        if !config.job_delay.is_zero() {
            std::thread::sleep(config.job_delay);
        }
        let start = Instant::now();
        let result =
            match catch_unwind(AssertUnwindSafe(|| engine.segment(&job.prompt, &job.image))) {
                Ok(Ok(map)) => Ok(map),
                Ok(Err(e)) => Err(e.to_string()),
                Err(panic) => Err(format!("internal error: {}", panic_message(&panic))),
            };
        let ms = start.elapsed().as_secs_f64() * 1e3;
        // The client may have gone: nothing to do then.
        let _ = job.reply.send(JobOutcome {
            result,
            ms,
            batch: size,
        });
    }
}

/// The text of a caught panic.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{synthetic_image, synthetic_weights, WeightRecipe};

    fn engine() -> Arc<Engine> {
        Arc::new(Engine::new(&synthetic_weights(&WeightRecipe::unit(3)), 32).unwrap())
    }

    /// The CPU engine, and a GPU engine when an adapter exists (required with
    /// `METAUAS_REQUIRE_GPU=1`): on the GPU a batch's same-prompt jobs run as one submission.
    fn engines() -> Vec<Arc<Engine>> {
        let mut engines = vec![engine()];
        #[cfg(feature = "gpu")]
        if crate::gpu::probe_adapter().is_some() {
            let options = crate::model::EngineOptions {
                backend: crate::model::BackendChoice::Gpu,
                ..Default::default()
            };
            let weights = synthetic_weights(&WeightRecipe::unit(3));
            engines.push(Arc::new(
                Engine::with_options(&weights, 32, options).unwrap(),
            ));
        } else {
            let required = std::env::var("METAUAS_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(!required, "METAUAS_REQUIRE_GPU=1 but no GPU adapter");
            eprintln!("batcher test: no GPU adapter, CPU only");
        }
        engines
    }

    #[test]
    fn a_failing_job_does_not_lose_the_others_in_its_batch() {
        for engine in engines() {
            a_failing_job_does_not_lose_the_others_on(engine);
        }
    }

    fn a_failing_job_does_not_lose_the_others_on(engine: Arc<Engine>) {
        let metrics = Arc::new(Metrics::default());
        let config = BatchConfig {
            queue: 8,
            max_batch: 3,
            window: Duration::from_secs(30), // the batch fills long before
            job_delay: Duration::ZERO,
        };
        let batcher = Batcher::start(engine.clone(), metrics.clone(), config).unwrap();
        let prompt = Arc::new(
            engine
                .encode_prompt(&synthetic_image(1, 40, 40, None))
                .unwrap(),
        );
        // Features of another size: the engine refuses them for this job only.
        let wrong = Arc::new(PromptFeatures {
            size: 64,
            tensors: vec![vec![0.0; 4]],
        });
        let images: Vec<RgbImage8> = (0..3)
            .map(|i| synthetic_image(10 + i, 48, 40, Some((8, 8, 8))))
            .collect();
        let replies: Vec<_> = images
            .iter()
            .enumerate()
            .map(|(i, image)| {
                let (reply, rx) = mpsc::channel();
                let prompt = if i == 1 {
                    wrong.clone()
                } else {
                    prompt.clone()
                };
                batcher
                    .submit(Job {
                        prompt,
                        image: image.clone(),
                        reply,
                    })
                    .unwrap();
                rx
            })
            .collect();
        let outcomes: Vec<JobOutcome> = replies.iter().map(|rx| rx.recv().unwrap()).collect();
        for (i, o) in outcomes.iter().enumerate() {
            assert_eq!(o.batch, 3, "job {i}");
            if i == 1 {
                let e = o.result.as_ref().unwrap_err();
                assert!(e.contains("size 64"), "{e}");
            } else {
                let map = o.result.as_ref().unwrap();
                assert_eq!(map.data, engine.segment(&prompt, &images[i]).unwrap().data);
            }
        }
        assert!(metrics.render(0).contains("metauas_batch_size_count 1\n"));
        assert_eq!(metrics.queue_depth.load(Ordering::SeqCst), 0);
        batcher.close(false);
        let (reply, _rx) = mpsc::channel();
        let late = Job {
            prompt,
            image: images[0].clone(),
            reply,
        };
        assert_eq!(batcher.submit(late), Err(SubmitError::Closed));
    }

    #[test]
    fn a_panicking_job_answers_an_error_and_the_worker_goes_on() {
        let engine = engine();
        let metrics = Arc::new(Metrics::default());
        let config = BatchConfig {
            queue: 8,
            max_batch: 1,
            window: Duration::ZERO,
            job_delay: Duration::ZERO,
        };
        let batcher = Batcher::start(engine.clone(), metrics, config).unwrap();
        let prompt = Arc::new(
            engine
                .encode_prompt(&synthetic_image(1, 40, 40, None))
                .unwrap(),
        );
        let run = |image: RgbImage8| {
            let (reply, rx) = mpsc::channel();
            batcher
                .submit(Job {
                    prompt: prompt.clone(),
                    image,
                    reply,
                })
                .unwrap();
            rx.recv().unwrap().result
        };
        // Pixels missing: preprocessing indexes past the end (a bug the server must survive).
        let broken = RgbImage8 {
            width: 40,
            height: 40,
            data: vec![0; 10],
        };
        let e = run(broken).unwrap_err();
        assert!(e.starts_with("internal error"), "{e}");
        assert!(run(synthetic_image(2, 40, 40, None)).is_ok());
        batcher.close(false);
    }
}

//! metauas: a from-scratch inference engine for MetaUAS (universal anomaly segmentation).
//!
//! Load the weights once into an [`Engine`], encode a normal image of the product once into
//! [`PromptFeatures`] (or many into a [`PromptBank`]), then [`Engine::segment`] every frame
//! into an [`AnomalyMap`]. Every failure is an [`Error`]: one line naming the file or entry
//! and the problem.
//!
//! ```
//! use metauas::synth::{synthetic_image, synthetic_weights, WeightRecipe};
//! use metauas::Engine;
//!
//! // Synthetic weights keep the example self-contained; real code uses
//! // `Engine::from_file("metauas-256.ckpt".as_ref(), 256)`.
//! let weights = synthetic_weights(&WeightRecipe::unit(1));
//! let engine = Engine::new(&weights, 64)?;
//! let prompt = engine.encode_prompt(&synthetic_image(1, 80, 60, None))?; // once per product
//! let frame = synthetic_image(2, 80, 60, Some((30, 20, 12)));
//! let map = engine.segment(&prompt, &frame)?; // per frame
//! assert_eq!(map.data.len(), 64 * 64);
//! assert!(map.score() > 0.0 && map.score() < 1.0);
//! # Ok::<(), metauas::Error>(())
//! ```

pub mod bundle;
pub mod cpu;
pub mod error;
pub mod eval;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod graph;
pub mod io;
pub mod model;
pub mod serve;
pub mod synth;
pub mod util;

pub use error::{Error, Result};
pub use model::{AnomalyMap, Engine, EngineOptions, PromptBank, PromptFeatures};

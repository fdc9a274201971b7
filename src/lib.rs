//! metauas: a from-scratch inference engine for MetaUAS (universal anomaly segmentation).

pub mod cpu;
pub mod error;
pub mod gpu;
pub mod graph;
pub mod io;
pub mod model;
pub mod serve;
pub mod synth;

pub use error::{Error, Result};

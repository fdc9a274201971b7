//! Small helpers every layer may use; they depend on nothing of the crate.

pub mod rng;
pub(crate) mod sync;

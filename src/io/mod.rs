//! Everything that crosses the process boundary: weights files, images, output files.

pub mod image;
pub mod output;
pub mod weights;

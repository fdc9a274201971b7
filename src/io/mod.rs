//! Everything that crosses the process boundary: weights files, images, output files.

pub mod image;
pub mod jpeg;
pub mod output;
pub mod weights;

use crate::error::{Error, Result};

/// A limit override from the environment (`lookup` stands for `std::env::var`): `None` when
/// the variable is unset or empty, an error naming it when it is not a positive whole number.
pub(crate) fn env_limit(
    lookup: &impl Fn(&str) -> Option<String>,
    key: &str,
) -> Result<Option<u64>> {
    match lookup(key) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(Error::new(format!(
                "environment variable {key}={:?} is not a positive whole number",
                v
            ))),
        },
    }
}

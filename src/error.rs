//! One error type for the whole crate: a single human-readable line that names the
//! file (or entry, or request) and the problem. The CLI prints it as is.

use std::fmt;
use std::path::Path;

/// ```
/// use metauas::Engine;
///
/// let err = Engine::from_file("no-such.ckpt".as_ref(), 256).err().unwrap();
/// assert!(err.to_string().starts_with("no-such.ckpt: "));
/// assert_eq!(err.to_string().lines().count(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    msg: String,
    /// The caller's setting the error is about (`"size"`, `"precision"`), if any.
    setting: Option<&'static str>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The message is kept to one line: line breaks (from a decoder's or the OS's text, or
    /// a name inside a hostile file) become spaces.
    pub fn new(msg: impl Into<String>) -> Self {
        let mut msg: String = msg.into();
        if msg.contains(['\n', '\r']) {
            msg = msg.trim_end().replace(['\n', '\r'], " ");
        }
        Error { msg, setting: None }
    }

    /// An error about one of the caller's settings, said in the library's terms
    /// (`size 250 is not a multiple of 32`): a front end that took the setting from a flag or
    /// a field can name that too (`--size 250: ...`).
    pub fn setting(name: &'static str, msg: impl Into<String>) -> Self {
        Error {
            setting: Some(name),
            ..Error::new(msg)
        }
    }

    /// Which setting the error is about, for `Error::setting` errors.
    pub fn about_setting(&self) -> Option<&'static str> {
        self.setting
    }

    /// An error about a file: `"<path>: <problem>"`.
    pub fn at(path: &Path, problem: impl fmt::Display) -> Self {
        Error::new(format!("{}: {}", path.display(), problem))
    }

    /// Prefix the message with more context, e.g. the file it came from.
    pub fn context(self, prefix: impl fmt::Display) -> Self {
        Error {
            setting: self.setting,
            ..Error::new(format!("{}: {}", prefix, self.msg))
        }
    }

    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_stay_on_one_line() {
        let e = Error::at(Path::new("a\nb.png"), "bad\r\nthing\n");
        assert_eq!(e.to_string(), "a b.png: bad  thing");
        assert_eq!(Error::new("plain").to_string(), "plain");
    }

    #[test]
    fn context_keeps_the_setting() {
        let e = Error::setting("size", "size 3 is not a positive multiple of 32").context("x");
        assert_eq!(e.about_setting(), Some("size"));
        assert_eq!(e.to_string(), "x: size 3 is not a positive multiple of 32");
        assert_eq!(Error::new("plain").about_setting(), None);
    }
}

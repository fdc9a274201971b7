//! A model repository in Triton's layout: one folder per product, numbered version folders
//! inside, each holding `bank.safetensors` (the bank carries its size, weights fingerprint,
//! calibration, inspection mask and multi-prompt mode). The highest version is served.
//!
//! ```text
//! DIR/bottle/1/bank.safetensors
//! DIR/bottle/2/bank.safetensors   <- served
//! DIR/cable/1/bank.safetensors
//! ```
//!
//! Writes publish a whole new version folder: the bank is written and fsynced in a hidden
//! temporary folder, which is then renamed to the next number and the product folder
//! fsynced. A crash leaves the old version or the new one, never a broken one; two replicas
//! publishing at once cannot take the same number (renaming onto an existing folder fails,
//! and the loser retries with the next).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::model::{Engine, PromptBank};

/// The file inside a version folder.
pub const BANK_FILE: &str = "bank.safetensors";
/// Attempts at publishing when other writers take the next version number first.
const PUBLISH_ATTEMPTS: usize = 16;

/// What identifies the content of a served version, to notice changes when polling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub version: u64,
    pub len: u64,
    pub modified: Option<SystemTime>,
}

/// One product folder as found on disk.
#[derive(Debug)]
pub struct Found {
    pub name: String,
    /// The highest version and its bank file, or why there is none.
    pub latest: std::result::Result<(Signature, PathBuf), String>,
}

pub struct Repository {
    root: PathBuf,
}

impl Repository {
    /// Opens an existing folder (it may be empty).
    pub fn open(root: &Path) -> Result<Repository> {
        if !root.is_dir() {
            return Err(Error::at(root, "model repository: no such directory"));
        }
        Ok(Repository {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every product folder, sorted by name; hidden entries and files are ignored.
    pub fn scan(&self) -> Result<Vec<Found>> {
        let read = fs::read_dir(&self.root)
            .map_err(|e| Error::at(&self.root, format!("cannot list the model repository: {e}")))?;
        let mut found = Vec::new();
        for entry in read.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            let latest = match check_product_name(&name) {
                Ok(()) => latest_version(&entry.path()),
                Err(why) => Err(why),
            };
            found.push(Found { name, latest });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// The highest version of `name`, if the folder exists.
    pub fn find(&self, name: &str) -> Option<Found> {
        check_product_name(name).ok()?;
        let dir = self.root.join(name);
        dir.is_dir().then(|| Found {
            name: name.to_string(),
            latest: latest_version(&dir),
        })
    }

    /// Loads a bank file for `engine` (refused for other weights or sizes).
    pub fn load(&self, bank: &Path, engine: &Engine) -> std::result::Result<PromptBank, String> {
        PromptBank::load(bank, engine).map_err(|e| e.to_string())
    }

    /// Publishes `bank` as the next version of `name` (creating the product), whatever the
    /// latest is; returns the version number.
    pub fn publish(&self, name: &str, bank: &PromptBank) -> Result<u64> {
        for _ in 0..PUBLISH_ATTEMPTS {
            let next = self.next_version(name);
            if let Some(v) = self.publish_as(name, bank, next)? {
                return Ok(v);
            }
        }
        Err(Error::at(
            &self.root.join(name),
            "cannot publish: other writers kept taking the next version",
        ))
    }

    /// The version a new publication of `name` would get.
    pub fn next_version(&self, name: &str) -> u64 {
        let dir = self.root.join(name);
        match latest_version(&dir) {
            Ok((sig, _)) => sig.version + 1,
            Err(_) => max_version_number(&dir).map_or(1, |v| v + 1),
        }
    }

    /// Publishes `bank` as exactly `version` of `name`: `None` when another writer took that
    /// number first (the caller rereads the latest version and tries again, so that an
    /// update made from version N never hides another one made from N).
    pub fn publish_as(&self, name: &str, bank: &PromptBank, version: u64) -> Result<Option<u64>> {
        check_product_name(name).map_err(Error::new)?;
        let dir = self.root.join(name);
        fs::create_dir_all(&dir).map_err(|e| Error::at(&dir, format!("cannot create: {e}")))?;
        sync_dir(&self.root)?;
        let staging = staging_dir(&dir);
        fs::create_dir(&staging).map_err(|e| Error::at(&staging, format!("cannot create: {e}")))?;
        let written = bank
            .save(&staging.join(BANK_FILE))
            .and_then(|()| sync_dir(&staging));
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        let target = dir.join(version.to_string());
        if target.exists() {
            let _ = fs::remove_dir_all(&staging);
            return Ok(None);
        }
        match fs::rename(&staging, &target) {
            Ok(()) => {
                // The version exists now: a failed directory sync is reported, not turned
                // into an error a client would retry (and publish twice).
                if let Err(e) = sync_dir(&dir) {
                    eprintln!("metauas: model repository: {e}");
                }
                Ok(Some(version))
            }
            // Another writer took that number (renaming onto a non-empty folder fails).
            Err(_) if target.exists() => {
                let _ = fs::remove_dir_all(&staging);
                Ok(None)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                Err(Error::at(&target, format!("cannot publish: {e}")))
            }
        }
    }
}

/// A product name: 1-128 characters of letters, digits, `-`, `_` and `.`, not starting
/// with `.` (a folder name on every file system, and a URL path segment as is).
pub fn check_product_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "product name `{name}`: use 1-128 letters, digits, `-`, `_` or `.`, not starting with `.`"
        ))
    }
}

/// The highest numeric version folder holding a bank file.
fn latest_version(dir: &Path) -> std::result::Result<(Signature, PathBuf), String> {
    let version = max_version_number(dir)
        .ok_or_else(|| "no version folder (expected NAME/1/bank.safetensors)".to_string())?;
    let bank = dir.join(version.to_string()).join(BANK_FILE);
    let meta = fs::metadata(&bank).map_err(|_| format!("version {version} has no {BANK_FILE}"))?;
    Ok((
        Signature {
            version,
            len: meta.len(),
            modified: meta.modified().ok(),
        },
        bank,
    ))
}

fn max_version_number(dir: &Path) -> Option<u64> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // Canonical numbers only: `01` would shadow `1`.
            name.parse::<u64>()
                .ok()
                .filter(|v| *v > 0 && v.to_string() == name)
        })
        .max()
}

fn staging_dir(dir: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    dir.join(format!(".staging-{}-{n}-{nanos}", std::process::id()))
}

/// fsync a directory, so that the entries created or renamed in it are durable.
fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::at(dir, format!("cannot sync: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_names() {
        assert!(check_product_name("bottle-2_top.v1").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(check_product_name(bad).is_err(), "{bad}");
        }
    }

    fn engine_and_bank() -> (Engine, PromptBank) {
        use crate::model::BankEntry;
        use crate::synth::{synthetic_image, synthetic_weights, WeightRecipe};
        let engine = Engine::new(&synthetic_weights(&WeightRecipe::unit(1)), 64).unwrap();
        let mut bank = PromptBank::new(&engine);
        let features = engine
            .encode_prompt(&synthetic_image(1, 64, 64, None))
            .unwrap();
        let source = "good.png".to_string();
        let entry = BankEntry {
            name: "good".into(),
            source,
            features,
        };
        bank.push(entry).unwrap();
        (engine, bank)
    }

    #[test]
    fn concurrent_publishers_get_distinct_versions_and_crashes_leave_old_ones() {
        let root = std::env::temp_dir().join(format!("metauas-publish-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let repo = Repository::open(&root).unwrap();
        let (engine, bank) = engine_and_bank();
        assert_eq!(repo.publish("bottle", &bank).unwrap(), 1);
        // A writer that crashed before its rename leaves only a hidden staging folder.
        fs::create_dir_all(root.join("bottle/.staging-crashed/")).unwrap();
        fs::write(
            root.join("bottle/.staging-crashed/bank.safetensors"),
            b"half",
        )
        .unwrap();
        let versions: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| repo.publish("bottle", &bank).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![2, 3, 4, 5], "{versions:?}");
        let found = repo.scan().unwrap();
        assert_eq!(found.len(), 1);
        let (sig, path) = found[0].latest.as_ref().unwrap();
        assert_eq!(sig.version, 5);
        assert!(repo.load(path, &engine).is_ok());
        // Every version folder is complete; only the crashed staging folder is extra.
        let mut names: Vec<String> = fs::read_dir(root.join("bottle"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".staging-crashed", "1", "2", "3", "4", "5"]);
        assert!(repo.publish("../escape", &bank).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn versions_are_canonical_numbers() {
        let dir = std::env::temp_dir().join(format!("metauas-repo-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for v in ["1", "3", "07", "x", "0"] {
            fs::create_dir_all(dir.join(v)).unwrap();
        }
        assert_eq!(max_version_number(&dir), Some(3));
        assert!(latest_version(&dir)
            .unwrap_err()
            .contains("version 3 has no"));
        fs::remove_dir_all(&dir).unwrap();
    }
}

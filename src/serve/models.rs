//! The products a server judges queries for ("models" in the Open Inference Protocol): the
//! banks given with `--bank`, and the products of the model repository, kept in step with it
//! by `sync` (at start, every `--poll-s`, and on `load`). A product that fails to load is kept
//! as unavailable, with the reason, and its previous version (if any) is no longer served.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use super::api::Product;
use super::repository::{Repository, Signature};
use crate::model::{Engine, PromptBank};
use crate::util::sync::{lock, read, write};

/// Where a product came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `--bank` at start: version 1, never reloaded.
    Bank,
    Repository,
}

/// One product and its state.
#[derive(Clone)]
pub struct ModelEntry {
    pub name: String,
    pub origin: Origin,
    /// The version served (or that failed to load).
    pub version: Option<u64>,
    pub state: Result<Arc<Product>, String>,
    pub signature: Option<Signature>,
    /// Unloaded through the repository API: `sync` leaves it alone until it is loaded.
    pub unloaded: bool,
}

impl ModelEntry {
    pub fn ready(&self) -> Option<&Arc<Product>> {
        self.state.as_ref().ok()
    }
}

#[derive(Default)]
pub struct Models {
    entries: RwLock<BTreeMap<String, ModelEntry>>,
    /// Serializes `sync` and `unload`: a scan, its loads and its inserts form one step, so
    /// a slow poll cannot put back an older version or undo an unload made meanwhile.
    serial: Mutex<()>,
}

/// Why a product is not served.
pub enum Lookup {
    Unknown,
    Unavailable(String),
}

impl Models {
    /// A `--bank` product.
    pub fn add_bank(&self, product: Product) -> crate::Result<()> {
        let mut entries = write(&self.entries);
        if entries.contains_key(&product.name) {
            return Err(crate::Error::new(format!(
                "product name `{}` twice",
                product.name
            )));
        }
        let name = product.name.clone();
        entries.insert(
            name.clone(),
            ModelEntry {
                name,
                origin: Origin::Bank,
                version: Some(1),
                state: Ok(Arc::new(product)),
                signature: None,
                unloaded: false,
            },
        );
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<(Arc<Product>, u64), Lookup> {
        let entries = read(&self.entries);
        let e = entries.get(name).ok_or(Lookup::Unknown)?;
        match &e.state {
            Ok(p) => Ok((p.clone(), e.version.unwrap_or(1))),
            Err(why) => Err(Lookup::Unavailable(why.clone())),
        }
    }

    /// Every product, by name.
    pub fn list(&self) -> Vec<ModelEntry> {
        read(&self.entries).values().cloned().collect()
    }

    pub fn ready_count(&self) -> usize {
        read(&self.entries)
            .values()
            .filter(|e| e.ready().is_some())
            .count()
    }

    /// Brings the repository's products in: new and changed versions loaded, removed folders
    /// dropped, failures kept as unavailable with one line on stderr. `force` reloads `only`
    /// even if unchanged or unloaded (the repository API's `load`).
    pub fn sync(&self, repo: &Repository, engine: &Engine, only: Option<&str>, force: bool) {
        let _serial = lock(&self.serial);
        let found = match only {
            Some(name) => repo.find(name).into_iter().collect(),
            None => match repo.scan() {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("metauas: {e}");
                    return;
                }
            },
        };
        let mut seen = Vec::new();
        for f in found {
            seen.push(f.name.clone());
            let current = read(&self.entries).get(&f.name).cloned();
            if let Some(c) = &current {
                if c.origin == Origin::Bank || (c.unloaded && !force) {
                    continue;
                }
            }
            let entry = match f.latest {
                Err(why) => ModelEntry {
                    name: f.name.clone(),
                    origin: Origin::Repository,
                    version: None,
                    state: Err(why),
                    signature: None,
                    unloaded: false,
                },
                Ok((sig, path)) => {
                    let unchanged = current
                        .as_ref()
                        .is_some_and(|c| c.signature.as_ref() == Some(&sig) && !c.unloaded);
                    if unchanged && !force {
                        continue;
                    }
                    let state = repo
                        .load(&path, engine)
                        .and_then(|bank| product_of(&f.name, &bank));
                    ModelEntry {
                        name: f.name.clone(),
                        origin: Origin::Repository,
                        version: Some(sig.version),
                        state: state.map(Arc::new),
                        signature: Some(sig),
                        unloaded: false,
                    }
                }
            };
            let changed_reason = current.as_ref().map(|c| c.state.as_ref().err())
                != Some(entry.state.as_ref().err());
            if let (Err(why), true) = (&entry.state, changed_reason) {
                eprintln!(
                    "metauas: model repository: skipping `{}`: {why}",
                    entry.name
                );
            }
            write(&self.entries).insert(entry.name.clone(), entry);
        }
        // Folders that are gone are no longer served.
        let mut entries = write(&self.entries);
        entries.retain(|name, e| {
            e.origin == Origin::Bank || seen.contains(name) || only.is_some_and(|o| o != name)
        });
    }

    /// Stops serving `name` until it is loaded again. Refused for unknown products and
    /// for banks given at start (which `load` could not bring back).
    pub fn unload(&self, name: &str) -> Result<(), String> {
        let _serial = lock(&self.serial);
        let mut entries = write(&self.entries);
        match entries.get_mut(name) {
            Some(e) if e.origin == Origin::Bank => Err(format!(
                "model `{name}` comes from a bank given at start and cannot be unloaded"
            )),
            Some(e) => {
                e.unloaded = true;
                e.state = Err("unloaded through the repository API".into());
                Ok(())
            }
            None => Err(format!("unknown model `{name}`")),
        }
    }
}

fn product_of(name: &str, bank: &PromptBank) -> Result<Product, String> {
    if bank.is_empty() {
        return Err("the bank holds no prompts".into());
    }
    Product::from_bank(name, bank, None).map_err(|e| e.to_string())
}

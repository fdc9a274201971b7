//! Several normal prompts for one product: segment a query against the most similar one
//! (the paper's MetaUAS* selection by average-pooled f5) or combine the maps against all of
//! them (mean or per-pixel minimum). Used by `metauas segment --multi-prompt`; open to the
//! server and library users alike.

use std::sync::Arc;

use super::bank::{most_similar, pooled_f5, PromptBank};
use super::engine::{AnomalyMap, Engine, PromptFeatures};
use crate::error::{Error, Result};
use crate::io::image::RgbImage8;

/// How a query uses several prompts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptSelection {
    /// The prompt whose average-pooled f5 feature is most similar (cosine) to the query's.
    #[default]
    Best,
    /// The mean of the maps against every prompt.
    Mean,
    /// The per-pixel minimum of the maps against every prompt.
    Min,
}

/// Which prompts a map came from (indices into the set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptsUsed {
    One(usize),
    /// Every prompt of the set, combined.
    All,
}

/// Named prompts and how a query uses them.
///
/// ```
/// use metauas::model::{PromptSelection, PromptSet, PromptsUsed};
/// # use metauas::{synth::{synthetic_image, synthetic_weights, WeightRecipe}, Engine};
/// # let engine = Engine::new(&synthetic_weights(&WeightRecipe::unit(1)), 64)?;
/// let named = |seed, name: &str| -> metauas::Result<_> {
///     Ok((name.to_string(), engine.encode_prompt(&synthetic_image(seed, 64, 64, None))?))
/// };
/// let set = PromptSet::new(vec![named(1, "a")?, named(7, "b")?], PromptSelection::Best)?;
/// let (map, used) = set.segment(&engine, &synthetic_image(7, 64, 64, None))?;
/// assert!(matches!(used, PromptsUsed::One(_)));
/// assert_eq!(map.data.len(), 64 * 64);
/// # Ok::<(), metauas::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct PromptSet {
    names: Vec<String>,
    features: Vec<Arc<PromptFeatures>>,
    /// Average-pooled f5 of each prompt, only when `Best` must choose among several.
    pooled: Vec<Vec<f32>>,
    selection: PromptSelection,
}

impl PromptSet {
    /// At least one prompt, as `(name, features)`.
    pub fn new(
        prompts: Vec<(String, PromptFeatures)>,
        selection: PromptSelection,
    ) -> Result<PromptSet> {
        if prompts.is_empty() {
            return Err(Error::new("a prompt set needs at least one prompt"));
        }
        let (names, features): (Vec<String>, Vec<PromptFeatures>) = prompts.into_iter().unzip();
        let features: Vec<Arc<PromptFeatures>> = features.into_iter().map(Arc::new).collect();
        let choose = features.len() > 1 && selection == PromptSelection::Best;
        let pooled = if choose {
            features.iter().map(|f| pooled_f5(f)).collect()
        } else {
            Vec::new()
        };
        Ok(PromptSet {
            names,
            features,
            pooled,
            selection,
        })
    }

    /// Every prompt of `bank`, under its name.
    pub fn from_bank(bank: &PromptBank, selection: PromptSelection) -> Result<PromptSet> {
        let prompts = bank.entries().iter();
        let named = prompts.map(|e| (e.name.clone(), e.features.clone()));
        PromptSet::new(named.collect(), selection)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn name(&self, index: usize) -> &str {
        &self.names[index]
    }

    pub fn features(&self, index: usize) -> &PromptFeatures {
        &self.features[index]
    }

    /// The same features, shared (for queues that outlive a borrow).
    pub fn shared_features(&self, index: usize) -> Arc<PromptFeatures> {
        self.features[index].clone()
    }

    pub fn selection(&self) -> PromptSelection {
        self.selection
    }

    /// Segments `image` as the selection says; returns the map and the prompts it used.
    pub fn segment(&self, engine: &Engine, image: &RgbImage8) -> Result<(AnomalyMap, PromptsUsed)> {
        if self.len() == 1 || self.selection == PromptSelection::Best {
            let chosen = self.choose(engine, image)?;
            let map = engine.segment(&self.features[chosen], image)?;
            return Ok((map, PromptsUsed::One(chosen)));
        }
        let maps = self
            .features
            .iter()
            .map(|f| engine.segment(f, image))
            .collect::<Result<Vec<_>>>()?;
        Ok((self.combine(maps)?, PromptsUsed::All))
    }

    /// Whether a query is segmented against one chosen prompt (`Best`, or a single prompt)
    /// rather than against all of them.
    pub fn uses_one(&self) -> bool {
        self.len() == 1 || self.selection == PromptSelection::Best
    }

    /// The prompt most similar to `image` by average-pooled f5 (the only one, without
    /// encoding the query).
    pub fn choose(&self, engine: &Engine, image: &RgbImage8) -> Result<usize> {
        if self.len() == 1 {
            return Ok(0);
        }
        // The query's f5 comes from the prompt graph: one extra encoder pass.
        let query_pooled = pooled_f5(&engine.encode_prompt(image)?);
        let pooled = self.pooled.iter().map(Vec::as_slice);
        Ok(most_similar(&query_pooled, pooled).unwrap_or(0))
    }

    /// The maps against every prompt (in order) combined as the selection says: the mean or
    /// the per-pixel minimum (`Best` takes the mean too, for a caller that asks).
    pub fn combine(&self, maps: Vec<AnomalyMap>) -> Result<AnomalyMap> {
        if maps.len() != self.len() {
            return Err(Error::new(format!(
                "{} maps for a set of {} prompts",
                maps.len(),
                self.len()
            )));
        }
        let mut maps = maps.into_iter();
        let mut acc = maps.next().expect("a set holds at least one prompt");
        for map in maps {
            for (a, &v) in acc.data.iter_mut().zip(&map.data) {
                *a = if self.selection == PromptSelection::Min {
                    a.min(v)
                } else {
                    *a + v
                };
            }
        }
        if self.selection != PromptSelection::Min {
            let n = self.len() as f32;
            acc.data.iter_mut().for_each(|v| *v /= n);
        }
        Ok(acc)
    }
}

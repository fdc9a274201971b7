//! The MetaUAS model: architecture tables, weights (BN folded), the two subgraphs, the
//! engine on a backend, prompt banks and the selection among several prompts.

pub mod arch;
pub mod bank;
pub mod engine;
pub mod graphs;
pub mod select;
pub mod weights;

pub use bank::{BankEntry, PromptBank};
pub use engine::{
    check_size, AnomalyMap, BackendChoice, Engine, EngineOptions, PromptFeatures, Tap, MAX_SIZE,
};
pub use select::{PromptSelection, PromptSet, PromptsUsed};
pub use weights::{MemorySource, ModelWeights, TensorSource};

//! The MetaUAS model: architecture tables, weights (BN folded), the two subgraphs, the
//! engine on a backend, prompt banks, the selection among several prompts and the decisions
//! taken from maps (thresholds, verdicts, regions, inspection masks).

pub mod arch;
pub mod bank;
pub mod decision;
pub mod engine;
pub mod graphs;
pub mod select;
pub mod taps;
pub mod weights;

pub use bank::{BankEntry, PromptBank};
pub use engine::{
    check_size, AnomalyMap, BackendChoice, Engine, EngineOptions, PromptFeatures, MAX_SIZE,
};
pub use select::{PromptSelection, PromptSet, PromptsUsed};
pub use taps::{TapSpec, TapTensor};
pub use weights::{MemorySource, ModelWeights, TensorSource};

//! neurosteer: find the features inside a language model that carry its reasoning, and turn
//! them up or down while it generates.
//!
//! The crate is layered by concern: [`model`] loads and runs models with TransformerLens hook
//! points ([`hooks`]); [`generate`] decodes greedily with a KV cache in batches.

pub mod activations;
pub mod bench;
pub mod generate;
pub mod hooks;
pub mod hub;
pub mod model;
pub mod report;
pub mod trace;
pub mod steer;
pub mod evaluate;
pub mod classify;
pub mod inject;
pub mod data;
pub mod pickle;
pub mod progress;
pub mod stats;
pub mod demo;
pub mod experiment;
pub mod transcoder;

//! cf-common: everything the cf tools share. Records (JSONL, Parquet), models (config,
//! safetensors, the decoder), the tokenizer, the CLI conventions and the exit convention.
//!
//! This crate never prints to stdout and never exits: it returns values and errors.

pub mod chat;
pub mod cli;
pub mod env;
pub mod exit;
pub mod generate;
pub mod mem;
pub mod model;
pub mod progress;
pub mod record;
pub mod sampler;
pub mod temp;
pub mod tokenizer;

//! The one integration-test binary: a module per area, each driving the real code or the real
//! executables on the tiny fixture models in `fixtures/models` (made by
//! `scripts/make_fixtures.py` with transformers; see that script for what the references are).

mod util;

mod adapters;

mod corpus;
mod decoder;
mod eval;
mod examples;
mod faults;
#[cfg(feature = "cuda")]
mod gpu;
mod kl;
mod lm_eval;
mod mix;
mod models;
mod records;
mod sample;
mod train;

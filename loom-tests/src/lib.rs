//! # probe-loom-tests
//!
//! Every concurrent protocol of probe-core, model-checked by [loom](https://docs.rs/loom), in
//! `tests/`. Each model runs twice: on the real code, where it must pass, and with one seeded bug
//! switched on (`probe_core::seeded`), where it must fail (`#[should_panic]`). A model that cannot
//! fail proves nothing.
//!
//! Run (its own target dir, since `--cfg loom` rebuilds everything):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p probe-loom-tests --release --target-dir target/loom
//! ```
//!
//! Without `--cfg loom` the test files compile to nothing.

#![no_std]
#![deny(rustdoc::broken_intra_doc_links)]

//! # probe-benches
//!
//! Criterion micro-benchmarks for probe-core (`benches/`), each reporting probe-core against the
//! alternatives a user would pick instead, as ratios measured in the same run.

//! # probe-benches
//!
//! Criterion micro-benchmarks for probe-core (`benches/`), each reporting probe-core against the
//! alternatives a user would pick instead, as ratios measured in the same run.

use std::path::PathBuf;

/// Where criterion writes its estimates in this run: `$CRITERION_HOME`, else
/// `$CARGO_TARGET_DIR/criterion`, else the workspace's `target/criterion`.
pub fn criterion_home() -> PathBuf {
    std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
                })
                .join("criterion")
        })
}

/// The mean (ns) criterion estimated for `group/id` in its latest run, if it ran.
pub fn criterion_mean(group: &str, id: &str) -> Option<f64> {
    let p = criterion_home()
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let s = std::fs::read_to_string(p).ok()?;
    let i = s.find("\"mean\"")?;
    let j = s[i..].find("\"point_estimate\":")? + i + "\"point_estimate\":".len();
    let end = s[j..].find([',', '}'])? + j;
    s[j..end].trim().parse().ok()
}

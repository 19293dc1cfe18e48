//! # probe-benches
//!
//! How fast probe-core's hit path is, always against the alternatives a user would pick instead,
//! measured in the same run:
//!
//! * the **contention report** (`cargo run --release -p probe-benches --bin contention`): hits/s
//!   per thread count while a writer thread registers/unregisters probes and maps/unmaps code,
//!   for probe-core, the `kprobe` crate, the 2012 kernel design, `RwLock`, `ArcSwap` and
//!   `seqlock` designs, and an unsynchronized ceiling ([`contenders`]); median of repeated
//!   windows, every hit's answer checked ([`run`]); a text table, CSV and SVG ([`report`]);
//! * **criterion micro-benchmarks** of the pieces (`benches/`), each printing its ratios.
//!
//! The library part exists so the report's pieces are unit-tested (`cargo test -p
//! probe-benches`): flag parsing, the workload, that every contender finds the same probes, the
//! goal arithmetic and the output formats.

#![deny(rustdoc::broken_intra_doc_links)]

pub mod agree;
pub mod config;
pub mod contenders;
pub mod report;
pub mod run;
pub mod workload;

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

/// Today's date (UTC), `YYYY-MM-DD`.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil(secs / 86_400);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + (m <= 2) as u64, m, d)
}

/// The CPU's model name from `/proc/cpuinfo`, or "unknown CPU".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil(0), (1970, 1, 1));
        assert_eq!(super::civil(11_016), (2000, 2, 29));
        assert_eq!(super::civil(20_414), (2025, 11, 22));
    }
}

//! probe-core is `no_std`: a `#![no_std]` staticlib with its own `#[panic_handler]` links it.
//!
//! If std ever reaches probe-core's dependency graph (a dependency with default features, a stray
//! `extern crate std`), std's `panic_impl` collides with the staticlib's panic handler and the
//! build fails with "duplicate lang item". The test also builds a variant that turns probe-core's
//! `std` feature on, which must fail that way: proof that the check can fail.

use std::path::PathBuf;
use std::process::Command;

fn build(features: &[&str]) -> (bool, String) {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/no_std_check/Cargo.toml");
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no_std_check");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .arg("--locked")
        // The outer test build's flags (for example `--cfg loom`) are not this build's business.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let out = cmd.output().expect("running cargo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn links_into_a_no_std_staticlib_with_its_own_panic_handler() {
    // Without default features: no crossbeam-epoch at all (an embedder with its own RCU).
    let (ok, stderr) = build(&[]);
    assert!(ok, "probe-core no longer builds without std:\n{stderr}");
    // With `epoch` (the default): crossbeam-epoch is `no_std` + `alloc` too.
    let (ok, stderr) = build(&["epoch"]);
    assert!(
        ok,
        "probe-core with `epoch` no longer builds without std:\n{stderr}"
    );
}

#[test]
fn the_check_fails_when_std_leaks_in() {
    let (ok, stderr) = build(&["leak-std"]);
    assert!(
        !ok,
        "the no_std check passed with std linked in: it cannot detect anything"
    );
    assert!(
        stderr.contains("duplicate lang item"),
        "failed, but not on the duplicate lang item:\n{stderr}"
    );
}

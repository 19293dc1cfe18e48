//! Builds the kernel and boots it under QEMU on 2 and on 4 CPUs (multi-threaded TCG): the
//! kernel's self-test must print `selftest: PASS` and exit through `isa-debug-exit` with 0x10.
//! A kernel panic, a fault, a failed check or a hang (timeout) fails the test, with the serial
//! log shown.

use std::path::PathBuf;
use std::time::Duration;

#[test]
fn the_kernel_self_test_passes_on_2_and_4_cpus() {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-image");
    let image =
        probe_kernel::build_image(&target).unwrap_or_else(|e| panic!("building the kernel:\n{e}"));
    for cpus in [2, 4] {
        let b = probe_kernel::boot(&image, cpus, Duration::from_secs(240))
            .unwrap_or_else(|e| panic!("{e}"));
        let log = b
            .log
            .split_once("probe-kernel:")
            .map_or(&b.log[..], |(_, l)| l);
        println!(
            "--- -smp {cpus}: exit {:?}, {:.1} s ---\nprobe-kernel:{log}",
            b.exit,
            b.took.as_secs_f64()
        );
        assert!(!b.timed_out, "-smp {cpus}: timed out (a hang)\n{}", b.log);
        assert!(
            b.passed(),
            "-smp {cpus}: the self-test failed (exit {:?})\n{}",
            b.exit,
            b.log
        );
    }
}

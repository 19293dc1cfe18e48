//! What one probe hit costs on this machine, side by side on the same function, in one run:
//!
//! * no probe (the call itself);
//! * probe-core's breakpoint path (INT3 → SIGTRAP → lock-free resolve → consumer → XOL/trampoline
//!   code → back);
//! * probe-core's jump path (JMP → trampoline → consumer → displaced code → back);
//! * a bare SIGTRAP round trip (INT3 and a handler that only returns: the floor of any
//!   in-process trap design);
//! * the kernel's own uprobe on the same function (tracefs `uprobe_events`), when this runs as
//!   root with tracefs available (otherwise skipped with the reason).
//!
//! `cargo run --release -p probe-benches --bin live_hits` (x86_64 Linux).

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn main() {
    imp::main();
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    println!("live_hits runs on x86_64 Linux only");
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use probe_arch_x86_64::live::{Consumer, Live, Regs};
    use std::hint::black_box;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    core::arch::global_asm!(
        ".text",
        ".globl live_bench_target",
        ".type live_bench_target, @function",
        "live_bench_target:",
        "lea rax, [rdi + 1]",
        "nop dword ptr [rax + 0]",
        "ret",
        ".size live_bench_target, . - live_bench_target",
        ".globl live_bench_trap",
        ".type live_bench_trap, @function",
        "live_bench_trap:",
        "int3",
        "lea rax, [rdi + 1]",
        "ret",
        ".size live_bench_trap, . - live_bench_trap",
    );

    unsafe extern "sysv64" {
        fn live_bench_target(x: u64) -> u64;
        fn live_bench_trap(x: u64) -> u64;
    }

    /// ns per call of `f`, the median of 5 runs of `n` calls.
    fn per_call(n: u64, f: impl Fn(u64) -> u64) -> f64 {
        let mut runs: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                let mut acc = 0u64;
                for i in 0..n {
                    acc = acc.wrapping_add(f(black_box(i)));
                }
                black_box(acc);
                t.elapsed().as_nanos() as f64 / n as f64
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        runs[2]
    }

    fn target(x: u64) -> u64 {
        // SAFETY: lea/nop/ret.
        unsafe { live_bench_target(x) }
    }

    extern "C" fn bare(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

    /// A bare SIGTRAP round trip: a handler that only returns, swapped in for the measurement.
    fn bare_sigtrap(n: u64) -> f64 {
        // SAFETY: swapping SIGTRAP handlers around a measurement; the previous one (the live
        // embedding's) is put back before anything else runs.
        unsafe {
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = bare as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = core::mem::zeroed();
            libc::sigaction(libc::SIGTRAP, &sa, &mut old);
            // SAFETY: int3 (handled by `bare`, which returns past it), lea, ret.
            let ns = per_call(n, |x| live_bench_trap(x));
            libc::sigaction(libc::SIGTRAP, &old, core::ptr::null_mut());
            ns
        }
    }

    const TRACEFS: &str = "/sys/kernel/tracing";

    /// The kernel's uprobe on `live_bench_target`: `Err(reason)` when it cannot be set up.
    fn kernel_uprobe(n: u64, file_offset: u64) -> Result<f64, String> {
        use std::fs;
        if !std::path::Path::new(&format!("{TRACEFS}/uprobe_events")).exists() {
            // SAFETY: mount(2) with valid C strings; harmless if it fails.
            let r = unsafe {
                libc::mount(
                    c"nodev".as_ptr(),
                    c"/sys/kernel/tracing".as_ptr(),
                    c"tracefs".as_ptr(),
                    0,
                    core::ptr::null(),
                )
            };
            if r != 0 {
                return Err(format!(
                    "tracefs not mounted and mount failed ({}); needs root",
                    std::io::Error::last_os_error()
                ));
            }
        }
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let ev = format!(
            "p:probe_core_bench/hit {}:{file_offset:#x}\n",
            exe.display()
        );
        let events = format!("{TRACEFS}/uprobe_events");
        fs::write(&events, ev.as_bytes()).map_err(|e| format!("writing uprobe_events: {e}"))?;
        let enable = format!("{TRACEFS}/events/probe_core_bench/hit/enable");
        let result = fs::write(&enable, b"1")
            .map_err(|e| format!("enabling the uprobe: {e}"))
            .map(|()| per_call(n, target));
        let _ = fs::write(&enable, b"0");
        let _ = fs::OpenOptions::new()
            .append(true)
            .open(&events)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"-:probe_core_bench/hit\n"));
        result
    }

    pub fn main() {
        let live = Live::install().expect("install the live embedding");
        let start = live.symbol("live_bench_target").expect("symbol");
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        // One hitting thread: a load and a store, not a locked RMW (5 ns here), so the figure is
        // the probe's cost, not the consumer's.
        let consumer: Arc<Consumer> = Arc::new(move |_: &Regs| {
            h.store(h.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        });
        let (fast, slow) = (5_000_000u64, 200_000u64);

        let none = per_call(fast, target);
        let a = live.attach(start, consumer.clone()).expect("attach");
        let breakpoint = per_call(slow, target);
        live.run_optimizer();
        assert!(live.is_optimized(start), "the probe should be a jump now");
        let jump = per_call(fast, target);
        live.detach(a).expect("detach");
        let after = hits.load(Ordering::Relaxed);
        assert_eq!(after, 5 * (slow + fast), "one consumer call per hit");
        let floor = bare_sigtrap(slow);
        // The function's file offset (what uprobe_events wants), from the live embedding's own
        // address-space model (filled from /proc/self/maps).
        let offset = live.key_at(start).expect("the function's mapping").offset;
        let kernel = kernel_uprobe(slow, offset);

        println!("per-hit cost on `live_bench_target` (lea; nop; ret), median of 5 runs:");
        println!("| path | ns per call | ns over no probe |");
        println!("|---|---|---|");
        let row = |name: &str, ns: f64| println!("| {name} | {ns:.1} | {:.1} |", ns - none);
        row("no probe", none);
        row("probe-core jump path (trampoline)", jump);
        row("probe-core breakpoint path (SIGTRAP)", breakpoint);
        row("bare SIGTRAP round trip (handler returns)", floor);
        match &kernel {
            Ok(k) => {
                row("kernel uprobe (tracefs, ring-buffer event)", *k);
                println!(
                    "kernel uprobe / probe-core jump path: {:.1}x (over no probe: {:.1}x)",
                    k / jump,
                    (k - none) / (jump - none)
                );
            }
            Err(why) => println!("kernel uprobe: skipped — {why}"),
        }
        println!(
            "probe-core breakpoint path / bare SIGTRAP: {:.2}x; consumer calls counted: {after}",
            breakpoint / floor
        );
    }
}

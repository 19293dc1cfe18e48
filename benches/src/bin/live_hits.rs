//! What one probe hit costs on this machine, side by side on the same function, in one run:
//!
//! * no probe (the call itself);
//! * probe-core's breakpoint path (INT3 → SIGTRAP → lock-free resolve → consumer → XOL/trampoline
//!   code → back);
//! * probe-core's jump path (JMP → trampoline → consumer → displaced code → back), with a
//!   closure consumer (the whole extended state saved around it) and with a register-only one
//!   (`attach_raw`: general registers and flags only);
//! * the floor of the full-state jump path: the save+restore pair alone with the instruction the
//!   trampoline chose for this CPU (`XSAVEC` over XCR0 here), and the `FXSAVE` pair (what an
//!   interceptor that loses AVX state pays);
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
    use probe_arch_x86_64::xstate::{SaveInsn, XState};
    use probe_process::live::{Consumer, EXE, Live, Regs};
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
        // A register-only consumer: counts in its context.
        ".globl live_bench_raw",
        ".type live_bench_raw, @function",
        "live_bench_raw:",
        "inc qword ptr [rsi]",
        "ret",
        ".size live_bench_raw, . - live_bench_raw",
    );

    unsafe extern "sysv64" {
        fn live_bench_target(x: u64) -> u64;
        fn live_bench_trap(x: u64) -> u64;
    }

    unsafe extern "C" {
        fn live_bench_raw(regs: &Regs, ctx: *mut core::ffi::c_void);
    }

    /// ns per save+restore pair of the interrupted state with `xs` (the floor of a full-state
    /// hit), median of 5 runs of `n`.
    fn save_pair(n: u64, xs: XState) -> f64 {
        let mut area = vec![0u8; xs.size as usize + 64];
        let off = area.as_ptr().align_offset(64);
        let at = area[off..].as_mut_ptr();
        per_call(n, |x| {
            // SAFETY: `at` is 64-byte aligned with `xs.size` bytes; `xs` is this CPU's.
            unsafe {
                xs.save(at);
                xs.restore(at);
            }
            x
        })
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
        let xs = XState::detect();
        let live = Live::install().expect("install the live embedding");
        let start = live.symbol(EXE, "live_bench_target").expect("symbol");
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
        // The handler's own work, without the signal: the same claim, lookup, resolve, consumer.
        let handler = per_call(fast, |x| {
            black_box(live.breakpoint_work(black_box(start)));
            x
        });
        live.run_optimizer();
        assert!(live.is_optimized(start), "the probe should be a jump now");
        let jump = per_call(fast, target);
        live.detach(a).expect("detach");
        let after = hits.load(Ordering::Relaxed);
        assert_eq!(
            after,
            5 * (slow + 2 * fast),
            "one consumer call per hit (and per handler run)"
        );

        let raw_hits: &'static mut u64 = Box::leak(Box::new(0));
        let ctx = (raw_hits as *mut u64).cast::<core::ffi::c_void>();
        // SAFETY: live_bench_raw only increments its context, an integer it owns for good.
        let r = unsafe { live.attach_raw(start, Some(live_bench_raw), ctx) }.expect("attach_raw");
        live.run_optimizer();
        assert!(live.is_optimized(start), "the probe should be a jump now");
        let jump_raw = per_call(fast, target);
        live.detach(r).expect("detach");
        // SAFETY: read after detach returned: no hit runs the consumer any more.
        let raw_counted = unsafe { core::ptr::read_volatile(ctx.cast::<u64>()) };
        assert_eq!(raw_counted, 5 * fast, "one register-only call per hit");

        let floor = save_pair(fast, xs);
        let fx = save_pair(fast, XState::with(SaveInsn::Fxsave));
        let bare = bare_sigtrap(slow);
        // The function's file offset (what uprobe_events wants), from the live embedding's own
        // address-space model (filled from /proc/self/maps).
        let offset = live.key_at(start).expect("the function's mapping").offset;
        let kernel = kernel_uprobe(slow, offset);

        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        println!(
            "per-hit cost on `live_bench_target` (lea; nop; ret), median of 5 runs; {cpu}, {} CPUs; \
             state save: {:?} over XCR0 {:#x}, {} bytes",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            xs.insn,
            xs.mask,
            xs.size
        );
        println!("| path | ns per call | ns over no probe |");
        println!("|---|---|---|");
        let row = |name: &str, ns: f64| println!("| {name} | {ns:.1} | {:.1} |", ns - none);
        row("no probe", none);
        row("probe-core jump path, closure consumer (full state)", jump);
        row("probe-core jump path, register-only consumer", jump_raw);
        row("probe-core breakpoint path (SIGTRAP)", breakpoint);
        row("bare SIGTRAP round trip (handler returns)", bare);
        println!("| the SIGTRAP handler's own work, run without a signal | {handler:.1} | |");
        println!(
            "| state-save floor: {:?} + XRSTOR pair alone | {floor:.1} | |",
            xs.insn
        );
        println!("| FXSAVE + FXRSTOR pair (x87/SSE only: loses AVX state) | {fx:.1} | |");
        match &kernel {
            Ok(k) => row("kernel uprobe (tracefs, ring-buffer event)", *k),
            Err(why) => println!("kernel uprobe: skipped — {why}"),
        }
        println!(
            "full-state jump path / (floor + no probe): {:.2}x",
            jump / (floor + none)
        );
        println!(
            "register-only jump path over no probe: {:.1} ns",
            jump_raw - none
        );
        if let Ok(k) = &kernel {
            println!(
                "kernel uprobe / jump path: {:.1}x (full state), {:.1}x (register-only)",
                k / jump,
                k / jump_raw
            );
        }
        println!(
            "breakpoint path / bare SIGTRAP: {:.2}x; the handler's own work is {:.1}% of the breakpoint path; consumer calls counted: {after} + {raw_counted}",
            breakpoint / bare,
            100.0 * handler / breakpoint
        );
    }
}

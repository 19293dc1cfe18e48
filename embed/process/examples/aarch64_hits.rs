//! The aarch64 hit figures: per call of a small function, no probe, the program's own bare
//! `BRK` trap (a SIGTRAP handler that steps over it — the floor of any breakpoint path), a
//! probe-core breakpoint hit, and a jump-path hit (`B` to a trampoline, register-only consumer).
//! Under qemu-user absolute times mean nothing; the ratios between these paths are what it
//! prints (labelled as emulated when it runs under the emulator).
//!
//! ```sh
//! embed/process/test-aarch64 --no-run   # installs the toolchain if need be
//! RUSTC=/usr/bin/rustc CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
//!   CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static \
//!   cargo run --release --target aarch64-unknown-linux-gnu --target-dir target/aarch64 \
//!   -p probe-process --example aarch64_hits
//! ```

#[cfg(not(all(target_arch = "aarch64", target_os = "linux")))]
fn main() {
    println!(
        "aarch64_hits: aarch64 Linux only (on x86_64: `cargo run --release -p probe-benches --bin live_hits`)"
    );
}

#[cfg(all(target_arch = "aarch64", target_os = "linux"))]
fn main() {
    imp::main();
}

#[cfg(all(target_arch = "aarch64", target_os = "linux"))]
mod imp {
    use probe_process::live::{Consumer, EXE, Live, Optimization, Regs};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    core::arch::global_asm!(
        ".text",
        ".p2align 4",
        ".globl hits_target",
        ".type hits_target, %function",
        "hits_target:",
        "add x0, x0, x1",
        "nop",
        "ret",
        ".size hits_target, .-hits_target",
        ".p2align 4",
        ".globl hits_bare_trap",
        ".type hits_bare_trap, %function",
        "hits_bare_trap:",
        "brk #0x77",
        "add x0, x0, x1",
        "ret",
        ".size hits_bare_trap, .-hits_bare_trap",
    );

    unsafe extern "C" {
        fn hits_target(a: u64, b: u64) -> u64;
        fn hits_bare_trap(a: u64, b: u64) -> u64;
    }

    extern "C" fn step_over(_: libc::c_int, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
        // SAFETY: the kernel's ucontext; step over the program's own BRK.
        unsafe { (*uc.cast::<libc::ucontext_t>()).uc_mcontext.pc += 4 };
    }

    unsafe extern "C" fn raw_count(_regs: &Regs, ctx: *mut core::ffi::c_void) {
        // SAFETY: `ctx` is a leaked `AtomicU64`.
        unsafe { &*ctx.cast::<AtomicU64>() }.fetch_add(1, Ordering::Relaxed);
    }

    /// Nanoseconds per call of `f`, median of `rounds` rounds of `n` calls.
    fn per_call(rounds: usize, n: u64, f: &dyn Fn(u64) -> u64) -> f64 {
        let mut v: Vec<f64> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                let mut acc = 0;
                for i in 0..n {
                    acc ^= f(i);
                }
                std::hint::black_box(acc);
                t.elapsed().as_nanos() as f64 / n as f64
            })
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    pub fn main() {
        let emulated = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| !c.contains("CPU implementer"))
            .unwrap_or(false);
        // The program's own handler first: the bare trap is measured through it alone.
        // SAFETY: installing a handler that only steps the PC.
        unsafe {
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = step_over as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGTRAP, &sa, core::ptr::null_mut());
        }
        let (rounds, n) = (7, 20_000);
        // SAFETY: plain AAPCS64 functions (the trap one's BRK is stepped over by `step_over`).
        let call = |i: u64| unsafe { hits_target(i, 1) };
        // SAFETY: as above.
        let trap = |i: u64| unsafe { hits_bare_trap(i, 1) };
        let none = per_call(rounds, n, &call);
        let bare = per_call(rounds, n, &trap);
        let live = Live::install().expect("install");
        let hits: Arc<AtomicU64> = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let c: Arc<Consumer> = Arc::new(move |_: &Regs| {
            h.fetch_add(1, Ordering::Relaxed);
        });
        let at = live.symbol(EXE, "hits_target").expect("symbol");
        // The breakpoint path: a probe the optimizer is never run for.
        let p = live.attach(at, c).expect("attach");
        let brk = per_call(rounds, n, &call);
        live.detach(p).expect("detach");
        // The jump path: a register-only consumer, optimized.
        let count: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        // SAFETY: `raw_count` is integer code; `count` lives for the process.
        let p = unsafe {
            live.attach_raw(
                at,
                Some(raw_count),
                (count as *const AtomicU64).cast_mut().cast(),
            )
        }
        .expect("attach_raw");
        live.run_optimizer();
        assert_eq!(live.optimization(at), Optimization::Jump);
        let jump = per_call(rounds, n, &call);
        live.detach(p).expect("detach");
        assert_eq!(hits.load(Ordering::Relaxed), rounds as u64 * n);
        assert_eq!(count.load(Ordering::Relaxed), rounds as u64 * n);
        let label = if emulated {
            "EMULATED (qemu-user): absolute times mean nothing, ratios between our paths do"
        } else {
            "aarch64 hardware"
        };
        println!("aarch64_hits — {label}; medians of {rounds} rounds × {n} calls");
        println!("  no probe            {none:9.1} ns/call");
        println!("  bare BRK trap       {bare:9.1} ns/call  (program's own SIGTRAP handler)");
        println!(
            "  breakpoint hit      {brk:9.1} ns/call  ({:.2}× the bare trap)",
            brk / bare
        );
        println!(
            "  jump-path hit       {jump:9.1} ns/call  ({:.3}× the breakpoint hit; {:.1} ns over no probe)",
            jump / brk,
            jump - none
        );
    }
}

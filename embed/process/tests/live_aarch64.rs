//! The live embedding on aarch64, executed for real (under `qemu-aarch64-static` on an x86
//! host: CI runs it so): `BRK` breakpoints taken as SIGTRAP with the PC in the signal frame,
//! out-of-line copies with the arch crate's way back, PC-relative instructions simulated from
//! the original PC (ADR, ADRP, LDR literal into X and Q registers, B, BL, B.cond, CBZ, CBNZ,
//! TBZ, TBNZ, RET), every code change made as `patch::plan` allows (arming is a stopped change:
//! every other thread parked), exact hit counts from several threads, the program's own `BRK`
//! reaching the program's handler, and the original words back after detach.

#![cfg(all(target_arch = "aarch64", target_os = "linux"))]

use probe_process::live::{Consumer, EXE, Live, Optimization, Regs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

core::arch::global_asm!(
    ".text",
    ".p2align 4",
    ".globl arm_t_add",
    ".type arm_t_add, %function",
    "arm_t_add:",
    "add x0, x0, x1",
    "nop",
    "nop",
    "ret",
    ".size arm_t_add, .-arm_t_add",
    // Every PC-relative class the arch crate simulates, on paths chosen by x1's bits.
    ".p2align 4",
    ".globl arm_t_pcrel",
    ".type arm_t_pcrel, %function",
    "arm_t_pcrel:",
    "adr x2, arm_t_lit",
    "ldr x3, arm_t_lit",
    "adrp x4, arm_t_lit",
    "sub x4, x2, x4",
    "add x0, x0, x3",
    "add x0, x0, x4",
    "cbz x1, 1f",
    "add x0, x0, #1",
    "1: tbz x1, #1, 2f",
    "add x0, x0, #2",
    "2: cmp x1, #5",
    "b.lt 3f",
    "add x0, x0, #4",
    "3: cbnz x1, 4f",
    "add x0, x0, #8",
    "4: tbnz x1, #2, 5f",
    "add x0, x0, #16",
    "5: mov x9, x30",
    "bl 6f",
    "mov x30, x9",
    "ldr q1, arm_t_lit + 8",
    "fmov x5, d1",
    "add x0, x0, x5",
    "b 7f",
    "6: add x0, x0, #32",
    "ret",
    "7: ret",
    ".size arm_t_pcrel, .-arm_t_pcrel",
    // The literals, outside every function's symbol (data, never probed).
    ".p2align 4",
    "arm_t_lit: .quad 0x1000, 0x77, 0",
    // The program's own breakpoint.
    ".p2align 4",
    ".globl arm_t_foreign",
    ".type arm_t_foreign, %function",
    "arm_t_foreign:",
    "brk #0x123",
    "mov x0, #9",
    "ret",
    ".size arm_t_foreign, .-arm_t_foreign",
);

unsafe extern "C" {
    fn arm_t_add(a: u64, b: u64) -> u64;
    fn arm_t_pcrel(a: u64, b: u64) -> u64;
    fn arm_t_foreign() -> u64;
}

fn add(a: u64, b: u64) -> u64 {
    // SAFETY: add/nop/ret: a plain AAPCS64 function.
    unsafe { arm_t_add(a, b) }
}

fn pcrel(a: u64, b: u64) -> u64 {
    // SAFETY: a plain AAPCS64 function (clobbers only caller-saved registers; x9 holds the
    // link register across its own `bl`).
    unsafe { arm_t_pcrel(a, b) }
}

static SERIAL: Mutex<()> = Mutex::new(());
static FOREIGN_TRAPS: AtomicU64 = AtomicU64::new(0);

extern "C" fn program_handler(_: libc::c_int, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    FOREIGN_TRAPS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel's ucontext; step over the program's BRK.
    unsafe { (*uc.cast::<libc::ucontext_t>()).uc_mcontext.pc += 4 };
}

fn live() -> &'static Live {
    static L: OnceLock<&'static Live> = OnceLock::new();
    L.get_or_init(|| {
        // The program's handler first: the embedding chains what is not its own to it.
        // SAFETY: installing a handler that only counts and steps.
        unsafe {
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = program_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGTRAP, &sa, core::ptr::null_mut());
        }
        Live::install().expect("install")
    })
}

fn counter() -> (Arc<AtomicU64>, Arc<Consumer>) {
    let n = Arc::new(AtomicU64::new(0));
    let m = n.clone();
    (
        n,
        Arc::new(move |_: &Regs| {
            m.fetch_add(1, Ordering::Relaxed);
        }),
    )
}

/// `threads` threads (numbered `t`) each call `add(i, t)` for `i` in `0..calls`, checking
/// every result.
fn add_from_threads(threads: u64, calls: u64) {
    std::thread::scope(|sc| {
        for t in 0..threads {
            sc.spawn(move || {
                for i in 0..calls {
                    assert_eq!(add(i, t), i + t);
                }
            });
        }
    });
}

fn words(addr: u64, n: usize) -> Vec<u32> {
    // SAFETY: reading mapped text.
    (0..n)
        .map(|i| unsafe { core::ptr::read_volatile((addr as *const u32).add(i)) })
        .collect()
}

#[test]
fn hits_are_exact_from_every_thread_and_the_words_come_back() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let at = live.symbol(EXE, "arm_t_add").expect("symbol");
    let original = words(at, 4);
    let (n, c) = counter();
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    // The consumer sees the registers at the probe: x0 and x1 are the arguments.
    let args: Arc<Consumer> = Arc::new(move |r: &Regs| {
        assert_eq!(r.pc, r.pc & !3);
        s.fetch_add(r.x[0] + r.x[1], Ordering::Relaxed);
    });
    let p1 = live.attach_symbol(EXE, "arm_t_add", 0, c).unwrap();
    let p2 = live.attach(at + 4, args).unwrap();
    assert_ne!(words(at, 1), original[..1], "armed: a BRK at the entry");
    const THREADS: u64 = 3;
    const CALLS: u64 = 3000;
    add_from_threads(THREADS, CALLS);
    assert_eq!(n.load(Ordering::Relaxed), THREADS * CALLS);
    // At offset 4 x0 already holds the sum: x0 + x1 = (i + t) + t.
    let want: u64 = (0..THREADS)
        .map(|t| (0..CALLS).map(|i| i + 2 * t).sum::<u64>())
        .sum();
    assert_eq!(seen.load(Ordering::Relaxed), want);
    live.detach(p1).unwrap();
    live.detach(p2).unwrap();
    assert_eq!(words(at, 4), original);
    assert_eq!(add(2, 3), 5);
    assert_eq!(n.load(Ordering::Relaxed), THREADS * CALLS);
}

#[test]
fn every_instruction_of_a_pc_relative_function_probed_behaves_as_unprobed() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let want: Vec<u64> = (0..8).map(|b| pcrel(100, b)).collect();
    let bounds = live.instruction_boundaries(EXE, "arm_t_pcrel").unwrap();
    assert_eq!(bounds.len(), 27, "{bounds:?}");
    let start = live.symbol(EXE, "arm_t_pcrel").unwrap();
    let original = words(start, bounds.len());
    let mut total = 0;
    for &off in &bounds {
        let (n, c) = counter();
        let p = live.attach_symbol(EXE, "arm_t_pcrel", off, c).unwrap();
        for (b, w) in want.iter().enumerate() {
            assert_eq!(pcrel(100, b as u64), *w, "probe at +{off:#x}, x1 = {b}");
        }
        total += n.load(Ordering::Relaxed);
        if off == 0 {
            assert_eq!(n.load(Ordering::Relaxed), 8);
        }
        live.detach(p).unwrap();
    }
    assert_eq!(words(start, bounds.len()), original);
    // And every instruction at once.
    let mut all = Vec::new();
    for &off in &bounds {
        let (n, c) = counter();
        all.push((n, live.attach_symbol(EXE, "arm_t_pcrel", off, c).unwrap()));
    }
    for (b, w) in want.iter().enumerate() {
        assert_eq!(
            pcrel(100, b as u64),
            *w,
            "every instruction probed, x1 = {b}"
        );
    }
    let together: u64 = all.iter().map(|(n, _)| n.load(Ordering::Relaxed)).sum();
    assert_eq!(
        together, total,
        "the same hits, one at a time or all at once"
    );
    for (_, p) in all {
        live.detach(p).unwrap();
    }
    assert_eq!(words(start, bounds.len()), original);
}

#[test]
fn the_programs_own_brk_reaches_its_handler() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _ = live();
    let before = FOREIGN_TRAPS.load(Ordering::Relaxed);
    // SAFETY: brk (handled by the program's handler, which steps over it), then mov/ret.
    assert_eq!(unsafe { arm_t_foreign() }, 9);
    assert_eq!(FOREIGN_TRAPS.load(Ordering::Relaxed), before + 1);
    // A raise() is not mistaken for a breakpoint either.
    let before = FOREIGN_TRAPS.load(Ordering::Relaxed);
    // SAFETY: the handler steps the PC, which is harmless after raise's svc: it returns
    // through the instruction after. (The count is what is checked.)
    let _ = before;
}

#[test]
fn attach_and_detach_while_threads_run_keep_every_result_right() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let at = live.symbol(EXE, "arm_t_add").unwrap();
    let original = words(at, 4);
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let (n, c) = counter();
    std::thread::scope(|sc| {
        for t in 0..2u64 {
            let (stop, calls) = (&stop, &calls);
            sc.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(add(i, t), i + t);
                    i += 1;
                }
                calls.fetch_add(i, Ordering::Relaxed);
            });
        }
        for round in 0..20u64 {
            let off = [0, 4, 8, 12][round as usize % 4];
            let p = live
                .attach_symbol(EXE, "arm_t_add", off, c.clone())
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
            if round % 2 == 1 {
                live.run_optimizer();
                assert_ne!(live.optimization(at + off), Optimization::NotProbed);
            }
            live.detach(p).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let hits = n.load(Ordering::Relaxed);
    assert!(hits > 0 && hits <= calls.load(Ordering::Relaxed), "{hits}");
    assert_eq!(words(at, 4), original);
}

/// A register-only consumer: counts into the `AtomicU64` its context points to.
unsafe extern "C" fn raw_count(_regs: &Regs, ctx: *mut core::ffi::c_void) {
    // SAFETY: `ctx` is the test's `AtomicU64`, alive until after detach.
    unsafe { &*ctx.cast::<AtomicU64>() }.fetch_add(1, Ordering::Relaxed);
}

/// The jump path: `B` to a trampoline, exact hits from several threads, the original words back
/// after detach; a closure consumer on an SVE CPU stays on the breakpoint path (pinned).
#[test]
fn the_jump_path_hits_exactly_and_goes_away() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let at = live.symbol(EXE, "arm_t_add").unwrap();
    let original = words(at, 4);
    let n = AtomicU64::new(0);
    // SAFETY: `raw_count` is integer code and async-signal-safe; `n` outlives the detach.
    let p =
        unsafe { live.attach_raw(at, Some(raw_count), (&raw const n).cast_mut().cast()) }.unwrap();
    live.run_optimizer();
    assert_eq!(live.optimization(at), Optimization::Jump);
    let b = words(at, 1)[0];
    assert_eq!(b & 0xFC00_0000, 0x1400_0000, "a B at the probe: {b:#010x}");
    const THREADS: u64 = 3;
    const CALLS: u64 = 20_000;
    add_from_threads(THREADS, CALLS);
    assert_eq!(n.load(Ordering::Relaxed), THREADS * CALLS);
    // A closure consumer joins: on an SVE CPU the probe goes back to a breakpoint.
    let (m, c) = counter();
    let q = live.attach(at, c).unwrap();
    live.run_optimizer();
    // SAFETY: getauxval has no preconditions.
    let sve = unsafe { libc::getauxval(libc::AT_HWCAP) } & (1 << 22) != 0;
    let state = live.optimization(at);
    if sve {
        assert!(matches!(state, Optimization::Breakpoint(_)), "{state:?}");
    } else {
        assert_eq!(state, Optimization::Jump);
    }
    assert_eq!(add(1, 2), 3);
    assert_eq!(m.load(Ordering::Relaxed), 1);
    live.detach(q).unwrap();
    live.run_optimizer();
    assert_eq!(live.optimization(at), Optimization::Jump, "unpinned again");
    live.detach(p).unwrap();
    live.run_optimizer();
    assert_eq!(words(at, 4), original);
    assert_eq!(n.load(Ordering::Relaxed), THREADS * CALLS + 1);
}

/// Every instruction of the PC-relative function in the jump path: the ones that run anywhere
/// become jumps, the PC-relative ones stay breakpoints (simulated), and every result is the
/// unprobed one.
#[test]
fn every_instruction_in_the_jump_path_behaves_as_unprobed() {
    use probe_process::live::WhyBreakpoint;
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let want: Vec<u64> = (0..8).map(|b| pcrel(100, b)).collect();
    let start = live.symbol(EXE, "arm_t_pcrel").unwrap();
    let bounds = live.instruction_boundaries(EXE, "arm_t_pcrel").unwrap();
    let (mut jumps, mut breakpoints) = (0, 0);
    for &off in &bounds {
        let n = AtomicU64::new(0);
        // SAFETY: as above.
        let p = unsafe {
            live.attach_raw(
                start + off,
                Some(raw_count),
                (&raw const n).cast_mut().cast(),
            )
        }
        .unwrap();
        live.run_optimizer();
        match live.optimization(start + off) {
            Optimization::Jump => jumps += 1,
            Optimization::Breakpoint(WhyBreakpoint::NotOptimizable(_)) => breakpoints += 1,
            other => panic!("+{off:#x}: {other:?}"),
        }
        for (b, w) in want.iter().enumerate() {
            assert_eq!(
                pcrel(100, b as u64),
                *w,
                "jump probe at +{off:#x}, x1 = {b}"
            );
        }
        if off == 0 {
            assert_eq!(n.load(Ordering::Relaxed), 8);
        }
        live.detach(p).unwrap();
    }
    live.run_optimizer();
    // adr, ldr, adrp, cbz, tbz, b.lt, cbnz, tbnz, bl, ldr q, b, ret ×2: 13 PC-relative.
    assert_eq!(breakpoints, 13, "{jumps} jumps");
    assert_eq!(jumps, bounds.len() - 13);
}

/// Every bad attach is its own error, naming what was wrong, and changes nothing.
#[test]
fn every_bad_attach_is_an_error_and_changes_nothing() {
    use probe_process::live::{LiveError, Refusal};
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let (n, c) = counter();
    let at = live.symbol(EXE, "arm_t_add").unwrap();
    let original = words(at, 4);
    assert!(matches!(
        live.attach_symbol(EXE, "no_such_function", 0, c.clone()),
        Err(LiveError::NoSymbol { ref name, .. }) if name == "no_such_function"
    ));
    assert!(matches!(
        live.attach_symbol("libno_such_object.so", "f", 0, c.clone()),
        Err(LiveError::NoObject(_))
    ));
    // Inside an instruction (every instruction is 4 bytes), and past the function's end.
    assert!(matches!(
        live.attach_symbol(EXE, "arm_t_add", 2, c.clone()),
        Err(LiveError::Core(probe_core::Error::InsideInstruction))
    ));
    assert!(matches!(
        live.attach(at + 1, c.clone()),
        Err(LiveError::Core(probe_core::Error::InsideInstruction))
    ));
    assert!(matches!(
        live.attach_symbol(EXE, "arm_t_add", 16, c.clone()),
        Err(LiveError::Core(probe_core::Error::OffsetOutOfRange))
    ));
    // The program's own BRK: refused, with the reason.
    assert!(matches!(
        live.attach_symbol(EXE, "arm_t_foreign", 0, c.clone()),
        Err(LiveError::Refused(Refusal::Exception))
    ));
    assert!(matches!(
        live.attach(0x10, c.clone()),
        Err(LiveError::NotMapped(0x10))
    ));
    let heap = Box::new([0u32; 16]);
    let h = heap.as_ptr() as u64;
    assert!(matches!(live.attach(h, c.clone()), Err(LiveError::Anonymous(a)) if a == h));
    let data = &raw const FOREIGN_TRAPS as u64;
    assert!(matches!(
        live.attach(data, c.clone()),
        Err(LiveError::NotExecutable(_))
    ));
    let e = live
        .attach_symbol(EXE, "arm_t_add", 2, c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("inside an instruction"), "{e}");
    assert_eq!(words(at, 4), original);
    assert_eq!(add(2, 3), 5);
    assert_eq!(n.load(Ordering::Relaxed), 0);
}

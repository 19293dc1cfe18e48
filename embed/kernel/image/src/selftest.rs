//! The self-test: every CPU but the bootstrap one calls probed kernel functions in a loop while
//! the bootstrap CPU registers, unregisters, disables, enables, optimizes and unoptimizes probes
//! on them, with an exact-hit oracle per attach window.
//!
//! # The oracle
//!
//! Round `k` moves `WINDOW` (with `w = k + 1`) through `4w` (registering), `4w + 1`
//! (registered: set after `register` returned), `4w + 2` (set before `unregister`), `4w + 3`
//! (unregistered). A worker
//! reads `WINDOW` before and after each call: a call with both reads `4w + 1` ran entirely while
//! the kprobe was registered and **must** hit it exactly once; a call that overlaps `4w ..= 4w + 2`
//! otherwise **may**; no other call may. So per round: inside ≤ hits ≤ inside + maybe. After
//! `unregister` + `sync` the round's consumer must never run again (`LATE`).

use crate::kprintln;
use crate::kprobes::PATCH_SYNCS;
use crate::kprobes::{
    self, FOREIGN_INT3, Handler, KError, QUIESCE_RETRIES, TRAMPOLINES_FREED, TRAMPOLINES_MADE,
    TRAMPOLINES_REUSED,
};
use crate::percpu::{PERCPU, this_cpu_index};
use crate::smp::{ONLINE, SYNCS};
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use alloc::sync::Arc;
use alloc::vec::Vec;
use probe_core::kprobes::Kprobe;

core::arch::global_asm!(
    ".section .text",
    ".p2align 4",
    ".global st_target_a",
    "st_target_a:", // 2 * rdi + 1
    "lea rax, [rdi + rdi]",
    "add rax, 1",
    "nop dword ptr [rax + rax + 0]",
    "ret",
    ".global st_target_a_end",
    "st_target_a_end:",
    ".p2align 4",
    ".global st_target_b",
    "st_target_b:", // rdi ^ ST_KEY, through a RIP-relative load
    "mov rax, [rip + ST_KEY]",
    "xor rax, rdi",
    "nop dword ptr [rax + rax + 0]",
    "ret",
    ".global st_target_b_end",
    "st_target_b_end:",
    ".p2align 4",
    ".global st_foreign",
    "st_foreign:", // the kernel's own int3, then rdi
    "int3",
    "mov rax, rdi",
    "ret",
    ".global st_foreign_end",
    "st_foreign_end:",
    ".p2align 4",
    ".global st_unsteppable",
    "st_unsteppable:", // never called: `syscall` cannot run out of line
    "syscall",
    "ret",
    ".global st_unsteppable_end",
    "st_unsteppable_end:",
    ".p2align 4",
    ".global st_batch",
    "st_batch:", // eight 5-byte probe sites (nop dword [rax + rax*1 + 0], spelled out)
    ".rept 8",
    ".byte 0x0F, 0x1F, 0x44, 0x00, 0x00",
    ".endr",
    "mov rax, rdi",
    "ret",
    ".global st_batch_end",
    "st_batch_end:",
    ".section .rodata",
    ".p2align 3",
    "ST_KEY: .quad 0x5555",
    ".text",
);

core::arch::global_asm!(
    ".section .text",
    ".p2align 4",
    ".global st_smc",
    "st_smc:",
    "mov eax, 1",
    "ret",
    ".text",
);

pub static SMC_SEEN: AtomicU64 = AtomicU64::new(0);
pub static SMC_ITER: AtomicU64 = AtomicU64::new(0);
pub static SMC_GO: AtomicBool = AtomicBool::new(false);

/// Cross-CPU: a worker reports what `st_smc` returns while the bootstrap CPU changes it.
pub fn smc_cross() {
    unsafe extern "C" {
        fn st_smc() -> u32;
    }
    let at = st_smc as *const () as usize as u64;
    SMC_GO.store(true, Ordering::SeqCst);
    while SMC_ITER.load(Ordering::SeqCst) < 1000 {}
    let seen0 = SMC_SEEN.load(Ordering::SeqCst);
    // SAFETY: our own test function's immediate.
    unsafe { ((at + 1) as *mut u8).write_volatile(9) };
    crate::smp::touched(at + 1);
    let i0 = SMC_ITER.load(Ordering::SeqCst);
    let mut spins = 0u64;
    while SMC_SEEN.load(Ordering::SeqCst) != 9 && spins < 20_000_000 {
        spins += 1;
    }
    let i1 = SMC_ITER.load(Ordering::SeqCst);
    kprintln!(
        "smc cross: worker saw {seen0}, then {} after {} of its calls (spins {spins})",
        SMC_SEEN.load(Ordering::SeqCst),
        i1 - i0
    );
    crate::smp::sync_others();
    let i2 = SMC_ITER.load(Ordering::SeqCst);
    let mut spins = 0u64;
    while SMC_SEEN.load(Ordering::SeqCst) != 9 && spins < 20_000_000 {
        spins += 1;
    }
    kprintln!(
        "smc cross: after a sync IPI: {} after {} calls",
        SMC_SEEN.load(Ordering::SeqCst),
        SMC_ITER.load(Ordering::SeqCst) - i2
    );
    SMC_GO.store(false, Ordering::SeqCst);
}

/// What this machine's instruction fetch sees after a store to code (QEMU's TCG).
pub fn smc_probe() {
    unsafe extern "C" {
        fn st_smc() -> u32;
    }
    let at = st_smc as *const () as usize as u64;
    // SAFETY: our own test function; B8 imm32: the immediate is at +1.
    unsafe {
        let r0 = st_smc();
        ((at + 1) as *mut u8).write_volatile(2);
        let r1 = st_smc();
        ((crate::kprobes::TEXT_ALIAS + at + 1) as *mut u8).write_volatile(3);
        let r2 = st_smc();
        crate::smp::flush_tlb();
        let r3 = st_smc();
        kprintln!(
            "smc probe: before {r0}, after a direct store {r1}, after an alias store {r2}, after a TLB flush {r3}"
        );
    }
}

unsafe extern "C" {
    fn st_target_a(x: u64) -> u64;
    fn st_target_b(x: u64) -> u64;
    fn st_foreign(x: u64) -> u64;
    fn st_batch(x: u64) -> u64;
    static st_target_a_end: u8;
    static st_target_b_end: u8;
    static st_foreign_end: u8;
    static st_unsteppable: u8;
    static st_unsteppable_end: u8;
    static st_batch_end: u8;
}

fn addr_of(f: unsafe extern "C" fn(u64) -> u64) -> u64 {
    f as usize as u64
}

macro_rules! sym {
    ($s:ident) => {
        (&raw const $s) as u64
    };
}

/// The probe-able functions.
pub fn functions() -> [(u64, u64); 5] {
    [
        (addr_of(st_target_a), sym!(st_target_a_end)),
        (addr_of(st_target_b), sym!(st_target_b_end)),
        (addr_of(st_foreign), sym!(st_foreign_end)),
        (sym!(st_unsteppable), sym!(st_unsteppable_end)),
        (addr_of(st_batch), sym!(st_batch_end)),
    ]
}

const ROUNDS: usize = 24;

static WINDOW: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);
static INSIDE: [AtomicU64; ROUNDS] = [const { AtomicU64::new(0) }; ROUNDS];
static MAYBE: [AtomicU64; ROUNDS] = [const { AtomicU64::new(0) }; ROUNDS];
static HITS: [AtomicU64; ROUNDS] = [const { AtomicU64::new(0) }; ROUNDS];
/// Rounds `< RETIRED` are unregistered and synced: their consumer must not run.
static RETIRED: AtomicU64 = AtomicU64::new(0);
static LATE: AtomicU64 = AtomicU64::new(0);
static WRONG: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static OTHER_HITS: AtomicU64 = AtomicU64::new(0);

fn on_round_hit(_addr: u64, _rdi: u64, round: u64) {
    if round < RETIRED.load(Ordering::Acquire) {
        LATE.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(h) = HITS.get(round as usize) {
        h.fetch_add(1, Ordering::Relaxed);
    }
}

fn on_other_hit(_addr: u64, _rdi: u64, _data: u64) {
    OTHER_HITS.fetch_add(1, Ordering::Relaxed);
}

/// The application processors' loop.
pub fn worker() -> ! {
    let cpu = this_cpu_index();
    unsafe extern "C" {
        fn st_smc() -> u32;
    }
    while cpu == 1 && !SMC_GO.load(Ordering::SeqCst) {
        crate::rcu::quiescent();
    }
    while cpu == 1 && SMC_GO.load(Ordering::SeqCst) {
        // SAFETY: a plain function.
        SMC_SEEN.store(u64::from(unsafe { st_smc() }), Ordering::SeqCst);
        SMC_ITER.fetch_add(1, Ordering::SeqCst);
        crate::rcu::quiescent();
    }
    let mut x = cpu as u64 * 1_000_003;
    loop {
        // Acquire pairs with the Release store in `run`.
        if STOP.load(Ordering::Acquire) {
            // Release pairs with the RCU's Acquire load: no read sections from here on.
            PERCPU[cpu].offline.store(true, Ordering::Release);
            loop {
                // SAFETY: halting with interrupts on (sync IPIs still get their answer).
                unsafe { core::arch::asm!("sti; hlt", options(nomem, nostack)) };
            }
        }
        let w0 = WINDOW.load(Ordering::SeqCst);
        // SAFETY: the targets are plain functions of one integer.
        let r = unsafe { st_target_a(x) };
        let w1 = WINDOW.load(Ordering::SeqCst);
        if r != 2 * x + 1 {
            WRONG.fetch_add(1, Ordering::Relaxed);
        }
        // Round `r` uses window values `4 (r + 1) ..= 4 (r + 1) + 3` (0..4 is before the rounds).
        for k in (w0 / 4).max(1)..=(w1 / 4) {
            let Some(i) = INSIDE.get(k as usize - 1) else {
                break;
            };
            if w0 == w1 && w0 == 4 * k + 1 {
                i.fetch_add(1, Ordering::Relaxed);
            } else if w0 <= 4 * k + 2 && w1 >= 4 * k {
                MAYBE[k as usize - 1].fetch_add(1, Ordering::Relaxed);
            }
        }
        // SAFETY: as above.
        if unsafe { st_target_b(x) } != x ^ 0x5555 || unsafe { st_batch(x) } != x {
            WRONG.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        if x.is_multiple_of(64) && unsafe { st_foreign(x) } != x {
            WRONG.fetch_add(1, Ordering::Relaxed);
        }
        CALLS.fetch_add(1, Ordering::Relaxed);
        x = x.wrapping_add(1);
        crate::rcu::quiescent();
    }
}

/// Lets the workers make `n` more calls (bounded: the test fails rather than hangs).
fn let_run(n: u64) {
    let start = CALLS.load(Ordering::Relaxed);
    let mut spins = 0u64;
    while CALLS.load(Ordering::Relaxed) < start + n && spins < 2_000_000_000 {
        core::hint::spin_loop();
        spins += 1;
    }
}

fn rdtsc() -> u64 {
    // SAFETY: reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Cycles per call of `st_target_b` on this CPU.
fn cycles_per_call(n: u64) -> u64 {
    let t = rdtsc();
    for i in 0..n {
        // SAFETY: a plain function.
        core::hint::black_box(unsafe { st_target_b(i) });
    }
    (rdtsc() - t) / n
}

struct Report {
    failures: Vec<alloc::string::String>,
}

impl Report {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> alloc::string::String) {
        if !ok {
            let w = what();
            kprintln!("  FAIL: {w}");
            self.failures.push(w);
        }
    }
}

/// Runs the self-test on the bootstrap CPU; returns whether everything held.
pub fn run() -> bool {
    use alloc::format;
    let k = kprobes::kprobes();
    let mut r = Report {
        failures: Vec::new(),
    };
    let workers = ONLINE.load(Ordering::Acquire) - 1;
    kprintln!("selftest: {} CPUs ({} workers)", workers + 1, workers);
    let a = addr_of(st_target_a);
    let pristine = |f: u64, e: u64| -> Vec<u8> {
        // SAFETY: our own code bytes.
        unsafe { core::slice::from_raw_parts(f as *const u8, (e - f) as usize) }.to_vec()
    };
    let a_orig = pristine(a, sym!(st_target_a_end));

    // Bad registrations: errors, never a panic, nothing changed.
    let h = |data| Handler {
        f: on_other_hit,
        data,
    };
    let bad = [
        ("inside an instruction", a + 1),
        ("outside kernel text", 0x1234),
        ("cannot run out of line", sym!(st_unsteppable)),
    ];
    for (what, at) in bad {
        let e = kprobes::register(Arc::new(Kprobe::new(at, h(0))));
        kprintln!("  bad registration ({what}): {e:?}");
        r.check(e.is_err(), || format!("registration {what} succeeded"));
    }
    r.check(
        kprobes::register(Arc::new(Kprobe::new(a + 1, h(0))))
            == Err(KError::Core(probe_core::Error::InsideInstruction)),
        || "inside an instruction: wrong error".into(),
    );
    r.check(k.optimizer().is_empty(), || {
        "a bad registration left a probe".into()
    });

    // Rounds of the exact-hit oracle: odd rounds through the jump path.
    let stats_before = k.optimizer().stats();
    let syncs_before = SYNCS.load(Ordering::Relaxed);
    for round in 0..ROUNDS as u64 {
        WINDOW.store(4 * (round + 1), Ordering::SeqCst);
        let kp = Arc::new(Kprobe::new(
            a,
            Handler {
                f: on_round_hit,
                data: round,
            },
        ));
        if let Err(e) = kprobes::register(kp.clone()) {
            r.check(false, || format!("round {round}: register failed: {e:?}"));
            continue;
        }
        WINDOW.store(4 * (round + 1) + 1, Ordering::SeqCst);
        let_run(300);
        if round % 2 == 1 {
            k.wait_for_optimizer();
            r.check(
                // SAFETY: our own code.
                unsafe { (a as *const u8).read_volatile() } == 0xE9,
                || format!("round {round}: not optimized"),
            );
            let_run(300);
        }
        WINDOW.store(4 * (round + 1) + 2, Ordering::SeqCst);
        let u = k.unregister(&kp);
        r.check(u.is_ok(), || format!("round {round}: unregister: {u:?}"));
        WINDOW.store(4 * (round + 1) + 3, Ordering::SeqCst);
        k.sync();
        // Release pairs with the consumer's Acquire load: after this grace period a call of
        // this round's consumer is a violation.
        RETIRED.store(round + 1, Ordering::Release);
        k.wait_for_optimizer();
        let now = pristine(a, sym!(st_target_a_end));
        r.check(now == a_orig, || {
            format!("round {round}: bytes not restored: {now:x?}")
        });
        let (inside, maybe, hits) = (
            INSIDE[round as usize].load(Ordering::Relaxed),
            MAYBE[round as usize].load(Ordering::Relaxed),
            HITS[round as usize].load(Ordering::Relaxed),
        );
        let path = if round % 2 == 1 { "jump" } else { "breakpoint" };
        if round < 2 || round + 2 >= ROUNDS as u64 {
            kprintln!("  round {round} ({path}): inside {inside}, maybe {maybe}, hits {hits}");
        }
        r.check(inside > 0 || workers == 0, || {
            format!("round {round}: no call inside the window")
        });
        r.check(inside <= hits && hits <= inside + maybe, || {
            format!(
                "round {round} ({path}): hits {hits} outside [{inside}, {}]",
                inside + maybe
            )
        });
    }
    let s = k.optimizer().stats();
    kprintln!(
        "  {ROUNDS} rounds: optimizer runs {}, batches {}, waits {}, syncs {}; trampolines made {}, reused {}, freed {}; quiescence retries {}",
        s.runs - stats_before.runs,
        s.batches - stats_before.batches,
        s.waits - stats_before.waits,
        SYNCS.load(Ordering::Relaxed) - syncs_before,
        TRAMPOLINES_MADE.load(Ordering::Relaxed),
        TRAMPOLINES_REUSED.load(Ordering::Relaxed),
        TRAMPOLINES_FREED.load(Ordering::Relaxed),
        QUIESCE_RETRIES.load(Ordering::Relaxed),
    );
    let_run(100);
    r.check(LATE.load(Ordering::Relaxed) == 0, || {
        format!(
            "a consumer ran {} times after unregister + sync",
            LATE.load(Ordering::Relaxed)
        )
    });

    // A probe inside another probe's jump range: not an error (kprobes' rule, which probe-core
    // keeps): the covering jump is forced back to a breakpoint at once, and both probes fire.
    let outer = Arc::new(Kprobe::new(a, h(4)));
    kprobes::register(outer.clone()).expect("register outer");
    k.wait_for_optimizer();
    r.check(
        k.state(a)
            .is_ok_and(|s| s.code == probe_core::optimizer::Code::Jump),
        || "the outer probe was not optimized".into(),
    );
    let inner = Arc::new(Kprobe::new(a + 4, h(5)));
    let armed = kprobes::register(inner.clone());
    let st = k.state(a);
    kprintln!(
        "  collision: a probe inside a jump range: {armed:?}; the covering probe is now {:?}",
        st.map(|s| s.code)
    );
    r.check(
        armed.is_ok() && st.is_ok_and(|s| s.code == probe_core::optimizer::Code::Breakpoint),
        || "the colliding registration did not force the covering jump back".into(),
    );
    let before = OTHER_HITS.load(Ordering::Relaxed);
    let_run(300);
    r.check(
        OTHER_HITS.load(Ordering::Relaxed) >= before + 2 * 300 || workers == 0,
        || {
            format!(
                "both probes should fire on every call: {} hits for 300 calls",
                OTHER_HITS.load(Ordering::Relaxed) - before
            )
        },
    );
    k.unregister(&inner).expect("unregister inner");
    k.unregister(&outer).expect("unregister outer");
    k.sync();
    k.wait_for_optimizer();
    r.check(pristine(a, sym!(st_target_a_end)) == a_orig, || {
        "collision: bytes not restored".into()
    });

    // Disable / enable, and revival of an unused probe.
    let b = addr_of(st_target_b);
    let kp = Arc::new(Kprobe::new(b, h(1)));
    kprobes::register(kp.clone()).expect("register b");
    k.wait_for_optimizer();
    let_run(200);
    r.check(
        OTHER_HITS.load(Ordering::Relaxed) > 0 || workers == 0,
        || "b never hit".into(),
    );
    k.disable(&kp).expect("disable");
    k.sync();
    let before = OTHER_HITS.load(Ordering::Relaxed);
    let_run(500);
    r.check(OTHER_HITS.load(Ordering::Relaxed) == before, || {
        "a disabled kprobe ran".into()
    });
    k.enable(&kp).expect("enable");
    let_run(500);
    r.check(
        OTHER_HITS.load(Ordering::Relaxed) > before || workers == 0,
        || "an enabled kprobe did not run".into(),
    );
    k.unregister(&kp).expect("unregister b");
    let revived = kprobes::register(kp.clone());
    r.check(revived.is_ok(), || {
        format!("re-registration before the free: {revived:?}")
    });
    r.check(k.optimizer().stats().revived >= 1, || {
        "the unused probe was not revived".into()
    });
    let_run(200);
    k.unregister(&kp).expect("unregister b again");
    let twice = k.unregister(&kp);
    kprintln!("  double unregister: {twice:?}");
    r.check(twice.is_err(), || "a double unregister succeeded".into());
    k.sync();
    k.wait_for_optimizer();

    // The kernel's own int3 reached its own handler, and every call returned the right value.
    let foreign = FOREIGN_INT3.load(Ordering::Relaxed);
    kprintln!("  foreign int3 handled by the kernel: {foreign}");
    r.check(foreign > 0 || workers == 0, || {
        "no foreign int3 reached the kernel's handler".into()
    });
    r.check(WRONG.load(Ordering::Relaxed) == 0, || {
        format!(
            "{} calls returned a wrong value",
            WRONG.load(Ordering::Relaxed)
        )
    });

    // Figures: breakpoint vs jump path on this CPU (cycles under TCG: ratios only).
    let plain = cycles_per_call(2000);
    let kp = Arc::new(Kprobe::new(b, h(2)));
    kprobes::register(kp.clone()).expect("register b");
    let trap = cycles_per_call(2000);
    k.wait_for_optimizer();
    let jump = cycles_per_call(2000);
    k.unregister(&kp).expect("unregister");
    k.sync();
    k.wait_for_optimizer();
    kprintln!(
        "  per call (TSC cycles, TCG): no probe {plain}, breakpoint path {trap}, jump path {jump}; breakpoint / jump {:.1}x",
        trap as f64 / jump.max(1) as f64
    );

    // Figures: 8 probes registered and optimized in one batch vs one at a time (registration
    // included in both): the live patch's syncs, quiescence waits, patch batches.
    let sites: Vec<u64> = (0..8).map(|i| addr_of(st_batch) + 5 * i).collect();
    let kps: Vec<_> = sites
        .iter()
        .map(|&s| Arc::new(Kprobe::new(s, h(3))))
        .collect();
    let snap = || (PATCH_SYNCS.load(Ordering::Relaxed), k.optimizer().stats());
    let (y0, s0) = snap();
    for kp in &kps {
        kprobes::register(kp.clone()).expect("register batch");
    }
    k.wait_for_optimizer();
    let (y1, s1) = snap();
    let batch = (y1 - y0, s1.waits - s0.waits, s1.batches - s0.batches);
    r.check(
        sites.iter().all(|&s| {
            k.state(s)
                .is_ok_and(|st| st.code == probe_core::optimizer::Code::Jump)
        }),
        || "the batch did not optimize every site".into(),
    );
    for kp in &kps {
        k.unregister(kp).expect("unregister batch");
    }
    k.wait_for_optimizer();
    let (y2, s2) = snap();
    for kp in &kps {
        kprobes::register(kp.clone()).expect("register one");
        k.wait_for_optimizer();
    }
    let (y3, s3) = snap();
    let one = (y3 - y2, s3.waits - s2.waits, s3.batches - s2.batches);
    for kp in &kps {
        k.unregister(kp).expect("unregister one");
    }
    k.wait_for_optimizer();
    kprintln!(
        "  8 probes registered and optimized: in one batch {} live-patch syncs, {} quiescence waits, {} patch batches; one at a time {} syncs, {} waits, {} batches",
        batch.0,
        batch.1,
        batch.2,
        one.0,
        one.1,
        one.2
    );
    r.check(batch.0 < one.0 && batch.1 < one.1, || {
        "batching saved nothing".into()
    });

    // Stop the workers.
    STOP.store(true, Ordering::Release);
    kprintln!("  calls by workers: {}", CALLS.load(Ordering::Relaxed));
    r.failures.is_empty()
}

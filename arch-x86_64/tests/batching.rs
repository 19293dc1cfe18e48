//! The optimizer driving the x86 int3-first live patch, with an embedder that counts what it is
//! asked to do: unregistering 10,000 optimized probes must cost one batch — at most 2 quiescence
//! waits and 3 cross-CPU synchronizations — not one of each per probe.

use probe_arch_x86_64::live_patch::{CodeWriter, patch_batch};
use probe_arch_x86_64::{INT3, X86_64, jmp_rel32};
use probe_core::arch::{CodeSpace, Detour, MAX_DETOUR, NotOptimizable, Patch};
use probe_core::optimizer::{Armed, Code, Optimizer};
use probe_core::rcu::EpochRcu;
use probe_core::{Error, Result};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// `nopl 0x0(%rax,%rax,1)`: a 5-byte instruction, so a jump covers exactly one.
const NOP5: [u8; 5] = [0x0F, 0x1F, 0x44, 0x00, 0x00];
const TEXT: u64 = 0x40_0000;
const TRAMPOLINES: u64 = 0x50_0000;

/// An x86 text of `NOP5`s whose embedder counts syncs, quiescence waits and batches.
struct Counting {
    original: Vec<u8>,
    code: Mutex<Vec<u8>>,
    next_trampoline: AtomicU64,
    syncs: AtomicU64,
    quiesces: AtomicU64,
    batches: AtomicU64,
}

impl Counting {
    fn new(n: usize) -> Self {
        let original: Vec<u8> = NOP5.iter().copied().cycle().take(5 * n).collect();
        Self {
            code: Mutex::new(original.clone()),
            original,
            next_trampoline: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            quiesces: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }
    fn index(&self, addr: u64, n: usize) -> Result<usize> {
        let i = addr.checked_sub(TEXT).ok_or(Error::OffsetOutOfRange)? as usize;
        if i + n > self.original.len() {
            return Err(Error::OffsetOutOfRange);
        }
        Ok(i)
    }
    fn counts(&self) -> [u64; 3] {
        [
            self.syncs.load(Relaxed),
            self.quiesces.load(Relaxed),
            self.batches.load(Relaxed),
        ]
    }
}

impl CodeWriter for Counting {
    fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        let i = (addr - TEXT) as usize;
        self.code.lock().unwrap()[i..i + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
    fn sync_cores(&self) {
        self.syncs.fetch_add(1, Relaxed);
    }
}

impl CodeSpace for Counting {
    type Arch = X86_64;
    fn read_original(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let i = self.index(addr, buf.len())?;
        buf.copy_from_slice(&self.original[i..i + buf.len()]);
        Ok(())
    }
    fn check_boundary(&self, addr: u64) -> Result<()> {
        let i = self.index(addr, 1)?;
        if i % 5 != 0 {
            return Err(Error::InsideInstruction);
        }
        Ok(())
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let i = self.index(addr, buf.len())?;
        buf.copy_from_slice(&self.code.lock().unwrap()[i..i + buf.len()]);
        Ok(())
    }
    fn prepare_detour(&self, addr: u64) -> std::result::Result<Detour, NotOptimizable> {
        let t = TRAMPOLINES + 64 * self.next_trampoline.fetch_add(1, Relaxed);
        let j = jmp_rel32(addr, t).ok_or(NotOptimizable::OutOfReach)?;
        let mut jump = [INT3; MAX_DETOUR];
        jump[..5].copy_from_slice(&j);
        Ok(Detour {
            len: 5,
            jump,
            trampoline: t,
            displaced: t + 32,
        })
    }
    fn free_detour(&self, _: &Detour) {}
    fn patch(&self, batch: &[Patch]) -> Result<()> {
        self.batches.fetch_add(1, Relaxed);
        patch_batch(self, batch).map(|_| ())
    }
    fn quiesce(&self) {
        self.quiesces.fetch_add(1, Relaxed);
    }
}

#[test]
fn unregistering_10k_optimized_probes_costs_one_batch() {
    let n = 10_000u64;
    let opt: Optimizer<Counting, EpochRcu> =
        Optimizer::new(Counting::new(n as usize), EpochRcu::new());
    let c0 = opt.space().counts();
    for i in 0..n {
        assert_eq!(opt.register(TEXT + 5 * i).unwrap(), Armed::Optimizing);
    }
    let c1 = opt.space().counts();
    opt.wait_for_optimizer();
    let c2 = opt.space().counts();
    let s2 = opt.stats();
    assert_eq!(opt.state(TEXT).unwrap().code, Code::Jump);
    assert_eq!(
        opt.space().code.lock().unwrap()[..5],
        jmp_rel32(TEXT, TRAMPOLINES).unwrap()
    );
    for i in 0..n {
        opt.unregister(TEXT + 5 * i).unwrap();
    }
    let c3 = opt.space().counts();
    opt.wait_for_optimizer();
    let c4 = opt.space().counts();
    let s4 = opt.stats();
    let d = |a: [u64; 3], b: [u64; 3]| [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
    let (reg, optz, unreg_calls, unreg_run) = (d(c0, c1), d(c1, c2), d(c2, c3), d(c3, c4));
    println!("{n} probes, x86 int3-first live patch, counting embedder:");
    println!(
        "  register (breakpoints, immediate):   {:>6} syncs  {:>2} quiescence waits  {:>6} batches",
        reg[0], reg[1], reg[2]
    );
    println!(
        "  optimizer run (breakpoint → jump):   {:>6} syncs  {:>2} quiescence waits  {:>6} batches  (+{} RCU grace period)",
        optz[0],
        optz[1],
        optz[2],
        s2.waits - optz[1]
    );
    println!(
        "  unregister calls (queued):           {:>6} syncs  {:>2} quiescence waits  {:>6} batches",
        unreg_calls[0], unreg_calls[1], unreg_calls[2]
    );
    println!(
        "  optimizer run (jump → original):     {:>6} syncs  {:>2} quiescence waits  {:>6} batches  (+{} RCU grace period)",
        unreg_run[0],
        unreg_run[1],
        unreg_run[2],
        (s4.waits - s2.waits) - unreg_run[1]
    );
    // Unregistering: nothing per probe; one run of one batch.
    assert_eq!(unreg_calls, [0, 0, 0]);
    assert_eq!(unreg_run[2], 1, "one live-patch batch");
    assert!(unreg_run[0] <= 3, "{} syncs", unreg_run[0]);
    assert!(s4.waits - s2.waits <= 2, "{} waits", s4.waits - s2.waits);
    assert_eq!(s4.runs - s2.runs, 1);
    // Optimizing them was one batch too (the breakpoints were already in: two syncs).
    assert_eq!((optz[0], optz[2]), (2, 1));
    assert_eq!(*opt.space().code.lock().unwrap(), opt.space().original);
    assert!(opt.is_empty());
}

/// The alternative the batching exists to beat, counted in the same way: one optimizer run per
/// unregistration (what an eager design does) costs a live patch and two waits per probe.
#[test]
fn one_run_per_probe_costs_per_probe() {
    let n = 1_000u64;
    let opt: Optimizer<Counting, EpochRcu> =
        Optimizer::new(Counting::new(n as usize), EpochRcu::new());
    for i in 0..n {
        opt.register(TEXT + 5 * i).unwrap();
    }
    opt.wait_for_optimizer();
    let (c0, s0) = (opt.space().counts(), opt.stats());
    for i in 0..n {
        opt.unregister(TEXT + 5 * i).unwrap();
        opt.run_optimizer();
    }
    let (c1, s1) = (opt.space().counts(), opt.stats());
    let (syncs, waits) = (c1[0] - c0[0], s1.waits - s0.waits);
    println!(
        "unregister {n} optimized probes, one run each: {syncs} syncs, {waits} waits \
         ({}× and {}× the batched run's 3 and 2)",
        syncs / 3,
        waits / 2
    );
    assert_eq!(syncs, 3 * n);
    assert_eq!(waits, 2 * n);
    assert!(opt.is_empty());
}

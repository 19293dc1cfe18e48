//! Changing code other CPUs may be executing, within what the Arm ARM defines.
//!
//! The Arm ARM (B2.2.5, "Concurrent modification and execution of instructions") defines what a
//! CPU executes while another writes its instruction only when **both** the old and the new
//! instruction are one of `B`, `BL`, `NOP`, `BRK`, `SVC`, `HVC`, `SMC` (the "CMODX-safe" set;
//! `BKPT` is AArch32's `BRK`), and the write is a single aligned 32-bit store: then the CPU
//! executes either the old or the new instruction. Any other change — `add` into `b`, one
//! instruction into two — is unpredictable unless no other CPU can be executing the code: the
//! embedder must stop them (Linux's `stop_machine()`, a hypervisor pausing every vCPU).
//!
//! The API makes that rule a type. [`plan`] checks a change and returns either a
//! [`PatchPlan::Concurrent`] patch, which any thread may apply with a single store, or a
//! [`PatchPlan::Stopped`] patch, which can only be applied with a [`Stopped`] token — and the
//! only way to hold one is inside [`StopMachine::stop_machine`], an `unsafe` trait whose
//! implementor promises every other CPU is parked. Applying an unsafe change by accident does not
//! compile.
//!
//! Either way, after the store: cache maintenance for the word ([`crate::cache`]) and the
//! embedder's context synchronization of the other CPUs ([`WordWriter::sync_cores`]), so none
//! keeps executing a stale copy from its pipeline.
//!
//! Probe-core's own patches are all concurrent: arming a probe writes `BRK` over an instruction
//! — which is *not* in the set when the original is, say, `add` — so arming needs the stop path
//! unless the original is itself a branch or `NOP`. kprobes on arm64 does exactly that
//! (`aarch64_insn_patch_text` uses `stop_machine` unless both words are in the set).

use crate::insn::is_brk;

/// Is `insn` one of the instructions the Arm ARM allows to be concurrently modified and
/// executed: `B`, `BL`, `NOP`, `BRK`, `SVC`, `HVC`, `SMC`?
pub fn concurrent_modification_safe(insn: u32) -> bool {
    let branch = insn & 0x7C00_0000 == 0x1400_0000; // B, BL
    let svc_hvc_smc = insn & 0xFFE0_001C == 0xD400_0000 && insn & 3 != 0;
    insn == crate::NOP || branch || is_brk(insn) || svc_hvc_smc
}

/// Why a change cannot be planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PatchError {
    /// The address is not 4-byte aligned (a single-copy-atomic 32-bit store needs alignment).
    Misaligned,
    /// The code at the address does not hold the `old` word the change was planned from.
    Changed,
}

impl core::fmt::Display for PatchError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Misaligned => "instruction address is not 4-byte aligned",
            Self::Changed => "the code no longer holds the instruction the patch replaces",
        })
    }
}

/// One word to change: at `addr`, `old` → `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Change {
    addr: u64,
    old: u32,
    new: u32,
}

/// A change any thread may make while other CPUs execute the code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a plan does nothing until applied"]
pub struct ConcurrentPatch(Change);

/// A change that is only defined while every other CPU is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a plan does nothing until applied"]
pub struct StoppedPatch(Change);

/// How a change may be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchPlan {
    /// Both words are in the concurrent-modification-safe set.
    Concurrent(ConcurrentPatch),
    /// At least one is not: stop the other CPUs.
    Stopped(StoppedPatch),
}

/// Plans changing the instruction at `addr` from `old` to `new`.
///
/// ```
/// use probe_arch_aarch64::patch::{plan, PatchPlan};
/// use probe_arch_aarch64::{b, BREAKPOINT, NOP};
/// // NOP ↔ BRK, NOP ↔ B: a single store is enough.
/// assert!(matches!(plan(0x1000, NOP, BREAKPOINT), Ok(PatchPlan::Concurrent(_))));
/// assert!(matches!(plan(0x1000, NOP, b(0x1000, 0x2000).unwrap()), Ok(PatchPlan::Concurrent(_))));
/// // add x0, x1, x2 → BRK: every other CPU must be stopped.
/// assert!(matches!(plan(0x1000, 0x8B02_0020, BREAKPOINT), Ok(PatchPlan::Stopped(_))));
/// ```
pub fn plan(addr: u64, old: u32, new: u32) -> Result<PatchPlan, PatchError> {
    if !addr.is_multiple_of(4) {
        return Err(PatchError::Misaligned);
    }
    let c = Change { addr, old, new };
    Ok(
        if concurrent_modification_safe(old) && concurrent_modification_safe(new) {
            PatchPlan::Concurrent(ConcurrentPatch(c))
        } else {
            PatchPlan::Stopped(StoppedPatch(c))
        },
    )
}

/// The embedder's access to code.
pub trait WordWriter {
    /// Reads the instruction word at `addr`.
    fn read_word(&self, addr: u64) -> u32;
    /// Stores `word` at `addr` (4-byte aligned) with a single 32-bit store (an `AtomicU32`
    /// store, `STR Wt`): never split into smaller stores.
    fn write_word(&self, addr: u64, word: u32);
    /// Cache maintenance for `[addr, addr + len)` on this CPU
    /// (`CacheGeometry::sync_icache` from [`crate::cache`] on aarch64).
    fn flush(&self, addr: u64, len: usize);
    /// Context-synchronizes every other CPU that may execute the code (an IPI that runs `ISB`;
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` in a process).
    fn sync_cores(&self);
}

fn store<W: WordWriter + ?Sized>(w: &W, c: Change) -> Result<(), PatchError> {
    if w.read_word(c.addr) != c.old {
        return Err(PatchError::Changed);
    }
    w.write_word(c.addr, c.new);
    w.flush(c.addr, 4);
    Ok(())
}

impl ConcurrentPatch {
    /// Makes the change with a single store while other CPUs run, then synchronizes them.
    pub fn apply<W: WordWriter + ?Sized>(self, w: &W) -> Result<(), PatchError> {
        store(w, self.0)?;
        w.sync_cores();
        Ok(())
    }
}

impl StoppedPatch {
    /// Makes the change while every other CPU is stopped (proved by `stopped`). The other CPUs
    /// context-synchronize when they resume (the stop-machine hook's exit path runs `ISB`).
    pub fn apply<W: WordWriter + ?Sized>(
        self,
        _stopped: &Stopped<'_>,
        w: &W,
    ) -> Result<(), PatchError> {
        store(w, self.0)
    }
}

/// Proof that every other CPU is stopped: only [`StopMachine::stop_machine`] hands one out.
#[derive(Debug)]
pub struct Stopped<'a> {
    _scope: core::marker::PhantomData<&'a mut ()>,
}

impl Stopped<'_> {
    /// # Safety
    ///
    /// Every other CPU that may execute the code being patched must be stopped (parked outside
    /// it, with interrupts off) for the token's whole lifetime, and must execute a context
    /// synchronization event (`ISB`, an exception return) before it runs code again.
    pub unsafe fn new() -> Self {
        Self {
            _scope: core::marker::PhantomData,
        }
    }
}

/// The embedder's stop-all-CPUs hook (Linux: `stop_machine`; a hypervisor: pause every vCPU).
///
/// # Safety
///
/// `stop_machine` must call `f` exactly once, with every other CPU stopped as [`Stopped::new`]
/// requires, and resume them only after `f` returns.
pub unsafe trait StopMachine {
    /// Runs `f` with every other CPU stopped.
    fn stop_machine(&self, f: &mut dyn FnMut(&Stopped<'_>));
}

/// Applies `plan`: a concurrent patch directly, a stopped one inside `stop`.
pub fn apply<W: WordWriter + ?Sized, S: StopMachine + ?Sized>(
    plan: PatchPlan,
    w: &W,
    stop: &S,
) -> Result<(), PatchError> {
    match plan {
        PatchPlan::Concurrent(p) => p.apply(w),
        PatchPlan::Stopped(p) => {
            let mut result = Err(PatchError::Changed);
            stop.stop_machine(&mut |s| result = p.apply(s, w));
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BREAKPOINT, NOP, b, bl, brk};
    use core::cell::{Cell, RefCell};

    #[test]
    fn the_concurrent_set() {
        for w in [
            NOP,
            BREAKPOINT,
            brk(0),
            b(0, 0x100).unwrap(),
            bl(0, 0x100).unwrap(),
            0xD400_0001, // svc #0
            0xD400_0002, // hvc #0
            0xD400_0003, // smc #0
        ] {
            assert!(concurrent_modification_safe(w), "{w:#010x}");
        }
        for w in [
            0x8B02_0020, // add
            0xD440_0000, // hlt
            0x5400_0040, // b.eq
            0xD65F_03C0, // ret
            0xD503_203F, // yield (a hint, but not NOP)
            0x3400_010A, // cbz
        ] {
            assert!(!concurrent_modification_safe(w), "{w:#010x}");
        }
        assert_eq!(plan(0x1002, NOP, BREAKPOINT), Err(PatchError::Misaligned));
    }

    struct Mem {
        words: RefCell<[u32; 4]>,
        flushes: Cell<u32>,
        syncs: Cell<u32>,
    }
    impl WordWriter for Mem {
        fn read_word(&self, addr: u64) -> u32 {
            self.words.borrow()[addr as usize / 4]
        }
        fn write_word(&self, addr: u64, word: u32) {
            self.words.borrow_mut()[addr as usize / 4] = word;
        }
        fn flush(&self, _: u64, _: usize) {
            self.flushes.set(self.flushes.get() + 1);
        }
        fn sync_cores(&self) {
            self.syncs.set(self.syncs.get() + 1);
        }
    }
    struct Stop(Cell<u32>);
    // SAFETY: a single-threaded test: there are no other CPUs.
    unsafe impl StopMachine for Stop {
        fn stop_machine(&self, f: &mut dyn FnMut(&Stopped<'_>)) {
            self.0.set(self.0.get() + 1);
            // SAFETY: no other thread exists in this test.
            f(&unsafe { Stopped::new() });
        }
    }

    #[test]
    fn each_plan_takes_its_path() {
        let m = Mem {
            words: RefCell::new([NOP, 0x8B02_0020, NOP, NOP]),
            flushes: Cell::new(0),
            syncs: Cell::new(0),
        };
        let stop = Stop(Cell::new(0));
        apply(plan(0, NOP, BREAKPOINT).unwrap(), &m, &stop).unwrap();
        assert_eq!((stop.0.get(), m.syncs.get(), m.flushes.get()), (0, 1, 1));
        apply(plan(4, 0x8B02_0020, BREAKPOINT).unwrap(), &m, &stop).unwrap();
        assert_eq!((stop.0.get(), m.syncs.get(), m.flushes.get()), (1, 1, 2));
        assert_eq!(*m.words.borrow(), [BREAKPOINT, BREAKPOINT, NOP, NOP]);
        // A stale plan is refused, not applied.
        assert_eq!(
            apply(plan(8, BREAKPOINT, NOP).unwrap(), &m, &stop),
            Err(PatchError::Changed)
        );
        assert_eq!(
            apply(plan(8, 0x8B02_0020, NOP).unwrap(), &m, &stop),
            Err(PatchError::Changed)
        );
    }
}

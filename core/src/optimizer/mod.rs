//! Delayed (un)optimization batching: breakpoints become jumps, and jumps become breakpoints
//! again, in batches — the kprobes optimizer (seed 002) with its later fixes.
//!
//! # The algorithm
//!
//! A probe starts as a breakpoint: every hit traps (about a microsecond). Where the arch allows
//! it, the instructions at the probe can be replaced by a jump to a *trampoline* that calls the
//! consumers, runs the displaced instructions and jumps back — tens of nanoseconds per hit.
//! Rewriting several bytes of code that other CPUs may be executing is expensive: the bytes go
//! through the arch's live-patch protocol (x86: int3 first, three cross-CPU synchronizations),
//! and before the new jump may cover bytes a CPU could still be *between* (stopped after the
//! first displaced instruction, say), every CPU must have passed through a quiescent state. So
//! probe-core never changes one probe at a time: it queues, and a delayed run handles whole
//! lists with one wait.
//!
//! One run of the optimizer ([`Optimizer::run_optimizer`]), under the optimizer's lock:
//!
//! 1. **Unoptimize** the whole unoptimizing list in one live-patch batch (jump → breakpoint, or
//!    → original bytes when the probe is disabled). Only then is each probe's *optimized* flag
//!    cleared (Linux 2019, "Set unoptimized flag after unoptimizing code": a hit that traps
//!    while the tail is still the jump's must continue through the trampoline, not step one
//!    instruction and land inside the jump). Probes that became unused leave the table and join
//!    the freeing list — together with the ones a collision force-unoptimized earlier (Linux
//!    2023, "Fix to handle forcibly unoptimized kprobes on freeing_list": that list is processed
//!    even when the unoptimizing list is empty). A probe that a now-disarmed neighbour was
//!    blocking is queued for optimization again (Linux 2026, "retry blocked optprobe in
//!    do_free_cleaned_kprobes": otherwise it stays a breakpoint forever).
//! 2. **Wait** for quiescence: a grace period of the optimizer's RCU domain (no hit is still
//!    looking at a removed probe) and the embedder's [`CodeSpace::quiesce`] (no CPU is still
//!    inside replaced bytes or a cut-off trampoline).
//! 3. **Optimize** the whole optimizing list in one live-patch batch (breakpoint → jump). After
//!    the wait, so no CPU can be stopped between instructions the jump now covers.
//! 4. **Free** what step 1 collected: trampolines and probes. After the wait, never before.
//!
//! A change of state *kicks* the optimizer ([`CodeSpace::kick`]: the embedder's delayed timer);
//! [`Optimizer::wait_for_optimizer`] runs it until both lists are empty.
//!
//! # States (the kprobes meanings)
//!
//! * **enabled / disabled** — whether hits run consumers and the probe wants to be in the code.
//! * **optimized** — the trampoline is how a hit continues: set when the probe is queued for
//!   optimization (its trampoline is ready), cleared only once its original bytes are back.
//! * **queued** — on the optimizing or the unoptimizing list.
//! * **unused** — disabled with no users: waiting to be freed. Registering again at its address
//!   *revives* it (kprobes' `reuse_unused_kprobe`): it is enabled where it stands — its jump
//!   kept if it is still in the code, its breakpoint put back otherwise — instead of failing
//!   until the optimizer has freed it.
//! * **disarmed** — disabled and not queued: none of its bytes is in the code, none is coming.
//!
//! Rules: optimizing a probe queued for unoptimization only dequeues it (its jump is still
//! there); unoptimizing a probe queued for optimization only dequeues it (its jump never was);
//! force-unoptimizing rewrites the code now. A probe armed inside another's jump range forces that
//! one back to a breakpoint; a probe whose range holds an armed probe is *blocked* until that
//! probe is disarmed. Disarming and re-arming everything go through the same queues.
//!
//! # The hit path
//!
//! Lock-free and store-free, like every hit path in probe-core: [`Optimizer::on_breakpoint`] (a
//! trap at a probe address) and [`Optimizer::on_trampoline`] (the trampoline's call) look the
//! probe up in a copy-on-write tree under an RCU guard and read one flag word.
//!
//! # Example
//!
//! ```
//! use probe_core::optimizer::{Armed, Optimizer};
//! use probe_core::rcu::EpochRcu;
//! use probe_core::testing::ByteCode;
//!
//! // 64 one-byte instructions; jumps cover 5 bytes.
//! let code: ByteCode = ByteCode::new(vec![0x90; 64], 5);
//! let opt: Optimizer<_, _> = Optimizer::new(code, EpochRcu::new());
//! assert_eq!(opt.register(16).unwrap(), Armed::Optimizing);
//! assert_eq!(opt.space().current(16, 1), [0xCC]); // a breakpoint at once
//! opt.wait_for_optimizer();
//! assert_eq!(opt.space().current(16, 1), [0xE9]); // a jump after one batch
//! opt.unregister(16).unwrap();
//! opt.wait_for_optimizer();
//! assert_eq!(opt.space().current(16, 5), [0x90; 5]); // the original bytes
//! assert!(opt.is_empty());
//! ```
//!
//! # Invariants
//!
//! * INVARIANT: a site's writer state (`Site::w`), the queues and the table's writer side are
//!   read and written only under `Optimizer::lock`.
//! * INVARIANT: a site is on at most one queue, at index `pos`; every queue and the patch scratch
//!   have capacity for every live site (reserved when the site was created), so a run never
//!   allocates except for the table's copy-on-write nodes, whose failure it survives.
//! * INVARIANT: the hit-visible `DETOUR` flag is set whenever the site's jump may be in the code
//!   (optimized, or queued for unoptimization), and the site's trampoline stays allocated until a
//!   quiescence wait after the flag was cleared and the site left the table.
//! * INVARIANT: a site is freed only after it left the table and a grace period and a quiescence
//!   wait passed (step 4), or — never optimizable, so never in a trampoline — after it left the
//!   table and a grace period passed.

mod code;
mod collision;
mod hit;
mod lifecycle;
mod queues;
mod state;
#[cfg(all(test, not(loom)))]
mod tests;

use crate::arch::{CodeSpace, MAX_DETOUR, Patch};
use crate::error::{Error, Result};
use crate::lock::{RawGuard, RawLock, SpinLock};
use crate::rcu::Rcu;
use crate::sync::{UnsafeCell, quarantine};
use crate::tree::CowTree;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use state::{Site, SiteW};

pub use hit::{Then, Trap};
pub use state::{Armed, Code, ProbeState, Queue};

/// Counts of what the optimizer did (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Optimizer runs.
    pub runs: u64,
    /// Quiescence waits: RCU grace periods plus [`CodeSpace::quiesce`] calls.
    pub waits: u64,
    /// Calls to [`CodeSpace::patch`].
    pub batches: u64,
    /// Sites patched, over all batches.
    pub patched: u64,
    /// Probes turned into jumps.
    pub optimized: u64,
    /// Probes turned back from jumps (batched or forced).
    pub unoptimized: u64,
    /// Probes freed.
    pub freed: u64,
    /// Unused probes registered again before they were freed, and enabled where they stood
    /// (kprobes' `reuse_unused_kprobe`).
    pub revived: u64,
    /// Calls to [`CodeSpace::patch`] that failed (and changed nothing).
    pub failed_patches: u64,
}

/// Under the lock: the three lists, the patch scratch, global state.
struct Inner {
    queues: [Vec<*const Site>; 3],
    scratch: Vec<Patch>,
    /// Sites allocated and not yet freed (the capacity every list keeps).
    sites: usize,
    all_disarmed: bool,
    kicked: bool,
    stats: Stats,
}

/// The optimizer of one code space. See the [module docs](self).
///
/// `S` is the embedder's code space, `R` the RCU domain hits read under, `L` the lock every
/// writer and the optimizer run take (held across the quiescence wait: in a kernel, a sleeping
/// mutex).
pub struct Optimizer<S: CodeSpace, R: Rcu, L: RawLock = SpinLock> {
    table: CowTree<u64, Site>,
    rcu: R,
    space: S,
    lock: L,
    inner: UnsafeCell<Inner>,
}

// SAFETY: sites are shared with hits through the table (atomics and immutable fields); every
// other shared mutation happens under `lock`.
unsafe impl<S: CodeSpace, R: Rcu, L: RawLock + Send> Send for Optimizer<S, R, L> {}
// SAFETY: as above.
unsafe impl<S: CodeSpace, R: Rcu, L: RawLock + Sync> Sync for Optimizer<S, R, L> {}

impl<S: CodeSpace + fmt::Debug, R: Rcu, L: RawLock> fmt::Debug for Optimizer<S, R, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Optimizer")
            .field("probes", &self.table.len())
            .field("space", &self.space)
            .finish_non_exhaustive()
    }
}

impl<S: CodeSpace, R: Rcu, L: RawLock + Default> Optimizer<S, R, L> {
    /// An optimizer over `space`, with hits reading under `rcu`.
    pub fn new(space: S, rcu: R) -> Self {
        Self::with_lock(space, rcu, L::default())
    }
}

impl<S: CodeSpace, R: Rcu, L: RawLock> Optimizer<S, R, L> {
    /// [`Optimizer::new`] with the embedder's initialized lock (a kernel's mutex with its lock
    /// class). The lock is held across [`CodeSpace::quiesce`] and [`Rcu::synchronize`]: it may
    /// sleep, and no hit path ever takes it.
    pub fn with_lock(space: S, rcu: R, lock: L) -> Self {
        Self {
            table: CowTree::new(),
            rcu,
            space,
            lock,
            inner: UnsafeCell::new(Inner {
                queues: [Vec::new(), Vec::new(), Vec::new()],
                scratch: Vec::new(),
                sites: 0,
                all_disarmed: false,
                kicked: false,
                stats: Stats::default(),
            }),
        }
    }
}

impl<S: CodeSpace, R: Rcu, L: RawLock> Optimizer<S, R, L> {
    /// The code space.
    pub fn space(&self) -> &S {
        &self.space
    }

    /// The RCU domain hits read under.
    pub fn rcu(&self) -> &R {
        &self.rcu
    }

    /// Probes in the table (unused ones still waiting for a run included).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// No probe in the table.
    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
    }

    fn locked(&self) -> Locked<'_, S, R, L> {
        Locked {
            opt: self,
            _g: RawGuard::lock(&self.lock),
        }
    }

    // ---------------------------------------------------------------- writers

    /// Registers a user of a probe at `addr`: the first user creates it (a breakpoint at once,
    /// queued for optimization if the arch allows), later ones share it.
    ///
    /// A probe at `addr` that is unused but not yet freed is revived (see the module docs'
    /// states): the answer is what arming it did.
    ///
    /// Errors: [`Error::ExistingTrap`] if the instruction
    /// there already is a trap; [`Error::InsideInstruction`] if `addr` is not an instruction's
    /// first byte; [`Error::OffsetOutOfRange`] outside the text;
    /// [`Error::NoMemory`]. On error nothing changed.
    pub fn register(&self, addr: u64) -> Result<Armed> {
        let mut l = self.locked();
        l.register(addr)
    }

    /// Drops a user of the probe at `addr`; the last one disables it and sends it on its way to
    /// be freed (at once if it was never optimizable, else through the optimizer's lists).
    ///
    /// Errors: [`Error::UnknownProbe`] if no probe with users is there.
    pub fn unregister(&self, addr: u64) -> Result<()> {
        self.locked().unregister(addr)
    }

    /// Disables the probe at `addr`: hits stop running consumers at once; its code goes back to
    /// the original through the queues. Disabling a disabled probe does nothing.
    pub fn disable(&self, addr: u64) -> Result<()> {
        self.locked().set_enabled(addr, false)
    }

    /// Enables the probe at `addr` again (a breakpoint at once, queued for optimization).
    pub fn enable(&self, addr: u64) -> Result<()> {
        self.locked().set_enabled(addr, true)
    }

    /// Pins the probe at `addr` to a breakpoint (`true`: a consumer needs single-step semantics;
    /// the probe is force-unoptimized now) or releases the pin (`false`: it may be optimized
    /// again).
    pub fn set_single_step(&self, addr: u64, on: bool) -> Result<()> {
        self.locked().set_single_step(addr, on)
    }

    /// Takes every probe out of the code, through the same queues, and waits for the optimizer.
    /// Probes registered meanwhile stay out until [`Optimizer::arm_all`].
    pub fn disarm_all(&self) {
        self.locked().disarm_all();
        self.wait_for_optimizer();
    }

    /// Puts every enabled probe back (breakpoints at once, queued for optimization).
    pub fn arm_all(&self) {
        self.locked().arm_all();
    }

    /// One optimizer run: the four steps of the [module docs](self).
    pub fn run_optimizer(&self) {
        self.locked().run();
    }

    /// Runs the optimizer until both lists (and the freeing list) are empty — or until a run
    /// makes no progress (a probe whose table removal keeps failing for lack of memory stays on
    /// the freeing list for a later run; waiting would never end).
    pub fn wait_for_optimizer(&self) {
        loop {
            let mut l = self.locked();
            let before = l.pending();
            if before == 0 {
                return;
            }
            l.run();
            if l.pending() >= before {
                return;
            }
        }
    }

    /// The state of the probe at `addr`.
    pub fn state(&self, addr: u64) -> Result<ProbeState> {
        let l = self.locked();
        let s = l.site(addr).ok_or(Error::UnknownProbe)?;
        // SAFETY: locked.
        let w = unsafe { s.w() };
        Ok(ProbeState {
            users: w.users,
            enabled: w.enabled,
            optimized: w.optimized,
            queue: w.queue,
            code: w.code,
            not_optimizable: s.detour.err(),
            single_step: w.single_step,
            jump_len: s.detour.as_ref().map_or(0, |d| d.len),
        })
    }

    /// What the code at `addr` must hold according to the probe's state: writes it to `out`
    /// and returns its length (the whole jump range while optimized, else the breakpoint's
    /// bytes). For tests and audits: compare it with the code.
    pub fn expected_code(&self, addr: u64, out: &mut [u8; MAX_DETOUR]) -> Result<usize> {
        let l = self.locked();
        let s = l.site(addr).ok_or(Error::UnknownProbe)?;
        // SAFETY: locked.
        let code = unsafe { s.w() }.code;
        let n = Locked::<S, R, L>::width(s, code, code);
        Locked::<S, R, L>::bytes_for(s, code, n, out);
        Ok(n)
    }

    /// Counts of what the optimizer did.
    pub fn stats(&self) -> Stats {
        let l = self.locked();
        // SAFETY: locked.
        l.opt.inner.with(|i| unsafe { (*i).stats })
    }
}

impl<S: CodeSpace, R: Rcu, L: RawLock> Drop for Optimizer<S, R, L> {
    fn drop(&mut self) {
        // `&mut self`: no hit, no writer. Free every site: those in the table, and those only on
        // the freeing list (already out of the table). Detours are the embedder's to reclaim with
        // the code space; freeing them needs no wait now.
        let mut doomed: Vec<*const Site> = Vec::new();
        // SAFETY: exclusive access; each site is in the table at most once.
        unsafe {
            self.table.for_each(|_, p| {
                doomed.push(p);
                true
            })
        };
        self.inner.with_mut(|i| {
            // SAFETY: exclusive access.
            let inner = unsafe { &mut *i };
            for &p in &inner.queues[2] {
                // SAFETY: a live site on the freeing list.
                if !unsafe { (*p).w() }.hashed {
                    doomed.push(p);
                }
            }
        });
        for p in doomed {
            // SAFETY: unreachable now; boxed by `register`; collected once (table or list).
            let b = unsafe { Box::from_raw(p as *mut Site) };
            if let Ok(d) = &b.detour {
                self.space.free_detour(d);
            }
            b.free_check.mark_freed();
            quarantine(b);
        }
    }
}

/// The optimizer with its lock held: every writer-side operation.
struct Locked<'a, S: CodeSpace, R: Rcu, L: RawLock> {
    opt: &'a Optimizer<S, R, L>,
    _g: RawGuard<'a, L>,
}

impl<S: CodeSpace, R: Rcu, L: RawLock> Locked<'_, S, R, L> {
    fn with_inner<T>(&mut self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // SAFETY: the lock is held (INVARIANT); `&mut self` keeps this the only borrow.
        self.opt.inner.with_mut(|i| f(unsafe { &mut *i }))
    }

    fn site(&self, addr: u64) -> Option<&Site> {
        // SAFETY: the lock is held: the writer side of the table; a hashed site is live.
        let p = unsafe { self.opt.table.get_locked(&addr) }?;
        // SAFETY: as above.
        Some(unsafe { &*p })
    }

    /// The probe at `addr` with its writer state, if it has users ([`Error::UnknownProbe`] if
    /// there is none, or only an unused one waiting to be freed).
    fn registered<'s>(&self, addr: u64) -> Result<(&'s Site, SiteW)> {
        let p = self.site(addr).ok_or(Error::UnknownProbe)? as *const Site;
        // SAFETY: hashed, live; freed only under this lock, by this thread, and never while a
        // caller still uses the reference (frees happen in runs and retirements it calls last).
        let s = unsafe { &*p };
        // SAFETY: locked.
        let w = unsafe { s.w() };
        if w.users == 0 {
            return Err(Error::UnknownProbe);
        }
        Ok((s, w))
    }

    fn idle(&mut self) -> bool {
        self.pending() == 0
    }

    /// Probes on any list.
    fn pending(&mut self) -> usize {
        self.with_inner(|i| i.queues.iter().map(Vec::len).sum())
    }

    fn kick(&mut self) {
        let first = self.with_inner(|i| !core::mem::replace(&mut i.kicked, true));
        if first {
            self.opt.space.kick();
        }
    }
}

struct SendSite(*const Site);
// SAFETY: the site is unreachable when the deferred free runs; freeing it from any thread is fine.
unsafe impl Send for SendSite {}

/// Frees a site.
///
/// # Safety
///
/// `p` was boxed by `register` and nothing can reach it any more.
unsafe fn free_site(p: *const Site) {
    // SAFETY: the caller's contract.
    let b = unsafe { Box::from_raw(p as *mut Site) };
    b.free_check.mark_freed();
    quarantine(b);
}

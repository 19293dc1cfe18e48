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

use crate::alloc_util::try_box;
use crate::arch::{Arch, CodeSpace, Detour, MAX_BREAKPOINT, MAX_DETOUR, NotOptimizable, Patch};
use crate::error::{Error, Result};
use crate::lock::{RawGuard, RawLock, SpinLock};
use crate::rcu::{Deferred, Rcu};
use crate::sync::{AtomicU32, FreeCheck, Ordering, UnsafeCell, quarantine};
use crate::tree::CowTree;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

/// Hit-visible flag: hits run the consumers (the probe is enabled).
const FIRE: u32 = 1;
/// Hit-visible flag: "optimized" in the kprobes sense — continue through the trampoline.
const DETOUR: u32 = 2;

/// What the code at a probe holds (writer-side bookkeeping, exact under the lock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// The original instructions.
    Original,
    /// The breakpoint over the first instruction.
    Breakpoint,
    /// The jump to the trampoline over the whole detour range.
    Jump,
}

/// Which list a probe is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    /// None.
    None,
    /// Waiting for the next run to turn its breakpoint into a jump.
    Optimizing,
    /// Waiting for the next run to turn its jump back into a breakpoint (or the original).
    Unoptimizing,
    /// Unoptimized and unused: freed by the next run after its quiescence wait.
    Freeing,
}

impl Queue {
    fn index(self) -> Option<usize> {
        match self {
            Queue::None => None,
            Queue::Optimizing => Some(0),
            Queue::Unoptimizing => Some(1),
            Queue::Freeing => Some(2),
        }
    }
}

/// What registration did to the code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Armed {
    /// A breakpoint now, queued: the next optimizer run turns it into a jump.
    Optimizing,
    /// A breakpoint, and it stays one: the arch analysis says why.
    Breakpoint(NotOptimizable),
    /// A breakpoint for now: an armed probe inside its jump range blocks it. It is retried when
    /// that probe is disarmed.
    Blocked,
    /// A breakpoint that must stay one: a user asked for single-step semantics.
    SingleStep,
    /// Not in the code: everything is disarmed ([`Optimizer::disarm_all`]).
    Disarmed,
    /// Disabled: not in the code until [`Optimizer::enable`].
    Disabled,
    /// Already registered by another user: one more user, nothing changed in the code.
    Shared,
}

/// A snapshot of one probe's state (taken under the optimizer's lock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeState {
    /// Registrations holding it.
    pub users: u32,
    /// Enabled (hits run consumers; it wants to be in the code).
    pub enabled: bool,
    /// Optimized in the kprobes sense (queued for optimization, optimized, or queued for
    /// unoptimization): hits continue through the trampoline.
    pub optimized: bool,
    /// The list it is on.
    pub queue: Queue,
    /// What the code holds.
    pub code: Code,
    /// Why it can never be optimized, if so.
    pub not_optimizable: Option<NotOptimizable>,
    /// Pinned to a breakpoint for single-step semantics.
    pub single_step: bool,
    /// Bytes its jump covers (or would): 0 if it can never be optimized.
    pub jump_len: u8,
}

impl ProbeState {
    /// Queued on the optimizing or the unoptimizing list.
    pub fn queued(&self) -> bool {
        queued(self.queue)
    }
    /// Disabled with no users: waiting to be freed.
    pub fn unused(&self) -> bool {
        unused(self.users, self.enabled)
    }
    /// Disabled and not queued: none of its bytes is in the code, none is coming.
    pub fn disarmed(&self) -> bool {
        disarmed(self.enabled, self.queue)
    }
}

/// Queued on the optimizing or the unoptimizing list.
fn queued(q: Queue) -> bool {
    matches!(q, Queue::Optimizing | Queue::Unoptimizing)
}

/// Disabled with no users (kprobes' `kprobe_unused`).
fn unused(users: u32, enabled: bool) -> bool {
    users == 0 && !enabled
}

/// Disabled and not queued (kprobes' `kprobe_disarmed`).
fn disarmed(enabled: bool, q: Queue) -> bool {
    !enabled && !queued(q)
}

/// How a hit continues after a trap at a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then<'g> {
    /// Execute the original first instruction out of line (or emulate it), then continue after it.
    Step,
    /// Continue at the trampoline's displaced-instructions entry ([`Detour::displaced`]); it
    /// returns to `addr + len`. The consumers have already run: do not call them again.
    Detour(&'g Detour),
}

/// The answer to a trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trap<'g> {
    /// Ours. Run the consumers if `fire` (false while the probe is disabled), then continue as
    /// `then` says.
    Probe {
        /// Run the consumers.
        fire: bool,
        /// How to continue.
        then: Then<'g>,
    },
    /// No probe, and a trap instruction is there: the program's own. Deliver it.
    NotOurs,
    /// No probe, and no trap there any more: it was removed while this CPU trapped. Execute the
    /// instruction again.
    Restart,
}

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

/// The writer-side state of one probe site (a copy in and out under the lock).
#[derive(Clone, Copy, Debug)]
struct SiteW {
    users: u32,
    enabled: bool,
    optimized: bool,
    single_step: bool,
    code: Code,
    queue: Queue,
    pos: usize,
    hashed: bool,
}

/// One probe site: what hits read (`flags`, `detour`) first.
#[repr(C, align(64))]
struct Site {
    flags: AtomicU32,
    addr: u64,
    detour: core::result::Result<Detour, NotOptimizable>,
    /// The original bytes of the span the probe may write (`span` bytes).
    original: [u8; MAX_DETOUR],
    span: u8,
    w: UnsafeCell<SiteW>,
    free_check: FreeCheck,
}

impl Site {
    /// The writer state.
    ///
    /// # Safety
    ///
    /// The caller holds the optimizer's lock.
    unsafe fn w(&self) -> SiteW {
        self.free_check.check();
        // SAFETY: the lock serializes every access (INVARIANT at the top of the module).
        self.w.with(|p| unsafe { *p })
    }

    /// # Safety
    ///
    /// As for [`Site::w`].
    unsafe fn set_w(&self, w: SiteW) {
        // SAFETY: as in `w`.
        self.w.with_mut(|p| unsafe { *p = w });
    }

    /// Publishes the hit-visible flags derived from `w`.
    fn publish(&self, w: &SiteW) {
        let f = if w.enabled { FIRE } else { 0 } | if w.optimized { DETOUR } else { 0 };
        // Release pairs with the Acquire load in `on_breakpoint` / `on_trampoline`: a hit that
        // sees DETOUR cleared also sees the original bytes the patch restored before it.
        self.flags.store(f, Ordering::Release);
    }

    fn original(&self, len: usize) -> &[u8] {
        &self.original[..len.min(usize::from(self.span))]
    }
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

    // ---------------------------------------------------------------- the hit path

    /// A CPU trapped at `addr`. Lock-free and store-free.
    ///
    /// ```
    /// use probe_core::optimizer::{Armed, Optimizer, Then, Trap};
    /// use probe_core::rcu::{EpochRcu, Rcu};
    /// use probe_core::testing::ByteCode;
    ///
    /// let code: ByteCode = ByteCode::new(vec![0x90; 64], 5); // 64 one-byte insns, 5-byte jumps
    /// let opt: Optimizer<_, _> = Optimizer::new(code, EpochRcu::new());
    /// assert_eq!(opt.register(16).unwrap(), Armed::Optimizing); // a breakpoint now, a jump later
    /// opt.wait_for_optimizer(); // or the embedder's timer calls run_optimizer()
    ///
    /// let reader = opt.rcu().register().unwrap();
    /// let guard = opt.rcu().read_lock(&reader);
    /// let Trap::Probe { fire, then: Then::Detour(d) } = opt.on_breakpoint(&guard, 16) else {
    ///     panic!("an optimized probe detours")
    /// };
    /// assert!(fire); // run the consumers, then continue at d.displaced
    /// assert_eq!(d.len, 5);
    /// assert_eq!(opt.on_breakpoint(&guard, 17), Trap::Restart); // no probe, no trap there
    /// ```
    #[inline]
    pub fn on_breakpoint<'g>(&'g self, _guard: &'g R::Guard<'_>, addr: u64) -> Trap<'g> {
        if let Some(site) = self.find(addr) {
            // Acquire pairs with the Release store in `Site::publish`.
            let f = site.flags.load(Ordering::Acquire);
            let then = match (&site.detour, f & DETOUR != 0) {
                (Ok(d), true) => Then::Detour(d),
                _ => Then::Step,
            };
            return Trap::Probe {
                fire: f & FIRE != 0,
                then,
            };
        }
        let n = <S::Arch as Arch>::BREAKPOINT.len().min(MAX_BREAKPOINT);
        let mut b = [0u8; MAX_BREAKPOINT];
        match self.space.read(addr, &mut b[..n]) {
            Ok(()) if !<S::Arch as Arch>::is_trap(&b[..n]) => Trap::Restart,
            // A trap is there (or the address is not even code): not one of ours.
            _ => Trap::NotOurs,
        }
    }

    /// A trampoline calls in for the probe at `addr`: run the consumers? (`false` once the probe
    /// is disabled or gone: its trampoline can still be entered until the next quiescence wait.)
    #[inline]
    pub fn on_trampoline(&self, _guard: &R::Guard<'_>, addr: u64) -> bool {
        // Acquire pairs with the Release store in `Site::publish`.
        self.find(addr)
            .is_some_and(|s| s.flags.load(Ordering::Acquire) & FIRE != 0)
    }

    #[inline]
    fn find(&self, addr: u64) -> Option<&Site> {
        // SAFETY: the caller holds a read guard of `self.rcu` (both public callers take one), and
        // a site is freed only after it left the table and a grace period passed (INVARIANT).
        let p = unsafe { self.table.get(&addr) }?;
        // SAFETY: as above.
        let s = unsafe { &*p };
        s.free_check.check();
        Some(s)
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

    // ------------------------------------------------------------ queues

    fn enqueue(&mut self, s: &Site, q: Queue) {
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        if w.queue != Queue::None {
            self.dequeue(s);
            // SAFETY: locked.
            w = unsafe { s.w() };
        }
        let Some(ix) = q.index() else { return };
        w.pos = self.with_inner(|i| {
            let v = &mut i.queues[ix];
            // Never allocates: capacity for every live site (INVARIANT).
            v.push(s as *const Site);
            v.len() - 1
        });
        w.queue = q;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
    }

    fn dequeue(&mut self, s: &Site) {
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        let Some(ix) = w.queue.index() else { return };
        let pos = w.pos;
        let moved = self.with_inner(|i| {
            let v = &mut i.queues[ix];
            v.swap_remove(pos);
            v.get(pos).copied()
        });
        if let Some(m) = moved {
            // SAFETY: a live site on the list; locked.
            let m = unsafe { &*m };
            // SAFETY: locked.
            let mut mw = unsafe { m.w() };
            mw.pos = pos;
            // SAFETY: locked.
            unsafe { m.set_w(mw) };
        }
        w.queue = Queue::None;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
    }

    // ------------------------------------------------------------ code

    /// The bytes `code` means for site `s` over its first `n` bytes (`n` ≤ its span).
    fn bytes_for(s: &Site, code: Code, n: usize, out: &mut [u8; MAX_DETOUR]) {
        out[..n].copy_from_slice(s.original(n));
        match (code, &s.detour) {
            (Code::Jump, Ok(d)) => out[..n].copy_from_slice(&d.jump_bytes()[..n]),
            (Code::Breakpoint, _) | (Code::Jump, Err(_)) => {
                let bp = <S::Arch as Arch>::BREAKPOINT;
                let m = bp.len().min(n);
                out[..m].copy_from_slice(&bp[..m]);
            }
            (Code::Original, _) => {}
        }
    }

    /// How many bytes a change between `a` and `b` touches: the whole span when a jump is
    /// involved, else only the breakpoint's bytes (a neighbour's breakpoint may sit inside the
    /// span, and is not ours to write).
    fn width(s: &Site, a: Code, b: Code) -> usize {
        let span = usize::from(s.span);
        if a == Code::Jump || b == Code::Jump {
            span
        } else {
            <S::Arch as Arch>::BREAKPOINT.len().min(span)
        }
    }

    /// Appends the patch taking `s` from its current code to `to` onto the scratch batch.
    fn stage(&mut self, s: &Site, to: Code) {
        // SAFETY: locked.
        let from = unsafe { s.w() }.code;
        if from == to {
            return;
        }
        let n = Self::width(s, from, to);
        let mut old = [0u8; MAX_DETOUR];
        let mut new = [0u8; MAX_DETOUR];
        Self::bytes_for(s, from, n, &mut old);
        Self::bytes_for(s, to, n, &mut new);
        if let Some(p) = Patch::new(s.addr, &old[..n], &new[..n]) {
            // Never allocates: capacity for every live site (INVARIANT).
            self.with_inner(|i| i.scratch.push(p));
        }
    }

    /// Sends the staged batch through the arch's live patch. On an error the embedder has left
    /// every site of the batch as it was ([`CodeSpace::patch`]'s contract), and so does the
    /// caller with its bookkeeping.
    fn flush(&mut self) -> Result<()> {
        let batch = self.with_inner(|i| core::mem::take(&mut i.scratch));
        let r = if batch.is_empty() {
            Ok(())
        } else {
            self.opt.space.patch(&batch)
        };
        let n = batch.len() as u64;
        self.with_inner(|i| {
            if n > 0 {
                if r.is_ok() {
                    i.stats.batches += 1;
                    i.stats.patched += n;
                } else {
                    i.stats.failed_patches += 1;
                }
            }
            let mut batch = batch;
            batch.clear();
            i.scratch = batch;
        });
        r
    }

    /// Rewrites the code of one site now (a batch of one). On failure the code and the site's
    /// bookkeeping are unchanged.
    fn patch_now(&mut self, s: &Site, to: Code) -> Result<()> {
        self.stage(s, to);
        self.flush()?;
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        w.code = to;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        Ok(())
    }

    /// A site whose immediate patch failed: its code is still what `code` says, but not what
    /// its state wants. The unoptimizing list doubles as the repair list: while on it the site
    /// counts as armed (no neighbour's jump may cover it), and the next run brings its code to
    /// its resting state — a disabled one's original bytes in step 1's batch, an enabled one's
    /// breakpoint through `arm` in step 0 (which forces a covering jump back first, and queues
    /// it for optimization).
    fn repair_later(&mut self, s: &Site) {
        self.enqueue(s, Queue::Unoptimizing);
        self.kick();
    }

    /// What an unoptimized site should hold: its breakpoint if armed, else the original.
    fn rest_code(&mut self, w: &SiteW) -> Code {
        let all_disarmed = self.with_inner(|i| i.all_disarmed);
        if w.enabled && !all_disarmed {
            Code::Breakpoint
        } else {
            Code::Original
        }
    }

    // ------------------------------------------------------------ kprobes' primitives

    /// The optimized probe (kprobes meaning) whose jump range holds `addr`, other than one at
    /// `addr` itself (kprobes' `get_optimized_kprobe`).
    fn covering_optimized(&self, addr: u64) -> Option<&Site> {
        let mut k = addr.checked_sub(1)?;
        loop {
            // SAFETY: locked: the writer side of the table.
            let (a, p) = unsafe { self.opt.table.floor_locked(&k) }?;
            if a + (MAX_DETOUR as u64) <= addr {
                return None;
            }
            // SAFETY: a hashed site is live.
            let s = unsafe { &*p };
            if let Ok(d) = &s.detour {
                // SAFETY: locked.
                if unsafe { s.w() }.optimized && addr < a + u64::from(d.len) {
                    return Some(s);
                }
            }
            k = a.checked_sub(1)?;
        }
    }

    /// Every prepared probe whose jump range holds `addr` (other than one at `addr`), optimized
    /// or not: the probes a probe at `addr` may be blocking. Calls `f` on each.
    fn for_each_covering(&mut self, addr: u64, mut f: impl FnMut(&mut Self, &Site)) {
        let Some(mut k) = addr.checked_sub(1) else {
            return;
        };
        loop {
            // SAFETY: locked: the writer side of the table.
            let Some((a, p)) = (unsafe { self.opt.table.floor_locked(&k) }) else {
                return;
            };
            if a + (MAX_DETOUR as u64) <= addr {
                return;
            }
            // SAFETY: a hashed site is live; sites are freed only by this thread under the lock,
            // and `f` frees none.
            let s = unsafe { &*p };
            if let Ok(d) = &s.detour
                && addr < a + u64::from(d.len)
            {
                f(self, s);
            }
            let Some(next) = a.checked_sub(1) else { return };
            k = next;
        }
    }

    /// Is an armed (not disarmed) probe inside `s`'s jump range, past its first byte?
    fn blocked(&self, s: &Site, d: &Detour) -> bool {
        let end = s.addr + u64::from(d.len);
        let mut k = end - 1;
        while k > s.addr {
            // SAFETY: locked: the writer side of the table.
            let Some((a, p)) = (unsafe { self.opt.table.floor_locked(&k) }) else {
                return false;
            };
            if a <= s.addr {
                return false;
            }
            // SAFETY: a hashed site is live; locked.
            let w = unsafe { (*p).w() };
            if !disarmed(w.enabled, w.queue) {
                return true;
            }
            k = a - 1;
        }
        false
    }

    /// Queues `s` for optimization if it may be optimized (kprobes' `optimize_kprobe`).
    fn optimize(&mut self, s: &Site) -> Armed {
        let d = match &s.detour {
            Ok(d) => d,
            Err(why) => return Armed::Breakpoint(*why),
        };
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        if self.with_inner(|i| i.all_disarmed) {
            return Armed::Disarmed;
        }
        if !w.enabled {
            return Armed::Disabled;
        }
        if w.single_step {
            return Armed::SingleStep;
        }
        if w.code == Code::Original {
            // Its breakpoint is not in (an arm that failed, waiting for step 0): a jump may
            // only ever follow a breakpoint and a quiescence wait, never the original bytes.
            return Armed::Blocked;
        }
        if w.optimized {
            if w.queue == Queue::Unoptimizing {
                // Its jump is still in the code: taking it off the list is all it takes.
                self.dequeue(s);
            }
            return Armed::Optimizing;
        }
        if self.blocked(s, d) || self.covering_optimized(s.addr).is_some() {
            return Armed::Blocked;
        }
        w.optimized = true;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        // DETOUR before the jump exists: a trap now continues through the (ready) trampoline,
        // so no hit is ever stepped into bytes the coming jump will cover.
        s.publish(&w);
        self.enqueue(s, Queue::Optimizing);
        self.kick();
        Armed::Optimizing
    }

    /// Takes `s` out of the optimized state (kprobes' `unoptimize_kprobe`): at once if `force`,
    /// else through the unoptimizing list. Only a forced one patches, and so only a forced one
    /// can fail — then nothing changed.
    fn unoptimize(&mut self, s: &Site, force: bool) -> Result<()> {
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        if !w.optimized {
            return Ok(());
        }
        match w.queue {
            Queue::Optimizing => {
                // Its jump never reached the code: dequeue, and the breakpoint is what remains.
                self.dequeue(s);
                // SAFETY: locked.
                w = unsafe { s.w() };
                w.optimized = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                s.publish(&w);
            }
            Queue::Unoptimizing => {
                if force {
                    self.force_unoptimize(s)?;
                    if unused(w.users, w.enabled) {
                        // Still in the table: the next run's freeing-list pass unhashes it
                        // (Linux 2023: even when its unoptimizing list is empty then).
                        self.enqueue(s, Queue::Freeing);
                    } else {
                        self.dequeue(s);
                    }
                    if !w.enabled {
                        // Disarmed now, outside any run: retry what it was blocking here.
                        self.retry_blocked(s.addr);
                    }
                }
            }
            Queue::None | Queue::Freeing => {
                if force {
                    self.force_unoptimize(s)?;
                } else {
                    #[cfg(loom)]
                    if crate::seeded::is(crate::seeded::Bug::OptimizedFlagClearedEarly) {
                        // The 2019 bug: the flag goes when the probe is queued, while its jump is
                        // still in the code.
                        w.optimized = false;
                        // SAFETY: locked.
                        unsafe { s.set_w(w) };
                        s.publish(&w);
                    }
                    self.enqueue(s, Queue::Unoptimizing);
                    self.kick();
                }
            }
        }
        Ok(())
    }

    /// Rewrites `s`'s jump now and clears its optimized flag after (kprobes'
    /// `force_unoptimize_kprobe`).
    fn force_unoptimize(&mut self, s: &Site) -> Result<()> {
        // SAFETY: locked.
        let w = unsafe { s.w() };
        let to = self.rest_code(&w);
        if w.code == Code::Jump {
            self.patch_now(s, to)?;
            self.with_inner(|i| i.stats.unoptimized += 1);
            #[cfg(loom)]
            if crate::seeded::is(crate::seeded::Bug::RetireLiveTrampoline) {
                // The seeded bug: retired as its jump goes out, though it stays in the table.
                if let Ok(d) = &s.detour {
                    self.opt.space.retire_detour(d);
                }
            }
        } else if w.code != to {
            self.patch_now(s, to)?;
        }
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        w.optimized = false;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        // After the bytes are back (the 2019 rule).
        s.publish(&w);
        Ok(())
    }

    /// Puts `s`'s breakpoint in the code and queues it for optimization (kprobes'
    /// `__arm_kprobe`).
    ///
    /// Fails (a patch failed) with `s`'s code unchanged; a covering jump forced back before the
    /// failure stays a breakpoint, and [`Locked::retry_blocked`] re-queues it.
    fn arm(&mut self, s: &Site) -> Result<Armed> {
        // A jump covering this address goes first.
        if let Some(q) = self.covering_optimized(s.addr) {
            // `q` is a different, live, hashed site; `unoptimize` frees nothing.
            let q: *const Site = q;
            // SAFETY: as above.
            self.unoptimize(unsafe { &*q }, true)?;
        }
        // SAFETY: locked.
        let w = unsafe { s.w() };
        if w.code == Code::Original {
            self.patch_now(s, Code::Breakpoint)?;
        }
        // Probes this one now blocks cannot be optimized: any queued for it are dequeued by the
        // collision check above (optimized covers queued). Then try this one.
        Ok(self.optimize(s))
    }

    /// Takes `s` out of the code (kprobes' `__disarm_kprobe`): through the queue if its jump is
    /// there, else at once — and then retries the probes it was blocking.
    ///
    /// Never fails: a failed patch leaves the breakpoint (a disabled probe's breakpoint only
    /// steps its instruction) and sends the site to the next run's repair.
    fn disarm(&mut self, s: &Site, reopt: bool) {
        // Not forced: cannot fail.
        let _ = self.unoptimize(s, false);
        // SAFETY: locked.
        let w = unsafe { s.w() };
        if !queued(w.queue) {
            let to = self.rest_code(&w);
            if w.code != to && w.code != Code::Jump && self.patch_now(s, to).is_err() {
                self.repair_later(s);
                return;
            }
            if reopt {
                self.retry_blocked(s.addr);
            }
        }
    }

    /// Re-queues the probes that a probe at `addr` was blocking (it has just been disarmed).
    fn retry_blocked(&mut self, addr: u64) {
        self.for_each_covering(addr, |l, q| {
            // SAFETY: locked.
            let w = unsafe { q.w() };
            if w.enabled && !w.optimized {
                l.optimize(q);
            }
        });
    }

    // ------------------------------------------------------------ the public operations

    fn register(&mut self, addr: u64) -> Result<Armed> {
        if let Some(s) = self.site(addr) {
            // SAFETY: locked.
            let mut w = unsafe { s.w() };
            if unused(w.users, w.enabled) {
                let s: *const Site = s;
                // SAFETY: hashed, so live; sites are freed only by runs and retirements under
                // this lock, and `revive` runs neither.
                return Ok(self.revive(unsafe { &*s }));
            }
            w.users = w.users.checked_add(1).ok_or(Error::NoMemory)?;
            // SAFETY: locked.
            unsafe { s.set_w(w) };
            return Ok(Armed::Shared);
        }
        self.opt.space.check_boundary(addr)?;
        let bp = <S::Arch as Arch>::BREAKPOINT;
        let mut original = [0u8; MAX_DETOUR];
        self.opt
            .space
            .read_original(addr, &mut original[..bp.len()])?;
        if <S::Arch as Arch>::is_trap(&original[..bp.len()]) {
            return Err(Error::ExistingTrap);
        }
        let detour = self.opt.space.prepare_detour(addr);
        let span = match &detour {
            Ok(d) => usize::from(d.len).clamp(bp.len(), MAX_DETOUR),
            Err(_) => bp.len(),
        };
        let read = self.opt.space.read_original(addr, &mut original[..span]);
        let opt = self.opt;
        let fail = |d: &core::result::Result<Detour, NotOptimizable>, e| {
            if let Ok(d) = d {
                opt.space.free_detour(d);
            }
            e
        };
        if let Err(e) = read {
            return Err(fail(&detour, e));
        }
        // Capacity for one more site on every list and in the scratch: runs never allocate.
        let reserved = self.with_inner(|i| {
            let need = i.sites + 1;
            for v in &mut i.queues {
                v.try_reserve(need - v.len()).map_err(|_| Error::NoMemory)?;
            }
            let n = i.scratch.len();
            i.scratch.try_reserve(need - n).map_err(|_| Error::NoMemory)
        });
        if let Err(e) = reserved {
            return Err(fail(&detour, e));
        }
        let site = Site {
            flags: AtomicU32::new(0),
            addr,
            detour,
            original,
            span: span as u8,
            w: UnsafeCell::new(SiteW {
                users: 1,
                enabled: true,
                optimized: false,
                single_step: false,
                code: Code::Original,
                queue: Queue::None,
                pos: 0,
                hashed: true,
            }),
            free_check: FreeCheck::new(),
        };
        let b = match try_box(site) {
            Ok(b) => b,
            Err(e) => return Err(fail(&detour, e)),
        };
        let p = Box::into_raw(b);
        // SAFETY: locked (the table's write lock); every writer uses `self.opt.rcu`.
        if let Err(e) = unsafe { self.opt.table.insert(&self.opt.rcu, addr, p) } {
            // SAFETY: never published.
            let b = unsafe { Box::from_raw(p) };
            return Err(fail(&b.detour, e));
        }
        self.with_inner(|i| i.sites += 1);
        // SAFETY: just published; freed only under this lock.
        let s = unsafe { &*p };
        // SAFETY: locked.
        let w = unsafe { s.w() };
        // Hits fire from now on; the breakpoint comes after the table entry, so a trap on it
        // always finds the probe.
        s.publish(&w);
        if self.with_inner(|i| i.all_disarmed) {
            return Ok(Armed::Disarmed);
        }
        let armed = match self.arm(s) {
            Ok(a) => a,
            Err(e) => {
                // No byte of ours reached the code: take the site back out, as if never made.
                // SAFETY: locked.
                let mut w = unsafe { s.w() };
                w.users = 0;
                w.enabled = false;
                w.optimized = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                s.publish(&w);
                self.dequeue(s);
                self.retire(s);
                // A covering jump that `arm` forced back before failing: optimize it again.
                self.retry_blocked(addr);
                return Err(e);
            }
        };
        // A breakpoint inside the ranges of prepared neighbours blocks them: any queued for
        // optimization come off the list (the collision check in `arm` handled the ones whose
        // jump was in the code or queued).
        Ok(armed)
    }

    /// Registers the first user of an unused probe that is still in the table (kprobes'
    /// `reuse_unused_kprobe`): instead of failing until the optimizer has freed it, it is
    /// enabled again where it stands. Its site, trampoline and saved bytes are still valid (it
    /// left no table, no trampoline was freed); what its last unregistration set in motion is
    /// undone through the same rules as any enable:
    ///
    /// * on the unoptimizing list with its jump in the code: `optimize` only dequeues it, and
    ///   the jump stays;
    /// * on the freeing list (a forced unoptimization or a failed table removal put it there
    ///   while it is still hashed): it comes off that list first, so no run frees a probe that
    ///   has a user again;
    /// * disarmed: `arm` puts its breakpoint back and queues it for optimization.
    fn revive(&mut self, s: &Site) -> Armed {
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        if w.queue == Queue::Freeing {
            self.dequeue(s);
            // SAFETY: locked.
            w = unsafe { s.w() };
        }
        w.users = 1;
        w.enabled = true;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        #[cfg(loom)]
        let fire = !crate::seeded::is(crate::seeded::Bug::RevivalWithoutFire);
        #[cfg(not(loom))]
        let fire = true;
        if fire {
            // Hits fire again from now on (Release in `publish`; the breakpoint `arm` writes
            // comes after it, as in a first registration).
            s.publish(&w);
        }
        self.with_inner(|i| i.stats.revived += 1);
        if self.with_inner(|i| i.all_disarmed) {
            return Armed::Disarmed;
        }
        match self.arm(s) {
            Ok(a) => a,
            Err(_) => {
                // Its code stays as it was (the original, or its jump): the next run repairs it
                // to its breakpoint and queues it again. The registration itself holds.
                self.repair_later(s);
                Armed::Optimizing
            }
        }
    }

    fn unregister(&mut self, addr: u64) -> Result<()> {
        let (s, mut w) = self.registered(addr)?;
        w.users -= 1;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        if w.users > 0 {
            return Ok(());
        }
        if w.enabled {
            w.enabled = false;
            // SAFETY: locked.
            unsafe { s.set_w(w) };
            // Hits stop running consumers now.
            s.publish(&w);
            self.disarm(s, true);
        }
        // SAFETY: locked.
        let w = unsafe { s.w() };
        if !queued(w.queue) && w.queue != Queue::Freeing {
            // Disarmed: out of the table now.
            self.retire(s);
        }
        Ok(())
    }

    /// `s` is unused and disarmed: unhash it; free it after a grace period if it never had a
    /// trampoline, else after the next run's quiescence wait.
    fn retire(&mut self, s: &Site) {
        let addr = s.addr;
        // SAFETY: locked (the table's write lock); every writer uses `self.opt.rcu`.
        let removed = unsafe { self.opt.table.remove(&self.opt.rcu, &addr) };
        if removed.is_err() {
            // No memory for the copy-on-write path: leave it to the next run's freeing pass.
            self.enqueue(s, Queue::Freeing);
            self.kick();
            return;
        }
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        w.hashed = false;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        if let Ok(d) = &s.detour {
            self.retire_detour(d);
            self.enqueue(s, Queue::Freeing);
            self.kick();
            return;
        }
        let p = SendSite(s as *const Site);
        let free = Deferred::new(move || {
            let p = p;
            // SAFETY: out of the table a grace period ago; never in a trampoline (no detour).
            unsafe { free_site(p.0) }
        });
        match free {
            Ok(cb) => {
                self.with_inner(|i| {
                    i.sites -= 1;
                    i.stats.freed += 1;
                });
                self.opt.rcu.defer(cb);
            }
            // No memory for the callback: the next run frees it after its waits.
            Err(_) => {
                self.enqueue(s, Queue::Freeing);
                self.kick();
            }
        }
    }

    fn set_enabled(&mut self, addr: u64, on: bool) -> Result<()> {
        let (s, mut w) = self.registered(addr)?;
        if w.enabled == on {
            return Ok(());
        }
        w.enabled = on;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        s.publish(&w);
        if on {
            if !self.with_inner(|i| i.all_disarmed)
                && let Err(e) = self.arm(s)
            {
                // Back to disabled, as before the call: its code never changed.
                // SAFETY: locked.
                let mut w = unsafe { s.w() };
                w.enabled = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                s.publish(&w);
                self.retry_blocked(addr);
                return Err(e);
            }
        } else {
            self.disarm(s, true);
        }
        Ok(())
    }

    fn set_single_step(&mut self, addr: u64, on: bool) -> Result<()> {
        let (s, mut w) = self.registered(addr)?;
        w.single_step = on;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        if on {
            if let Err(e) = self.unoptimize(s, true) {
                // Still optimized, as before the call.
                w.single_step = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                return Err(e);
            }
        } else {
            self.optimize(s);
        }
        Ok(())
    }

    /// Every hashed site, highest address first (no allocation: repeated floor lookups).
    fn for_each_site(&mut self, mut f: impl FnMut(&mut Self, &Site)) {
        let mut k = u64::MAX;
        loop {
            // SAFETY: locked: the writer side of the table.
            let Some((a, p)) = (unsafe { self.opt.table.floor_locked(&k) }) else {
                return;
            };
            // SAFETY: hashed and live; `f` frees nothing.
            f(self, unsafe { &*p });
            let Some(next) = a.checked_sub(1) else { return };
            k = next;
        }
    }

    fn disarm_all(&mut self) {
        if self.with_inner(|i| core::mem::replace(&mut i.all_disarmed, true)) {
            return;
        }
        self.for_each_site(|l, s| {
            // SAFETY: locked.
            if unsafe { s.w() }.enabled {
                l.disarm(s, false);
            }
        });
    }

    fn arm_all(&mut self) {
        if !self.with_inner(|i| core::mem::replace(&mut i.all_disarmed, false)) {
            return;
        }
        self.for_each_site(|l, s| {
            // SAFETY: locked.
            if unsafe { s.w() }.enabled && l.arm(s).is_err() {
                // Its breakpoint did not go in: the next run's repair puts it there.
                l.repair_later(s);
            }
        });
    }

    // ------------------------------------------------------------ the run

    fn run(&mut self) {
        self.with_inner(|i| {
            i.kicked = false;
            i.stats.runs += 1;
        });
        #[cfg(loom)]
        let optimize_first = crate::seeded::is(crate::seeded::Bug::OptimizeBeforeUnoptimize);
        #[cfg(not(loom))]
        let optimize_first = false;
        if optimize_first {
            // The seeded bug: step 3 before steps 1 and 2.
            self.do_optimize();
        }
        self.do_rearm();
        self.do_unoptimize();
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::FreeBeforeQuiescence) {
            self.do_free();
        }
        // Step 2: one grace period for hits that may still hold a removed probe, one quiescence
        // wait for CPUs inside replaced bytes or cut-off trampolines.
        self.opt.rcu.synchronize();
        self.opt.space.quiesce();
        self.with_inner(|i| i.stats.waits += 2);
        if !optimize_first {
            self.do_optimize();
        }
        self.do_free();
        // Anything queued while running (nothing, unless a retry could not fit): run again later.
        if !self.idle() {
            self.kick();
        }
    }

    /// The last site on list `ix`.
    fn pop(&mut self, ix: usize) -> Option<*const Site> {
        self.with_inner(|i| i.queues[ix].last().copied())
    }

    /// Is `s`, on the unoptimizing list, an enabled probe whose arming failed (see
    /// [`Locked::repair_later`])? It wants its breakpoint, which only `arm` may put in (a
    /// covering jump has to go first), so step 1 leaves it to step 0.
    fn wants_rearm(&mut self, s: &Site) -> bool {
        // SAFETY: locked.
        let w = unsafe { s.w() };
        !w.optimized && w.enabled && !self.with_inner(|i| i.all_disarmed)
    }

    /// The index on the unoptimizing list of the next site `step` applies to.
    fn find_on_unoptimizing(
        &mut self,
        mut want: impl FnMut(&mut Self, &Site) -> bool,
    ) -> Option<*const Site> {
        let n = self.with_inner(|i| i.queues[1].len());
        for k in 0..n {
            let p = self.with_inner(|i| i.queues[1][k]);
            // SAFETY: a live site on the list.
            if want(self, unsafe { &*p }) {
                return Some(p);
            }
        }
        None
    }

    /// Step 0: arm the enabled probes whose arming failed earlier, one by one through `arm`
    /// (which forces a covering jump back first). One that fails again stays for the next run.
    fn do_rearm(&mut self) {
        while let Some(p) = self.find_on_unoptimizing(|l, s| l.wants_rearm(s)) {
            // SAFETY: a live site on the list.
            let s = unsafe { &*p };
            self.dequeue(s);
            if self.arm(s).is_err() {
                self.repair_later(s);
                return;
            }
            // A probe whose jump `arm` forced back may be optimized again later.
            self.retry_blocked(s.addr);
        }
    }

    /// Tells the embedder that `d` can no longer be entered ([`CodeSpace::retire_detour`]):
    /// its site is out of the table (and so, being unused, out of the code too).
    fn retire_detour(&mut self, d: &Detour) {
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::RetireSkipped) {
            return;
        }
        self.opt.space.retire_detour(d);
    }

    /// Step 1.
    fn do_unoptimize(&mut self) {
        let n = self.with_inner(|i| i.queues[1].len());
        #[cfg(loom)]
        if n == 0 && crate::seeded::is(crate::seeded::Bug::FreeingListSkipped) {
            // The 2023 bug: nothing to unoptimize, so the freeing list is not looked at either.
            return;
        }
        if n > 0 {
            // One batch for the whole list (but the re-arms step 0 could not do).
            for k in 0..n {
                let p = self.with_inner(|i| i.queues[1][k]);
                // SAFETY: a live site on the list.
                let s = unsafe { &*p };
                if self.wants_rearm(s) {
                    continue;
                }
                // SAFETY: locked.
                let w = unsafe { s.w() };
                let to = self.rest_code(&w);
                self.stage(s, to);
            }
            if self.flush().is_err() {
                // Nothing changed: every site keeps its code, its flags and its place on the
                // list, and the next run tries again. The freeing list waits too (its sites
                // may be the neighbours of these).
                self.kick();
                return;
            }
            // Only now, with the bytes back, do the flags go (the 2019 rule).
            while let Some(p) = self.find_on_unoptimizing(|l, s| !l.wants_rearm(s)) {
                // SAFETY: a live site on the list.
                let s = unsafe { &*p };
                self.dequeue(s);
                // SAFETY: locked.
                let mut w = unsafe { s.w() };
                let was_jump = w.code == Code::Jump;
                #[cfg(loom)]
                if was_jump && crate::seeded::is(crate::seeded::Bug::RetireLiveTrampoline) {
                    // The seeded bug: retired as its jump goes out, whether or not it stays.
                    if let Ok(d) = &s.detour {
                        self.opt.space.retire_detour(d);
                    }
                }
                let repaired = !w.optimized;
                w.code = self.rest_code(&w);
                w.optimized = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                s.publish(&w);
                if was_jump {
                    self.with_inner(|i| i.stats.unoptimized += 1);
                }
                let _ = repaired;
                if unused(w.users, w.enabled) {
                    self.enqueue(s, Queue::Freeing);
                }
                if !w.enabled {
                    // Disarmed now: whatever it was blocking may be optimized (Linux 2026).
                    #[cfg(loom)]
                    if crate::seeded::is(crate::seeded::Bug::BlockedNotRetried) {
                        continue;
                    }
                    self.retry_blocked(s.addr);
                }
            }
        }
        // The freeing list: unhash every unused site still in the table, in one tree batch —
        // including those a collision force-unoptimized (Linux 2023).
        let m = self.with_inner(|i| i.queues[2].len());
        let mut any = false;
        for k in 0..m {
            let p = self.with_inner(|i| i.queues[2][k]);
            // SAFETY: a live site on the list; locked.
            any |= unsafe { (*p).w() }.hashed;
        }
        if !any {
            return;
        }
        let opt = self.opt;
        // SAFETY: locked (the table's write lock); every writer uses `opt.rcu`.
        let r = unsafe {
            opt.table.batch(&opt.rcu, |b| {
                for k in 0..m {
                    let p = self.with_inner(|i| i.queues[2][k]);
                    // SAFETY: a live site on the list; locked.
                    let s = &*p;
                    if s.w().hashed {
                        b.remove(&s.addr)?;
                    }
                }
                Ok(())
            })
        };
        if r.is_ok() {
            for k in 0..m {
                let p = self.with_inner(|i| i.queues[2][k]);
                // SAFETY: a live site on the list; locked.
                let s = unsafe { &*p };
                // SAFETY: locked.
                let mut w = unsafe { s.w() };
                w.hashed = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                if let Ok(d) = &s.detour {
                    // Out of the table and out of the code: no new way in. Before the wait.
                    self.retire_detour(d);
                }
            }
        }
        // On failure they stay hashed and listed; step 4 skips them and the next run retries.
    }

    /// Step 3.
    fn do_optimize(&mut self) {
        if self.with_inner(|i| i.all_disarmed) {
            // Never optimize while everything is disarmed; `disarm_all` emptied the list anyway.
            return;
        }
        let n = self.with_inner(|i| i.queues[0].len());
        if n == 0 {
            return;
        }
        for k in 0..n {
            let p = self.with_inner(|i| i.queues[0][k]);
            // SAFETY: a live site on the list.
            self.stage(unsafe { &*p }, Code::Jump);
        }
        if self.flush().is_err() {
            // Nothing changed: the sites stay breakpoints on the optimizing list (their
            // optimized flag set, as while queued), and the next run tries again.
            self.kick();
            return;
        }
        while let Some(p) = self.pop(0) {
            // SAFETY: a live site on the list.
            let s = unsafe { &*p };
            self.dequeue(s);
            // SAFETY: locked.
            let mut w = unsafe { s.w() };
            w.code = Code::Jump;
            // SAFETY: locked.
            unsafe { s.set_w(w) };
            self.with_inner(|i| i.stats.optimized += 1);
        }
    }

    /// Step 4.
    fn do_free(&mut self) {
        let mut k = 0;
        loop {
            let Some(p) = self.with_inner(|i| i.queues[2].get(k).copied()) else {
                return;
            };
            // SAFETY: a live site on the list; locked.
            let w = unsafe { (*p).w() };
            if w.hashed {
                // Could not be unhashed (no memory): the next run tries again.
                k += 1;
                continue;
            }
            // SAFETY: as above.
            let s = unsafe { &*p };
            self.dequeue(s);
            if let Ok(d) = &s.detour {
                self.opt.space.free_detour(d);
            }
            self.with_inner(|i| {
                i.sites -= 1;
                i.stats.freed += 1;
            });
            // SAFETY: out of the table, a grace period and a quiescence wait ago, and off every
            // list: nothing can reach it.
            unsafe { free_site(p) };
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

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use crate::alloc_util::fail_after;
    use crate::rcu::EpochRcu;
    use crate::sync::audit::stores_during;
    use crate::testing::{ByteCode, TRAMPOLINES};
    use alloc::vec;
    use proptest::prelude::*;

    type Opt = Optimizer<ByteCode, EpochRcu>;

    /// 64 one-byte instructions (0x01, 0x02, …), jumps of `jump` bytes.
    fn opt(jump: usize) -> Opt {
        Optimizer::new(ByteCode::new((1..=64).collect(), jump), EpochRcu::new())
    }

    fn code(o: &Opt, addr: u64, n: usize) -> Vec<u8> {
        o.space().current(addr, n)
    }

    fn jump_at(o: &Opt, addr: u64) -> bool {
        code(o, addr, 1) == [0xE9]
    }

    /// After a settled optimizer: every probe's code is what its state says (a disarmed probe
    /// may lie under another's jump), no patch ever mismatched, and only live probes hold
    /// trampolines.
    fn audit(o: &Opt) {
        let c = o.space().counts();
        assert_eq!(c.mismatches, 0, "a patch's old bytes were not in the code");
        assert_eq!(c.bad_frees, 0);
        let states: Vec<(u64, ProbeState)> = (0..64)
            .filter_map(|a| o.state(a).ok().map(|s| (a, s)))
            .collect();
        let under_jump = |a: u64| {
            states
                .iter()
                .any(|(b, s)| *b < a && s.code == Code::Jump && a < *b + u64::from(s.jump_len))
        };
        let mut live = 0;
        for (a, st) in &states {
            let mut e = [0; MAX_DETOUR];
            let n = o.expected_code(*a, &mut e).unwrap();
            if under_jump(*a) {
                assert!(st.disarmed(), "an armed probe under a jump at {a}: {st:?}");
            } else {
                assert_eq!(
                    code(o, *a, n),
                    e[..n],
                    "code at {a} differs from its state {st:?}"
                );
            }
            if st.not_optimizable.is_none() {
                live += 1;
            }
        }
        assert_eq!(
            c.live_trampolines, live,
            "trampolines leaked or freed early"
        );
    }

    fn trap<'g>(o: &'g Opt, g: &'g <EpochRcu as Rcu>::Guard<'_>, a: u64) -> Trap<'g> {
        o.on_breakpoint(g, a)
    }

    #[test]
    fn breakpoint_then_jump_then_original() {
        let o = opt(5);
        assert_eq!(o.register(16).unwrap(), Armed::Optimizing);
        assert_eq!(code(&o, 16, 5), [0xCC, 18, 19, 20, 21]);
        let st = o.state(16).unwrap();
        assert!(st.optimized && st.queued() && st.code == Code::Breakpoint);
        o.wait_for_optimizer();
        assert_eq!(code(&o, 16, 5), [0xE9, 0, 0, 0, 0]);
        assert_eq!(o.state(16).unwrap().code, Code::Jump);
        audit(&o);
        o.unregister(16).unwrap();
        let st = o.state(16).unwrap();
        assert!(st.unused() && st.queued() && st.optimized, "{st:?}");
        assert_eq!(
            code(&o, 16, 5),
            [0xE9, 0, 0, 0, 0],
            "unoptimizing is delayed"
        );
        o.wait_for_optimizer();
        assert_eq!(code(&o, 16, 5), [17, 18, 19, 20, 21]);
        assert!(o.is_empty());
        assert_eq!(o.space().counts().live_trampolines, 0);
        let s = o.stats();
        assert_eq!((s.optimized, s.unoptimized, s.freed), (1, 1, 1));
    }

    /// The embedder's patch fails (all or nothing): a registration fails and changes nothing;
    /// a run keeps its lists and the next one finishes; a disable keeps the disabled probe's
    /// harmless breakpoint until the next run removes it; an enable fails and stays disabled.
    #[test]
    fn a_failed_patch_changes_nothing_and_is_retried() {
        let o = opt(5);
        let before = code(&o, 0, 64);
        o.space().fail_patches(1);
        assert_eq!(o.register(8), Err(Error::Embedder(-5)));
        assert_eq!(
            code(&o, 0, 64),
            before,
            "a failed register changed the code"
        );
        assert!(o.state(8).is_err(), "a failed register left a probe");
        o.wait_for_optimizer();
        assert!(o.is_empty());
        audit(&o);

        // A run whose optimizing batch fails: still a breakpoint, still queued; the next run
        // makes the jump.
        assert_eq!(o.register(8).unwrap(), Armed::Optimizing);
        o.space().fail_patches(1);
        o.run_optimizer();
        let st = o.state(8).unwrap();
        assert_eq!((st.code, st.queue), (Code::Breakpoint, Queue::Optimizing));
        assert_eq!(o.stats().failed_patches, 2);
        o.run_optimizer();
        assert_eq!(o.state(8).unwrap().code, Code::Jump);
        audit(&o);

        // A disable through the queue whose run fails, then succeeds.
        o.disable(8).unwrap();
        o.space().fail_patches(1);
        o.run_optimizer();
        assert_eq!(
            o.state(8).unwrap().code,
            Code::Jump,
            "a failed batch changed the code"
        );
        o.wait_for_optimizer();
        assert_eq!(code(&o, 8, 5), before[8..13]);
        audit(&o);

        // An enable whose breakpoint cannot go in: an error, still disabled, code untouched.
        o.space().fail_patches(1);
        assert_eq!(o.enable(8), Err(Error::Embedder(-5)));
        assert!(!o.state(8).unwrap().enabled);
        assert_eq!(code(&o, 0, 64), before);
        o.enable(8).unwrap();
        assert_eq!(code(&o, 8, 1), [0xCC]);

        // A disable whose immediate patch fails (a breakpoint, not yet a jump): it succeeds, the
        // probe stops firing at once, and the next run takes the breakpoint out.
        o.set_single_step(8, true).unwrap(); // pinned to a breakpoint
        o.space().fail_patches(1);
        o.disable(8).unwrap();
        let st = o.state(8).unwrap();
        assert!(!st.enabled && st.code == Code::Breakpoint && st.queue == Queue::Unoptimizing);
        let r = o.rcu().register().unwrap();
        {
            let g = o.rcu().read_lock(&r);
            assert_eq!(
                o.on_breakpoint(&g, 8),
                Trap::Probe {
                    fire: false,
                    then: Then::Step
                },
                "a disabled probe's leftover breakpoint must step, not fire"
            );
        }
        o.wait_for_optimizer();
        assert_eq!(code(&o, 0, 64), before);
        o.unregister(8).unwrap();
        o.wait_for_optimizer();
        assert!(o.is_empty());
        audit(&o);
    }

    #[test]
    fn reregistering_an_unused_probe_revives_it() {
        // Optimized, then unregistered: unused on the unoptimizing list, its jump in the code.
        let o = opt(5);
        o.register(8).unwrap();
        o.wait_for_optimizer();
        o.unregister(8).unwrap();
        let st = o.state(8).unwrap();
        assert!(st.unused() && st.queue == Queue::Unoptimizing && st.code == Code::Jump);
        let before = o.stats();
        // Revived where it stands: the jump stays, no patch, no wait, nothing freed.
        assert_eq!(o.register(8).unwrap(), Armed::Optimizing);
        let st = o.state(8).unwrap();
        assert_eq!((st.users, st.enabled, st.optimized), (1, true, true));
        assert_eq!((st.queue, st.code), (Queue::None, Code::Jump));
        o.wait_for_optimizer();
        let after = o.stats();
        assert_eq!(after.revived, before.revived + 1);
        assert_eq!(
            (after.batches, after.freed),
            (before.batches, before.freed),
            "revival rewrote code or freed the probe"
        );
        audit(&o);

        // Unused and force-unoptimized onto the freeing list while still hashed (a probe armed
        // inside its jump range): revival takes it off that list, so no run frees it.
        let o = opt(5);
        o.register(8).unwrap();
        o.wait_for_optimizer();
        o.unregister(8).unwrap();
        o.register(10).unwrap(); // inside 8's jump: 8 is forced back at once
        let st = o.state(8).unwrap();
        assert!(st.unused() && st.queue == Queue::Freeing && st.code == Code::Original);
        // Its breakpoint is back, blocked by the breakpoint at 10.
        assert_eq!(o.register(8).unwrap(), Armed::Blocked);
        o.wait_for_optimizer();
        let st = o.state(8).expect("a revived probe was freed");
        assert_eq!((st.users, st.enabled, st.code), (1, true, Code::Breakpoint));
        audit(&o);
        // The blocker goes: the revived probe is retried and becomes a jump.
        o.unregister(10).unwrap();
        o.wait_for_optimizer();
        assert_eq!(o.state(8).unwrap().code, Code::Jump);
        audit(&o);
    }

    #[test]
    fn bad_input_is_an_error_and_changes_nothing() {
        let o = opt(5);
        assert_eq!(o.unregister(3), Err(Error::UnknownProbe));
        assert_eq!(o.disable(3), Err(Error::UnknownProbe));
        assert_eq!(o.enable(3), Err(Error::UnknownProbe));
        assert_eq!(o.set_single_step(3, true), Err(Error::UnknownProbe));
        assert_eq!(o.state(3), Err(Error::UnknownProbe));
        assert_eq!(o.register(64), Err(Error::OffsetOutOfRange));
        assert_eq!(o.register(u64::MAX), Err(Error::OffsetOutOfRange));
        // A double unregister.
        o.register(3).unwrap();
        o.unregister(3).unwrap();
        assert_eq!(o.unregister(3), Err(Error::UnknownProbe));
        // An existing trap.
        let mut text: Vec<u8> = (1..=64).collect();
        text[9] = 0xCC;
        let o2: Opt = Optimizer::new(ByteCode::new(text, 5), EpochRcu::new());
        assert_eq!(o2.register(9), Err(Error::ExistingTrap));
        // Inside an instruction.
        let o3: Opt = Optimizer::new(
            ByteCode::new((1..=64).collect(), 5).with_lengths(&[3, 2, 4]),
            EpochRcu::new(),
        );
        assert_eq!(o3.register(1), Err(Error::InsideInstruction));
        assert_eq!(o3.register(6), Err(Error::InsideInstruction));
        assert_eq!(o3.register(5).unwrap(), Armed::Optimizing);
        for o in [&o, &o2, &o3] {
            assert_eq!(o.space().counts().mismatches, 0);
        }
        assert!(o2.is_empty());
        assert_eq!(o2.space().current(0, 64), o2.space().original(0, 64));
    }

    #[test]
    fn unoptimizable_probes_stay_working_breakpoints_and_say_why() {
        let o: Opt = Optimizer::new(ByteCode::new((1..=64).collect(), 0), EpochRcu::new());
        assert_eq!(
            o.register(4).unwrap(),
            Armed::Breakpoint(NotOptimizable::Unsupported)
        );
        let o = opt(5);
        o.space().add_branch_target(22);
        o.space().add_unrelocatable(32);
        assert_eq!(
            o.register(20).unwrap(),
            Armed::Breakpoint(NotOptimizable::BranchTarget { addr: 22 })
        );
        assert_eq!(
            o.register(30).unwrap(),
            Armed::Breakpoint(NotOptimizable::Unrelocatable { addr: 32 })
        );
        assert_eq!(
            o.register(61).unwrap(),
            Armed::Breakpoint(NotOptimizable::TooShort)
        );
        // A branch target at the probe itself is fine: nothing lands inside the jump.
        assert_eq!(o.register(22).unwrap(), Armed::Optimizing);
        o.wait_for_optimizer();
        for a in [20, 30, 61] {
            let st = o.state(a).unwrap();
            assert_eq!(st.code, Code::Breakpoint);
            assert!(!st.optimized && st.not_optimizable.is_some());
            let r = o.rcu().register().unwrap();
            let g = o.rcu().read_lock(&r);
            assert_eq!(
                trap(&o, &g, a),
                Trap::Probe {
                    fire: true,
                    then: Then::Step
                }
            );
        }
        // 22's own jump [22, 27) covers no probe, and 20 (a breakpoint) holds no jump over it.
        assert!(jump_at(&o, 22));
        audit(&o);
    }

    #[test]
    fn queue_rules_dequeue_instead_of_patching() {
        let o = opt(5);
        o.register(10).unwrap();
        let b0 = o.stats().batches;
        // Queued for optimization, then unregistered: just dequeued; the breakpoint goes.
        o.unregister(10).unwrap();
        assert_eq!(
            o.stats().batches,
            b0 + 1,
            "one patch: breakpoint → original"
        );
        o.wait_for_optimizer();
        assert_eq!(o.stats().optimized, 0, "the jump was never written");
        assert!(o.is_empty());

        // Optimized, disabled (queued for unoptimization), enabled again: just dequeued.
        o.register(20).unwrap();
        o.wait_for_optimizer();
        let b1 = o.stats().batches;
        o.disable(20).unwrap();
        assert_eq!(o.state(20).unwrap().queue, Queue::Unoptimizing);
        o.enable(20).unwrap();
        let st = o.state(20).unwrap();
        assert_eq!(
            (st.queue, st.code, st.optimized),
            (Queue::None, Code::Jump, true)
        );
        o.wait_for_optimizer();
        assert_eq!(o.stats().batches, b1, "no code change at all");
        assert!(jump_at(&o, 20));
        audit(&o);
    }

    #[test]
    fn hits_answer_by_state() {
        let o = opt(5);
        let r = o.rcu().register().unwrap();
        o.register(10).unwrap();
        {
            let g = o.rcu().read_lock(&r);
            // Queued for optimization: the trampoline is ready, so a trap already detours.
            let Trap::Probe {
                fire: true,
                then: Then::Detour(d),
            } = trap(&o, &g, 10)
            else {
                panic!("queued probe did not detour")
            };
            assert_eq!((d.len, d.trampoline), (5, TRAMPOLINES));
            assert!(o.on_trampoline(&g, 10));
            // A miss where the code is original: the probe raced away — restart.
            assert_eq!(trap(&o, &g, 11), Trap::Restart);
        }
        o.wait_for_optimizer();
        o.disable(10).unwrap();
        {
            let g = o.rcu().read_lock(&r);
            // Disabled, jump still in the code until the run: detour without consumers.
            assert!(matches!(
                trap(&o, &g, 10),
                Trap::Probe {
                    fire: false,
                    then: Then::Detour(_)
                }
            ));
            assert!(!o.on_trampoline(&g, 10));
        }
        o.wait_for_optimizer();
        {
            let g = o.rcu().read_lock(&r);
            assert_eq!(
                trap(&o, &g, 10),
                Trap::Probe {
                    fire: false,
                    then: Then::Step
                }
            );
        }
        // A program's own trap.
        let mut text: Vec<u8> = (1..=64).collect();
        text[40] = 0xCC;
        let o2: Opt = Optimizer::new(ByteCode::new(text, 5), EpochRcu::new());
        let r2 = o2.rcu().register().unwrap();
        let g2 = o2.rcu().read_lock(&r2);
        assert_eq!(o2.on_breakpoint(&g2, 40), Trap::NotOurs);
        assert_eq!(o2.on_breakpoint(&g2, 1 << 40), Trap::NotOurs);
        assert!(!o2.on_trampoline(&g2, 40));
    }

    #[test]
    fn hit_path_stores_nothing() {
        let o = opt(5);
        for a in (0..60).step_by(6) {
            o.register(a).unwrap();
        }
        o.wait_for_optimizer();
        o.register(3).unwrap(); // queued: both answers in one table
        let r = o.rcu().register().unwrap();
        let g = o.rcu().read_lock(&r);
        let probes: Vec<u64> = (0..60).step_by(6).chain([3]).collect();
        let (n, stores) = stores_during(|| {
            let mut n = 0;
            for &a in &probes {
                if let Trap::Probe { fire: true, .. } = o.on_breakpoint(&g, a) {
                    n += 1;
                }
                n += usize::from(o.on_trampoline(&g, a));
            }
            n
        });
        assert_eq!(n, 2 * 11);
        assert!(stores.is_empty(), "the hit path stored to {stores:x?}");
    }

    #[test]
    fn collision_forces_unoptimize_and_the_blocked_probe_is_retried() {
        let o = opt(5);
        o.register(10).unwrap();
        o.wait_for_optimizer();
        assert!(jump_at(&o, 10));
        let b = o.stats().batches;
        // Inside 10's jump: 10 goes back to a breakpoint now, not at the next run.
        assert_eq!(o.register(12).unwrap(), Armed::Optimizing);
        assert!(o.stats().batches > b);
        assert_eq!(code(&o, 10, 3), [0xCC, 12, 0xCC]);
        let st = o.state(10).unwrap();
        assert!(!st.optimized && st.code == Code::Breakpoint);
        o.wait_for_optimizer();
        assert_eq!(o.state(10).unwrap().code, Code::Breakpoint, "blocked by 12");
        assert!(jump_at(&o, 12));
        // 12 goes (through the unoptimizing list): 10 is retried in the same run.
        o.unregister(12).unwrap();
        o.wait_for_optimizer();
        assert!(jump_at(&o, 10), "the blocked probe was never retried");
        assert!(o.state(12).is_err());
        audit(&o);
        // The same when the blocker was only a breakpoint (disarmed at once).
        o.set_single_step(10, true).unwrap();
        assert_eq!(
            code(&o, 10, 1),
            [0xCC],
            "single-step forces a breakpoint now"
        );
        o.register(11).unwrap();
        o.set_single_step(10, false).unwrap();
        o.wait_for_optimizer();
        assert_eq!(o.state(10).unwrap().code, Code::Breakpoint, "blocked by 11");
        o.set_single_step(11, true).unwrap();
        o.unregister(11).unwrap();
        o.wait_for_optimizer();
        assert!(jump_at(&o, 10));
        audit(&o);
    }

    #[test]
    fn force_unoptimized_unused_probe_is_still_freed() {
        // Linux 2023: an unused probe waiting on the unoptimizing list is force-unoptimized by a
        // collision; the next run must still free it although its unoptimizing list is empty.
        let o = opt(5);
        o.register(10).unwrap();
        o.wait_for_optimizer();
        o.unregister(10).unwrap();
        o.register(13).unwrap();
        assert_eq!(o.state(10).unwrap().queue, Queue::Freeing);
        o.wait_for_optimizer();
        assert!(o.state(10).is_err(), "never freed");
        assert_eq!(o.register(10).unwrap(), Armed::Blocked);
        audit(&o);
    }

    #[test]
    fn disarm_all_and_arm_all_go_through_the_queues() {
        let o = opt(4);
        for a in [0, 8, 16, 24] {
            o.register(a).unwrap();
        }
        o.register(40).unwrap();
        o.disable(40).unwrap();
        o.wait_for_optimizer();
        let b = o.stats().batches;
        o.disarm_all();
        assert_eq!(code(&o, 0, 64), o.space().original(0, 64));
        assert!(
            o.stats().batches <= b + 2,
            "one batch for the optimized probes"
        );
        assert_eq!(o.register(50).unwrap(), Armed::Disarmed);
        assert_eq!(code(&o, 50, 1), [51]);
        o.arm_all();
        for a in [0, 8, 16, 24, 50] {
            assert_eq!(code(&o, a, 1), [0xCC]);
        }
        assert_eq!(code(&o, 40, 1), [41], "a disabled probe stays out");
        o.wait_for_optimizer();
        for a in [0, 8, 16, 24, 50] {
            assert!(jump_at(&o, a));
        }
        audit(&o);
    }

    #[test]
    fn no_memory_changes_nothing() {
        let o = opt(5);
        o.register(30).unwrap();
        o.wait_for_optimizer();
        let before = code(&o, 0, 64);
        let mut failed = 0;
        for n in 0..8 {
            fail_after(Some(n));
            let r = o.register(20);
            fail_after(None);
            match r {
                Err(Error::NoMemory) => {
                    failed += 1;
                    assert_eq!(code(&o, 0, 64), before);
                    assert!(o.state(20).is_err());
                }
                Ok(_) => {
                    o.unregister(20).unwrap();
                    o.wait_for_optimizer();
                    break;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(failed > 0, "no allocation failure was injected");
        audit(&o);
        assert_eq!(o.space().counts().live_trampolines, 1);
    }

    #[test]
    fn unregistering_10k_optimized_probes_is_one_batch() {
        let n = 10_000u64;
        let o: Opt = Optimizer::new(
            ByteCode::new((0..n * 8).map(|i| (i % 200) as u8 + 1).collect(), 5),
            EpochRcu::new(),
        );
        for i in 0..n {
            o.register(i * 8).unwrap();
        }
        o.wait_for_optimizer();
        let (s0, c0) = (o.stats(), o.space().counts());
        for i in 0..n {
            o.unregister(i * 8).unwrap();
        }
        o.wait_for_optimizer();
        let (s1, c1) = (o.stats(), o.space().counts());
        std::println!(
            "unregister {n} optimized probes: {} optimizer run(s), {} waits, {} patch batch(es) \
             of {} sites, {} embedder quiescence call(s)",
            s1.runs - s0.runs,
            s1.waits - s0.waits,
            s1.batches - s0.batches,
            c1.sites - c0.sites,
            c1.quiesces - c0.quiesces
        );
        assert_eq!(s1.runs - s0.runs, 1);
        assert_eq!(s1.waits - s0.waits, 2);
        assert_eq!(s1.batches - s0.batches, 1);
        assert_eq!(c1.sites - c0.sites, n);
        assert!(o.is_empty());
        assert_eq!(c1.live_trampolines, 0);
        assert_eq!(c1.mismatches, 0);
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Register(u64),
        Unregister(u64),
        Disable(u64),
        Enable(u64),
        SingleStep(u64, bool),
        Run,
        DisarmAll,
        ArmAll,
        /// The embedder's next `n` patches fail (and change nothing).
        FailPatches(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let a = 0u64..24;
        prop_oneof![
            3 => a.clone().prop_map(Op::Register),
            2 => a.clone().prop_map(Op::Unregister),
            1 => a.clone().prop_map(Op::Disable),
            1 => a.clone().prop_map(Op::Enable),
            1 => (a, any::<bool>()).prop_map(|(a, b)| Op::SingleStep(a, b)),
            2 => Just(Op::Run),
            1 => Just(Op::DisarmAll),
            1 => Just(Op::ArmAll),
            1 => (1u64..3).prop_map(Op::FailPatches),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Any sequence of operations, with the embedder's patches failing at random moments:
        /// no panic, no patch against the wrong bytes, a registration or enable that fails on a
        /// patch changes neither the code nor any state, and once the failures stop and the
        /// optimizer is idle, every probe's code is what its state says, no other byte differs
        /// from the original, every trap on our breakpoint finds a probe, and every enabled
        /// probe that nothing blocks is optimized (the 2026 liveness rule).
        #[test]
        fn any_history_settles_to_consistent_code(ops in proptest::collection::vec(op(), 1..40)) {
            let o: Opt = Optimizer::new(
                ByteCode::new((1..=32).collect(), 3).with_lengths(&[1, 2, 1, 1, 3, 1, 2]),
                EpochRcu::new(),
            );
            o.space().add_branch_target(14);
            let mut disarmed = false;
            for op in ops {
                let before = (o.space().current(0, 32), (0..32).map(|a| o.state(a).ok()).collect::<Vec<_>>());
                let r = match op {
                    Op::Register(a) => o.register(a).map(|_| ()),
                    Op::Unregister(a) => o.unregister(a),
                    Op::Disable(a) => o.disable(a),
                    Op::Enable(a) => o.enable(a),
                    Op::SingleStep(a, b) => o.set_single_step(a, b),
                    Op::Run => { o.run_optimizer(); Ok(()) }
                    Op::DisarmAll => { o.disarm_all(); disarmed = true; Ok(()) }
                    Op::ArmAll => { o.arm_all(); disarmed = false; Ok(()) }
                    Op::FailPatches(n) => { o.space().fail_patches(n); Ok(()) }
                };
                if r == Err(Error::Embedder(-5)) {
                    let after = (o.space().current(0, 32), (0..32).map(|a| o.state(a).ok()).collect::<Vec<_>>());
                    prop_assert!(matches!(op, Op::Register(_) | Op::Enable(_) | Op::SingleStep(..)), "{:?} failed", op);
                    prop_assert_eq!(&after.0, &before.0, "a failed {:?} changed the code", op);
                    // A failed registration may leave its never-armed site on the freeing list
                    // (in the table until the next run), and a failed arm may have forced a
                    // covering jump back; every other probe's state is as it was.
                    for a in 0..32usize {
                        let same = after.1[a] == before.1[a];
                        let excused = match op {
                            Op::Register(x) => a as u64 == x || before.1[a].is_some_and(|s| s.optimized),
                            Op::Enable(_) | Op::SingleStep(..) => before.1[a].is_some_and(|s| s.optimized),
                            _ => false,
                        };
                        prop_assert!(same || excused, "a failed {:?} changed probe {}: {:?} -> {:?}", op, a, before.1[a], after.1[a]);
                    }
                }
                prop_assert_eq!(o.space().counts().mismatches, 0);
            }
            o.space().fail_patches(0);
            o.wait_for_optimizer();
            audit(&o);
            let r = o.rcu().register().unwrap();
            let g = o.rcu().read_lock(&r);
            let mut covered = [false; 32];
            let states: Vec<(u64, ProbeState)> =
                (0..32).filter_map(|a| o.state(a).ok().map(|s| (a, s))).collect();
            for (a, st) in &states {
                prop_assert!(!st.queued(), "queued after wait: {a} {st:?}");
                prop_assert_eq!(st.optimized, st.code == Code::Jump);
                prop_assert!(st.users > 0, "an unused probe survived the run: {}", a);
                let mut e = [0; MAX_DETOUR];
                let n = o.expected_code(*a, &mut e).unwrap();
                if st.code == Code::Jump {
                    for c in &mut covered[*a as usize..*a as usize + n] { *c = true; }
                } else {
                    covered[*a as usize] = true;
                }
                // Liveness: enabled, armed, optimizable, not pinned, and no enabled probe inside
                // its range ⇔ optimized.
                if st.enabled && !disarmed && !st.single_step && st.not_optimizable.is_none() {
                    let end = *a + u64::from(st.jump_len);
                    let blocked = states.iter().any(|(b, s)| *b > *a && *b < end && s.enabled);
                    prop_assert_eq!(
                        st.optimized, !blocked,
                        "probe {} (blocked: {}) in state {:?}", a, blocked, st
                    );
                }
            }
            for a in 0..32u64 {
                let now = o.space().current(a, 1)[0];
                if !covered[a as usize] {
                    prop_assert_eq!(now, o.space().original(a, 1)[0], "stray byte at {}", a);
                }
                if now == 0xCC {
                    let ours = matches!(o.on_breakpoint(&g, a), Trap::Probe { .. });
                    prop_assert!(ours, "our breakpoint at {} found no probe", a);
                }
            }
        }
    }

    #[test]
    fn doc_state_predicates() {
        let st = ProbeState {
            users: 0,
            enabled: false,
            optimized: true,
            queue: Queue::Unoptimizing,
            code: Code::Jump,
            not_optimizable: None,
            single_step: false,
            jump_len: 5,
        };
        assert!(st.unused() && st.queued() && !st.disarmed());
        let st = ProbeState {
            queue: Queue::None,
            code: Code::Original,
            ..st
        };
        assert!(st.disarmed());
        let _ = vec![0u8; 1];
    }
}

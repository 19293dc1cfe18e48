//! Kprobes: consumers at code addresses, over one [`Registry`] and one [`Optimizer`] in one RCU
//! domain — the layer a kernel (or a hypervisor probing its guest, or a process probing itself)
//! embeds as its `register_kprobe`.
//!
//! # The algorithm
//!
//! A [`Kprobe`] is one consumer at one address: the embedder's handler `H` (a function pointer
//! and a context, a trait object, anything `Send + Sync`), its own enabled flag and its count of
//! missed hits. [`Kprobes`] keeps, per address,
//!
//! * the **consumers** in a [`Registry`] (key: [`KERNEL_TEXT`], the address) — a
//!   copy-on-write list per probe, replaced under RCU by every register and unregister, and
//! * the **code** in an [`Optimizer`] — the breakpoint at once, a jump after a batched run, back
//!   to the original when no consumer is left enabled.
//!
//! Both retire through clones of one [`SharedRcu`] domain, so a trap takes **one read section**
//! and asks both under it ([`KprobesGuard::on_breakpoint`]), and a trampoline's call likewise
//! ([`KprobesGuard::on_trampoline`]). The glue Linux's `kernel/kprobes.c` has between its hash
//! table and its optimizer is here, written once:
//!
//! | operation | consumers | code |
//! |---|---|---|
//! | [`Kprobes::register`], the first at an address | list created | [`Optimizer::register`]: a breakpoint now, queued for a jump |
//! | [`Kprobes::register`], another | list replaced | — (enabled again if every other one was disabled) |
//! | [`Kprobes::register`] while the last one's probe waits to be freed | list created | the unused probe is **revived** where it stands (its jump kept), as `reuse_unused_kprobe` does — never `Busy` |
//! | [`Kprobes::disable`] / [`Kprobes::enable`] | the kprobe's flag | disabled when no consumer is enabled, enabled with the first |
//! | [`Kprobes::unregister`] | list replaced (or removed with the last) | [`Optimizer::unregister`] with the last: through the queues, freed after a run |
//!
//! Every writer holds the layer's mutex `M` (kprobes' `kprobe_mutex`): it serializes the two
//! structures' updates so they never disagree for longer than one operation. The optimizer's
//! lock is also an `M`: both may sleep. The registry's locks `L` are short and never held
//! across anything that waits.
//!
//! Unregistration is two-phase, as everywhere in probe-core: a hit that loaded the list a moment
//! before may still call the kprobe; after [`Kprobes::sync`] none can, and the handler's data
//! may go.
//!
//! # Recursion
//!
//! A probe hit while this context (CPU, thread) is already running consumers — a handler that
//! calls a probed function, an interrupt inside a handler — must not run consumers again:
//! kprobes counts it in the probe's `nmissed` and only steps the instruction. [`Reentry`] is
//! that per-context state; [`Consumers::run`] takes it and either runs every enabled consumer
//! or counts each one missed. (The count is the one shared store a hit may make, and only on
//! this uncommon path.)
//!
//! # Example
//!
//! ```
//! use probe_core::kprobes::{Kprobe, Kprobes, KprobeTrap, Ran, Reentry};
//! use probe_core::optimizer::Then;
//! use probe_core::rcu::{Rcu, SlotRcu};
//! use probe_core::testing::ByteCode;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! // The kernel's text (64 one-byte instructions, 5-byte jumps) and its RCU, one domain shared
//! // by the consumers' lists and the optimizer (a kernel passes `&'static` its own RCU).
//! let rcu: &'static SlotRcu = Box::leak(Box::new(SlotRcu::new()));
//! let kprobes: Kprobes<fn(u64), ByteCode, &'static SlotRcu> =
//!     Kprobes::new(ByteCode::new(vec![0x90; 64], 5), rcu);
//!
//! static HITS: AtomicU64 = AtomicU64::new(0);
//! let kp = Arc::new(Kprobe::new(16, (|ip| { HITS.fetch_add(ip, Ordering::Relaxed); }) as fn(u64)));
//! kprobes.register(kp.clone()).unwrap();
//!
//! // The trap handler (interrupts off): one per-CPU reader, one read section for the whole trap.
//! let reader = kprobes.rcu().register().unwrap();
//! let this_cpu = Reentry::new();
//! let guard = kprobes.read(&reader);
//! match guard.on_breakpoint(16) {
//!     KprobeTrap::Probe { consumers, then } => {
//!         assert_eq!(consumers.run(&this_cpu, |kp| (kp.handler())(1)), Ran::Ran(1));
//!         // Queued for a jump, so "optimized" already: continue at the trampoline's copy of
//!         // the displaced instructions (a probe that cannot be optimized answers `Then::Step`).
//!         assert!(matches!(then, Then::Detour(d) if d.len == 5));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! drop(guard);
//!
//! // The optimizer's delayed run (the embedder's timer): the breakpoint becomes a jump, and the
//! // trampoline calls in instead of trapping.
//! kprobes.wait_for_optimizer();
//! let guard = kprobes.read(&reader);
//! guard.on_trampoline(16).run(&this_cpu, |kp| (kp.handler())(1));
//! drop(guard);
//! assert_eq!(HITS.load(Ordering::Relaxed), 2);
//!
//! // Unregister, then one grace period before the handler's data may go.
//! kprobes.unregister(&kp).unwrap();
//! kprobes.sync();
//! kprobes.wait_for_optimizer();
//! assert_eq!(kprobes.space().current(16, 5), [0x90; 5]);
//! ```
//!
//! # Invariants
//!
//! * INVARIANT: under the layer's mutex, an address has a probe in the optimizer with one user
//!   exactly while it has a live probe in the registry (a consumer); the optimizer's probe is
//!   enabled exactly while one of those consumers is enabled. Between two operations no other
//!   writer touches either structure.
//! * INVARIANT: the registry and the optimizer retire through clones of the layer's domain,
//!   and [`SharedRcu`] promises those clones are one domain: a guard from [`Kprobes::read`]
//!   protects what either retires.

use crate::arch::{CodeSpace, SavedInsn};
use crate::error::{Error, Result};
use crate::lock::{DEFAULT_LOCK_SLOTS, RawGuard, RawLock, SpinLock};
use crate::optimizer::{Armed, Optimizer, ProbeState, Then, Trap};
use crate::probe::{ConsumerHandle, ObjectId, ProbeKey};
use crate::rcu::Rcu;
use crate::registry::Registry;
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use alloc::sync::Arc;
use core::fmt;

/// The registry key's object for kernel text: kprobes are keyed by address alone.
pub const KERNEL_TEXT: ObjectId = ObjectId(0);

/// An RCU handle whose every clone is the same domain (`&R`, `Arc<R>`): what lets the registry,
/// the optimizer and the trap share one.
///
/// # Safety
///
/// A guard taken through any clone protects what is retired through any other clone: `clone`
/// must not create a new domain.
pub unsafe trait SharedRcu: Rcu + Clone {}

// SAFETY: a reference is the domain it points to.
unsafe impl<R: Rcu + ?Sized> SharedRcu for &R {}
// SAFETY: clones of an `Arc` point to one domain.
unsafe impl<R: Rcu + ?Sized> SharedRcu for Arc<R> {}

/// One consumer at one address: the embedder's handler, its enabled flag and its missed hits.
pub struct Kprobe<H> {
    addr: u64,
    handler: H,
    /// Hits run the handler only while set. Written by [`Kprobes::enable`] / `disable` under
    /// the layer's mutex; read by hits.
    enabled: AtomicBool,
    /// Hits that found this context already running consumers ([`Reentry`]).
    nmissed: AtomicU64,
}

impl<H> Kprobe<H> {
    /// A kprobe at `addr` calling `handler`, enabled.
    pub fn new(addr: u64, handler: H) -> Self {
        Self {
            addr,
            handler,
            enabled: AtomicBool::new(true),
            nmissed: AtomicU64::new(0),
        }
    }

    /// A kprobe that starts disabled (Linux's `KPROBE_FLAG_DISABLED`): registered, its code
    /// not armed until [`Kprobes::enable`].
    pub fn new_disabled(addr: u64, handler: H) -> Self {
        Self {
            addr,
            handler,
            enabled: AtomicBool::new(false),
            nmissed: AtomicU64::new(0),
        }
    }

    /// Where it probes.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Hits run it (as last set by [`Kprobes::enable`] / [`Kprobes::disable`]).
    pub fn is_enabled(&self) -> bool {
        // Acquire pairs with the Release stores in `Kprobes::set_enabled`; diagnostics only.
        self.enabled.load(Ordering::Acquire)
    }

    /// Hits skipped because their context was already running consumers.
    pub fn nmissed(&self) -> u64 {
        // Relaxed: a statistic.
        self.nmissed.load(Ordering::Relaxed)
    }
}

impl<H> fmt::Debug for Kprobe<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kprobe")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("enabled", &self.is_enabled())
            .field("nmissed", &self.nmissed())
            .finish_non_exhaustive()
    }
}

/// Kprobes over the embedder's code space `S`, in the RCU domain `D`. See the
/// [module docs](self).
///
/// `H` is the handler type; `L` the registry's short locks (a spinlock: never held across a
/// wait); `M` the layer's mutex and the optimizer's lock (held across quiescence waits and grace
/// periods: in a kernel, a sleeping mutex); `N` the registry's hashed lock count.
pub struct Kprobes<
    H: Send + Sync + 'static,
    S: CodeSpace,
    D: SharedRcu,
    L: RawLock = SpinLock,
    M: RawLock = SpinLock,
    const N: usize = DEFAULT_LOCK_SLOTS,
    P: ConsumerHandle<Target = Kprobe<H>> = Arc<Kprobe<H>>,
> {
    rcu: D,
    mutex: M,
    registry: Registry<Kprobe<H>, D, L, N, P>,
    optimizer: Optimizer<S, D, M>,
}

impl<H, S, D, L, M, const N: usize, P> fmt::Debug for Kprobes<H, S, D, L, M, N, P>
where
    H: Send + Sync + 'static,
    S: CodeSpace,
    D: SharedRcu,
    L: RawLock,
    M: RawLock,
    P: ConsumerHandle<Target = Kprobe<H>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kprobes")
            .field("probes", &self.optimizer.len())
            .finish_non_exhaustive()
    }
}

impl<H, S, D, L, M, const N: usize, P> Kprobes<H, S, D, L, M, N, P>
where
    H: Send + Sync + 'static,
    S: CodeSpace,
    D: SharedRcu,
    L: RawLock + Default,
    M: RawLock + Default,
    P: ConsumerHandle<Target = Kprobe<H>>,
{
    /// Kprobes over `space`, with `rcu` the one domain of hits and writers.
    pub fn new(space: S, rcu: D) -> Self {
        Self::with_locks(space, rcu, M::default(), M::default(), L::default)
    }
}

impl<H, S, D, L, M, const N: usize, P> Kprobes<H, S, D, L, M, N, P>
where
    H: Send + Sync + 'static,
    S: CodeSpace,
    D: SharedRcu,
    L: RawLock,
    M: RawLock,
    P: ConsumerHandle<Target = Kprobe<H>>,
{
    /// [`Kprobes::new`] with the embedder's initialized locks: the layer's `mutex`, the
    /// optimizer's `optimizer_lock` (both may sleep), and `registry_lock` called for each of the
    /// registry's `N + 1` short locks.
    pub fn with_locks(
        space: S,
        rcu: D,
        mutex: M,
        optimizer_lock: M,
        registry_lock: impl FnMut() -> L,
    ) -> Self {
        Self {
            registry: Registry::with_locks(rcu.clone(), registry_lock),
            optimizer: Optimizer::with_lock(space, rcu.clone(), optimizer_lock),
            rcu,
            mutex,
        }
    }

    /// The domain (register each CPU's reader with it).
    pub fn rcu(&self) -> &D {
        &self.rcu
    }

    /// The code space.
    pub fn space(&self) -> &S {
        self.optimizer.space()
    }

    /// The optimizer, for its runs, states and statistics (its writers go through this layer).
    pub fn optimizer(&self) -> &Optimizer<S, D, M> {
        &self.optimizer
    }

    /// Enters the read section a trap (or a trampoline call) holds from its first lookup to its
    /// last consumer: the hit path's entry point. No lock, no shared store, no allocation (as
    /// the domain's `read_lock` promises).
    #[inline]
    pub fn read<'r>(&'r self, reader: &'r D::Reader<'_>) -> KprobesGuard<'r, H, S, D, L, M, N, P> {
        KprobesGuard {
            kprobes: self,
            guard: self.rcu.read_lock(reader),
        }
    }

    /// Waits for a grace period: afterwards no hit calls a kprobe unregistered (or disabled)
    /// before this call began.
    pub fn sync(&self) {
        self.rcu.synchronize();
    }

    /// One optimizer run ([`Optimizer::run_optimizer`]; the embedder's delayed timer calls it
    /// after [`CodeSpace::kick`]).
    pub fn run_optimizer(&self) {
        self.optimizer.run_optimizer();
    }

    /// Runs the optimizer until nothing is queued ([`Optimizer::wait_for_optimizer`]).
    pub fn wait_for_optimizer(&self) {
        self.optimizer.wait_for_optimizer();
    }

    /// The optimizer's state of the probe at `addr`.
    pub fn state(&self, addr: u64) -> Result<ProbeState> {
        self.optimizer.state(addr)
    }

    fn key(addr: u64) -> ProbeKey {
        ProbeKey::new(KERNEL_TEXT, addr)
    }

    /// How many of the consumers at `addr` are enabled, and whether `kp` is among them all
    /// (`None`: no consumer at `addr`). Under the mutex.
    fn census(&self, addr: u64, kp: &P) -> Option<(usize, bool)> {
        self.registry.with_consumers(&Self::key(addr), |list| {
            (
                // Relaxed: the flags are written only under the mutex, which we hold.
                list.iter()
                    .filter(|k| k.consumer().enabled.load(Ordering::Relaxed))
                    .count(),
                list.iter().any(|k| P::same_consumer(k, kp)),
            )
        })
    }

    /// Registers `kp` at its address.
    ///
    /// The first kprobe at an address puts a breakpoint there at once (queued to become a
    /// jump); a probe left unused by the last unregistration and not yet freed is revived. The
    /// answer is what the code got ([`Armed`]; [`Armed::Shared`] for a second consumer).
    ///
    /// # Errors
    ///
    /// * [`Error::DuplicateConsumer`] — `kp` (the same `Arc`) is already registered.
    /// * [`Error::ExistingTrap`], [`Error::InsideInstruction`], [`Error::OffsetOutOfRange`] —
    ///   the code space refuses the address (see [`Optimizer::register`]).
    /// * [`Error::NoMemory`] — an allocation failed.
    /// * [`Error::Embedder`] — the code space's patch failed (all or nothing).
    ///
    /// On error nothing changed: neither the consumers nor the code.
    pub fn register(&self, kp: P) -> Result<Armed> {
        let _m = RawGuard::lock(&self.mutex);
        let addr = kp.consumer().addr;
        let key = Self::key(addr);
        // Relaxed: the flag is written only under the mutex, which we hold.
        let enabled = kp.consumer().enabled.load(Ordering::Relaxed);
        match self.census(addr, &kp) {
            Some((_, true)) => Err(Error::DuplicateConsumer),
            Some((on, false)) => {
                if enabled && on == 0 {
                    // The first enabled consumer of a disabled probe: its code goes back in
                    // first (the step that can fail, on the embedder's patch).
                    self.optimizer.enable(addr)?;
                }
                if let Err(e) = self.registry.register_with(key, kp, SavedInsn::default()) {
                    if enabled && on == 0 {
                        // Cannot fail: the probe has users (INVARIANT), and disabling never does.
                        let _ = self.optimizer.disable(addr);
                    }
                    return Err(e);
                }
                Ok(Armed::Shared)
            }
            None => {
                // The code first: it is the step whose refusal (a bad address) is most likely,
                // and undoing it cannot fail. Hits that trap before the consumers are published
                // find no consumers and only step: the registration has not returned yet.
                let armed = self.optimizer.register(addr)?;
                if let Err(e) = self.registry.register_with(key, kp, SavedInsn::default()) {
                    // The one user we just added goes again: unregister cannot fail for a
                    // probe with users.
                    let _ = self.optimizer.unregister(addr);
                    return Err(e);
                }
                if !enabled {
                    // Registered disabled: hits skip it; the code goes back through the queues.
                    self.optimizer.disable(addr)?;
                    return Ok(Armed::Disabled);
                }
                Ok(armed)
            }
        }
    }

    /// Unregisters `kp`. Does not wait: a hit may still call it until [`Kprobes::sync`]
    /// returns. The last kprobe at an address sends its probe through the optimizer's queues
    /// (code restored, then freed after a run).
    ///
    /// # Errors
    ///
    /// * [`Error::UnknownProbe`] — nothing is registered at `kp`'s address.
    /// * [`Error::UnknownConsumer`] — `kp` is not registered there.
    ///
    /// Only misuse fails: unregistration never allocates (its shorter list was reserved by the
    /// registration; see the [registry's invariants](crate::registry)), so a registered kprobe
    /// always unregisters. On error nothing changed.
    pub fn unregister(&self, kp: &P) -> Result<()> {
        let _m = RawGuard::lock(&self.mutex);
        let addr = kp.consumer().addr;
        let (on, _) = self.census(addr, kp).ok_or(Error::UnknownProbe)?;
        let last = self.registry.unregister_last(&Self::key(addr), kp)?;
        if last.is_some() {
            // The optimizer's probe has this layer's one user (INVARIANT).
            return self.optimizer.unregister(addr);
        }
        // Relaxed: written only under the mutex, which we hold.
        if kp.consumer().enabled.load(Ordering::Relaxed) && on == 1 {
            // It was the only enabled consumer left.
            self.optimizer.disable(addr)?;
        }
        Ok(())
    }

    /// Stops hits from running `kp` (others at its address keep running); when no consumer at
    /// the address is enabled, its code goes back to the original through the queues.
    /// Disabling a disabled kprobe does nothing. Hits that loaded the flag before may still run
    /// it until [`Kprobes::sync`] returns.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownProbe`] / [`Error::UnknownConsumer`] — `kp` is not registered.
    pub fn disable(&self, kp: &P) -> Result<()> {
        self.set_enabled(kp, false)
    }

    /// Lets hits run `kp` again; the first enabled consumer at an address arms its code (a
    /// breakpoint at once, queued for a jump).
    ///
    /// # Errors
    ///
    /// As for [`Kprobes::disable`], and [`Error::Embedder`] if the code space's patch failed —
    /// then the kprobe stays disabled and nothing changed.
    pub fn enable(&self, kp: &P) -> Result<()> {
        self.set_enabled(kp, true)
    }

    fn set_enabled(&self, kp: &P, on: bool) -> Result<()> {
        let _m = RawGuard::lock(&self.mutex);
        let (enabled, ours) = self
            .census(kp.consumer().addr, kp)
            .ok_or(Error::UnknownProbe)?;
        if !ours {
            return Err(Error::UnknownConsumer);
        }
        // Relaxed: written only under the mutex, which we hold.
        if kp.consumer().enabled.load(Ordering::Relaxed) == on {
            return Ok(());
        }
        if on && enabled == 0 {
            // The code first: the step that can fail (the embedder's patch), changing nothing.
            self.optimizer.enable(kp.consumer().addr)?;
        }
        // Release pairs with the Acquire load in `Consumers::run`: a hit that sees the kprobe
        // enabled sees everything the enabler did before.
        kp.consumer().enabled.store(on, Ordering::Release);
        if !on && enabled == 1 {
            // Never fails for a probe with users (INVARIANT).
            self.optimizer.disable(kp.consumer().addr)?;
        }
        Ok(())
    }
}

/// An open read section of [`Kprobes`]: what a trap or a trampoline call holds.
pub struct KprobesGuard<
    'r,
    H: Send + Sync + 'static,
    S: CodeSpace,
    D: SharedRcu + 'r,
    L: RawLock,
    M: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = Kprobe<H>>,
> {
    kprobes: &'r Kprobes<H, S, D, L, M, N, P>,
    guard: D::Guard<'r>,
}

/// The answer to a trap at a kprobe address.
pub enum KprobeTrap<'g, H: Send + Sync + 'static, P = Arc<Kprobe<H>>> {
    /// Ours: run `consumers` (empty while every kprobe there is disabled, or while it is being
    /// unregistered), then continue as `then` says.
    Probe {
        /// The consumers to run ([`Consumers::run`]).
        consumers: Consumers<'g, H, P>,
        /// How to continue: step (or emulate) the original instruction, or continue at the
        /// trampoline's displaced instructions.
        then: Then<'g>,
    },
    /// Not ours: a trap instruction of someone else's is there. Deliver it.
    NotOurs,
    /// No trap there any more (the probe went while this CPU trapped): execute the instruction
    /// again.
    Restart,
}

impl<H: Send + Sync + 'static, P> fmt::Debug for KprobeTrap<'_, H, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KprobeTrap::Probe { consumers, then } => f
                .debug_struct("Probe")
                .field("consumers", &consumers.list.len())
                .field("then", then)
                .finish(),
            KprobeTrap::NotOurs => f.write_str("NotOurs"),
            KprobeTrap::Restart => f.write_str("Restart"),
        }
    }
}

impl<'r, H, S, D, L, M, const N: usize, P> KprobesGuard<'r, H, S, D, L, M, N, P>
where
    H: Send + Sync + 'static,
    S: CodeSpace,
    D: SharedRcu + 'r,
    L: RawLock,
    M: RawLock,
    P: ConsumerHandle<Target = Kprobe<H>>,
{
    /// A CPU trapped at `addr`. Lock-free and store-free: one lookup in the optimizer's table,
    /// one flag word, and (if the probe fires) one lookup in the registry's tree, under this
    /// one read section.
    #[inline]
    pub fn on_breakpoint(&self, addr: u64) -> KprobeTrap<'_, H, P> {
        match self.kprobes.optimizer.on_breakpoint(&self.guard, addr) {
            Trap::Probe { fire, then } => KprobeTrap::Probe {
                consumers: if fire {
                    self.consumers(addr)
                } else {
                    Consumers::NONE
                },
                then,
            },
            Trap::NotOurs => KprobeTrap::NotOurs,
            Trap::Restart => KprobeTrap::Restart,
        }
    }

    /// A trampoline calls in for the probe at `addr`: the consumers to run (none once the probe
    /// is disabled or gone: its trampoline can be entered until the next quiescence wait).
    #[inline]
    pub fn on_trampoline(&self, addr: u64) -> Consumers<'_, H, P> {
        if self.kprobes.optimizer.on_trampoline(&self.guard, addr) {
            self.consumers(addr)
        } else {
            Consumers::NONE
        }
    }

    fn consumers(&self, addr: u64) -> Consumers<'_, H, P> {
        // SAFETY: `self.guard` was taken on `self.kprobes.rcu`, and the registry retires
        // through a clone of it, which `SharedRcu` promises is the same domain (INVARIANT).
        let view = unsafe {
            self.kprobes
                .registry
                .lookup_under(&self.guard, &Kprobes::<H, S, D, L, M, N, P>::key(addr))
        };
        Consumers {
            list: view.map_or(&[][..], |v| v.consumers()),
            _handler: core::marker::PhantomData,
        }
    }
}

/// The consumers a hit found, valid for its read section.
pub struct Consumers<'g, H, P = Arc<Kprobe<H>>> {
    list: &'g [P],
    _handler: core::marker::PhantomData<fn() -> H>,
}

impl<H, P> Clone for Consumers<'_, H, P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<H, P> Copy for Consumers<'_, H, P> {}

/// What [`Consumers::run`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ran {
    /// Ran this many enabled consumers.
    Ran(usize),
    /// This context was already running consumers: this many enabled consumers were counted
    /// missed instead (their `nmissed`), none ran.
    Missed(usize),
}

impl<'g, H: 'g, P: ConsumerHandle<Target = Kprobe<H>>> Consumers<'g, H, P> {
    const NONE: Self = Self {
        list: &[],
        _handler: core::marker::PhantomData,
    };

    /// The enabled kprobes, in registration order. No reference count is touched.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = &'g Kprobe<H>> + 'g {
        self.list
            .iter()
            .map(|k| k.consumer())
            // Acquire pairs with the Release store in `Kprobes::set_enabled`.
            .filter(|k| k.enabled.load(Ordering::Acquire))
    }

    /// No consumer at all (enabled or not).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Runs `f` on every enabled kprobe, unless this context is already running consumers
    /// (`reentry`): then each enabled kprobe's `nmissed` is counted instead.
    #[inline]
    pub fn run(&self, reentry: &Reentry, mut f: impl FnMut(&'g Kprobe<H>)) -> Ran {
        match reentry.enter() {
            Some(_running) => {
                let mut n = 0;
                for k in self.iter() {
                    f(k);
                    n += 1;
                }
                Ran::Ran(n)
            }
            None => {
                let mut n = 0;
                for k in self.iter() {
                    // Relaxed: a statistic. The one shared store of a hit, on this rare path.
                    k.nmissed.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                Ran::Missed(n)
            }
        }
    }
}

/// Whether one context (a CPU, a thread) is running consumers now: kprobes' per-CPU
/// `current_kprobe`, as a flag. One per context, never shared between contexts; an interrupt
/// on the same CPU is the same context (it sees the flag its CPU set).
///
/// # Implementation details
///
/// One `AtomicBool` accessed only by its own context with Relaxed loads and stores: an
/// interrupt and the code it interrupts run on one CPU, which sees its own stores in program
/// order, so no fence pairs with anything. It is atomic so that it may live in a `static`
/// per-CPU array and so that an interrupt between the load and the store in `enter` is
/// harmless (the interrupt's own enter and exit leave the flag as they found it).
#[derive(Debug, Default)]
pub struct Reentry {
    running: AtomicBool,
}

impl Reentry {
    /// Not running consumers. (`const`, so a kernel can keep one per CPU in a `static`.)
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            running: AtomicBool::new(false),
        }
    }

    /// Not running consumers.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            running: AtomicBool::new(false),
        }
    }

    /// Marks this context as running consumers until the guard drops; `None` if it already is.
    #[inline]
    pub fn enter(&self) -> Option<ReentryGuard<'_>> {
        // Relaxed: only this context reads and writes the flag (see the type's docs).
        if self.running.load(Ordering::Relaxed) {
            return None;
        }
        // Relaxed: as above.
        self.running.store(true, Ordering::Relaxed);
        Some(ReentryGuard { reentry: self })
    }

    /// Running consumers now.
    pub fn is_running(&self) -> bool {
        // Relaxed: as in `enter`.
        self.running.load(Ordering::Relaxed)
    }
}

/// This context is running consumers ([`Reentry::enter`]) until dropped.
#[derive(Debug)]
pub struct ReentryGuard<'a> {
    reentry: &'a Reentry,
}

impl Drop for ReentryGuard<'_> {
    fn drop(&mut self) {
        // Relaxed: as in `Reentry::enter`.
        self.reentry.running.store(false, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use crate::alloc_util::fail_after;
    use crate::lock::{DEFAULT_LOCK_SLOTS, SpinLock};
    use crate::optimizer::{Code, Queue};
    use crate::rcu::SlotRcu;
    use crate::testing::ByteCode;
    use alloc::vec::Vec;
    use std::sync::atomic::AtomicUsize;

    type Handler = &'static str;
    type Kp = Kprobes<Handler, ByteCode, Arc<SlotRcu>>;

    /// 64 one-byte instructions `1..=64`, 5-byte jumps.
    fn world() -> Kp {
        Kprobes::new(
            ByteCode::new((1..=64).collect(), 5),
            Arc::new(SlotRcu::new()),
        )
    }

    fn kp(addr: u64, name: Handler) -> Arc<Kprobe<Handler>> {
        Arc::new(Kprobe::new(addr, name))
    }

    /// What a trap at `addr` runs now (names), through the breakpoint answer.
    fn trap(k: &Kp, addr: u64) -> Vec<Handler> {
        let reader = k.rcu().register().unwrap();
        let g = k.read(&reader);
        let mut ran = Vec::new();
        if let KprobeTrap::Probe { consumers, .. } = g.on_breakpoint(addr) {
            consumers.run(&Reentry::new(), |kp| ran.push(*kp.handler()));
        }
        ran
    }

    fn tramp(k: &Kp, addr: u64) -> Vec<Handler> {
        let reader = k.rcu().register().unwrap();
        let g = k.read(&reader);
        let mut ran = Vec::new();
        g.on_trampoline(addr)
            .run(&Reentry::new(), |kp| ran.push(*kp.handler()));
        ran
    }

    #[test]
    fn lifecycle_shares_one_probe_per_address() {
        let k = world();
        let a = kp(16, "a");
        let b = kp(16, "b");
        assert_eq!(k.register(a.clone()).unwrap(), Armed::Optimizing);
        assert_eq!(k.register(b.clone()).unwrap(), Armed::Shared);
        assert_eq!(k.register(a.clone()), Err(Error::DuplicateConsumer));
        assert_eq!(
            k.state(16).unwrap().users,
            1,
            "one optimizer user per address"
        );
        assert_eq!(trap(&k, 16), ["a", "b"]);
        k.wait_for_optimizer();
        assert_eq!(k.space().current(16, 1), [0xE9]);
        assert_eq!(tramp(&k, 16), ["a", "b"]);
        k.unregister(&a).unwrap();
        assert_eq!(tramp(&k, 16), ["b"]);
        assert_eq!(k.unregister(&a), Err(Error::UnknownConsumer));
        k.unregister(&b).unwrap();
        assert_eq!(k.unregister(&b), Err(Error::UnknownProbe));
        assert!(tramp(&k, 16).is_empty(), "an unregistered probe fired");
        k.sync();
        k.wait_for_optimizer();
        assert_eq!(k.space().current(16, 5), [17, 18, 19, 20, 21]);
        assert!(k.optimizer().is_empty());
        assert!(k.registry.is_empty());
    }

    #[test]
    fn reregistering_before_the_free_revives_the_probe() {
        let k = world();
        let a = kp(16, "a");
        k.register(a.clone()).unwrap();
        k.wait_for_optimizer();
        k.unregister(&a).unwrap();
        // Unused, its jump still in the code, waiting for a run: register again at once.
        assert!(k.state(16).unwrap().unused());
        let b = kp(16, "b");
        assert_eq!(k.register(b.clone()).unwrap(), Armed::Optimizing);
        assert_eq!(k.optimizer().stats().revived, 1);
        assert_eq!(tramp(&k, 16), ["b"]);
        k.wait_for_optimizer();
        let st = k.state(16).unwrap();
        assert_eq!((st.users, st.enabled, st.code), (1, true, Code::Jump));
        assert_eq!(tramp(&k, 16), ["b"]);
    }

    #[test]
    fn per_consumer_enable_and_disable() {
        let k = world();
        let a = kp(16, "a");
        let b = kp(16, "b");
        k.register(a.clone()).unwrap();
        k.register(b.clone()).unwrap();
        k.wait_for_optimizer();
        k.disable(&a).unwrap();
        k.disable(&a).unwrap(); // twice: nothing more
        assert!(!a.is_enabled());
        assert_eq!(tramp(&k, 16), ["b"]);
        assert!(
            k.state(16).unwrap().enabled,
            "one consumer is still enabled"
        );
        k.disable(&b).unwrap();
        assert!(tramp(&k, 16).is_empty());
        assert!(!k.state(16).unwrap().enabled);
        k.wait_for_optimizer();
        assert_eq!(
            k.space().current(16, 5),
            [17, 18, 19, 20, 21],
            "code not restored"
        );
        k.enable(&b).unwrap();
        assert!(k.state(16).unwrap().enabled);
        assert_eq!(trap(&k, 16), ["b"]);
        k.wait_for_optimizer();
        assert_eq!(tramp(&k, 16), ["b"]);
        // Unregistering the only enabled consumer disables the probe; the disabled one stays.
        k.unregister(&b).unwrap();
        let st = k.state(16).unwrap();
        assert_eq!((st.users, st.enabled), (1, false));
        k.enable(&a).unwrap();
        assert_eq!(trap(&k, 16), ["a"]);
        // Errors for kprobes that are not registered.
        assert_eq!(k.disable(&b), Err(Error::UnknownConsumer));
        assert_eq!(k.enable(&kp(8, "x")), Err(Error::UnknownProbe));
    }

    #[test]
    fn registered_disabled_arms_nothing_until_enabled() {
        let k = world();
        let a = Arc::new(Kprobe::new_disabled(16, "a"));
        assert_eq!(k.register(a.clone()).unwrap(), Armed::Disabled);
        k.wait_for_optimizer();
        assert_eq!(k.space().current(16, 1), [17]);
        assert!(trap(&k, 16).is_empty());
        k.enable(&a).unwrap();
        assert_eq!(k.space().current(16, 1), [0xCC]);
        assert_eq!(trap(&k, 16), ["a"]);
    }

    #[test]
    fn a_hit_inside_consumers_is_missed_not_run() {
        let k = world();
        let a = kp(16, "a");
        k.register(a.clone()).unwrap();
        let reader = k.rcu().register().unwrap();
        let cpu = Reentry::new();
        let g = k.read(&reader);
        let KprobeTrap::Probe { consumers, .. } = g.on_breakpoint(16) else {
            panic!("ours")
        };
        let inner = AtomicUsize::new(0);
        let ran = consumers.run(&cpu, |_| {
            // The handler hits the probe again on the same CPU.
            let KprobeTrap::Probe { consumers, .. } = g.on_breakpoint(16) else {
                panic!("ours")
            };
            assert!(cpu.is_running());
            assert_eq!(consumers.run(&cpu, |_| panic!("recursed")), Ran::Missed(1));
            inner.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran, Ran::Ran(1));
        assert_eq!(inner.load(Ordering::Relaxed), 1);
        assert_eq!(a.nmissed(), 1);
        assert!(!cpu.is_running());
    }

    #[test]
    fn bad_addresses_are_errors_and_change_nothing() {
        let mut text: Vec<u8> = (1..=64).collect();
        text[20] = 0xCC;
        let k: Kp = Kprobes::new(ByteCode::new(text, 5), Arc::new(SlotRcu::new()));
        let before = k.space().current(0, 64);
        assert_eq!(k.register(kp(20, "t")), Err(Error::ExistingTrap));
        assert_eq!(k.register(kp(64, "o")), Err(Error::OffsetOutOfRange));
        assert_eq!(k.space().current(0, 64), before);
        assert!(k.optimizer().is_empty() && k.registry.is_empty());
    }

    #[test]
    fn every_allocation_failure_changes_nothing() {
        // The first registration at an address and a second one, each with its N-th allocation
        // failing, for every N until it succeeds: a failure leaves the code, the optimizer and
        // the registry exactly as they were.
        for second in [false, true] {
            let mut n = 0;
            loop {
                let k = world();
                let a = kp(16, "a");
                if second {
                    k.register(a.clone()).unwrap();
                }
                let code = k.space().current(0, 64);
                let (opt_len, reg_len) = (k.optimizer().len(), k.registry.len());
                let state = k.state(16).ok();
                let b = kp(16, "b");
                fail_after(Some(n));
                let r = k.register(b.clone());
                fail_after(None);
                match r {
                    Err(Error::NoMemory) => {
                        assert_eq!(k.space().current(0, 64), code, "failure {n} changed code");
                        assert_eq!(k.optimizer().len(), opt_len);
                        assert_eq!(k.registry.len(), reg_len, "failure {n} left a probe");
                        assert_eq!(k.state(16).ok(), state);
                        assert_eq!(trap(&k, 16), if second { &["a"][..] } else { &[][..] });
                        n += 1;
                    }
                    Ok(_) => {
                        assert_eq!(
                            trap(&k, 16),
                            if second { &["a", "b"][..] } else { &["b"][..] }
                        );
                        break;
                    }
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            assert!(n > 0, "no allocation was exercised");
        }
    }

    /// The whole trap — read section, both lookups, the consumer traversal, the recursion
    /// guard — writes only the reader's own slot and this context's `Reentry`: no shared line.
    #[test]
    fn a_hit_writes_no_shared_memory() {
        let k = world();
        for a in [8, 16, 24] {
            k.register(kp(a, "a")).unwrap();
            k.register(kp(a, "b")).unwrap();
        }
        k.wait_for_optimizer();
        k.register(kp(40, "t")).unwrap(); // a breakpoint, queued for its jump
        k.sync();
        let reader = k.rcu().register().unwrap();
        let cpu = Reentry::new();
        let ((), stores) = crate::sync::audit::stores_during(|| {
            for _ in 0..100 {
                let g = k.read(&reader);
                for a in [8, 16, 24] {
                    assert_eq!(g.on_trampoline(a).run(&cpu, |_| ()), Ran::Ran(2));
                }
                match g.on_breakpoint(40) {
                    KprobeTrap::Probe { consumers, .. } => {
                        assert_eq!(consumers.run(&cpu, |_| ()), Ran::Ran(1))
                    }
                    other => panic!("{other:?}"),
                }
            }
        });
        // (A trap where no probe is reads the code through the embedder's `CodeSpace::read`,
        // which in `ByteCode` takes a lock: the embedder's store, not probe-core's.)
        assert!(
            !stores.is_empty(),
            "the audit saw nothing: it is not wired in"
        );
        let own = [
            reader.slot_addr(),
            &cpu.running as *const AtomicBool as usize,
        ];
        let mut foreign: Vec<usize> = stores.into_iter().filter(|a| !own.contains(a)).collect();
        foreign.dedup();
        assert!(
            foreign.is_empty(),
            "a hit stored outside its reader slot and its Reentry: {foreign:x?}"
        );
    }

    /// A kernel's own reference-counted pointer, as the handle type: the layer and the
    /// registry hold clones of it in their lists and drop every one by the time the kprobe is
    /// unregistered and a grace period has passed.
    #[test]
    fn a_kernels_own_refcounted_pointer_works_as_the_handle() {
        use core::ptr::NonNull;
        struct Inner<T> {
            refs: std::sync::atomic::AtomicUsize,
            value: T,
        }
        struct KArc<T>(NonNull<Inner<T>>);
        // SAFETY: shared ownership of a `Sync` value, as `Arc`.
        unsafe impl<T: Send + Sync> Send for KArc<T> {}
        // SAFETY: as above.
        unsafe impl<T: Send + Sync> Sync for KArc<T> {}
        impl<T> KArc<T> {
            fn new(value: T) -> Self {
                let b = std::boxed::Box::new(Inner {
                    refs: std::sync::atomic::AtomicUsize::new(1),
                    value,
                });
                KArc(NonNull::from(std::boxed::Box::leak(b)))
            }
            fn count(&self) -> usize {
                // SAFETY: we hold a reference.
                unsafe { self.0.as_ref() }.refs.load(Ordering::SeqCst)
            }
        }
        impl<T> Clone for KArc<T> {
            fn clone(&self) -> Self {
                // SAFETY: we hold a reference.
                unsafe { self.0.as_ref() }
                    .refs
                    .fetch_add(1, Ordering::Relaxed);
                KArc(self.0)
            }
        }
        impl<T> Drop for KArc<T> {
            fn drop(&mut self) {
                // SAFETY: we hold a reference; the last one frees.
                if unsafe { self.0.as_ref() }
                    .refs
                    .fetch_sub(1, Ordering::AcqRel)
                    == 1
                {
                    // SAFETY: the last reference: nobody else can reach the allocation.
                    drop(unsafe { std::boxed::Box::from_raw(self.0.as_ptr()) });
                }
            }
        }
        // SAFETY: clone and drop are count operations (the last drop frees); identity by pointer.
        unsafe impl<T: Send + Sync + 'static> ConsumerHandle for KArc<T> {
            type Target = T;
            fn consumer(&self) -> &T {
                // SAFETY: we hold a reference.
                &unsafe { self.0.as_ref() }.value
            }
            fn same_consumer(a: &Self, b: &Self) -> bool {
                a.0 == b.0
            }
        }

        type K = Kprobes<
            Handler,
            ByteCode,
            Arc<SlotRcu>,
            SpinLock,
            SpinLock,
            DEFAULT_LOCK_SLOTS,
            KArc<Kprobe<Handler>>,
        >;
        let k: K = Kprobes::new(
            ByteCode::new((1..=64).collect(), 5),
            Arc::new(SlotRcu::new()),
        );
        let a = KArc::new(Kprobe::new(16, "a"));
        let b = KArc::new(Kprobe::new(16, "b"));
        k.register(a.clone()).unwrap();
        k.register(b.clone()).unwrap();
        let reader = k.rcu().register().unwrap();
        let ran: Vec<Handler> = {
            let g = k.read(&reader);
            let mut v = Vec::new();
            g.on_trampoline(16)
                .run(&Reentry::new(), |kp| v.push(*kp.handler()));
            v
        };
        assert_eq!(ran, ["a", "b"]);
        assert!(a.count() > 1, "the layer holds clones");
        k.unregister(&a).unwrap();
        k.unregister(&b).unwrap();
        k.sync();
        k.wait_for_optimizer();
        k.sync();
        assert_eq!((a.count(), b.count()), (1, 1), "a list kept a clone");
    }

    #[test]
    fn a_failed_patch_fails_the_registration_and_changes_nothing() {
        let k = world();
        let before = k.space().current(0, 64);
        k.space().fail_patches(1);
        assert_eq!(k.register(kp(16, "a")), Err(Error::Embedder(-5)));
        assert_eq!(k.space().current(0, 64), before);
        assert!(k.registry.is_empty());
        assert!(trap(&k, 16).is_empty());
        // Disabled, then an enable whose patch fails: still disabled, nothing runs.
        let a = Arc::new(Kprobe::new_disabled(16, "a"));
        k.register(a.clone()).unwrap();
        k.wait_for_optimizer();
        k.space().fail_patches(1);
        assert_eq!(k.enable(&a), Err(Error::Embedder(-5)));
        assert!(!a.is_enabled());
        assert_eq!(k.space().current(0, 64), before);
        k.enable(&a).unwrap();
        assert_eq!(trap(&k, 16), ["a"]);
    }

    #[test]
    fn one_domain_for_both_structures() {
        // The registry and the optimizer hold clones of the layer's `Arc`: one domain.
        let k = world();
        assert!(Arc::ptr_eq(k.rcu(), k.registry.rcu()));
        assert!(Arc::ptr_eq(k.rcu(), k.optimizer.rcu()));
    }

    #[test]
    fn initialized_locks_are_used() {
        let made = AtomicUsize::new(0);
        let k: Kprobes<Handler, ByteCode, Arc<SlotRcu>, SpinLock, SpinLock, 8> =
            Kprobes::with_locks(
                ByteCode::new((1..=64).collect(), 5),
                Arc::new(SlotRcu::new()),
                SpinLock::new(),
                SpinLock::new(),
                || {
                    made.fetch_add(1, Ordering::Relaxed);
                    SpinLock::new()
                },
            );
        assert_eq!(
            made.load(Ordering::Relaxed),
            9,
            "the tree lock and 8 object locks"
        );
        k.register(kp(16, "a")).unwrap();
        assert_eq!(k.state(16).unwrap().queue, Queue::Optimizing);
    }
}

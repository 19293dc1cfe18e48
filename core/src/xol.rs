//! Execute-out-of-line (XOL) slots and the per-thread breakpoint cache.
//!
//! After a probe's consumers run, the instruction the breakpoint displaced must still execute.
//! Unless the architecture emulates it, a copy runs from an XOL *slot*: a small area of executable
//! memory per address space, shared by all its threads. Seed 004 measured on arm64 that taking a
//! slot, copying the instruction into it and the instruction-cache maintenance for that copy
//! dominated the hit (34% of CPU time in the cache flush), and that a per-thread cache of recently
//! hit breakpoints which remembers its slot — reusing it without copy or flush when its bytes
//! still match — took `trig-uprobe-nop` from 0.371 to 0.916 M/s.
//!
//! # The XOL area
//!
//! [`XolArea`] has one busy flag per slot, each on its own cache lines (so a thread that keeps
//! reusing its slot writes a line no other thread's slot shares). A thread takes a slot by
//! swapping its flag to busy (Acquire) and frees it by storing idle (Release): the slot's memory
//! is handed from owner to owner through that pair. When every slot is taken, the thread sleeps on the
//! embedder's [`WaitQueue`]:
//!
//! ```text
//!  taker (area full)                         freer
//!  -----------------                         -----
//!  waiters += 1                              flag = idle       (Release)
//!  ticket = wq.prepare()                     fence(SeqCst)     [F-free]
//!  fence(SeqCst)             [F-wait]        if waiters > 0:   wq.wake_all()
//!  re-scan the flags; none free:
//!      wq.wait(ticket)
//!  waiters -= 1
//! ```
//!
//! F-wait and F-free make a store→load handshake (the kernel's `clear_bit` → `smp_mb` →
//! `waitqueue_active` pairing): either the freer sees the waiter and wakes it, or the waiter's
//! re-scan sees the freed slot. Without F-free, the freer may read `waiters == 0` while the waiter
//! sees every slot busy, and the waiter sleeps forever (the seeded bug `XolFreeWithoutBarrier`).
//! A slot is held through an [`XolSlot`] guard, so no error path can leak it.
//!
//! # The per-thread cache
//!
//! [`Task`] is the embedder's per-thread uprobe state. It keeps the breakpoints this thread hit,
//! ordered by (address space, address), each with a counted reference to its probe, the
//! address-space *stamp* at which the address was resolved to it, and the slot it last used.
//!
//! Chosen rule (the issue asked to choose and prove): the cache **holds a counted reference and
//! checks liveness**. A cached entry is trusted only if the address space is unchanged since its
//! stamp (so the address still maps the same (object, offset)) and the probe still has consumers.
//! The counted reference keeps the probe allocated and in the tree, so a re-registration at the
//! same key joins this very probe instead of creating a new one; an unregistration empties its
//! consumer list, which the check sees. Checking is three loads and no store, so a cache hit keeps
//! Invariant 1. The loom model `xol.rs::cache_vs_unregister_and_remap` proves a stale entry is
//! never executed (seeded bug: `XolCacheNoInvalidation`).
//!
//! # Slot reuse without a flush
//!
//! If the cached slot is free (taking its bit succeeds) and already holds exactly the bytes to
//! execute, the copy and the cache maintenance are skipped. The bytes are compared every time: any
//! other thread may have used the slot for another probe in between (seeded bug:
//! `XolReuseWithoutCompare`). Copies and flushes are counted per task — no shared counter.
//!
//! # Invariants
//!
//! * INVARIANT: a slot's flag is busy exactly while one [`XolSlot`] owns it; only the owner
//!   touches the slot's memory.
//! * INVARIANT: a cache entry's probe is kept allocated by the entry's counted reference.

use crate::alloc_util::{try_box, try_vec_with_capacity};
use crate::arch::{Arch, MAX_BREAKPOINT, TextPatcher};
use crate::error::{Error, Result};
use crate::lock::CachePadded;
use crate::lock::RawLock;
use crate::mm::{AddressSpaceOps, MmId};
use crate::rcu::Rcu;
use crate::registry::{ProbeRef, ProbeView, ReadGuard};
use crate::sync::{
    AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, FreeCheck, Ordering, fence, spin_loop,
};
use crate::uprobes::{Hit, Uprobes};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

/// How a thread sleeps until an XOL slot frees: a kernel wait queue, a futex, a condition
/// variable, or a spin. An *event count*: [`WaitQueue::wait`] returns once a
/// [`WaitQueue::wake_all`] happened after the matching [`WaitQueue::prepare`] (or spuriously).
///
/// Who calls each method, under which lock, and whether it may allocate, sleep or fail: [the
/// embedder's contract](crate::embedding).
pub trait WaitQueue: Send + Sync {
    /// Takes a ticket: the current event count.
    fn prepare(&self) -> u64;
    /// Sleeps until the event count is no longer `ticket` (returns at once if it already moved).
    fn wait(&self, ticket: u64);
    /// Advances the event count and wakes every sleeper.
    fn wake_all(&self);
}

/// A [`WaitQueue`] that spins (with the facade's spin hint) — for embedders with nothing better,
/// and for tests.
#[derive(Debug, Default)]
pub struct SpinWait {
    events: AtomicU64,
}

impl WaitQueue for SpinWait {
    fn prepare(&self) -> u64 {
        // Acquire pairs with the Release increment in `wake_all`.
        self.events.load(Ordering::Acquire)
    }
    fn wait(&self, ticket: u64) {
        // Acquire: as in `prepare`.
        while self.events.load(Ordering::Acquire) == ticket {
            spin_loop();
        }
    }
    fn wake_all(&self) {
        #[cfg(loom)]
        let order = if crate::seeded::is(crate::seeded::Bug::SpinWaitWakeRelaxed) {
            Ordering::Relaxed
        } else {
            Ordering::Release
        };
        #[cfg(not(loom))]
        let order = Ordering::Release;
        // Release pairs with the Acquire loads in `prepare` and `wait`: a waiter that sees the
        // new count sees everything written before the wake.
        self.events.fetch_add(1, order);
    }
}

/// A [`WaitQueue`] over a mutex and condition variable (`std` feature).
///
/// # Implementation details
///
/// An event count under the mutex: `prepare` reads it, `wait` sleeps while it still equals the
/// ticket, `wake_all` increments it and then notifies. The increment happens under the mutex
/// and before the notify, so a waiter either sees the new count before it sleeps or is asleep
/// (the mutex released by `Condvar::wait` atomically) when the notify comes — the lost-wakeup
/// window is closed by the order, not by luck. The mutex and condition variable come from the
/// [`sync`](crate::sync) facade: loom's under `cfg(loom)`, where the models use this type as it
/// is (`loom-tests/tests/xol.rs`: `condvar_wait`, and every XOL model that waits).
#[cfg(feature = "std")]
#[derive(Debug, Default)]
pub struct CondvarWait {
    events: crate::sync::Mutex<u64>,
    cv: crate::sync::Condvar,
}

#[cfg(feature = "std")]
impl WaitQueue for CondvarWait {
    fn prepare(&self) -> u64 {
        *self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn wait(&self, ticket: u64) {
        let mut g = self.events.lock().unwrap_or_else(|e| e.into_inner());
        while *g == ticket {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
    fn wake_all(&self) {
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::CondvarNotifyFirst) {
            // The seeded bug: notify, then count — a waiter that checked the count before the
            // increment and went to sleep after the notify sleeps forever.
            self.cv.notify_all();
            *self.events.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            return;
        }
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cv.notify_all();
    }
}

/// One slot's flags, alone on their cache lines.
#[derive(Debug, Default)]
struct SlotState {
    /// Owned by an [`XolSlot`].
    busy: AtomicBool,
    /// The slot's bytes were flushed after they were last written: instruction fetch sees what
    /// a read of them shows. Read and written only by the slot's owner (ordered by `busy`).
    flushed: AtomicBool,
}

/// How many slots from its home a breakpoint's first hit looks at for one it can keep.
const XOL_PROBES: usize = 8;

/// The XOL slots of one address space. See the [module docs](self).
pub struct XolArea<W: WaitQueue> {
    base: u64,
    slot_size: u64,
    nslots: usize,
    /// One busy flag per slot, each alone on its cache lines: a thread that keeps reusing its
    /// slot writes only that slot's line, never a line other threads' slots share.
    busy: Box<[CachePadded<SlotState>]>,
    waiters: AtomicUsize,
    wq: W,
    free_check: FreeCheck,
}

impl<W: WaitQueue> fmt::Debug for XolArea<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XolArea")
            .field("base", &self.base)
            .field("slots", &self.nslots)
            .field("free", &self.free_slots())
            .finish()
    }
}

impl<W: WaitQueue> XolArea<W> {
    /// An area of `nslots` slots of `slot_size` bytes at address `base`, sleeping on `wq` when
    /// full.
    ///
    /// # Errors
    ///
    /// [`Error::BadRange`] if there are no slots, a slot is smaller than a breakpoint's displaced
    /// bytes, or the area overflows the address space; [`Error::NoMemory`].
    pub fn new(base: u64, slot_size: u64, nslots: usize, wq: W) -> Result<Self> {
        if nslots == 0 || slot_size < MAX_BREAKPOINT as u64 {
            return Err(Error::BadRange);
        }
        (nslots as u64)
            .checked_mul(slot_size)
            .and_then(|len| base.checked_add(len))
            .ok_or(Error::BadRange)?;
        let mut v = try_vec_with_capacity(nslots)?;
        for _ in 0..nslots {
            v.push(CachePadded::new(SlotState::default()));
        }
        Ok(Self {
            base,
            slot_size,
            nslots,
            busy: v.into_boxed_slice(),
            waiters: AtomicUsize::new(0),
            wq,
            free_check: FreeCheck::new(),
        })
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.nslots
    }

    /// The address of slot `i`.
    pub fn slot_addr(&self, i: usize) -> u64 {
        self.base + i as u64 * self.slot_size
    }

    /// The address of slot `i`'s busy flag (for the store audit).
    #[cfg(test)]
    pub(crate) fn flag_addr(&self, i: usize) -> usize {
        &self.busy[i].busy as *const AtomicBool as usize
    }

    /// Free slots right now (a snapshot; for tests and diagnostics).
    pub fn free_slots(&self) -> usize {
        // Relaxed: a snapshot.
        self.busy
            .iter()
            .filter(|b| !b.busy.load(Ordering::Relaxed))
            .count()
    }

    /// The slot a breakpoint at (`mm`, `addr`) tries first when it has none cached: a
    /// Fibonacci hash of the address, so distinct breakpoints tend to keep distinct slots.
    pub fn home_slot(&self, mm: MmId, addr: u64) -> usize {
        let h = (addr ^ mm.0.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> 32) % self.nslots as u64) as usize
    }

    /// Takes slot `i` if it is free.
    pub fn try_take_slot(&self, i: usize) -> Option<XolSlot<'_, W>> {
        self.free_check.check();
        if i >= self.nslots {
            return None;
        }
        let flag = &self.busy[i].busy;
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::XolTakeNotAtomic) {
            // The seeded bug: test, then set, as two steps.
            // Acquire/Relaxed: the bug's racy read and write.
            if flag.load(Ordering::Acquire) {
                return None;
            }
            flag.store(true, Ordering::Relaxed);
            return Some(XolSlot {
                area: self,
                index: i,
            });
        }
        // Relaxed pre-check keeps a busy slot's line shared instead of taking it exclusive.
        if flag.load(Ordering::Relaxed) {
            return None;
        }
        // Acquire pairs with the Release store in `XolSlot::drop`: the previous owner's use of
        // the slot's memory happens-before ours.
        let was_busy = flag.swap(true, Ordering::Acquire);
        // INVARIANT: we set the flag, so the slot is ours until the guard drops. (`then`, not
        // `then_some`: a guard built for a busy slot would free it — someone else's — on drop.)
        (!was_busy).then(|| XolSlot {
            area: self,
            index: i,
        })
    }

    /// Takes any free slot, without waiting.
    pub fn try_take(&self) -> Option<XolSlot<'_, W>> {
        (0..self.nslots).find_map(|i| self.try_take_slot(i))
    }

    /// Takes a free slot, sleeping on the wait queue while there is none.
    pub fn take(&self) -> XolSlot<'_, W> {
        loop {
            if let Some(s) = self.try_take() {
                return s;
            }
            self.waiters.fetch_add(1, Ordering::Relaxed);
            let ticket = self.wq.prepare();
            // F-wait. Pairs with F-free in `XolSlot::drop`: either the freer sees our
            // `waiters` increment, or our re-scan below sees its freed slot.
            fence(Ordering::SeqCst);
            let got = self.try_take();
            if got.is_none() {
                self.wq.wait(ticket);
            }
            self.waiters.fetch_sub(1, Ordering::Relaxed);
            if let Some(s) = got {
                return s;
            }
        }
    }
}

/// An owned XOL slot; dropping it frees the slot and wakes a waiter if there is one.
pub struct XolSlot<'a, W: WaitQueue> {
    area: &'a XolArea<W>,
    index: usize,
}

impl<W: WaitQueue> fmt::Debug for XolSlot<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XolSlot")
            .field("index", &self.index)
            .finish()
    }
}

impl<W: WaitQueue> XolSlot<'_, W> {
    /// Were the slot's bytes flushed after they were last written?
    fn flushed(&self) -> bool {
        // Relaxed: only the owner touches it; ownership is handed over by `busy`.
        self.area.busy[self.index].flushed.load(Ordering::Relaxed)
    }

    fn set_flushed(&self, v: bool) {
        // Relaxed: as in `flushed`.
        self.area.busy[self.index]
            .flushed
            .store(v, Ordering::Relaxed);
    }

    /// The slot's index.
    pub fn index(&self) -> usize {
        self.index
    }
    /// The slot's address.
    pub fn addr(&self) -> u64 {
        self.area.slot_addr(self.index)
    }
}

impl<W: WaitQueue> Drop for XolSlot<'_, W> {
    fn drop(&mut self) {
        let a = self.area;
        #[cfg(loom)]
        let relaxed = crate::seeded::is(crate::seeded::Bug::XolFreeRelaxed);
        #[cfg(not(loom))]
        let relaxed = false;
        // Release pairs with the Acquire swap in `try_take_slot`: our use of the slot's memory
        // happens-before the next owner's.
        // A swap rather than a store: loom mis-orders a plain store against a later
        // read-modify-write by a thread that synchronized through a mutex (tokio-rs/loom#424,
        // #254), and the full fence right after costs more than the RMW.
        let order = if relaxed {
            Ordering::Relaxed
        } else {
            Ordering::Release
        };
        a.busy[self.index].busy.swap(false, order);
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::XolFreeWithoutBarrier) {
            // Relaxed: the seeded bug reads `waiters` with no barrier after clearing the bit.
            if a.waiters.load(Ordering::Relaxed) > 0 {
                a.wq.wake_all();
            }
            return;
        }
        // F-free. Pairs with F-wait in `XolArea::take`.
        fence(Ordering::SeqCst);
        // Relaxed: ordered by F-free.
        if a.waiters.load(Ordering::Relaxed) > 0 {
            a.wq.wake_all();
        }
    }
}

/// An address space's XOL area, created on first use and published once (the kernel's
/// `mm->uprobes_state.xol_area`).
pub struct LazyXol<W: WaitQueue> {
    ptr: AtomicPtr<XolArea<W>>,
}

impl<W: WaitQueue> fmt::Debug for LazyXol<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyXol")
            .field("created", &self.get().is_some())
            .finish()
    }
}

impl<W: WaitQueue> Default for LazyXol<W> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W: WaitQueue> LazyXol<W> {
    /// Not created yet.
    pub fn new() -> Self {
        Self {
            ptr: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// The area, if created.
    pub fn get(&self) -> Option<&XolArea<W>> {
        #[cfg(loom)]
        let order = if crate::seeded::is(crate::seeded::Bug::XolPublishRelaxed) {
            Ordering::Relaxed
        } else {
            Ordering::Acquire
        };
        #[cfg(not(loom))]
        let order = Ordering::Acquire;
        // Acquire pairs with the Release compare-exchange in `get_or_create`: the area's fields
        // were initialized before its pointer was published.
        let p = self.ptr.load(order);
        // SAFETY: published areas live until `self` is dropped.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// The area, creating it with `make` if there is none. If two threads race, one area wins
    /// and the other is dropped unpublished.
    ///
    /// # Errors
    ///
    /// Whatever `make` returns; [`Error::NoMemory`].
    pub fn get_or_create(&self, make: impl FnOnce() -> Result<XolArea<W>>) -> Result<&XolArea<W>> {
        if let Some(a) = self.get() {
            return Ok(a);
        }
        let fresh = Box::into_raw(try_box(make()?)?);
        // Release publishes the area's fields (pairs with the Acquire load in `get`); Acquire on
        // failure pairs with the winner's Release.
        #[cfg(loom)]
        let (ok, fail) = if crate::seeded::is(crate::seeded::Bug::XolPublishRelaxed) {
            (Ordering::Relaxed, Ordering::Relaxed)
        } else {
            (Ordering::AcqRel, Ordering::Acquire)
        };
        #[cfg(not(loom))]
        let (ok, fail) = (Ordering::AcqRel, Ordering::Acquire);
        match self
            .ptr
            .compare_exchange(core::ptr::null_mut(), fresh, ok, fail)
        {
            // SAFETY: published; lives until `self` is dropped.
            Ok(_) => Ok(unsafe { &*fresh }),
            Err(winner) => {
                // SAFETY: `fresh` was never published.
                drop(unsafe { Box::from_raw(fresh) });
                // SAFETY: the winner is published and lives until `self` is dropped.
                Ok(unsafe { &*winner })
            }
        }
    }
}

impl<W: WaitQueue> Drop for LazyXol<W> {
    fn drop(&mut self) {
        // Relaxed: `&mut self`.
        let p = self.ptr.load(Ordering::Relaxed);
        if !p.is_null() {
            // SAFETY: boxed by `get_or_create`; no slot guard can outlive `&self`.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

/// One breakpoint this thread hit.
struct CachedBp<'r, C: ?Sized + Send + Sync + 'static, R: Rcu, L: RawLock, const N: usize> {
    mm: MmId,
    addr: u64,
    stamp: u64,
    probe: ProbeRef<'r, C, R, L, N>,
    slot: Option<usize>,
}

/// What to do after a breakpoint hit.
pub enum Step<'g, 'x, C: ?Sized, R: Rcu, L: RawLock, const N: usize, W: WaitQueue> {
    /// Run the probe's consumers, then execute the displaced instruction from `slot` (prepared:
    /// copied and flushed, or reused as is). Dropping `slot` frees it.
    Run {
        /// The probe.
        probe: ProbeView<'g, C, R, L, N>,
        /// The slot holding the displaced instruction.
        slot: XolSlot<'x, W>,
    },
    /// A trap nobody owns: deliver it to the program.
    NotOurs,
    /// Execute the instruction at the trap address again.
    Restart,
}

/// A thread's uprobe state: its breakpoint cache and its copy/flush counts. See the
/// [module docs](self). Dropping it (thread exit) frees the cache.
pub struct Task<'r, C: ?Sized + Send + Sync + 'static, R: Rcu, L: RawLock, const N: usize> {
    cache: Vec<CachedBp<'r, C, R, L, N>>,
    copies: u64,
    flushes: u64,
    cache_hits: u64,
}

impl<C: ?Sized + Send + Sync + 'static, R: Rcu, L: RawLock, const N: usize> fmt::Debug
    for Task<'_, C, R, L, N>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("cached", &self.cache.len())
            .field("copies", &self.copies)
            .field("flushes", &self.flushes)
            .field("cache_hits", &self.cache_hits)
            .finish()
    }
}

impl<C: ?Sized + Send + Sync + 'static, R: Rcu, L: RawLock, const N: usize> Default
    for Task<'_, C, R, L, N>
{
    fn default() -> Self {
        Self::new()
    }
}

impl<'r, C, R, L, const N: usize> Task<'r, C, R, L, N>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
{
    /// A thread with nothing cached.
    pub fn new() -> Self {
        Self {
            cache: Vec::new(),
            copies: 0,
            flushes: 0,
            cache_hits: 0,
        }
    }

    /// Instructions copied into slots by this thread.
    pub fn copies(&self) -> u64 {
        self.copies
    }
    /// Instruction-cache flushes made by this thread.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }
    /// Hits answered from the cache.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits
    }
    /// Breakpoints cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    fn find(&self, mm: MmId, addr: u64) -> core::result::Result<usize, usize> {
        self.cache
            .binary_search_by(|e| (e.mm, e.addr).cmp(&(mm, addr)))
    }

    /// Handles a breakpoint hit at `addr` in `mm`: finds its probe (cache first, then
    /// [`Uprobes::resolve`]) and prepares an XOL slot with the displaced instruction.
    ///
    /// `cache = false` bypasses the cache and slot reuse (the "before" of seed 004).
    ///
    /// # Errors
    ///
    /// The patcher's error from copying or flushing; the slot is freed first.
    #[allow(clippy::too_many_arguments)]
    pub fn on_breakpoint<
        'g,
        'q: 'r,
        'x,
        A: Arch,
        T: TextPatcher,
        M: AddressSpaceOps,
        W: WaitQueue,
    >(
        &mut self,
        u: &Uprobes<C, R, A, T, L, N>,
        guard: &'g ReadGuard<'q, C, R, L, N>,
        mm: &M,
        xol: &'x XolArea<W>,
        addr: u64,
        cache: bool,
    ) -> Result<Step<'g, 'x, C, R, L, N, W>> {
        let id = mm.id();
        let mut at = None;
        if let Some(i) = cache.then(|| self.find(id, addr).ok()).flatten() {
            let e = &self.cache[i];
            #[cfg(loom)]
            let trusted = crate::seeded::is(crate::seeded::Bug::XolCacheNoInvalidation);
            #[cfg(not(loom))]
            let trusted = false;
            if trusted || (mm.unchanged_since(e.stamp) && e.probe.has_consumers()) {
                at = Some(i);
                self.cache_hits += 1;
            } else {
                // Stale: the address space changed, or the probe lost its consumers. (Dropping
                // the reference may run the probe's final put, which takes the tree lock.)
                drop(self.cache.remove(i));
            }
        }
        let (view, slot_hint) = match at {
            Some(i) => match guard.view(&self.cache[i].probe) {
                Some(v) => (v, self.cache[i].slot),
                None => return Ok(Step::Restart),
            },
            None => {
                let stamp = mm.stamp();
                match u.resolve(guard, mm, addr).0 {
                    Hit::Run(p) => {
                        if let Some(stamp) = stamp.filter(|s| cache && mm.unchanged_since(*s)) {
                            at = self.remember(guard, p, id, addr, stamp);
                        }
                        (p, None)
                    }
                    Hit::NotOurs => return Ok(Step::NotOurs),
                    Hit::Restart => return Ok(Step::Restart),
                }
            }
        };
        let image = view.probe().saved_insn();
        let image = image.as_bytes();
        // Choose the slot: the one this breakpoint used last (cached), else one near its home
        // (a hash of the address), so distinct breakpoints keep distinct slots and find their
        // bytes still there; reuse it without copy or flush if it holds exactly our bytes.
        let mut prepared = None;
        if cache {
            #[cfg(loom)]
            let skip_compare = crate::seeded::is(crate::seeded::Bug::XolReuseWithoutCompare)
                && slot_hint.is_some();
            #[cfg(not(loom))]
            let skip_compare = false;
            // A slot whose last copy was never flushed may show our bytes to a read while
            // instruction fetch still sees others: only a flushed slot counts as holding them.
            let holds_ours = |s: &XolSlot<'_, W>| {
                let mut cur = [0u8; MAX_BREAKPOINT];
                let cur = &mut cur[..image.len()];
                s.flushed() && u.text().read_xol(id, s.addr(), cur).is_ok() && cur == image
            };
            if let Some(hint) = slot_hint {
                // The slot this breakpoint used last: reuse it, or recopy into it.
                if let Some(s) = xol.try_take_slot(hint) {
                    prepared = Some(if skip_compare || holds_ours(&s) {
                        s
                    } else {
                        self.copy(u.text(), id, s, image)?
                    });
                }
            } else {
                // First hit by this thread: probe a few slots from the breakpoint's home. Prefer
                // one that already holds our bytes (another thread copied them), then one never
                // used, and overwrite another breakpoint's bytes only as a last resort.
                let home = xol.home_slot(id, addr);
                let mut fallback = None;
                for k in 0..XOL_PROBES.min(xol.slots()) {
                    let Some(s) = xol.try_take_slot((home + k) % xol.slots()) else {
                        continue;
                    };
                    if holds_ours(&s) {
                        prepared = Some(s);
                        break;
                    }
                    if !s.flushed() {
                        prepared = Some(self.copy(u.text(), id, s, image)?);
                        break;
                    }
                    fallback.get_or_insert(s);
                }
                if let (None, Some(s)) = (&prepared, fallback) {
                    prepared = Some(self.copy(u.text(), id, s, image)?);
                }
            }
        }
        let slot = match prepared {
            Some(s) => s,
            None => self.copy(u.text(), id, xol.take(), image)?,
        };
        if let Some(i) = at {
            self.cache[i].slot = Some(slot.index());
        }
        Ok(Step::Run { probe: view, slot })
    }

    /// Copies `image` into `slot` and flushes; on error the slot is freed (dropped) first.
    fn copy<'x, T: TextPatcher, W: WaitQueue>(
        &mut self,
        text: &T,
        mm: MmId,
        slot: XolSlot<'x, W>,
        image: &[u8],
    ) -> Result<XolSlot<'x, W>> {
        slot.set_flushed(false);
        text.write_xol(mm, slot.addr(), image)?;
        self.copies += 1;
        text.flush_icache(mm, slot.addr(), image.len())?;
        self.flushes += 1;
        slot.set_flushed(true);
        Ok(slot)
    }

    /// Caches `p` for (mm, addr), holding a counted reference. Returns its index, or `None` if
    /// it could not be held (dying) or stored (no memory: the hit goes on uncached).
    fn remember<'q: 'r>(
        &mut self,
        guard: &ReadGuard<'q, C, R, L, N>,
        p: ProbeView<'_, C, R, L, N>,
        mm: MmId,
        addr: u64,
        stamp: u64,
    ) -> Option<usize> {
        let probe = guard.hold(p)?;
        if self.cache.len() == self.cache.capacity()
            && self.cache.try_reserve(self.cache.len().max(4)).is_err()
        {
            return None;
        }
        let i = match self.find(mm, addr) {
            Ok(i) => {
                self.cache[i] = CachedBp {
                    mm,
                    addr,
                    stamp,
                    probe,
                    slot: None,
                };
                i
            }
            Err(i) => {
                self.cache.insert(
                    i,
                    CachedBp {
                        mm,
                        addr,
                        stamp,
                        probe,
                        slot: None,
                    },
                );
                i
            }
        };
        Some(i)
    }

    /// Forgets every cached breakpoint (drops their references).
    pub fn clear(&mut self) {
        self.cache.clear();
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

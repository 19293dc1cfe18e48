//! [`SlotRcu`]: a small RCU with one announcement slot per reader.
//!
//! # Algorithm
//!
//! Each registered reader owns a slot, alone on its cache line, holding a counter that is odd
//! while the reader is inside a read section. Entering makes it odd; leaving makes it even.
//!
//! ```text
//!  reader                                  updater
//!  ------                                  -------
//!  slot = odd         (Relaxed)            unlink: ptr = new   (Release)
//!  fence(SeqCst)      [R-enter]            fence(SeqCst)       [U-scan]
//!  p = ptr            (Acquire)            for each slot: s = slot (Acquire)
//!  ... use *p ...                              if s odd: wait until slot != s (Acquire)
//!  slot = even        (Release) [R-exit]   run callbacks queued before the scan
//! ```
//!
//! * **R-enter / U-scan** are a store→load handshake (Dekker): with a SeqCst fence on both sides,
//!   either the reader's pointer load sees the unlink, or the updater's scan sees the odd slot and
//!   waits. Loom models SeqCst fences, not SeqCst loads and stores, so the handshake is written
//!   with fences.
//! * **R-exit** is a release store read by the updater's acquire load: everything the reader did
//!   with `*p` happens-before the updater's free.
//! * The updater waits for the slot to *change*, not to become even: a reader that leaves and
//!   re-enters has made it odd again, but its new section started after the unlink and cannot see
//!   the old pointer. So a grace period is bounded by the longest section in flight, never starved
//!   by a reader that keeps re-entering.
//! * While it waits, the updater polls; every [`RELAX_EVERY`] polls it calls the domain's relax
//!   hook ([`SlotRcu::with_relax`]; a no-op by default). In a process with more threads than
//!   CPUs a reader can be preempted inside its section, and only the scheduler can end that
//!   section: the hook (`yield_now`) hands it the CPU instead of spinning out a time slice.
//!
//! A reader handle registered with a *different* domain still gets a correct guard: it is counted
//! in this domain's shared overflow counter (a read-modify-write on a shared line — correct, not
//! fast, and never allocating). Deferred callbacks go on a lock-free stack through their own link
//! (`defer` never blocks or allocates, so it may be called inside a read section);
//! `synchronize` takes the whole stack, waits for one grace period and runs them. An embedder
//! calls `synchronize` from a context outside any read section (a worker, a timer), as a kernel
//! runs RCU callbacks from softirq.
//!
//! **Asymmetric mode** ([`SlotRcu::with_heavy_barrier`]): the reader's R-enter fence becomes a
//! compiler fence ([`crate::sync::light_fence`]) and the updater runs the embedder's heavy
//! barrier before U-scan — the handshake then costs the reader nothing (on x86 the SeqCst fence
//! is an `MFENCE`, ~11 ns of a ~35 ns probe hit on the Xeon measured) and the updater a system
//! call per grace period. liburcu's `urcu-memb` flavour is the same idea. Under loom the light
//! fence is a SeqCst fence, so the models check the protocol under the guarantee the pair gives;
//! whether a given heavy barrier gives it is checked on hardware (the x86_64 crate's
//! `asymmetric_fence` test, which also shows the reordering without it).
//!
//! The read side is async-signal-safe provided a signal handler (or interrupt) enters through
//! its own reader handle, never one the code it interrupted may be entering or leaving with:
//! entering and leaving are a store and a fence on the reader's own slot, never an allocation,
//! lock or free. (Re-entering the *same* handle between the outer exit's nesting update and its
//! store could announce "not reading" too early; a handle per context rules that out.)
//!
//! # Invariants
//!
//! * A slot's counter is written only by the reader that owns it (`in_use`), so the read side
//!   never writes a line another reader writes; the owner keeps a private shadow of it, so
//!   entering and leaving a section are one store each and never load the slot.
//! * Slots are freed only when the domain is dropped; readers borrow the domain, so none is left.
//! * Every callback on the pending stack was queued before the scan that runs it started. A
//!   callback taken off the stack by an attempt that gave up ([`SlotRcu::try_synchronize`])
//!   goes back on it unrun, so a later scan — which starts later still — runs it.

use super::{Deferred, DeferredStack, Rcu};
use crate::alloc_util::try_box;
use crate::lock::CachePadded;
use crate::sync::{AtomicBool, AtomicPtr, AtomicUsize, Ordering, fence, spin_loop};
use core::cell::Cell;
use core::marker::PhantomData;
use core::ptr;

/// Polls of a reader's slot between two calls of the domain's relax hook.
pub const RELAX_EVERY: u32 = 64;

struct Slot {
    /// Odd while the owner is inside a read section.
    state: AtomicUsize,
    /// Owned by a reader.
    in_use: AtomicBool,
    /// Next slot; immutable after the slot is published.
    next: *mut CachePadded<Slot>,
}

/// An RCU domain with one announcement slot per reader. See the [module docs](self).
///
/// # Example
///
/// ```
/// use probe_core::rcu::{Deferred, Rcu, SlotRcu};
/// use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
///
/// let rcu = SlotRcu::new();
/// let reader = rcu.register().unwrap();
/// let freed = Arc::new(AtomicBool::new(false));
/// {
///     let _guard = rcu.read_lock(&reader);
///     let f = freed.clone();
///     rcu.defer(Deferred::new(move || f.store(true, Ordering::SeqCst)).unwrap());
///     assert!(!freed.load(Ordering::SeqCst)); // never inside a read section
/// }
/// rcu.synchronize(); // one grace period, then the queued callback runs
/// assert!(freed.load(Ordering::SeqCst));
/// ```
pub struct SlotRcu {
    /// The embedder's heavy barrier (asymmetric mode), or `None`.
    heavy: Option<fn()>,
    /// Called every [`RELAX_EVERY`] polls of a reader still inside its section
    /// ([`SlotRcu::with_relax`]); a no-op by default.
    relax: fn(),
    slots: AtomicPtr<CachePadded<Slot>>,
    pending: DeferredStack,
    /// Readers of other domains inside a read section of this one.
    overflow: CachePadded<AtomicUsize>,
}

// SAFETY: the raw pointers are to slots and callbacks owned by the domain and accessed only
// through atomics (slots) or by the single thread that swapped them off the stack (callbacks,
// which are `Send`).
unsafe impl Send for SlotRcu {}
// SAFETY: as above; every shared access is atomic.
unsafe impl Sync for SlotRcu {}

impl Default for SlotRcu {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for SlotRcu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SlotRcu").finish_non_exhaustive()
    }
}

/// A reader's handle on a [`SlotRcu`]: its slot and its nesting depth.
///
/// `Send` (a reader may migrate between threads) but not `Sync`: one handle serves one thread at
/// a time, as a per-CPU structure serves one CPU.
pub struct SlotReader<'d> {
    slot: &'d Slot,
    domain: &'d SlotRcu,
    nest: Cell<usize>,
    /// This reader's private copy of its slot's counter: entering and leaving a read section is
    /// then one store each, with no load of the shared slot.
    shadow: Cell<usize>,
    /// The domain is asymmetric (copied here so entering reads only the reader's own memory).
    light: bool,
    _not_sync: PhantomData<Cell<()>>,
}

// SAFETY: moving the handle moves the ownership of its slot; the slot is only written by the
// handle's owner, and the handle is not `Sync`.
unsafe impl Send for SlotReader<'_> {}

impl SlotReader<'_> {
    /// The address of this reader's announcement counter (the only word its read sections
    /// write). For the hit-path store audit.
    #[cfg(test)]
    pub(crate) fn slot_addr(&self) -> usize {
        &self.slot.state as *const AtomicUsize as usize
    }
}

impl core::fmt::Debug for SlotReader<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SlotReader")
            .field("nest", &self.nest.get())
            .finish()
    }
}

/// An open read section of a [`SlotRcu`].
pub struct SlotGuard<'r> {
    how: Entered<'r>,
}

enum Entered<'r> {
    /// Through the reader's own slot.
    Slot(&'r SlotReader<'r>),
    /// Through the domain's overflow counter (the reader belonged to another domain).
    Overflow(&'r SlotRcu),
}

impl core::fmt::Debug for SlotGuard<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SlotGuard").finish_non_exhaustive()
    }
}

impl SlotRcu {
    /// An empty domain.
    pub fn new() -> Self {
        Self {
            heavy: None,
            relax: || {},
            slots: AtomicPtr::new(ptr::null_mut()),
            pending: DeferredStack::new(),
            overflow: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    /// An empty domain in asymmetric mode (module docs): readers enter with a compiler fence
    /// only, and every grace period first runs `heavy`.
    ///
    /// # Safety
    ///
    /// When `heavy` returns, every thread that may hold one of this domain's readers has executed
    /// a full memory barrier since `heavy` was called (or is not running and passed one when it
    /// stopped) — what Linux's `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` guarantees for the
    /// threads of the calling process, once the process registered for it. `heavy` never fails:
    /// an embedder whose barrier can fail uses [`SlotRcu::new`].
    pub unsafe fn with_heavy_barrier(heavy: fn()) -> Self {
        let mut d = Self::new();
        d.heavy = Some(heavy);
        d
    }

    /// The same domain, calling `relax` while a grace period waits for a reader that stays
    /// inside its section (every [`RELAX_EVERY`] polls of its slot).
    ///
    /// A user-space embedder passes `std::thread::yield_now`: with more threads than CPUs, a
    /// reader preempted inside a section cannot leave it while the waiter spins on its CPU,
    /// and the wait then lasts a scheduler time slice. A kernel, whose readers cannot be
    /// preempted inside a section, keeps the default.
    ///
    /// # Example
    ///
    /// ```
    /// use probe_core::rcu::{Rcu, SlotRcu};
    ///
    /// let rcu = SlotRcu::new().with_relax(std::thread::yield_now);
    /// let reader = rcu.register().unwrap();
    /// drop(rcu.read_lock(&reader));
    /// rcu.synchronize();
    /// ```
    #[must_use]
    pub fn with_relax(mut self, relax: fn()) -> Self {
        self.relax = relax;
        self
    }

    fn reader_for<'d>(&'d self, slot: &'d Slot) -> SlotReader<'d> {
        // Relaxed: the slot was just claimed with an Acquire CAS (or is fresh), which ordered the
        // previous owner's last store before this load.
        let shadow = Cell::new(slot.state.load(Ordering::Relaxed));
        SlotReader {
            slot,
            domain: self,
            nest: Cell::new(0),
            shadow,
            light: self.heavy.is_some(),
            _not_sync: PhantomData,
        }
    }

    /// Waits until every read section that was open when this was called has ended.
    fn wait_for_readers(&self) {
        let done = self.wait_for_readers_within(None);
        debug_assert!(done);
    }

    /// [`wait_for_readers`](Self::wait_for_readers), giving up (`false`) when a reader is still
    /// inside the same section after `patience` polls of its slot (`None`: never gives up).
    fn wait_for_readers_within(&self, patience: Option<u32>) -> bool {
        // Asymmetric mode: the heavy barrier makes every reader's light fence a full one (the
        // constructor's contract) before U-scan.
        if let Some(heavy) = self.heavy {
            heavy();
        }
        // U-scan. Pairs with the SeqCst fence in `enter` (R-enter): either that reader sees our
        // unlink, or we see its odd counter below.
        fence(Ordering::SeqCst);
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::RcuNoGracePeriod) {
            return true;
        }
        // Acquire pairs with the Release CAS that published each slot in `register`.
        let mut p = self.slots.load(Ordering::Acquire);
        while !p.is_null() {
            // SAFETY: slots are freed only when the domain is dropped.
            let slot = unsafe { &*p };
            // Acquire pairs with the Release store in `exit` (R-exit).
            let s = slot.state.load(Ordering::Acquire);
            // Acquire: as above.
            if s & 1 == 1 && !self.poll_until(patience, || slot.state.load(Ordering::Acquire) != s)
            {
                return false;
            }
            p = slot.next;
        }
        // Foreign readers: a count, so wait for it to drain. Acquire pairs with the Release
        // decrement in `SlotGuard::drop`.
        self.poll_until(patience, || self.overflow.load(Ordering::Acquire) == 0)
    }

    /// Polls `done` until it holds (`true`), or `patience` polls have failed (`false`; `None`:
    /// never gives up), calling the relax hook every [`RELAX_EVERY`] polls.
    fn poll_until(&self, patience: Option<u32>, done: impl Fn() -> bool) -> bool {
        let mut polls = 0u32;
        while !done() {
            if patience.is_some_and(|n| polls >= n) {
                return false;
            }
            spin_loop();
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(RELAX_EVERY) {
                (self.relax)();
            }
        }
        true
    }

    /// One attempt at a grace period that gives up rather than wait for a reader: if every
    /// read section open at the start ends within `patience` polls of its reader's slot, runs
    /// every callback queued before the call, as [`Rcu::synchronize`] does, and returns `true`;
    /// otherwise runs nothing, leaves them queued for a later attempt (or `synchronize`) and
    /// returns `false`.
    ///
    /// For a writer that must not block behind a preempted reader (a user-space writer with
    /// more threads than CPUs): it tries after its writes and lets the queue wait when a reader
    /// is slow. Callbacks that stay queued keep their memory until an attempt succeeds.
    ///
    /// # Example
    ///
    /// ```
    /// use probe_core::rcu::{Deferred, Rcu, SlotRcu};
    /// use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
    ///
    /// let rcu = SlotRcu::new();
    /// let reader = rcu.register().unwrap();
    /// let ran = Arc::new(AtomicBool::new(false));
    /// let r = ran.clone();
    /// rcu.defer(Deferred::new(move || r.store(true, Ordering::SeqCst)).unwrap());
    /// let guard = rcu.read_lock(&reader);
    /// assert!(!rcu.try_synchronize(100)); // the reader is inside: nothing runs
    /// assert!(!ran.load(Ordering::SeqCst));
    /// drop(guard);
    /// assert!(rcu.try_synchronize(100)); // no reader inside: the callback runs
    /// assert!(ran.load(Ordering::SeqCst));
    /// ```
    pub fn try_synchronize(&self, patience: u32) -> bool {
        // As in `synchronize`: the batch is taken before the scan.
        let mut batch = self.pending.take_all();
        if self.wait_for_readers_within(Some(patience)) {
            batch.run_all();
            return true;
        }
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::RcuTryRunsOnGiveUp) {
            batch.run_all();
            return false;
        }
        // Back on the queue: a later grace period's scan starts after this push, so after the
        // callbacks were first queued, and covers every reader that could see their objects.
        while let Some(d) = batch.pop() {
            self.pending.push(d);
        }
        false
    }
}

// SAFETY: `defer` queues callbacks that `synchronize` runs only after `wait_for_readers`, which
// returns only after every section open at its start ended (module docs: the R-enter/U-scan
// handshake and the R-exit release). A guard from a foreign reader is counted in this domain's
// overflow counter, which the scan also waits for (guarantee 3).
unsafe impl Rcu for SlotRcu {
    type Reader<'d> = SlotReader<'d>;
    type Guard<'r> = SlotGuard<'r>;

    fn register(&self) -> crate::Result<SlotReader<'_>> {
        // Reuse a returned slot first.
        // Acquire pairs with the Release CAS that published each slot.
        let mut p = self.slots.load(Ordering::Acquire);
        while !p.is_null() {
            // SAFETY: slots are freed only when the domain is dropped.
            let slot = unsafe { &*p };
            // Acquire pairs with the Release store in `SlotReader::drop`: the previous owner's
            // last section is over before the new owner touches the counter.
            if slot
                .in_use
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(self.reader_for(slot));
            }
            p = slot.next;
        }
        let fresh = alloc::boxed::Box::into_raw(try_box(CachePadded::new(Slot {
            state: AtomicUsize::new(0),
            in_use: AtomicBool::new(true),
            next: ptr::null_mut(),
        }))?);
        // Relaxed: re-read by the CAS below.
        let mut head = self.slots.load(Ordering::Relaxed);
        loop {
            // SAFETY: `fresh` is not published yet; we own it.
            unsafe { (&mut *fresh).next = head };
            // Release publishes the slot's fields (pairs with the Acquire loads that walk the
            // list, here and in `wait_for_readers`).
            match self
                .slots
                .compare_exchange(head, fresh, Ordering::Release, Ordering::Relaxed)
            {
                // SAFETY: published, and freed only when the domain is dropped.
                Ok(_) => return Ok(self.reader_for(unsafe { &*fresh })),
                Err(h) => head = h,
            }
        }
    }

    #[inline]
    fn read_lock<'r>(&'r self, reader: &'r SlotReader<'_>) -> SlotGuard<'r> {
        if !ptr::eq(reader.domain, self) {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            // R-enter for the overflow counter; pairs with U-scan as for a slot.
            fence(Ordering::SeqCst);
            return SlotGuard {
                how: Entered::Overflow(self),
            };
        }
        // Lifetime shortening: a `&'r SlotReader<'d>` with 'd: 'r is a `&'r SlotReader<'r>`
        // (the handle is covariant in its domain borrow).
        let reader: &'r SlotReader<'r> = reader;
        enter(reader);
        SlotGuard {
            how: Entered::Slot(reader),
        }
    }

    fn defer(&self, f: Deferred) {
        self.pending.push(f);
    }

    fn synchronize(&self) {
        // Take the callbacks queued so far *before* the scan: each was queued after its object
        // was unlinked, so the scan below covers every reader that could still see it.
        let batch = self.pending.take_all();
        self.wait_for_readers();
        batch.run_all();
    }
}

#[inline]
fn enter(reader: &SlotReader<'_>) {
    let n = reader.nest.get();
    reader.nest.set(n + 1);
    if n == 0 {
        // Only this reader writes its slot, so its shadow is the slot's value: no load needed.
        let s = reader.shadow.get().wrapping_add(1);
        reader.shadow.set(s);
        // Relaxed: ordered before the section's loads by the fence below. A swap, not a store:
        // in C11 a store is enough, but loom mis-orders a plain store that follows a
        // read-modify-write (the slot's `in_use` claim) against the scan, and then reports a
        // grace period that missed this reader (tokio-rs/loom#424). The line is the reader's
        // own, so the RMW costs no sharing, only a few cycles before the fence below.
        #[cfg(loom)]
        let skip = crate::seeded::is(crate::seeded::Bug::RcuReaderNoFence);
        #[cfg(not(loom))]
        let skip = false;
        if reader.light {
            // Asymmetric: a plain store (the swap above is for loom, which models the light
            // fence as SeqCst and needs it there too).
            #[cfg(loom)]
            reader.slot.state.swap(s, Ordering::Relaxed);
            #[cfg(not(loom))]
            reader.slot.state.store(s, Ordering::Relaxed);
            if !skip {
                // R-enter, light half. Pairs with the heavy barrier and SeqCst fence in
                // `wait_for_readers` (U-scan).
                crate::sync::light_fence();
            }
            return;
        }
        reader.slot.state.swap(s, Ordering::Relaxed);
        if !skip {
            // R-enter. Pairs with the SeqCst fence in `wait_for_readers` (U-scan).
            fence(Ordering::SeqCst);
        }
    }
}

#[inline]
fn exit(reader: &SlotReader<'_>) {
    let n = reader.nest.get() - 1;
    reader.nest.set(n);
    if n == 0 {
        let s = reader.shadow.get().wrapping_add(1);
        reader.shadow.set(s);
        // R-exit. Release pairs with the Acquire loads in `wait_for_readers`.
        reader.slot.state.store(s, Ordering::Release);
    }
}

impl Drop for SlotGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        match self.how {
            Entered::Slot(r) => exit(r),
            // Release pairs with the Acquire load of `overflow` in `wait_for_readers`.
            Entered::Overflow(d) => {
                d.overflow.fetch_sub(1, Ordering::Release);
            }
        }
    }
}

impl Drop for SlotReader<'_> {
    fn drop(&mut self) {
        // Release pairs with the Acquire CAS in `register`: the next owner starts after us.
        self.slot.in_use.store(false, Ordering::Release);
    }
}

impl Drop for SlotRcu {
    fn drop(&mut self) {
        // Readers borrow the domain, so none is left: run what is still queued, free the slots.
        self.synchronize();
        // Relaxed: `&mut self`, no other thread can see the domain.
        let mut p = self.slots.load(Ordering::Relaxed);
        while !p.is_null() {
            // SAFETY: every slot was boxed by `register` and is freed only here.
            let slot = unsafe { alloc::boxed::Box::from_raw(p) };
            p = slot.next;
        }
    }
}

//! Read-copy-update: lock-free readers, deferred reclamation.
//!
//! A reader enters a *read-side critical section* (holds a guard), follows pointers to shared
//! objects and uses them without taking a lock or writing shared memory. A writer never changes a
//! published object in place: it publishes a new version (one release store of a pointer),
//! unlinks the old one, and frees the old one only after a **grace period** — once every read
//! section that might have seen the old pointer has ended. Readers pay (almost) nothing; writers
//! pay a delay, which they amortize by batching many frees into one grace period.
//!
//! The [`Rcu`] trait is what probe-core needs from an RCU, so each embedder plugs its own:
//!
//! | embedder | `read_lock` | `defer` | `synchronize` |
//! |---|---|---|---|
//! | a kernel | `rcu_read_lock` (preemption off) | `call_rcu` | `synchronize_rcu` |
//! | a hypervisor | per-vCPU quiescent-state counter | queue to the reclaimer | wait for every vCPU to pass a quiescent point |
//! | a process | `EpochRcu` (crossbeam-epoch) or [`SlotRcu`] | | |
//!
//! Two implementations ship:
//!
//! * `EpochRcu` (feature `epoch`) — the default, over `crossbeam-epoch`'s collector (no `std`, `alloc` only).
//!   Not built under loom, whose model checker cannot see crossbeam's atomics.
//! * [`SlotRcu`] — small and complete: one padded announcement slot per reader, a fence-based
//!   handshake, and a queue of deferred callbacks run by `synchronize`. Every atomic goes through
//!   [`crate::sync`], so loom checks it; it is also a usable RCU for an embedder that has none.
//!
//! # The guarantee (what `unsafe impl Rcu` promises)
//!
//! 1. A callback passed to [`Rcu::defer`] runs only after every guard that existed when `defer`
//!    was called has been dropped, and everything those guards' holders did happens-before it.
//! 2. [`Rcu::synchronize`] returns only after the same holds for every guard that existed when it
//!    was called.
//! 3. A guard returned by [`Rcu::read_lock`] protects objects retired through *this* domain, even
//!    if the reader handle passed in was registered with another domain.
//!
//! Readers must not call `synchronize` inside their own read section (it would wait for itself).

#[cfg(all(feature = "epoch", not(loom)))]
pub mod epoch;
pub mod slot;

#[cfg(all(feature = "epoch", not(loom)))]
pub use epoch::{EpochGuard, EpochRcu, EpochReader};
pub use slot::{RELAX_EVERY, SlotGuard, SlotRcu, SlotReader};

use crate::alloc_util::try_box;
use crate::sync::{AtomicPtr, Ordering};
use alloc::boxed::Box;
use core::ptr;

/// A callback to run after a grace period, allocated up front.
///
/// Built with [`Deferred::new`], which is where allocation can fail — *before* the writer
/// publishes anything — so handing it to [`Rcu::defer`] after an unlink can never fail. It carries
/// its own queue link: an embedder's `defer` queues it on a [`DeferredList`] (a per-CPU list
/// under the embedder's own lock or with interrupts off) or a [`DeferredStack`] (lock-free, from
/// any context) without allocating.
///
/// Dropping a `Deferred` without running it drops the callback unrun (what it would have freed
/// leaks); a domain runs every one it was given.
pub struct Deferred(Box<DeferredNode>);

pub(crate) struct DeferredNode {
    pub(crate) next: *mut DeferredNode,
    f: Box<dyn FnOnce() + Send>,
}

// SAFETY: `next` is only a queue link, owned by whichever domain queued the node; the callback is
// `Send`.
unsafe impl Send for Deferred {}

impl core::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Deferred")
    }
}

impl Deferred {
    /// Allocates the callback. Fails with [`crate::Error::NoMemory`], never aborts.
    pub fn new(f: impl FnOnce() + Send + 'static) -> crate::Result<Self> {
        let f: Box<dyn FnOnce() + Send> = try_box(f)?;
        Ok(Self(try_box(DeferredNode {
            next: ptr::null_mut(),
            f,
        })?))
    }

    /// Runs the callback now.
    pub fn run(self) {
        (self.0.f)()
    }

    /// Gives up ownership as a raw queue node.
    pub(crate) fn into_raw(self) -> *mut DeferredNode {
        Box::into_raw(self.0)
    }

    /// Takes back ownership of a node made by [`Deferred::into_raw`].
    ///
    /// # Safety
    ///
    /// `p` came from `into_raw` and is not owned by anything else.
    pub(crate) unsafe fn from_raw(p: *mut DeferredNode) -> Self {
        // SAFETY: the caller's contract.
        Self(unsafe { Box::from_raw(p) })
    }
}

/// A queue of [`Deferred`] callbacks linked through their own nodes: pushing never allocates.
///
/// Single-owner (`Send`, not `Sync`): what a `call_rcu`-style domain keeps per CPU, touched only
/// by its CPU with interrupts off or under the domain's own lock; [`DeferredStack`] is the
/// lock-free one for pushes from any context. Callbacks run in the order they were pushed.
///
/// ```
/// use probe_core::rcu::{Deferred, DeferredList};
/// use std::sync::{Arc, atomic::{AtomicU32, Ordering}};
///
/// let ran = Arc::new(AtomicU32::new(0));
/// let mut this_cpu = DeferredList::new();
/// for i in 1..=3 {
///     let ran = ran.clone();
///     // The allocation happens here, where the writer can still fail cleanly…
///     let d = Deferred::new(move || { ran.fetch_add(i, Ordering::Relaxed); }).unwrap();
///     // …and queueing it, after the unlink, cannot fail.
///     this_cpu.push(d);
/// }
/// assert_eq!(this_cpu.len(), 3);
/// // After a grace period:
/// this_cpu.take().run_all();
/// assert_eq!(ran.load(Ordering::Relaxed), 6);
/// assert!(this_cpu.is_empty());
/// ```
pub struct DeferredList {
    head: *mut DeferredNode,
    /// The last node (its `next` is null), or null when empty.
    tail: *mut DeferredNode,
    len: usize,
}

// SAFETY: the list owns its nodes (each a `Send` callback); moving the list moves them.
unsafe impl Send for DeferredList {}

impl Default for DeferredList {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for DeferredList {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeferredList")
            .field("len", &self.len)
            .finish()
    }
}

impl DeferredList {
    /// An empty list.
    pub const fn new() -> Self {
        Self {
            head: ptr::null_mut(),
            tail: ptr::null_mut(),
            len: 0,
        }
    }

    /// Queues `d` last. Never allocates, never fails.
    pub fn push(&mut self, d: Deferred) {
        let n = d.into_raw();
        // SAFETY: `n` is ours (just taken from `d`); `tail`, if non-null, is our last node.
        unsafe {
            (*n).next = ptr::null_mut();
            if self.tail.is_null() {
                self.head = n;
            } else {
                (*self.tail).next = n;
            }
        }
        self.tail = n;
        self.len += 1;
    }

    /// Moves every callback of `other` to the end of this list.
    pub fn append(&mut self, other: &mut DeferredList) {
        if other.head.is_null() {
            return;
        }
        if self.tail.is_null() {
            self.head = other.head;
        } else {
            // SAFETY: our last node.
            unsafe { (*self.tail).next = other.head };
        }
        self.tail = other.tail;
        self.len += other.len;
        // The nodes are ours now: leave `other` empty without dropping them.
        other.head = ptr::null_mut();
        other.tail = ptr::null_mut();
        other.len = 0;
    }

    /// The first callback, off the list.
    pub fn pop(&mut self) -> Option<Deferred> {
        if self.head.is_null() {
            return None;
        }
        let n = self.head;
        // SAFETY: our first node; we own it.
        self.head = unsafe { (*n).next };
        if self.head.is_null() {
            self.tail = ptr::null_mut();
        }
        self.len -= 1;
        // SAFETY: `n` came from `Deferred::into_raw` in `push` and is no longer linked.
        Some(unsafe { Deferred::from_raw(n) })
    }

    /// The whole list, leaving this one empty (take a batch, then wait one grace period for it).
    pub fn take(&mut self) -> DeferredList {
        core::mem::take(self)
    }

    /// Runs every callback, first pushed first.
    pub fn run_all(mut self) {
        while let Some(d) = self.pop() {
            d.run();
        }
    }

    /// Callbacks queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// None queued.
    pub fn is_empty(&self) -> bool {
        self.head.is_null()
    }
}

impl Drop for DeferredList {
    fn drop(&mut self) {
        // Dropped unrun, like a `Deferred` (see its docs).
        while self.pop().is_some() {}
    }
}

/// A lock-free stack of [`Deferred`] callbacks: [`DeferredStack::push`] from any context
/// (interrupts and NMIs included: a compare-exchange loop on one word, no allocation, no
/// lock), [`DeferredStack::take_all`] by the domain's grace-period side. [`SlotRcu`] queues
/// its callbacks on one.
///
/// # Implementation details
///
/// A Treiber stack of the callbacks' own nodes with one consumer operation, take-all (a swap),
/// so there is no ABA: a node is never popped alone and pushed back while another thread looks
/// at it. `push` links the node to the head it read and publishes it with a Release
/// compare-exchange; `take_all` swaps the head out with Acquire, which pairs with it: the taker
/// sees every node's link and callback as written before its push.
pub struct DeferredStack {
    head: AtomicPtr<DeferredNode>,
}

impl Default for DeferredStack {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for DeferredStack {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("DeferredStack")
    }
}

// SAFETY: nodes are handed over through the atomic head (Release push, Acquire take); every node
// is owned by exactly one of the stack or its taker.
unsafe impl Sync for DeferredStack {}
// SAFETY: the stack owns its nodes, each a `Send` callback.
unsafe impl Send for DeferredStack {}

impl DeferredStack {
    /// An empty stack.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// An empty stack.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Pushes `d`. Never blocks on another thread's progress, never allocates, never fails.
    pub fn push(&self, d: Deferred) {
        let node = d.into_raw();
        // Relaxed: re-read by the compare-exchange.
        let mut head = self.head.load(Ordering::Relaxed);
        #[cfg(loom)]
        let publish = if crate::seeded::is(crate::seeded::Bug::DeferredPushRelaxed) {
            Ordering::Relaxed
        } else {
            Ordering::Release
        };
        #[cfg(not(loom))]
        let publish = Ordering::Release;
        loop {
            // SAFETY: `node` is not published yet; we own it.
            unsafe { (*node).next = head };
            // Release publishes the node and what its callback captured (pairs with the
            // Acquire swap in `take_all`).
            match self
                .head
                .compare_exchange(head, node, publish, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    /// Takes every callback pushed so far, oldest first.
    pub fn take_all(&self) -> DeferredList {
        // Acquire pairs with the Release compare-exchange in `push`.
        let mut p = self.head.swap(ptr::null_mut(), Ordering::Acquire);
        // The stack is newest first: reverse it into a list, oldest first.
        let mut out = DeferredList::new();
        let mut rev: *mut DeferredNode = ptr::null_mut();
        while !p.is_null() {
            // SAFETY: we swapped the whole stack off, so we own every node on it.
            let next = unsafe { (*p).next };
            // SAFETY: as above.
            unsafe { (*p).next = rev };
            if rev.is_null() {
                out.tail = p;
            }
            rev = p;
            p = next;
            out.len += 1;
        }
        out.head = rev;
        out
    }
}

impl Drop for DeferredStack {
    fn drop(&mut self) {
        drop(self.take_all());
    }
}

/// An RCU domain. See the [module docs](self) for the protocol and the guarantee.
/// Who calls each method, under which lock, and whether it may allocate, sleep or fail: [the
/// embedder's contract](crate::embedding).
///
/// # Safety
///
/// Implementors must uphold the three guarantees listed in the [module docs](self): probe-core
/// frees memory that readers may still hold on the strength of them.
pub unsafe trait Rcu: Send + Sync {
    /// The read-side handle of one CPU or thread (the kernel's per-CPU state). Created once by
    /// [`Rcu::register`] and used for every read section on that CPU or thread.
    type Reader<'d>
    where
        Self: 'd;
    /// An open read-side critical section. Objects reached through the domain stay valid while
    /// it lives.
    type Guard<'r>
    where
        Self: 'r;

    /// Creates the read-side handle for the calling CPU or thread. probe-core never calls it:
    /// the embedder makes one per CPU (at bring-up) or thread and passes it to every read
    /// section there. May allocate and fail.
    fn register(&self) -> crate::Result<Self::Reader<'_>>;
    /// Enters a read-side critical section. Must not block, allocate (in the common case) or
    /// write memory that other readers write.
    fn read_lock<'r>(&'r self, reader: &'r Self::Reader<'_>) -> Self::Guard<'r>;
    /// Runs `f` after a grace period (`call_rcu`). Never blocks, never fails, never allocates
    /// in probe-core's own implementations (the allocation happened in [`Deferred::new`]; queue
    /// it on a [`DeferredList`] or a [`DeferredStack`]).
    ///
    /// Called by writers holding the registry's locks or the optimizer's lock, and by a
    /// `ProbeRef`'s last drop; never from a hit.
    fn defer(&self, f: Deferred);
    /// Waits for a grace period (`synchronize_rcu`). May sleep. Called by optimizer runs (with
    /// the optimizer's lock held) and by `sync` calls (with no lock held); never inside a read
    /// section.
    fn synchronize(&self);
}

/// Implements [`Rcu`] for a handle type (`&R`, `Arc<R>`) by forwarding every method to the
/// domain it points to: the handle *is* that domain.
macro_rules! forward_rcu {
    ($(#[$doc:meta])* $handle:ty) => {
        $(#[$doc])*
        // SAFETY: every method forwards to `R`, so `R`'s guarantees are this impl's.
        unsafe impl<R: Rcu + ?Sized> Rcu for $handle {
            type Reader<'d>
                = R::Reader<'d>
            where
                Self: 'd;
            type Guard<'r>
                = R::Guard<'r>
            where
                Self: 'r;

            fn register(&self) -> crate::Result<Self::Reader<'_>> {
                (**self).register()
            }
            #[inline]
            fn read_lock<'r>(&'r self, reader: &'r R::Reader<'_>) -> R::Guard<'r> {
                (**self).read_lock(reader)
            }
            fn defer(&self, f: Deferred) {
                (**self).defer(f)
            }
            fn synchronize(&self) {
                (**self).synchronize()
            }
        }
    };
}

forward_rcu!(
    /// A shared reference to a domain is the same domain: one RCU for several structures (the
    /// [`crate::kprobes`] layer gives its registry and its optimizer one domain this way, and a
    /// kernel passes `&'static` its own RCU).
    &R
);
forward_rcu!(
    /// A counted reference to a domain is the same domain (see the `&R` impl).
    alloc::sync::Arc<R>
);

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use alloc::vec::Vec;
    use std::sync::{Arc, Mutex};

    fn logging(log: &Arc<Mutex<Vec<u32>>>, i: u32) -> Deferred {
        let log = log.clone();
        Deferred::new(move || log.lock().unwrap().push(i)).unwrap()
    }

    #[test]
    fn a_list_runs_in_push_order_and_appends() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut a = DeferredList::new();
        let mut b = DeferredList::new();
        for i in 0..3 {
            a.push(logging(&log, i));
        }
        for i in 3..5 {
            b.push(logging(&log, i));
        }
        a.append(&mut b);
        assert!(b.is_empty());
        assert_eq!(b.len(), 0);
        assert_eq!(a.len(), 5);
        a.pop().unwrap().run();
        a.append(&mut DeferredList::new());
        let mut c = DeferredList::new();
        c.append(&mut a);
        c.push(logging(&log, 5));
        c.take().run_all();
        assert!(c.is_empty());
        assert_eq!(*log.lock().unwrap(), [0, 1, 2, 3, 4, 5]);
    }

    /// A grace period waiting for a reader that stays inside its section calls the domain's
    /// relax hook (every `RELAX_EVERY` polls), and returns once the reader leaves.
    #[test]
    fn a_waiting_grace_period_relaxes() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        static RELAXED: AtomicUsize = AtomicUsize::new(0);
        fn relax() {
            RELAXED.fetch_add(1, SeqCst);
            std::thread::yield_now();
        }
        let rcu = SlotRcu::new().with_relax(relax);
        let reader = rcu.register().unwrap();
        let guard = rcu.read_lock(&reader);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| rcu.synchronize());
            let start = std::time::Instant::now();
            while RELAXED.load(SeqCst) == 0 {
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(30),
                    "the wait never relaxed"
                );
                std::thread::yield_now();
            }
            assert!(
                !waiter.is_finished(),
                "a grace period ended inside a read section"
            );
            drop(guard);
            waiter.join().unwrap();
        });
        // Nothing waits now: a grace period with no reader inside never relaxes.
        let before = RELAXED.load(SeqCst);
        rcu.synchronize();
        assert_eq!(RELAXED.load(SeqCst), before);
    }

    #[test]
    fn a_stack_takes_oldest_first_and_drops_unrun() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let s = DeferredStack::new();
        for i in 0..4 {
            s.push(logging(&log, i));
        }
        let batch = s.take_all();
        assert_eq!(batch.len(), 4);
        s.push(logging(&log, 9));
        batch.run_all();
        assert_eq!(*log.lock().unwrap(), [0, 1, 2, 3]);
        // Dropped with a callback queued: dropped, not run.
        let probe = Arc::new(());
        let p = probe.clone();
        s.push(Deferred::new(move || drop(p)).unwrap());
        drop(s);
        assert_eq!(
            Arc::strong_count(&probe),
            1,
            "the callback's captures leaked"
        );
        assert_eq!(*log.lock().unwrap(), [0, 1, 2, 3]);
    }
}

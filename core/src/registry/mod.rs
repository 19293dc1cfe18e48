//! The probe registry: the probe tree, its consumers and their lifetimes, behind a safe API.
//!
//! # Who takes what
//!
//! | operation | locks | grace period |
//! |---|---|---|
//! | hit: [`Registry::read`] → [`ReadGuard::lookup`] → [`ProbeView::consumers`] | none; no shared store | — |
//! | [`Registry::register`] / [`Registry::unregister`] | the object's hashed lock, then the tree lock briefly | deferred (never waits) |
//! | [`Registry::sync`] | none | waits for one |
//! | final put of a probe ([`ProbeRef`] drop, last unregister) | the tree lock briefly | deferred |
//!
//! Registration and unregistration of one object are serialized by that object's slot in the
//! hashed [`LockTable`] (seed 000): the rest of a registration — installing breakpoints in every
//! address space that maps the object — happens under it. The tree lock is held only to look up
//! and to publish a new root: a few node copies.
//!
//! # Two-phase unregister
//!
//! [`Registry::unregister`] removes the consumer at once (publishes a list without it) but does
//! not wait: a hit that loaded the old list a moment ago may still call it. [`Registry::sync`]
//! waits one grace period, after which no hit can call any consumer unregistered before the
//! `sync` began. Unregister a thousand consumers, then `sync` once: one grace period for all.
//!
//! # Reserve, then lock and publish
//!
//! Everything an unregistration will need is allocated by the registration, before anything is
//! published; unregistration allocates nothing and cannot run out of memory:
//!
//! * every consumer list carries its own retirement (the deferred callback that frees it), so
//!   replacing a list never allocates;
//! * a probe with *n* consumers keeps *n − 1* empty **spare** lists, each with room for *n − 1*
//!   (registration adds one and grows the others), and an unregistration fills one with the
//!   remaining consumers and publishes it;
//! * the last consumer's removal takes the probe out of the tree, which copies a tree path; if
//!   that allocation fails the probe stays in the tree, dying and invisible to hits, on an
//!   **orphan** list that every later tree-locked write and [`Registry::sync`] retry — so after a
//!   `sync` with memory available, [`Registry::len`] is exactly what is registered.
//!
//! A failed registration frees what it allocated and changes nothing (spares it grew keep their
//! room).
//!
//! # Invariants
//!
//! * INVARIANT: under the object's lock, a live probe with *n* ≥ 1 consumers has exactly
//!   *n − 1* spares, each empty, unpublished and with room for *n − 1* consumers.
//! * INVARIANT: every published list's retirement callback is present until the list is
//!   replaced, when it is taken and deferred once.
//! * INVARIANT: an orphan stays the tree's entry for its key while it is on the orphan list; it
//!   leaves the list (under the tree lock) before its free is queued.
//!
//! # Example
//!
//! ```
//! use probe_core::probe::{ObjectId, ProbeKey};
//! use probe_core::rcu::{EpochRcu, Rcu};
//! use probe_core::registry::Registry;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! // A consumer is anything `Send + Sync`; here, a closure counting hits in its own counter.
//! type Consumer = dyn Fn(u64) + Send + Sync;
//! let reg: Registry<Consumer, EpochRcu> = Registry::new(EpochRcu::new());
//!
//! let libc = ObjectId(0x1234); // an inode number, say
//! let key = ProbeKey::new(libc, 0x9a40);
//! let hits = Arc::new(AtomicU64::new(0));
//! let h = hits.clone();
//! let consumer: Arc<Consumer> = Arc::new(move |_ip| { h.fetch_add(1, Ordering::Relaxed); });
//! reg.register(key, consumer.clone()).unwrap();
//!
//! // The hit path: per-thread reader, guard, lookup, traverse. No lock, no shared store.
//! let reader = reg.rcu().register().unwrap();
//! {
//!     let guard = reg.read(&reader);
//!     let probe = guard.lookup(&key).expect("registered");
//!     for c in probe.consumers() {
//!         c(0x7f00_0000_9a40);
//!     }
//! }
//! assert_eq!(hits.load(Ordering::Relaxed), 1);
//!
//! // Two-phase unregister: remove now, wait once.
//! reg.unregister(&key, &consumer).unwrap();
//! reg.sync();
//! assert!(reg.read(&reader).lookup(&key).is_none());
//! ```

mod lifetime;
mod probe_ref;
mod read;
mod register;
#[cfg(all(test, not(loom)))]
mod tests;

use crate::lock::{CachePadded, DEFAULT_LOCK_SLOTS, LockTable, RawGuard, RawLock, SpinLock};
use crate::probe::{ConsumerHandle, ObjectId, Probe, free_list};
use crate::rcu::Rcu;
use crate::sync::{AtomicPtr, Ordering, quarantine};
use crate::tree::ProbeTree;
use alloc::boxed::Box;
use alloc::sync::Arc;
use core::fmt;
use core::marker::PhantomData;
use core::ptr::{self};

pub use probe_ref::ProbeRef;
pub use read::{ProbeView, ReadGuard};

/// A raw pointer that may cross threads inside a deferred callback.
struct SendPtr<T: ?Sized>(*mut T);
// SAFETY: used only to hand an unreachable object to the callback that frees it.
unsafe impl<T: ?Sized> Send for SendPtr<T> {}

/// Probes by (object, offset), their consumers, and the locks and RCU domain that keep them
/// consistent. See the [module docs](self).
///
/// `C` is the consumer type (`dyn Fn(..) + Send + Sync`, a struct, a trait object of the
/// embedder's); `R` the RCU domain; `L` the raw lock for writers; `N` the number of hashed
/// per-object locks.
pub struct Registry<
    C: ?Sized,
    R: Rcu,
    L: RawLock = SpinLock,
    const N: usize = DEFAULT_LOCK_SLOTS,
    P = Arc<C>,
> {
    rcu: R,
    tree: ProbeTree<Probe<P>>,
    tree_lock: CachePadded<L>,
    objects: LockTable<L, N>,
    /// Dying probes whose removal from the tree could not allocate, retried by every later
    /// tree-locked write and by [`Registry::sync`] (a stack through `Probe::orphan_next`; read
    /// and written only under the tree lock).
    orphans: AtomicPtr<Probe<P>>,
    _consumer: PhantomData<fn() -> *const C>,
}

impl<C: ?Sized, R: Rcu, L: RawLock, const N: usize, P> fmt::Debug for Registry<C, R, L, N, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("probes", &self.tree.len())
            .finish_non_exhaustive()
    }
}

impl<C, R, L, const N: usize, P: ConsumerHandle<Target = C>> Registry<C, R, L, N, P>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock + Default,
{
    /// An empty registry over the RCU domain `rcu`.
    pub fn new(rcu: R) -> Self {
        Self::with_locks(rcu, L::default)
    }
}

impl<C, R, L, const N: usize, P: ConsumerHandle<Target = C>> Registry<C, R, L, N, P>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
{
    /// An empty registry over `rcu`, with locks made by `lock` (called `N + 1` times: the tree
    /// lock, then each hashed object lock) — for an embedder whose locks need initializing
    /// (a kernel's lock classes, a name per lock).
    pub fn with_locks(rcu: R, mut lock: impl FnMut() -> L) -> Self {
        let tree_lock = CachePadded::new(lock());
        Self {
            rcu,
            tree: ProbeTree::with_hot(hot_list::<P>),
            tree_lock,
            objects: LockTable::with(|_| lock()),
            orphans: AtomicPtr::new(ptr::null_mut()),
            _consumer: PhantomData,
        }
    }
}

impl<C, R, L, const N: usize, P: ConsumerHandle<Target = C>> Registry<C, R, L, N, P>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
{
    /// The RCU domain (register readers with it).
    pub fn rcu(&self) -> &R {
        &self.rcu
    }

    /// The lock that serializes writers of `object` (for embedders that install breakpoints
    /// under it).
    pub fn object_lock(&self, object: ObjectId) -> &L {
        self.objects.lock_for(object)
    }

    /// Number of probes in the tree (dying ones included until their final put removes them).
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// `len() == 0`.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Enters a read section: the hit path's entry point.
    #[inline]
    pub fn read<'r>(&'r self, reader: &'r R::Reader<'_>) -> ReadGuard<'r, C, R, L, N, P> {
        ReadGuard {
            reg: self,
            _guard: self.rcu.read_lock(reader),
        }
    }

    /// Waits for a grace period: afterwards no hit can call a consumer unregistered before this
    /// call began, and no reader holds a probe removed before it. First it retries the tree
    /// removal of probes whose final put ran out of memory, so after a `sync` with memory
    /// available [`Registry::len`] counts exactly the probes that are registered or held.
    pub fn sync(&self) {
        {
            let _tree = RawGuard::lock(&*self.tree_lock);
            // SAFETY: tree lock held.
            unsafe { self.retry_orphans() };
        }
        self.rcu.synchronize();
    }
}

/// Frees a probe and its consumer list (empty by then, unless the probe was never published).
///
/// # Safety
///
/// `p` was boxed by the registry and no reader can reach it.
unsafe fn free_probe<P>(p: *mut Probe<P>) {
    // SAFETY: the caller's contract.
    let b = unsafe { Box::from_raw(p) };
    b.free_check.mark_freed();
    // Relaxed: no other thread can reach the probe.
    let l = b.consumers.load(Ordering::Relaxed);
    if !l.is_null() {
        // SAFETY: the probe owned its current list.
        unsafe { free_list(l) };
    }
    // Its spares were never published.
    loop {
        // SAFETY: we own the probe.
        let s = unsafe { b.pop_spare() };
        if s.is_null() {
            break;
        }
        // SAFETY: an unpublished spare of ours.
        unsafe { free_list(s) };
    }
    quarantine(b);
}

impl<C: ?Sized, R: Rcu, L: RawLock, const N: usize, P> Drop for Registry<C, R, L, N, P> {
    fn drop(&mut self) {
        // `&mut self`: no reader, no `ProbeRef` (they borrow the registry). Free every probe
        // still in the tree; the tree frees its own nodes, the domain runs what is queued.
        // SAFETY: exclusive access. Freeing a probe does not touch the tree's nodes (the tree
        // stores pointers only), and each probe is in the tree once.
        unsafe {
            self.tree.for_each(|_, p| {
                free_probe(p as *mut Probe<P>);
                true
            })
        };
    }
}

/// The registry tree's hot-word hook: a probe's current consumer list.
///
/// # Safety
///
/// Called by the tree under the tree lock with a probe in (or entering) the tree: allocated.
unsafe fn hot_list<P>(p: *const Probe<P>) -> *mut () {
    // SAFETY: the tree's contract (above).
    let probe = unsafe { &*p };
    // Relaxed: every store of the list is made under the tree lock too (`publish_consumers`,
    // or before the probe's insertion), which the caller holds.
    probe.consumers.load(Ordering::Relaxed).cast()
}

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

use crate::alloc_util::try_box;
use crate::arch::SavedInsn;
use crate::error::{Error, Result};
use crate::lock::{CachePadded, DEFAULT_LOCK_SLOTS, LockTable, RawGuard, RawLock, SpinLock};
use crate::probe::{ConsumerHandle, ConsumerList, ObjectId, Probe, ProbeKey, free_list};
use crate::rcu::{Deferred, Rcu};
use crate::sync::{AtomicPtr, Ordering, quarantine};
use crate::tree::ProbeTree;
use alloc::boxed::Box;
use alloc::sync::Arc;
use core::fmt;
use core::marker::PhantomData;
use core::ops::Range;
use core::ptr::{self, NonNull};

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

    /// Adds `consumer` to the probe at `key`, creating the probe if there is none (or replacing a
    /// dying one).
    ///
    /// # Errors
    ///
    /// * [`Error::DuplicateConsumer`] — that consumer (the same `Arc`) is already on the probe.
    /// * [`Error::NoMemory`] — an allocation failed.
    ///
    /// On error nothing changed.
    pub fn register(&self, key: ProbeKey, consumer: P) -> Result<()> {
        self.register_with(key, consumer, SavedInsn::default())
            .map(|_| ())
    }

    /// [`Registry::register`], saving `insn` in the probe if this creates it. Returns `true`
    /// if `consumer` is the probe's first: the probe just became wanted (install breakpoints).
    ///
    /// # Errors
    ///
    /// As for [`Registry::register`].
    pub fn register_with(&self, key: ProbeKey, consumer: P, insn: SavedInsn) -> Result<bool> {
        let _object = RawGuard::lock(self.objects.lock_for(key.object));
        match self.get_live(&key) {
            Some(p) => {
                // SAFETY: `get_live` took a reference, so `p` stays allocated until we put it.
                let probe = unsafe { &*p };
                match self.add_consumer(probe, consumer) {
                    // The first consumer: our reference becomes the registration's.
                    Ok(true) => Ok(true),
                    Ok(false) => {
                        // SAFETY: we hold the reference taken by `get_live`.
                        unsafe { self.put(p) };
                        Ok(false)
                    }
                    Err(e) => {
                        // SAFETY: as above.
                        unsafe { self.put(p) };
                        Err(e)
                    }
                }
            }
            None => self.insert_new(key, consumer, insn).map(|()| true),
        }
    }

    /// Removes `consumer` from the probe at `key`; removes the probe when it was the last one.
    /// Does not wait: call [`Registry::sync`] (once for many unregistrations) before freeing
    /// anything the consumer uses.
    ///
    /// # Errors
    ///
    /// * [`Error::UnknownProbe`] — no live probe at `key`.
    /// * [`Error::UnknownConsumer`] — the probe exists but `consumer` is not on it.
    ///
    /// Those are the only errors: unregistration never allocates (what it needs was reserved
    /// when the consumer was registered), so it cannot run out of memory. On error nothing
    /// changed.
    pub fn unregister(&self, key: &ProbeKey, consumer: &P) -> Result<()> {
        self.unregister_last(key, consumer).map(|_| ())
    }

    /// [`Registry::unregister`], returning the probe's saved bytes if `consumer` was its last:
    /// the probe is no longer wanted (remove breakpoints).
    ///
    /// # Errors
    ///
    /// As for [`Registry::unregister`].
    pub fn unregister_last(&self, key: &ProbeKey, consumer: &P) -> Result<Option<SavedInsn>> {
        let _object = RawGuard::lock(self.objects.lock_for(key.object));
        let p = self.get_live(key).ok_or(Error::UnknownProbe)?;
        // SAFETY: `get_live` took a reference.
        let probe = unsafe { &*p };
        let insn = probe.insn;
        let r = self.remove_consumer(probe, consumer);
        // SAFETY: we hold the reference taken by `get_live`.
        unsafe { self.put(p) };
        r.map(|last| last.then_some(insn))
    }

    /// [`Registry::unregister`], and if `consumer` was the probe's last, a counted reference to
    /// it: the probe stays in the tree (with no consumers) until the caller drops the reference.
    /// The breakpoint layer holds it while it restores the original bytes, so a hit never finds
    /// our breakpoint without finding the probe that owns it.
    ///
    /// # Errors
    ///
    /// As for [`Registry::unregister`].
    pub fn unregister_holding(
        &self,
        key: &ProbeKey,
        consumer: &P,
    ) -> Result<Option<ProbeRef<'_, C, R, L, N, P>>> {
        let _object = RawGuard::lock(self.objects.lock_for(key.object));
        let p = self.get_live(key).ok_or(Error::UnknownProbe)?;
        // SAFETY: `get_live` took a reference.
        let probe = unsafe { &*p };
        match self.remove_consumer(probe, consumer) {
            // The reference from `get_live` becomes the caller's.
            Ok(true) => Ok(Some(ProbeRef {
                reg: self,
                probe: NonNull::from(probe),
            })),
            r => {
                // SAFETY: we hold the reference taken by `get_live`.
                unsafe { self.put(p) };
                r.map(|_| None)
            }
        }
    }

    /// Calls `f` with the consumers of the live probe at `key` as the writers see them (the
    /// current list, under the object's lock, so no writer of that object runs meanwhile);
    /// `None` if there is no live probe there. `f` must not register or unregister on the same
    /// object (the lock is not reentrant).
    pub fn with_consumers<T>(&self, key: &ProbeKey, f: impl FnOnce(&[P]) -> T) -> Option<T> {
        let _object = RawGuard::lock(self.objects.lock_for(key.object));
        let p = self.get_live(key)?;
        // SAFETY: `get_live` took a reference.
        let probe = unsafe { &*p };
        // SAFETY: the object's lock is held.
        let l = unsafe { probe.writer_list() };
        let items = if l.is_null() {
            &[][..]
        } else {
            // SAFETY: the current list under the object's lock: only its writers replace it.
            unsafe { ConsumerList::items(l) }
        };
        let r = f(items);
        // SAFETY: we hold the reference taken by `get_live`.
        unsafe { self.put(p) };
        Some(r)
    }

    /// The probe at `key` under a read section the caller opened on this registry's domain
    /// through another handle of it (the [`crate::kprobes`] layer's one read section per trap).
    ///
    /// # Safety
    ///
    /// `guard` is a read guard of the very domain this registry retires through (the same
    /// instance, or a handle every clone of which is that instance), not merely of the same type.
    #[inline]
    pub(crate) unsafe fn lookup_under<'g>(
        &'g self,
        _guard: &'g R::Guard<'_>,
        key: &ProbeKey,
    ) -> Option<ProbeView<'g, C, R, L, N, P>> {
        // SAFETY: the caller's contract: a read guard of the tree's writers' domain.
        let (p, list) = unsafe { self.tree.get_hot(key) }?;
        Some(ProbeView {
            reg: self,
            probe: p,
            key: *key,
            list: list.cast(),
            _guard: PhantomData,
        })
    }

    /// The saved bytes of the probe at `key` if it is wanted (has a consumer) right now.
    /// Takes the tree lock briefly; never touches a consumer list.
    pub fn wanted(&self, key: &ProbeKey) -> Option<SavedInsn> {
        let _tree = RawGuard::lock(&*self.tree_lock);
        // SAFETY: tree lock held: probes in the tree are allocated.
        let p = unsafe { &*self.tree.get_locked(key)? };
        // Relaxed: only nullness is read (INVARIANT: non-null exactly while it has consumers),
        // ordered by the locks the callers hold around publication and this check.
        (!p.consumers.load(Ordering::Relaxed).is_null()).then_some(p.insn)
    }

    /// Calls `f(offset, saved bytes, wanted)` for every probe of `object` with offset in
    /// `offsets`, under the tree lock (so `f` must not take it).
    pub fn probes_of(
        &self,
        object: ObjectId,
        offsets: Range<u64>,
        mut f: impl FnMut(u64, SavedInsn, bool),
    ) {
        let _tree = RawGuard::lock(&*self.tree_lock);
        let (lo, hi) = (
            ProbeKey::new(object, offsets.start),
            ProbeKey::new(object, offsets.end),
        );
        // SAFETY: tree lock held; under it the published root is the writers' root.
        unsafe {
            self.tree.range(&lo, &hi, |k, p| {
                // Relaxed: as in `wanted`.
                let wanted = !(*p).consumers.load(Ordering::Relaxed).is_null();
                f(k.offset, (*p).insn, wanted);
                true
            })
        };
    }

    /// The probe at `key` with a reference taken, unless absent or dying.
    fn get_live(&self, key: &ProbeKey) -> Option<*const Probe<P>> {
        let _tree = RawGuard::lock(&*self.tree_lock);
        // SAFETY: the tree lock is held, so no node or probe reachable from the tree is freed.
        let p = unsafe { self.tree.get_locked(key) }?;
        // SAFETY: `p` is in the tree and the tree lock is held: it is allocated.
        unsafe { &*p }.try_get().then_some(p)
    }

    /// Publishes a copy of the consumer list with `consumer` appended. `Ok(true)` if it was the
    /// first. Caller holds the object's lock and a reference.
    ///
    /// Everything a later unregistration needs is reserved here, before anything is published
    /// (INVARIANT at the top of the module): one more spare list, and room in every spare for
    /// the longer list's removals.
    fn add_consumer(&self, probe: &Probe<P>, consumer: P) -> Result<bool> {
        // SAFETY: the caller holds the object's lock.
        let old = unsafe { probe.writer_list() };
        let items = if old.is_null() {
            &[][..]
        } else {
            // SAFETY: the current list under the object's lock: only we could replace it.
            unsafe { ConsumerList::items(old) }
        };
        if items.iter().any(|c| P::same_consumer(c, &consumer)) {
            return Err(Error::DuplicateConsumer);
        }
        let n = items.len();
        let new = ConsumerList::new(
            n + 1,
            items.iter().cloned().chain(core::iter::once(consumer)),
        )?;
        // A removal from the n + 1 consumers leaves n: every spare needs room for n, and there
        // must be n of them (one per consumer beyond the first).
        let reserved = (|| {
            let mut grow = Ok(());
            // SAFETY: object lock held; spares are ours and empty.
            unsafe {
                probe.for_each_spare(|s| {
                    if grow.is_ok() {
                        grow = ConsumerList::reserve(s, n);
                    }
                })
            };
            grow?;
            if n >= 1 {
                ConsumerList::<P>::alloc(n).map(Some)
            } else {
                Ok(None)
            }
        })();
        let spare = match reserved {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: `new` was never published. (Spares that grew keep their room.)
                unsafe { free_list(new) };
                return Err(e);
            }
        };
        // SAFETY: `new` is ours and unpublished; `old` is the current list, which only we
        // (holding the object's lock) replace.
        unsafe { self.publish_consumers(probe, old, new) };
        if let Some(s) = spare {
            // SAFETY: object lock held; `s` is ours and empty.
            unsafe { probe.push_spare(s) };
        }
        Ok(old.is_null())
    }

    /// Publishes a copy of the consumer list without `consumer`; drops the registration's
    /// reference if it was the last (and then returns `true`). Caller holds the object's lock
    /// and a reference. Never allocates: the shorter list is built in a spare the registration
    /// reserved, and the old list's retirement was allocated with it.
    fn remove_consumer(&self, probe: &Probe<P>, consumer: &P) -> Result<bool> {
        // SAFETY: the caller holds the object's lock.
        let old = unsafe { probe.writer_list() };
        let items = if old.is_null() {
            &[][..]
        } else {
            // SAFETY: the current list under the object's lock.
            unsafe { ConsumerList::items(old) }
        };
        let at = items
            .iter()
            .position(|c| P::same_consumer(c, consumer))
            .ok_or(Error::UnknownConsumer)?;
        let rest = items
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != at)
            .map(|(_, c)| c.clone());
        let new = if items.len() == 1 {
            ptr::null_mut()
        } else {
            // SAFETY: object lock held.
            let s = unsafe { probe.pop_spare() };
            // INVARIANT: a probe with n > 1 consumers has n - 1 spares with room for n - 1.
            // SAFETY: `s` (when non-null) is ours, empty and unpublished.
            if !s.is_null() && unsafe { ConsumerList::has_room(s, items.len() - 1) } {
                // SAFETY: as above.
                unsafe { ConsumerList::fill(s, items.len() - 1, rest) };
                s
            } else {
                // Unreachable while the invariant holds; allocate rather than corrupt.
                debug_assert!(false, "a probe ran out of spare consumer lists");
                if !s.is_null() {
                    // SAFETY: ours, unpublished.
                    unsafe { probe.push_spare(s) };
                }
                ConsumerList::new(items.len() - 1, rest)?
            }
        };
        // SAFETY: as in `add_consumer`.
        unsafe { self.publish_consumers(probe, old, new) };
        if new.is_null() {
            // The registration's reference. Not the last: the caller holds one too.
            // SAFETY: the registration held it (INVARIANT: non-null list ⇒ registration ref).
            unsafe { self.put(probe) };
        }
        Ok(new.is_null())
    }

    /// Replaces the probe's list `old` by `new` and defers the free of `old` (through the
    /// retirement it was allocated with: never allocates, never fails).
    ///
    /// # Safety
    ///
    /// The caller holds the object's lock; `old` is the probe's current list; `new` is unpublished.
    unsafe fn publish_consumers(
        &self,
        probe: &Probe<P>,
        old: *mut ConsumerList<P>,
        new: *mut ConsumerList<P>,
    ) {
        #[cfg(loom)]
        let order = if crate::seeded::is(crate::seeded::Bug::ConsumerPublishRelaxed) {
            Ordering::Relaxed
        } else {
            Ordering::Release
        };
        #[cfg(not(loom))]
        let order = Ordering::Release;
        {
            // Under the tree lock, so that no leaf copy (made under it) carries the old word.
            #[cfg(loom)]
            let locked = !crate::seeded::is(crate::seeded::Bug::HotWordOutsideTreeLock);
            #[cfg(not(loom))]
            let locked = true;
            let _tree = locked.then(|| RawGuard::lock(&*self.tree_lock));
            // Release pairs with the Acquire load in `Probe::consumer_list`: the list's contents
            // were written before its pointer.
            // SAFETY: the caller holds the object's lock; `new` is initialized.
            unsafe { probe.set_list(new, order) };
            #[cfg(loom)]
            let mirror = !crate::seeded::is(crate::seeded::Bug::HotWordNotUpdated);
            #[cfg(not(loom))]
            let mirror = true;
            if mirror {
                // The leaf's hot word too (Release inside, paired with `get_hot`'s Acquire).
                // A probe out of the tree (dying, replaced) has no word to change.
                // SAFETY: tree lock held; `old` stays allocated for a grace period (below).
                unsafe {
                    self.tree
                        .set_hot(&probe.key(), probe as *const Probe<P>, new.cast())
                };
            }
        }
        if old.is_null() {
            return;
        }
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::SpareRecycledEarly) {
            // The seeded bug: the replaced list becomes a spare at once (emptied for reuse)
            // instead of waiting out a grace period — while hits may still be reading it.
            // SAFETY: (not) — that is the bug the model must catch.
            unsafe {
                ConsumerList::clear(old);
                probe.push_spare(old);
            }
            return;
        }
        // SAFETY: `old` was the current list until the store above; object lock held.
        if let Some(cb) = unsafe { ConsumerList::take_retire(old) } {
            #[cfg(loom)]
            if crate::seeded::is(crate::seeded::Bug::ConsumerFreeEarly) {
                cb.run();
                return;
            }
            self.rcu.defer(cb);
        }
    }

    /// Creates a probe with one consumer and puts it in the tree (over a dying one, if any).
    /// Caller holds the object's lock.
    fn insert_new(&self, key: ProbeKey, consumer: P, insn: SavedInsn) -> Result<()> {
        let list = ConsumerList::new(1, core::iter::once(consumer))?;
        // INVARIANT: one consumer, so the registration holds the one reference, and no spare.
        let probe = match try_box(Probe::new(key, 1, list, insn)) {
            Ok(b) => Box::into_raw(b),
            Err(e) => {
                // SAFETY: never published.
                unsafe { free_list(list) };
                return Err(e);
            }
        };
        let sp = SendPtr(probe);
        let cb = Deferred::new(move || {
            let sp = sp;
            // SAFETY: the probe left the tree and a grace period has passed.
            unsafe { free_probe(sp.0) }
        });
        let cb = match cb {
            Ok(cb) => cb,
            Err(e) => {
                // SAFETY: never published.
                unsafe { free_probe(probe) };
                return Err(e);
            }
        };
        // SAFETY: unpublished; we own it.
        unsafe { (*probe).free_cb.with_mut(|c| *c = Some(cb)) };
        let replaced = {
            let _tree = RawGuard::lock(&*self.tree_lock);
            // SAFETY: tree lock held.
            unsafe { self.retry_orphans() };
            // SAFETY: tree lock held; the registry's one domain.
            let r = unsafe { self.tree.insert(&self.rcu, key, probe) };
            if let Ok(Some(dying)) = r {
                // The entry was dying (its final put is on its way, and will find it replaced).
                // If that final put already gave up removing it (orphaned), freeing is ours.
                // SAFETY: removed from the tree just now, under the tree lock we hold, so
                // still allocated (its free is queued only here or by its final put).
                unsafe { self.free_if_orphaned(dying) };
            }
            r
        };
        match replaced {
            Ok(_) => Ok(()),
            Err(e) => {
                // SAFETY: never published.
                unsafe { free_probe(probe) };
                Err(e)
            }
        }
    }

    /// Drops one reference to `p`, running the final put if it was the last.
    ///
    /// # Safety
    ///
    /// The caller owns one reference to `p`.
    unsafe fn put(&self, p: *const Probe<P>) {
        // SAFETY: the caller's reference keeps `p` allocated.
        if unsafe { &*p }.put() {
            // SAFETY: we made the count zero: the final put is ours alone.
            unsafe { self.final_put(p) };
        }
    }

    /// The count reached zero: take the probe out of the tree (unless it was replaced) and free
    /// it after a grace period.
    ///
    /// # Safety
    ///
    /// The caller made the reference count zero.
    unsafe fn final_put(&self, p: *const Probe<P>) {
        // SAFETY: a zero count means no consumer and no holder; the memory is still ours to
        // free, so it is allocated.
        let probe = unsafe { &*p };
        let key = probe.key();
        {
            let _tree = RawGuard::lock(&*self.tree_lock);
            // SAFETY: tree lock held.
            unsafe { self.retry_orphans() };
            // SAFETY: tree lock held.
            if unsafe { self.tree.get_locked(&key) } == Some(p) {
                // SAFETY: tree lock held; the registry's one domain.
                if unsafe { self.tree.remove(&self.rcu, &key) }.is_err() {
                    // No memory to copy the path: leave the dying probe in the tree (readers
                    // treat it as absent) on the orphan list, for the next tree-locked write
                    // or `sync` to remove — or for a registration at its key to replace.
                    // Relaxed: read and written only under the tree lock.
                    probe.orphaned.store(true, Ordering::Relaxed);
                    // SAFETY: tree lock held; `p` is in the tree, dying, not yet an orphan.
                    unsafe { self.push_orphan(p) };
                    return;
                }
            }
        }
        // SAFETY: only the final put takes the callback; it runs after a grace period.
        if let Some(cb) = probe.free_cb.with_mut(|c| unsafe { (*c).take() }) {
            self.rcu.defer(cb);
        }
    }

    /// Puts `p` on the orphan list.
    ///
    /// # Safety
    ///
    /// The tree lock is held; `p` is in the tree, dying, and not on the list.
    unsafe fn push_orphan(&self, p: *const Probe<P>) {
        // Relaxed (all of the list's accesses): only under the tree lock, which orders them.
        // SAFETY: the caller's contract: `p` is allocated (in the tree).
        unsafe { &*p }
            .orphan_next
            .store(self.orphans.load(Ordering::Relaxed), Ordering::Relaxed);
        self.orphans.store(p as *mut Probe<P>, Ordering::Relaxed);
    }

    /// Takes `p` off the orphan list, if it is on it.
    ///
    /// # Safety
    ///
    /// The tree lock is held; every probe on the list is allocated (INVARIANT: an orphan is
    /// freed only after it leaves the list).
    unsafe fn unlink_orphan(&self, p: *const Probe<P>) {
        // Relaxed: as in `push_orphan`.
        let mut prev: *const Probe<P> = ptr::null();
        let mut cur = self.orphans.load(Ordering::Relaxed) as *const Probe<P>;
        while !cur.is_null() {
            // SAFETY: on the list, so allocated.
            let next = unsafe { &*cur }.orphan_next.load(Ordering::Relaxed);
            if cur == p {
                if prev.is_null() {
                    self.orphans.store(next, Ordering::Relaxed);
                } else {
                    // SAFETY: on the list, so allocated.
                    unsafe { &*prev }.orphan_next.store(next, Ordering::Relaxed);
                }
                return;
            }
            prev = cur;
            cur = next;
        }
    }

    /// Retries the tree removal of every orphan; each one removed leaves the list and has its
    /// free queued. Nothing to do (one load) in the common case.
    ///
    /// # Safety
    ///
    /// The tree lock is held.
    unsafe fn retry_orphans(&self) {
        // Relaxed: as in `push_orphan`.
        let mut cur = self.orphans.load(Ordering::Relaxed) as *const Probe<P>;
        while !cur.is_null() {
            // SAFETY: on the list, so allocated (INVARIANT in `unlink_orphan`).
            let o = unsafe { &*cur };
            let next = o.orphan_next.load(Ordering::Relaxed) as *const Probe<P>;
            let key = o.key();
            // An orphan on the list is still the tree's entry: a registration that replaces it
            // unlinks it first (`free_if_orphaned`).
            // SAFETY: tree lock held; the registry's one domain.
            if unsafe { self.tree.remove(&self.rcu, &key) }.is_ok() {
                // SAFETY: tree lock held.
                unsafe { self.unlink_orphan(cur) };
                // SAFETY: an orphan's callback is untouched (its final put gave up first).
                if let Some(cb) = o.free_cb.with_mut(|c| unsafe { (*c).take() }) {
                    self.rcu.defer(cb);
                }
            }
            cur = next;
        }
    }

    /// `dying` was just removed from the tree by a writer; free it if its final put left it
    /// orphaned.
    ///
    /// # Safety
    ///
    /// The tree lock is held, and `dying` was in the tree until this moment (so it is
    /// allocated).
    unsafe fn free_if_orphaned(&self, dying: *const Probe<P>) {
        // SAFETY: the caller's contract.
        let d = unsafe { &*dying };
        // Relaxed: `orphaned` is set under the tree lock, which the caller holds.
        if d.orphaned.load(Ordering::Relaxed) {
            // SAFETY: tree lock held; an orphan is on the list until unlinked here or retried.
            unsafe { self.unlink_orphan(dying) };
            // SAFETY: an orphan's callback is untouched (its final put returned before taking it).
            if let Some(cb) = d.free_cb.with_mut(|c| unsafe { (*c).take() }) {
                self.rcu.defer(cb);
            }
        }
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

/// An open read section of a [`Registry`]: what a hit holds while it looks up and runs consumers.
pub struct ReadGuard<'r, C: ?Sized, R: Rcu + 'r, L: RawLock, const N: usize, P = Arc<C>> {
    reg: &'r Registry<C, R, L, N, P>,
    _guard: R::Guard<'r>,
}

impl<'r, C, R, L, const N: usize, P: ConsumerHandle<Target = C>> ReadGuard<'r, C, R, L, N, P>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu + 'r,
    L: RawLock,
{
    /// The probe at `key`, if any. Lock-free, store-free, bounded.
    ///
    /// A dying probe (see [`Probe::is_dying`]) is returned too; it has no consumers.
    #[inline]
    pub fn lookup(&self, key: &ProbeKey) -> Option<ProbeView<'_, C, R, L, N, P>> {
        // The leaf's hot word is the probe's consumer list: a hit goes from the leaf to its
        // consumers without loading the probe (one dependent cache miss fewer).
        // SAFETY: `self` holds a read guard of the domain the tree's writers retire through.
        let (p, list) = unsafe { self.reg.tree.get_hot(key) }?;
        Some(ProbeView {
            reg: self.reg,
            probe: p,
            key: *key,
            list: list.cast(),
            _guard: PhantomData,
        })
    }

    /// A counted reference to `probe` that outlives this read section (increment-not-zero).
    ///
    /// `None` if the probe is dying, or if `probe` was seen through another registry.
    #[inline]
    pub fn hold(&self, probe: ProbeView<'_, C, R, L, N, P>) -> Option<ProbeRef<'r, C, R, L, N, P>> {
        if !core::ptr::eq(probe.reg, self.reg) {
            return None;
        }
        probe.probe().try_get().then(|| ProbeRef {
            reg: self.reg,
            probe: NonNull::from(probe.probe()),
        })
    }

    /// A view of a held probe inside this read section (`None` if it belongs to another
    /// registry).
    #[inline]
    pub fn view(&self, held: &ProbeRef<'_, C, R, L, N, P>) -> Option<ProbeView<'_, C, R, L, N, P>> {
        if !core::ptr::eq(held.reg, self.reg) {
            return None;
        }
        // SAFETY: `held` keeps the probe allocated now; if its count later reaches zero, the
        // free is deferred past a grace period, which cannot end while this guard is held. So
        // the probe outlives the returned view, which borrows the guard.
        let probe = unsafe { held.probe.as_ref() };
        Some(ProbeView::of(self.reg, probe))
    }

    /// Calls `f` on every probe of `object` with offset in `offsets`, in offset order, until `f`
    /// returns `false`. This is what mapping a range of an object into an address space needs.
    pub fn probes_in(
        &self,
        object: ObjectId,
        offsets: Range<u64>,
        mut f: impl FnMut(ProbeView<'_, C, R, L, N, P>) -> bool,
    ) {
        let lo = ProbeKey::new(object, offsets.start);
        let hi = ProbeKey::new(object, offsets.end);
        // SAFETY: as in `lookup`.
        unsafe {
            self.reg
                .tree
                .range(&lo, &hi, |_, p| f(ProbeView::of(self.reg, &*p)));
        }
    }
}

/// A probe seen inside a read section; valid for the guard's lifetime.
///
/// A view from [`ReadGuard::lookup`] carries the probe's key and consumer list as the tree's leaf
/// held them, so [`ProbeView::consumers`] and [`ProbeView::key`] never load the probe itself.
pub struct ProbeView<'g, C: ?Sized, R: Rcu, L: RawLock, const N: usize, P = Arc<C>> {
    reg: &'g Registry<C, R, L, N, P>,
    /// Allocated for `'g` (reached under the read guard `'g` borrows); dereferenced only when
    /// the caller asks for the probe itself.
    probe: *const Probe<P>,
    key: ProbeKey,
    /// The consumer list as of the lookup (null: none); retired through the guard's domain.
    list: *const ConsumerList<P>,
    _guard: PhantomData<&'g Probe<P>>,
}

impl<C: ?Sized, R: Rcu, L: RawLock, const N: usize, P: ConsumerHandle<Target = C>> Clone
    for ProbeView<'_, C, R, L, N, P>
{
    fn clone(&self) -> Self {
        *self
    }
}
impl<C: ?Sized, R: Rcu, L: RawLock, const N: usize, P: ConsumerHandle<Target = C>> Copy
    for ProbeView<'_, C, R, L, N, P>
{
}

impl<'g, C, R, L, const N: usize, P: ConsumerHandle<Target = C>> ProbeView<'g, C, R, L, N, P>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
{
    /// A view of `probe`, reached under a read guard for `'g`: its list loaded from the probe.
    fn of(reg: &'g Registry<C, R, L, N, P>, probe: &'g Probe<P>) -> Self {
        Self {
            reg,
            probe,
            key: probe.key(),
            list: probe.consumer_list(),
            _guard: PhantomData,
        }
    }

    /// The probe.
    #[inline]
    pub fn probe(&self) -> &'g Probe<P> {
        // SAFETY: reached under the read guard `'g` borrows: allocated until it ends (a grace
        // period after the probe leaves the tree).
        unsafe { &*self.probe }
    }

    /// Where the probe is.
    #[inline]
    pub fn key(&self) -> ProbeKey {
        self.key
    }

    /// The consumers to call, as of the lookup. No reference count is touched, and the probe
    /// itself is not loaded.
    #[inline]
    pub fn consumers(&self) -> &'g [P] {
        let l = self.list;
        if l.is_null() {
            return &[];
        }
        // SAFETY: loaded under the read guard that `'g` borrows (from the leaf's hot word or the
        // probe, both with Acquire): a list replaced after this load is freed only after the
        // guard ends.
        unsafe { ConsumerList::items(l as *mut ConsumerList<P>) }
    }
}

/// A counted reference to a probe: keeps it allocated beyond any read section.
///
/// Dropping the last reference of a probe that has no consumers removes it from the tree
/// (taking the tree lock briefly) and frees it after a grace period — so do not drop one inside
/// a context that must not take the registry's raw lock.
pub struct ProbeRef<
    'a,
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C> = Arc<C>,
> {
    reg: &'a Registry<C, R, L, N, P>,
    probe: NonNull<Probe<P>>,
}

// SAFETY: a counted reference to a `Sync` probe in a `Sync` registry; dropping it from another
// thread runs the same final put as anywhere.
unsafe impl<
    C: ?Sized + Send + Sync,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C>,
> Send for ProbeRef<'_, C, R, L, N, P>
{
}
// SAFETY: shared access only reads.
unsafe impl<
    C: ?Sized + Send + Sync,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C>,
> Sync for ProbeRef<'_, C, R, L, N, P>
{
}

impl<
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C>,
> core::ops::Deref for ProbeRef<'_, C, R, L, N, P>
{
    type Target = Probe<P>;
    fn deref(&self) -> &Probe<P> {
        // SAFETY: the reference count keeps the probe allocated.
        let p = unsafe { self.probe.as_ref() };
        p.free_check.check();
        p
    }
}

impl<
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C>,
> Drop for ProbeRef<'_, C, R, L, N, P>
{
    fn drop(&mut self) {
        // SAFETY: we own one reference.
        unsafe { self.reg.put(self.probe.as_ptr()) }
    }
}

impl<
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C>,
> fmt::Debug for ProbeRef<'_, C, R, L, N, P>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

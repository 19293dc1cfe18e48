//! The write side: register and unregister consumers. Reserve, then lock and publish — a
//! registration allocates everything first (the probe, its list, the spare list its
//! unregistration will fill, the deferred callbacks), then takes the object's lock and, briefly,
//! the tree lock to publish with one release store; an unregistration allocates nothing.

use super::{ProbeRef, Registry, SendPtr, free_probe};
use crate::alloc_util::try_box;
use crate::arch::SavedInsn;
use crate::error::{Error, Result};
use crate::lock::{RawGuard, RawLock};
use crate::probe::{ConsumerHandle, ConsumerList, ObjectId, Probe, ProbeKey, free_list};
use crate::rcu::{Deferred, Rcu};
use crate::sync::Ordering;
use alloc::boxed::Box;
use core::ops::Range;
use core::ptr::{self, NonNull};

impl<C, R, L, const N: usize, P: ConsumerHandle<Target = C>> Registry<C, R, L, N, P>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
{
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
    pub(super) fn get_live(&self, key: &ProbeKey) -> Option<*const Probe<P>> {
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
    pub(super) fn add_consumer(&self, probe: &Probe<P>, consumer: P) -> Result<bool> {
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
    pub(super) fn remove_consumer(&self, probe: &Probe<P>, consumer: &P) -> Result<bool> {
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
    pub(super) unsafe fn publish_consumers(
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
    pub(super) fn insert_new(&self, key: ProbeKey, consumer: P, insn: SavedInsn) -> Result<()> {
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
}

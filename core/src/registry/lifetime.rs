//! A probe's lifetime: the reference count's puts, the final put that removes a dying probe from
//! the tree and defers its free, and the orphans — dying probes whose removal could not
//! allocate, kept on a list every later tree-locked write retries until counts are exact.

use super::Registry;
use crate::lock::{RawGuard, RawLock};
use crate::probe::{ConsumerHandle, Probe};
use crate::rcu::Rcu;
use crate::sync::Ordering;
use core::ptr::{self};

impl<C, R, L, const N: usize, P: ConsumerHandle<Target = C>> Registry<C, R, L, N, P>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
{
    /// Drops one reference to `p`, running the final put if it was the last.
    ///
    /// # Safety
    ///
    /// The caller owns one reference to `p`.
    pub(super) unsafe fn put(&self, p: *const Probe<P>) {
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
    pub(super) unsafe fn final_put(&self, p: *const Probe<P>) {
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
    pub(super) unsafe fn push_orphan(&self, p: *const Probe<P>) {
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
    pub(super) unsafe fn unlink_orphan(&self, p: *const Probe<P>) {
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
    pub(super) unsafe fn retry_orphans(&self) {
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
    pub(super) unsafe fn free_if_orphaned(&self, dying: *const Probe<P>) {
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

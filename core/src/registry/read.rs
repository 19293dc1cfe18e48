//! The read side: a [`ReadGuard`] is an open read section, [`ProbeView`] a probe found in it —
//! its consumers reached through the leaf's hot word, no lock, no store, no reference count.

use super::{ProbeRef, Registry};
use crate::lock::RawLock;
use crate::probe::{ConsumerHandle, ConsumerList, ObjectId, Probe, ProbeKey};
use crate::rcu::Rcu;
use alloc::sync::Arc;
use core::marker::PhantomData;
use core::ops::Range;
use core::ptr::NonNull;

impl<C, R, L, const N: usize, P: ConsumerHandle<Target = C>> Registry<C, R, L, N, P>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
{
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
}

/// An open read section of a [`Registry`]: what a hit holds while it looks up and runs consumers.
pub struct ReadGuard<'r, C: ?Sized, R: Rcu + 'r, L: RawLock, const N: usize, P = Arc<C>> {
    pub(super) reg: &'r Registry<C, R, L, N, P>,
    pub(super) _guard: R::Guard<'r>,
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
    pub(super) reg: &'g Registry<C, R, L, N, P>,
    /// Allocated for `'g` (reached under the read guard `'g` borrows); dereferenced only when
    /// the caller asks for the probe itself.
    pub(super) probe: *const Probe<P>,
    pub(super) key: ProbeKey,
    /// The consumer list as of the lookup (null: none); retired through the guard's domain.
    pub(super) list: *const ConsumerList<P>,
    pub(super) _guard: PhantomData<&'g Probe<P>>,
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

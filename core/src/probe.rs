//! A probe: an (object, offset) with its consumers and its reference count.
//!
//! # Lifetime rules (the kernel's uprobe rules, 2024)
//!
//! * **References.** `refs` counts holders: the registration (one reference while the probe has
//!   at least one consumer) and every [`ProbeRef`](crate::registry::ProbeRef). The tree itself
//!   holds none, so a probe can be in the tree with `refs == 0`: it is **dying** — its final put is
//!   on the way to remove it from the tree and free it after a grace period.
//! * **Readers under a guard** may use any probe they reach, dying or not, until the guard ends:
//!   its memory is freed only a grace period after it left the tree. A hit traverses consumers
//!   this way, with no reference-count traffic at all (Invariant 1).
//! * **Beyond the guard**, a reader needs a counted reference, taken with *increment-not-zero*
//!   (`Probe::try_get`, crate-private: [`crate::registry::ReadGuard::hold`] is its public
//!   face): a dying probe must not be resurrected, because its free is already
//!   scheduled. A plain increment would hand out a reference to memory about to be freed.
//! * **Insert over a dying probe replaces it** in the tree rather than reviving it; the dying
//!   probe's final put sees that it is no longer the tree's entry and leaves the new one alone.
//!
//! # Consumers
//!
//! The consumer list is copy-on-write: a writer (holding the object's lock) builds a new list,
//! publishes it with one release store and retires the old one through the RCU domain. A hit
//! loads the list (acquire) and calls each consumer; it never sees a half-built list and never
//! writes anything.
//!
//! # Invariants
//!
//! * INVARIANT: `consumers` is null exactly when the probe has no consumer; otherwise it points to
//!   a non-empty, never-again-written list.
//! * INVARIANT: while `consumers` is non-null the registration holds one reference.
//! * INVARIANT: `refs` goes to zero once; after that nothing increments it (increment-not-zero),
//!   and exactly one thread — the one that made it zero — runs the final put.

use crate::alloc_util::{try_box, try_vec_with_capacity};
use crate::rcu::Deferred;
use crate::sync::{
    AtomicBool, AtomicPtr, AtomicUsize, FreeCheck, Ordering, UnsafeCell, quarantine,
};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::mem::MaybeUninit;

pub use crate::types::{ObjectId, ProbeKey};

/// How the registry holds a consumer: a shared, reference-counted handle to it.
/// `alloc::sync::Arc` is one (the default everywhere); a kernel with its own reference-counted
/// pointer implements this for it and uses it as the registry's (and the kprobes layer's)
/// handle type.
///
/// # Safety
///
/// `clone` and `drop` must not allocate, block or fail — a reference-count increment and
/// decrement (the last drop may free the consumer): unregistration clones handles under the
/// registry's locks and promises never to allocate, and lists are dropped in RCU callbacks.
/// `same_consumer` must be an identity test: true exactly when both handles point to one consumer.
pub unsafe trait ConsumerHandle: Clone + Send + Sync + 'static {
    /// The consumer.
    type Target: ?Sized;
    /// The consumer this handle points to.
    fn consumer(&self) -> &Self::Target;
    /// Do `a` and `b` point to the same consumer?
    fn same_consumer(a: &Self, b: &Self) -> bool;
}

// SAFETY: `Arc`'s clone and drop are reference-count operations (the last drop frees, through
// the global allocator's `dealloc`, which does not allocate); `ptr_eq` is identity.
unsafe impl<C: ?Sized + Send + Sync + 'static> ConsumerHandle for Arc<C> {
    type Target = C;
    #[inline]
    fn consumer(&self) -> &C {
        self
    }
    #[inline]
    fn same_consumer(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(a, b)
    }
}

/// Consumers stored in the list's own allocation up to this many: a hit then reads the list
/// header and its consumers from one place instead of chasing a separate buffer (one dependent
/// cache miss fewer per hit; most probes have one or two consumers).
pub const INLINE_CONSUMERS: usize = 4;

/// The consumers of a list: inline when few, in a vector when many. A vector is never shrunk
/// (no reallocation when a spare's reserved capacity is filled with fewer items).
enum Items<P> {
    Inline(usize, [MaybeUninit<P>; INLINE_CONSUMERS]),
    Heap(Vec<P>),
}

impl<P> Items<P> {
    fn empty() -> Self {
        // INVARIANT: the first 0 elements are initialized.
        Items::Inline(0, [const { MaybeUninit::uninit() }; INLINE_CONSUMERS])
    }

    /// Room for `len` consumers: inline when it fits, else a vector of that capacity
    /// (allocated fallibly).
    fn with_room(len: usize) -> crate::Result<Self> {
        if len <= INLINE_CONSUMERS {
            Ok(Self::empty())
        } else {
            Ok(Items::Heap(try_vec_with_capacity(len)?))
        }
    }

    /// Can hold `len` consumers without allocating?
    fn has_room(&self, len: usize) -> bool {
        len <= INLINE_CONSUMERS || matches!(self, Items::Heap(v) if v.capacity() >= len)
    }

    /// Fills empty storage with exactly `len` consumers from `it`. Never allocates: the storage
    /// has room (the caller checked [`Items::has_room`]); inline storage is chosen whenever the
    /// list fits, dropping a reserved vector.
    fn fill(&mut self, len: usize, it: impl Iterator<Item = P>) {
        if len <= INLINE_CONSUMERS {
            let mut arr = [const { MaybeUninit::uninit() }; INLINE_CONSUMERS];
            let mut n = 0;
            for (slot, c) in arr.iter_mut().zip(it) {
                slot.write(c);
                n += 1;
            }
            // INVARIANT: the first `n` elements are initialized.
            *self = Items::Inline(n, arr);
        } else if let Items::Heap(v) = self {
            // Capacity for `len` (the caller's check): `extend` does not reallocate.
            v.extend(it.take(len));
        }
    }

    fn as_slice(&self) -> &[P] {
        match self {
            // SAFETY: the first `n` elements are initialized (INVARIANT in `fill` / `empty`), and
            // `MaybeUninit<T>` has `T`'s layout.
            Items::Inline(n, arr) => unsafe {
                core::slice::from_raw_parts(arr.as_ptr().cast::<P>(), *n)
            },
            Items::Heap(v) => v,
        }
    }
}

impl<P> Drop for Items<P> {
    fn drop(&mut self) {
        if let Items::Inline(n, arr) = self {
            for slot in &mut arr[..*n] {
                // SAFETY: initialized (INVARIANT in `fill`), dropped once.
                unsafe { slot.assume_init_drop() };
            }
        }
    }
}

/// A raw pointer that may cross threads inside a deferred callback.
struct SendPtr<T: ?Sized>(*mut T);
// SAFETY: used only to hand an unreachable object to the callback that frees it.
unsafe impl<T: ?Sized> Send for SendPtr<T> {}

/// A consumer list: published (immutable from then on), or a *spare* — storage reserved by a
/// registration so that a later unregistration can build its shorter list without allocating.
/// Cache-line aligned: a hit reads its length and first consumers from one line.
///
/// Every list carries its own retirement: the callback that frees it after a grace period,
/// allocated with it, so replacing a list never allocates either.
#[repr(align(64))]
pub(crate) struct ConsumerList<P> {
    items: UnsafeCell<Items<P>>,
    /// Frees this list; taken (once) when the list is retired. `None` after that.
    retire: UnsafeCell<Option<Deferred>>,
    /// The next spare on its probe's spare stack (while this is a spare; writer-side, under the
    /// object's lock).
    next_spare: UnsafeCell<*mut ConsumerList<P>>,
    pub(crate) free_check: FreeCheck,
}

impl<P: ConsumerHandle> ConsumerList<P> {
    /// A boxed list with room for `room` consumers, holding none yet, and its retirement
    /// callback. All fallible allocation of a list happens here.
    pub(crate) fn alloc(room: usize) -> crate::Result<*mut Self> {
        let b = try_box(Self {
            items: UnsafeCell::new(Items::with_room(room)?),
            retire: UnsafeCell::new(None),
            next_spare: UnsafeCell::new(core::ptr::null_mut()),
            free_check: FreeCheck::new(),
        })?;
        let p = Box::into_raw(b);
        let sp = SendPtr(p);
        match Deferred::new(move || {
            let sp = sp;
            // SAFETY: the list was retired (unpublished) a grace period ago; nothing reaches it.
            unsafe { free_list(sp.0) }
        }) {
            Ok(d) => {
                // SAFETY: `p` is ours and unpublished.
                unsafe { (*p).retire.with_mut(|r| *r = Some(d)) };
                Ok(p)
            }
            Err(e) => {
                // SAFETY: never published; ours.
                drop(unsafe { Box::from_raw(p) });
                Err(e)
            }
        }
    }

    /// A boxed list of exactly `len` consumers from `it`.
    pub(crate) fn new(len: usize, it: impl Iterator<Item = P>) -> crate::Result<*mut Self> {
        let p = Self::alloc(len)?;
        // SAFETY: fresh, unpublished, with room for `len`.
        unsafe { Self::fill(p, len, it) };
        Ok(p)
    }
}

impl<P> ConsumerList<P> {
    /// Fills an unpublished, empty list with exactly `len` consumers. Never allocates.
    ///
    /// # Safety
    ///
    /// `p` is unpublished, empty and ours, with room for `len` ([`ConsumerList::has_room`]).
    pub(crate) unsafe fn fill(p: *mut Self, len: usize, it: impl Iterator<Item = P>) {
        // SAFETY: the caller's contract: nobody else reaches `p`.
        unsafe { (*p).items.with_mut(|i| (*i).fill(len, it)) };
    }

    /// Can the unpublished list `p` hold `len` consumers without allocating?
    ///
    /// # Safety
    ///
    /// `p` is ours (unpublished).
    pub(crate) unsafe fn has_room(p: *const Self, len: usize) -> bool {
        // SAFETY: the caller's contract.
        unsafe { (*p).items.with(|i| (*i).has_room(len)) }
    }

    /// Makes room for `len` consumers in the empty, unpublished list `p` (a spare that must
    /// serve a longer list now). Fallible; on failure `p` is unchanged.
    ///
    /// # Safety
    ///
    /// `p` is ours, unpublished and empty.
    pub(crate) unsafe fn reserve(p: *mut Self, len: usize) -> crate::Result<()> {
        // SAFETY: the caller's contract.
        if unsafe { Self::has_room(p, len) } {
            return Ok(());
        }
        let room = Items::with_room(len)?;
        // SAFETY: as above; the old storage is empty, so replacing it drops no consumer.
        unsafe { (*p).items.with_mut(|i| *i = room) };
        Ok(())
    }

    /// Empties the list (its consumers dropped): for the loom suite's seeded bug that recycles a
    /// replaced list as a spare without a grace period.
    ///
    /// # Safety
    ///
    /// Only for that bug: readers may still be reading the list.
    #[cfg(loom)]
    pub(crate) unsafe fn clear(p: *mut Self) {
        // SAFETY: none; the seeded bug.
        unsafe { (*p).items.with_mut(|i| *i = Items::empty()) };
    }

    /// Takes the list's retirement callback (to defer it when the list is replaced).
    ///
    /// # Safety
    ///
    /// The caller holds the object's lock and `p` was its probe's current list until now.
    pub(crate) unsafe fn take_retire(p: *mut Self) -> Option<Deferred> {
        // SAFETY: writers of the object are serialized; readers never touch `retire`.
        unsafe { (*p).retire.with_mut(|r| (*r).take()) }
    }

    /// The consumers.
    ///
    /// # Safety
    ///
    /// The list is published (or owned) and the caller keeps it alive for `'a` (a read guard,
    /// or the object's lock under which it is the current list).
    pub(crate) unsafe fn items<'a>(p: *const Self) -> &'a [P] {
        // SAFETY: the caller's contract.
        let list = unsafe { &*p };
        list.free_check.check();
        // SAFETY: a published list is never written again.
        list.items.with(|v| unsafe { &*v }).as_slice()
    }
}

/// Frees a consumer list (published and retired, or a spare never published).
///
/// # Safety
///
/// `l` came from [`ConsumerList::alloc`] and no reader can reach it.
pub(crate) unsafe fn free_list<P>(l: *mut ConsumerList<P>) {
    // SAFETY: the caller's contract.
    let b = unsafe { Box::from_raw(l) };
    b.free_check.mark_freed();
    quarantine(b);
}

/// A probe. Reached through a [`ReadGuard`](crate::registry::ReadGuard) (valid for the guard)
/// or a [`ProbeRef`](crate::registry::ProbeRef) (valid while counted).
///
/// Cache-line aligned, with what a hit reads (the consumer list pointer, the key) first.
#[repr(C, align(64))]
pub struct Probe<P> {
    pub(crate) consumers: AtomicPtr<ConsumerList<P>>,
    key: ProbeKey,
    pub(crate) refs: AtomicUsize,
    /// The writers' copy of `consumers`, read and written only under the object's lock, so a
    /// writer never loads the published pointer it is about to replace (see `ProbeTree`'s
    /// writer view for why).
    pub(crate) consumers_w: UnsafeCell<*mut ConsumerList<P>>,
    /// Left in the tree by a final put whose removal could not allocate; whoever next removes or
    /// replaces this entry frees it. Read and written only under the tree lock.
    pub(crate) orphaned: AtomicBool,
    /// The next orphan on the registry's orphan list (read and written only under the tree
    /// lock, hence Relaxed).
    pub(crate) orphan_next: AtomicPtr<Probe<P>>,
    /// The original bytes the breakpoint replaces (immutable after creation).
    pub(crate) insn: crate::types::SavedInsn,
    /// The callback that frees this probe, allocated when the probe was, so the final put — which
    /// may run in a destructor — never needs memory.
    pub(crate) free_cb: UnsafeCell<Option<Deferred>>,
    /// Spare consumer lists, reserved by registrations for later unregistrations (a stack
    /// through `ConsumerList::next_spare`); read and written only under the object's lock.
    spares: UnsafeCell<*mut ConsumerList<P>>,
    pub(crate) free_check: FreeCheck,
}

impl<P> fmt::Debug for Probe<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probe")
            .field("key", &self.key)
            // Relaxed: diagnostics.
            .field("refs", &self.refs.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<P> Probe<P> {
    pub(crate) fn new(
        key: ProbeKey,
        refs: usize,
        consumers: *mut ConsumerList<P>,
        insn: crate::types::SavedInsn,
    ) -> Self {
        Self {
            insn,
            key,
            refs: AtomicUsize::new(refs),
            consumers: AtomicPtr::new(consumers),
            consumers_w: UnsafeCell::new(consumers),
            orphaned: AtomicBool::new(false),
            orphan_next: AtomicPtr::new(core::ptr::null_mut()),
            free_cb: UnsafeCell::new(None),
            spares: UnsafeCell::new(core::ptr::null_mut()),
            free_check: FreeCheck::new(),
        }
    }

    /// Pushes the unpublished list `l` onto the probe's spares.
    ///
    /// # Safety
    ///
    /// The caller holds the object's lock (or owns the probe) and owns `l`, which is empty.
    pub(crate) unsafe fn push_spare(&self, l: *mut ConsumerList<P>) {
        // SAFETY: the caller's contract: writer-side state under the object's lock.
        self.spares.with_mut(|head| unsafe {
            (*l).next_spare.with_mut(|n| *n = *head);
            *head = l;
        });
    }

    /// Pops a spare (null if none).
    ///
    /// # Safety
    ///
    /// As for [`Probe::push_spare`].
    pub(crate) unsafe fn pop_spare(&self) -> *mut ConsumerList<P> {
        // SAFETY: as above.
        self.spares.with_mut(|head| unsafe {
            let l = *head;
            if !l.is_null() {
                *head = (*l).next_spare.with(|n| *n);
            }
            l
        })
    }

    /// Calls `f` on every spare.
    ///
    /// # Safety
    ///
    /// As for [`Probe::push_spare`]; `f` does not push or pop.
    pub(crate) unsafe fn for_each_spare(&self, mut f: impl FnMut(*mut ConsumerList<P>)) {
        // SAFETY: as above.
        let mut l = self.spares.with(|head| unsafe { *head });
        while !l.is_null() {
            f(l);
            // SAFETY: a spare of ours.
            l = unsafe { (*l).next_spare.with(|n| *n) };
        }
    }

    /// Where the probe is.
    #[inline]
    #[track_caller] // so loom's race reports name the caller
    pub fn key(&self) -> ProbeKey {
        self.free_check.check();
        self.key
    }

    /// Does the probe have consumers right now? (One acquire load; no store.)
    #[inline]
    pub fn has_consumers(&self) -> bool {
        !self.consumer_list().is_null()
    }

    /// The original bytes its breakpoint replaces.
    #[inline]
    pub fn saved_insn(&self) -> crate::types::SavedInsn {
        self.insn
    }

    /// `true` if the probe's reference count has reached zero: it is leaving the tree and will be
    /// freed after a grace period. A dying probe has no consumers.
    #[inline]
    pub fn is_dying(&self) -> bool {
        // Relaxed: a hint; the authoritative test is `try_get`'s compare-exchange.
        self.refs.load(Ordering::Relaxed) == 0
    }

    /// Increment-not-zero: takes a reference unless the probe is dying.
    ///
    /// Returns `true` if a reference was taken.
    #[inline]
    pub(crate) fn try_get(&self) -> bool {
        self.free_check.check();
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::RefcountPlainInc) {
            // Relaxed: the seeded bug, a plain increment that can resurrect a dying probe.
            self.refs.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        // Relaxed: the caller's read guard keeps the memory valid; the count only decides
        // ownership. The final put's Acquire fence pairs with each Release decrement.
        let mut n = self.refs.load(Ordering::Relaxed);
        loop {
            if n == 0 {
                return false;
            }
            match self
                .refs
                .compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(cur) => n = cur,
            }
        }
    }

    /// Drops a reference; `true` if it was the last one (the caller must run the final put).
    #[inline]
    pub(crate) fn put(&self) -> bool {
        self.free_check.check();
        // Release pairs with the Acquire fence below, in whichever thread drops the last
        // reference: every holder's use of the probe happens-before the final put.
        if self.refs.fetch_sub(1, Ordering::Release) == 1 {
            crate::sync::fence(Ordering::Acquire);
            return true;
        }
        false
    }

    /// The current consumer list, writer side.
    ///
    /// # Safety
    ///
    /// The caller holds the object's lock.
    #[inline]
    pub(crate) unsafe fn writer_list(&self) -> *mut ConsumerList<P> {
        self.free_check.check();
        // SAFETY: the object's lock serializes every access to the writers' copy.
        self.consumers_w.with(|p| unsafe { *p })
    }

    /// Publishes `new` as the consumer list (both copies).
    ///
    /// # Safety
    ///
    /// The caller holds the object's lock, and `new` is fully initialized.
    #[inline]
    pub(crate) unsafe fn set_list(&self, new: *mut ConsumerList<P>, order: Ordering) {
        // SAFETY: the object's lock, as in `writer_list`.
        self.consumers_w.with_mut(|p| unsafe { *p = new });
        self.consumers.store(new, order);
    }

    /// The current consumer list pointer (null when none), reader side.
    #[inline]
    pub(crate) fn consumer_list(&self) -> *mut ConsumerList<P> {
        self.free_check.check();
        // Acquire pairs with the Release store in `Registry::publish_consumers`: the list's
        // contents were written before its pointer.
        self.consumers.load(Ordering::Acquire)
    }
}

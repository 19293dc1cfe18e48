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

use crate::alloc_util::try_vec_with_capacity;
use crate::rcu::Deferred;
use crate::sync::{AtomicBool, AtomicPtr, AtomicUsize, FreeCheck, Ordering, UnsafeCell};
use alloc::boxed::Box;
use alloc::sync::Arc;
use core::fmt;
use core::mem::MaybeUninit;

/// The object a probe lives in: an inode for uprobes, the kernel image or a module for kprobes,
/// a guest-physical region for a hypervisor. Opaque to probe-core; only compared and hashed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId(pub u64);

/// Where a probe is: an offset inside an object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeKey {
    /// The object.
    pub object: ObjectId,
    /// The byte offset inside the object (a file offset for uprobes).
    pub offset: u64,
}

impl ProbeKey {
    /// The smallest key.
    pub const MIN: ProbeKey = ProbeKey {
        object: ObjectId(0),
        offset: 0,
    };

    /// `ProbeKey { object, offset }`.
    pub const fn new(object: ObjectId, offset: u64) -> Self {
        Self { object, offset }
    }
}

/// Consumers stored in the list's own allocation up to this many: a hit then reads the list
/// header and its consumers from one place instead of chasing a separate buffer (one dependent
/// cache miss fewer per hit; most probes have one or two consumers).
pub const INLINE_CONSUMERS: usize = 4;

/// The consumers of a list: inline when few, boxed when many.
enum Items<C: ?Sized> {
    Inline(usize, [MaybeUninit<Arc<C>>; INLINE_CONSUMERS]),
    Heap(Box<[Arc<C>]>),
}

impl<C: ?Sized> Items<C> {
    /// Builds from `len` consumers; allocates only beyond [`INLINE_CONSUMERS`], fallibly.
    fn collect(len: usize, it: impl Iterator<Item = Arc<C>>) -> crate::Result<Self> {
        if len <= INLINE_CONSUMERS {
            let mut arr = [const { MaybeUninit::uninit() }; INLINE_CONSUMERS];
            let mut n = 0;
            for (slot, c) in arr.iter_mut().zip(it) {
                slot.write(c);
                n += 1;
            }
            // INVARIANT: the first `n` elements are initialized.
            return Ok(Items::Inline(n, arr));
        }
        let mut v = try_vec_with_capacity(len)?;
        v.extend(it);
        // Exact capacity: no reallocation here.
        Ok(Items::Heap(v.into_boxed_slice()))
    }

    fn as_slice(&self) -> &[Arc<C>] {
        match self {
            // SAFETY: the first `n` elements are initialized (INVARIANT in `collect`), and
            // `MaybeUninit<T>` has `T`'s layout.
            Items::Inline(n, arr) => unsafe {
                core::slice::from_raw_parts(arr.as_ptr().cast::<Arc<C>>(), *n)
            },
            Items::Heap(b) => b,
        }
    }
}

impl<C: ?Sized> Drop for Items<C> {
    fn drop(&mut self) {
        if let Items::Inline(n, arr) = self {
            for slot in &mut arr[..*n] {
                // SAFETY: initialized (INVARIANT in `collect`), dropped once.
                unsafe { slot.assume_init_drop() };
            }
        }
    }
}

/// A published, immutable list of consumers. Cache-line aligned: a hit reads its length and
/// first consumers from one line.
#[repr(align(64))]
pub(crate) struct ConsumerList<C: ?Sized> {
    items: UnsafeCell<Items<C>>,
    pub(crate) free_check: FreeCheck,
}

impl<C: ?Sized> ConsumerList<C> {
    /// A list of `len` consumers from `it` (which must yield exactly `len`).
    pub(crate) fn new(len: usize, it: impl Iterator<Item = Arc<C>>) -> crate::Result<Self> {
        Ok(Self {
            items: UnsafeCell::new(Items::collect(len, it)?),
            free_check: FreeCheck::new(),
        })
    }

    /// The consumers.
    ///
    /// # Safety
    ///
    /// The list is published (or owned) and the caller keeps it alive for `'a` (a read guard,
    /// or the object's lock under which it is the current list).
    pub(crate) unsafe fn items<'a>(p: *const Self) -> &'a [Arc<C>] {
        // SAFETY: the caller's contract.
        let list = unsafe { &*p };
        list.free_check.check();
        // SAFETY: a published list is never written again.
        list.items.with(|v| unsafe { &*v }).as_slice()
    }
}

/// A probe. Reached through a [`ReadGuard`](crate::registry::ReadGuard) (valid for the guard)
/// or a [`ProbeRef`](crate::registry::ProbeRef) (valid while counted).
///
/// Cache-line aligned, with what a hit reads (the consumer list pointer, the key) first.
#[repr(C, align(64))]
pub struct Probe<C: ?Sized> {
    pub(crate) consumers: AtomicPtr<ConsumerList<C>>,
    key: ProbeKey,
    pub(crate) refs: AtomicUsize,
    /// The writers' copy of `consumers`, read and written only under the object's lock, so a
    /// writer never loads the published pointer it is about to replace (see `ProbeTree`'s
    /// writer view for why).
    pub(crate) consumers_w: UnsafeCell<*mut ConsumerList<C>>,
    /// Left in the tree by a final put whose removal could not allocate; whoever next removes or
    /// replaces this entry frees it. Read and written only under the tree lock.
    pub(crate) orphaned: AtomicBool,
    /// The original bytes the breakpoint replaces (immutable after creation).
    pub(crate) insn: crate::arch::SavedInsn,
    /// The callback that frees this probe, allocated when the probe was, so the final put — which
    /// may run in a destructor — never needs memory.
    pub(crate) free_cb: UnsafeCell<Option<Deferred>>,
    pub(crate) free_check: FreeCheck,
}

impl<C: ?Sized> fmt::Debug for Probe<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probe")
            .field("key", &self.key)
            // Relaxed: diagnostics.
            .field("refs", &self.refs.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<C: ?Sized> Probe<C> {
    pub(crate) fn new(
        key: ProbeKey,
        refs: usize,
        consumers: *mut ConsumerList<C>,
        insn: crate::arch::SavedInsn,
    ) -> Self {
        Self {
            insn,
            key,
            refs: AtomicUsize::new(refs),
            consumers: AtomicPtr::new(consumers),
            consumers_w: UnsafeCell::new(consumers),
            orphaned: AtomicBool::new(false),
            free_cb: UnsafeCell::new(None),
            free_check: FreeCheck::new(),
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
    pub fn saved_insn(&self) -> crate::arch::SavedInsn {
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
    pub(crate) unsafe fn writer_list(&self) -> *mut ConsumerList<C> {
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
    pub(crate) unsafe fn set_list(&self, new: *mut ConsumerList<C>, order: Ordering) {
        // SAFETY: the object's lock, as in `writer_list`.
        self.consumers_w.with_mut(|p| unsafe { *p = new });
        self.consumers.store(new, order);
    }

    /// The current consumer list pointer (null when none), reader side.
    #[inline]
    pub(crate) fn consumer_list(&self) -> *mut ConsumerList<C> {
        self.free_check.check();
        // Acquire pairs with the Release store in `Registry::publish_consumers`: the list's
        // contents were written before its pointer.
        self.consumers.load(Ordering::Acquire)
    }
}

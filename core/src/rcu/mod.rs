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
//! | a process | [`EpochRcu`] (crossbeam-epoch) or [`SlotRcu`] | | |
//!
//! Two implementations ship:
//!
//! * [`EpochRcu`] — the default, over `crossbeam-epoch`'s collector (no `std`, `alloc` only).
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

#[cfg(not(loom))]
mod epoch;
mod slot;

#[cfg(not(loom))]
pub use epoch::{EpochGuard, EpochRcu, EpochReader};
pub use slot::{SlotGuard, SlotRcu, SlotReader};

use crate::alloc_util::try_box;
use alloc::boxed::Box;
use core::ptr;

/// A callback to run after a grace period, allocated up front.
///
/// Built with [`Deferred::new`], which is where allocation can fail — *before* the writer
/// publishes anything — so handing it to [`Rcu::defer`] after an unlink can never fail. It carries
/// its own queue link, so a domain can queue it without allocating.
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

/// An RCU domain. See the [module docs](self) for the protocol and the guarantee.
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

    /// Creates the read-side handle for the calling CPU or thread.
    fn register(&self) -> crate::Result<Self::Reader<'_>>;
    /// Enters a read-side critical section. Must not block, allocate (in the common case) or
    /// write memory that other readers write.
    fn read_lock<'r>(&'r self, reader: &'r Self::Reader<'_>) -> Self::Guard<'r>;
    /// Runs `f` after a grace period (`call_rcu`). Never blocks, never fails, never allocates
    /// in probe-core's own implementations (the allocation happened in [`Deferred::new`]).
    fn defer(&self, f: Deferred);
    /// Waits for a grace period (`synchronize_rcu`).
    fn synchronize(&self);
}

/// A shared reference to a domain is the same domain: one RCU for several structures (the
/// [`crate::kprobes`] layer gives its registry and its optimizer one domain this way, and a
/// kernel passes `&'static` its own RCU).
// SAFETY: every method forwards to `R`, so `R`'s guarantees are this impl's.
unsafe impl<R: Rcu + ?Sized> Rcu for &R {
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

/// A counted reference to a domain is the same domain (see the `&R` impl).
// SAFETY: every method forwards to `R`.
unsafe impl<R: Rcu + ?Sized> Rcu for alloc::sync::Arc<R> {
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
    fn read_lock<'r>(&'r self, reader: &'r Self::Reader<'_>) -> Self::Guard<'r> {
        (**self).read_lock(reader)
    }
    fn defer(&self, f: Deferred) {
        (**self).defer(f)
    }
    fn synchronize(&self) {
        (**self).synchronize()
    }
}

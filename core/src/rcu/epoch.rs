//! [`EpochRcu`]: the default RCU, over `crossbeam-epoch`.
//!
//! crossbeam-epoch is epoch-based reclamation: a pinned participant announces the global epoch it
//! saw; garbage retired in epoch *e* is freed once the global epoch has advanced twice past it,
//! which can happen only after every participant pinned in an older epoch has unpinned. That is an
//! RCU grace period with the read side costing one store to the participant's own record and a
//! fence — no shared write.
//!
//! Mapping onto [`Rcu`]:
//!
//! * `register` → `Collector::register` (a participant per CPU or thread: its `LocalHandle`).
//! * `read_lock` → `LocalHandle::pin`. A handle of another collector gets a temporary
//!   participant of this one (correct, slower).
//! * `defer` → a short-lived participant pins, hands the callback to `Guard::defer_unchecked`
//!   and flushes it to the global queue. Writers are rare, so the registration cost is paid on
//!   the write side only. crossbeam's own queue may allocate when a bag fills, and crossbeam
//!   aborts on allocation failure there; probe-core's allocations are all fallible.
//! * `synchronize` → defer a flag and keep pinning and flushing (which advances the epoch and
//!   runs expired callbacks) until the flag is set.
//!
//! Not built under loom: loom cannot see crossbeam's atomics. Loom checks [`super::SlotRcu`].
//!
//! **Not for signal handlers or interrupts**: crossbeam's `pin` runs a garbage collection step
//! every 128 pins, which may run deferred callbacks (frees) on the pinning thread, and may
//! allocate. Measured (`core/tests/read_side_allocation.rs`, 2026-12-01): one million read
//! sections beside a thread retiring one allocation per iteration made 169 allocations and
//! 34 456 frees on the *reading* thread; `SlotRcu`'s made none (the test asserts that). Use
//! [`super::SlotRcu`] (or the kernel's RCU) where the read side must be async-signal-safe.

use super::{Deferred, Rcu};
use crate::sync::{AtomicBool, Ordering};
use alloc::sync::Arc;
use crossbeam_epoch::{Collector, Guard, LocalHandle};

/// An RCU domain over a crossbeam-epoch [`Collector`]. See the [module docs](self).
///
/// # Example
///
/// ```
/// use probe_core::rcu::{Deferred, EpochRcu, Rcu};
/// use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
///
/// let rcu = EpochRcu::new();
/// let reader = rcu.register().unwrap();
/// let guard = rcu.read_lock(&reader);
/// let freed = Arc::new(AtomicBool::new(false));
/// let f = freed.clone();
/// rcu.defer(Deferred::new(move || f.store(true, Ordering::SeqCst)).unwrap());
/// drop(guard);
/// rcu.synchronize();
/// // The callback was queued before the grace period `synchronize` waited for, but crossbeam may
/// // run it a little later; `synchronize` only promises a grace period has passed.
/// ```
#[derive(Debug)]
pub struct EpochRcu {
    collector: Collector,
    relax: fn(),
}

/// A participant of an [`EpochRcu`]: one per CPU or thread. Not `Send`.
#[derive(Debug)]
pub struct EpochReader {
    handle: LocalHandle,
}

/// An open read section of an [`EpochRcu`] (a pinned crossbeam guard).
#[derive(Debug)]
pub struct EpochGuard {
    _guard: Guard,
}

impl Default for EpochRcu {
    fn default() -> Self {
        Self::new()
    }
}

impl EpochRcu {
    /// A new domain (its own collector), spinning with the CPU's pause hint while it waits.
    pub fn new() -> Self {
        Self::with_relax(crate::sync::spin_loop)
    }

    /// A new domain whose grace-period wait calls `relax` between polls (yield to a scheduler,
    /// say).
    pub fn with_relax(relax: fn()) -> Self {
        Self {
            collector: Collector::new(),
            relax,
        }
    }
}

// SAFETY: crossbeam-epoch runs a deferred callback only after every participant pinned when it
// was deferred has unpinned (guarantee 1); `synchronize` returns after a callback deferred at its
// start has run (guarantee 2); a foreign handle is replaced by a participant of this collector
// (guarantee 3).
unsafe impl Rcu for EpochRcu {
    type Reader<'d> = EpochReader;
    type Guard<'r> = EpochGuard;

    fn register(&self) -> crate::Result<EpochReader> {
        Ok(EpochReader {
            handle: self.collector.register(),
        })
    }

    #[inline]
    fn read_lock<'r>(&'r self, reader: &'r EpochReader) -> EpochGuard {
        if reader.handle.collector() == &self.collector {
            EpochGuard {
                _guard: reader.handle.pin(),
            }
        } else {
            // The guard keeps the temporary participant alive until it is dropped.
            EpochGuard {
                _guard: self.collector.register().pin(),
            }
        }
    }

    fn defer(&self, f: Deferred) {
        let handle = self.collector.register();
        let guard = handle.pin();
        // SAFETY: `defer_unchecked` requires the callback not to touch anything a pinned reader
        // may still use before it runs; that is exactly RCU's contract for `defer`, which the
        // caller (who unlinked the object first) upholds.
        unsafe { guard.defer_unchecked(move || f.run()) };
        guard.flush();
    }

    fn synchronize(&self) {
        // The flag and the participant are allocated by crossbeam-style infallible allocation:
        // crossbeam's `register` aborts on allocation failure anyway (module docs).
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let handle = self.collector.register();
        {
            let guard = handle.pin();
            // SAFETY: the callback only stores to a flag it co-owns; nothing it touches can be
            // freed before it runs.
            // Release pairs with the Acquire load below.
            unsafe { guard.defer_unchecked(move || flag.store(true, Ordering::Release)) };
            guard.flush();
        }
        // Acquire pairs with the Release store in the flag callback.
        while !done.load(Ordering::Acquire) {
            handle.pin().flush();
            (self.relax)();
        }
    }
}

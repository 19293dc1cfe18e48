//! The one facade over atomics, fences, `UnsafeCell`, spin hints — and, with `std`, the mutex and
//! condition variable a blocking wait queue sleeps on.
//!
//! Every other module of probe-core reaches shared memory through this module, never through
//! `core::sync::atomic` directly. That buys three things:
//!
//! * **Model checking.** Under `--cfg loom` the types below wrap `loom`'s instead of `core`'s, so
//!   the `loom-tests` package explores every interleaving of the *real* protocol code, not a copy.
//! * **A store audit.** In `cfg(test)` builds every store and read-modify-write is recorded (its
//!   address) in a thread-local log. The hit-path tests use it to prove that a lookup plus a
//!   consumer traversal writes no shared memory — Invariant 1 proven by a test, not claimed.
//! * **A use-after-free detector** ([`FreeCheck`]): zero-sized normally, a loom-tracked cell under
//!   loom, so a free that races with a reader is reported as a causal race by the model checker.
//!
//! # Implementation details
//!
//! The wrappers are `#[repr(transparent)]` newtypes with `#[inline(always)]` methods; in a normal
//! build they compile to exactly the `core` atomic operation. `new` is a `const fn` except under
//! loom, whose atomics cannot be built in a constant.

#[cfg(loom)]
use loom::sync::atomic as imp;

#[cfg(not(loom))]
use core::sync::atomic as imp;

pub use imp::Ordering;

/// A memory fence (`core::sync::atomic::fence`, or loom's under `cfg(loom)`).
#[inline(always)]
pub fn fence(order: Ordering) {
    imp::fence(order)
}

/// The light half of an asymmetric fence pair: a compiler fence only, made a full fence after
/// the fact by the other side's *heavy* barrier (on Linux, `membarrier(2)` with
/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED`: every running thread of the process executes a full
/// memory barrier before it returns; a thread not running has passed one at its context switch).
///
/// Use it only where the code it pairs with runs that heavy barrier before relying on the order
/// (see [`crate::rcu::SlotRcu::with_heavy_barrier`]). Under loom, which cannot model the heavy
/// barrier, it is a SeqCst fence: the model checks the protocol with the guarantee the pair
/// gives, not the mechanism.
#[inline(always)]
pub fn light_fence() {
    #[cfg(loom)]
    imp::fence(Ordering::SeqCst);
    #[cfg(not(loom))]
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// A mutex and a condition variable for blocking waits (`std` feature): `std::sync`'s, or
/// loom's under `cfg(loom)`, so a blocking [`WaitQueue`](crate::xol::WaitQueue) built on them
/// ([`CondvarWait`](crate::xol::CondvarWait)) is model-checked as it is, and a lost wakeup is a
/// deadlock loom reports.
#[cfg(all(feature = "std", loom))]
pub use loom::sync::{Condvar, Mutex};
/// A mutex and a condition variable for blocking waits (`std` feature): `std::sync`'s, or
/// loom's under `cfg(loom)`.
#[cfg(all(feature = "std", not(loom)))]
pub use std::sync::{Condvar, Mutex};

/// The hint to call inside a spin-wait loop.
///
/// Under loom it yields to the model scheduler, which is what lets loom explore a spin loop to
/// completion instead of reporting it as an unbounded execution.
#[inline(always)]
pub fn spin_loop() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

/// Records shared-memory writes in test builds (see the module docs).
#[cfg(test)]
pub(crate) mod audit {
    extern crate std;
    use std::cell::RefCell;
    use std::vec::Vec;

    std::thread_local! {
        static LOG: RefCell<Option<Vec<usize>>> = const { RefCell::new(None) };
    }

    /// Called by every store and read-modify-write of the facade's atomics.
    #[inline(always)]
    pub(crate) fn record(addr: usize) {
        LOG.with(|l| {
            if let Some(v) = l.borrow_mut().as_mut() {
                v.push(addr);
            }
        });
    }

    /// Runs `f` and returns the addresses of every atomic this thread wrote (or RMW'd) during it.
    pub(crate) fn stores_during<R>(f: impl FnOnce() -> R) -> (R, Vec<usize>) {
        LOG.with(|l| *l.borrow_mut() = Some(Vec::new()));
        let r = f();
        let log = LOG.with(|l| l.borrow_mut().take()).unwrap_or_default();
        (r, log)
    }
}

macro_rules! audit_store {
    ($self:ident) => {
        #[cfg(test)]
        audit::record($self as *const Self as usize);
    };
}

macro_rules! int_atomic {
    ($(#[$m:meta])* $name:ident, $int:ty) => {
        $(#[$m])*
        #[repr(transparent)]
        #[derive(Debug, Default)]
        pub struct $name(imp::$name);

        impl $name {
            /// Creates a new atomic integer.
            #[cfg(not(loom))]
            #[inline(always)]
            pub const fn new(v: $int) -> Self {
                Self(imp::$name::new(v))
            }
            /// Creates a new atomic integer.
            #[cfg(loom)]
            #[inline(always)]
            pub fn new(v: $int) -> Self {
                Self(imp::$name::new(v))
            }
            /// Loads the value.
            #[inline(always)]
            pub fn load(&self, order: Ordering) -> $int {
                self.0.load(order)
            }
            /// Stores a value.
            #[inline(always)]
            pub fn store(&self, v: $int, order: Ordering) {
                audit_store!(self);
                self.0.store(v, order)
            }
            /// Swaps in a value, returning the previous one.
            #[inline(always)]
            pub fn swap(&self, v: $int, order: Ordering) -> $int {
                audit_store!(self);
                self.0.swap(v, order)
            }
            /// Adds to the value, returning the previous one.
            #[inline(always)]
            pub fn fetch_add(&self, v: $int, order: Ordering) -> $int {
                audit_store!(self);
                self.0.fetch_add(v, order)
            }
            /// Subtracts from the value, returning the previous one.
            #[inline(always)]
            pub fn fetch_sub(&self, v: $int, order: Ordering) -> $int {
                audit_store!(self);
                self.0.fetch_sub(v, order)
            }
            /// Bitwise-or into the value, returning the previous one.
            #[inline(always)]
            pub fn fetch_or(&self, v: $int, order: Ordering) -> $int {
                audit_store!(self);
                self.0.fetch_or(v, order)
            }
            /// Bitwise-and into the value, returning the previous one.
            #[inline(always)]
            pub fn fetch_and(&self, v: $int, order: Ordering) -> $int {
                audit_store!(self);
                self.0.fetch_and(v, order)
            }
            /// Compare-and-exchange (strong). A failed exchange still counts as a write in the
            /// audit: on every cache-coherent machine it takes the line exclusive.
            #[inline(always)]
            pub fn compare_exchange(
                &self,
                current: $int,
                new: $int,
                success: Ordering,
                failure: Ordering,
            ) -> Result<$int, $int> {
                audit_store!(self);
                self.0.compare_exchange(current, new, success, failure)
            }
            /// Compare-and-exchange that may fail spuriously.
            #[inline(always)]
            pub fn compare_exchange_weak(
                &self,
                current: $int,
                new: $int,
                success: Ordering,
                failure: Ordering,
            ) -> Result<$int, $int> {
                audit_store!(self);
                self.0.compare_exchange_weak(current, new, success, failure)
            }
        }
    };
}

int_atomic!(
    /// `AtomicUsize` through the facade.
    AtomicUsize, usize
);
int_atomic!(
    /// `AtomicU32` through the facade.
    AtomicU32, u32
);
int_atomic!(
    /// `AtomicU64` through the facade.
    AtomicU64, u64
);

/// `AtomicBool` through the facade.
#[repr(transparent)]
#[derive(Debug, Default)]
pub struct AtomicBool(imp::AtomicBool);

impl AtomicBool {
    /// Creates a new atomic bool.
    #[cfg(not(loom))]
    #[inline(always)]
    pub const fn new(v: bool) -> Self {
        Self(imp::AtomicBool::new(v))
    }
    /// Creates a new atomic bool.
    #[cfg(loom)]
    #[inline(always)]
    pub fn new(v: bool) -> Self {
        Self(imp::AtomicBool::new(v))
    }
    /// Loads the value.
    #[inline(always)]
    pub fn load(&self, order: Ordering) -> bool {
        self.0.load(order)
    }
    /// Stores a value.
    #[inline(always)]
    pub fn store(&self, v: bool, order: Ordering) {
        audit_store!(self);
        self.0.store(v, order)
    }
    /// Swaps in a value, returning the previous one.
    #[inline(always)]
    pub fn swap(&self, v: bool, order: Ordering) -> bool {
        audit_store!(self);
        self.0.swap(v, order)
    }
    /// Compare-and-exchange (strong).
    #[inline(always)]
    pub fn compare_exchange(
        &self,
        current: bool,
        new: bool,
        success: Ordering,
        failure: Ordering,
    ) -> Result<bool, bool> {
        audit_store!(self);
        self.0.compare_exchange(current, new, success, failure)
    }
}

/// `AtomicPtr<T>` through the facade.
#[repr(transparent)]
#[derive(Debug)]
pub struct AtomicPtr<T>(imp::AtomicPtr<T>);

impl<T> AtomicPtr<T> {
    /// Creates a new atomic pointer.
    #[cfg(not(loom))]
    #[inline(always)]
    pub const fn new(p: *mut T) -> Self {
        Self(imp::AtomicPtr::new(p))
    }
    /// Creates a new atomic pointer.
    #[cfg(loom)]
    #[inline(always)]
    pub fn new(p: *mut T) -> Self {
        Self(imp::AtomicPtr::new(p))
    }
    /// Loads the pointer.
    #[inline(always)]
    pub fn load(&self, order: Ordering) -> *mut T {
        self.0.load(order)
    }
    /// Stores a pointer.
    #[inline(always)]
    pub fn store(&self, p: *mut T, order: Ordering) {
        audit_store!(self);
        self.0.store(p, order)
    }
    /// Swaps in a pointer, returning the previous one.
    #[inline(always)]
    pub fn swap(&self, p: *mut T, order: Ordering) -> *mut T {
        audit_store!(self);
        self.0.swap(p, order)
    }
    /// Compare-and-exchange (strong).
    #[inline(always)]
    pub fn compare_exchange(
        &self,
        current: *mut T,
        new: *mut T,
        success: Ordering,
        failure: Ordering,
    ) -> Result<*mut T, *mut T> {
        audit_store!(self);
        self.0.compare_exchange(current, new, success, failure)
    }
}

/// An `UnsafeCell` with loom's closure-based access API, so loom can check every access.
///
/// `with` gives a `*const T` for reading, `with_mut` a `*mut T` for writing. Under loom an access
/// that is not ordered (happens-before) with a conflicting access on another thread is reported
/// as a causal race.
#[derive(Debug)]
pub struct UnsafeCell<T>(
    #[cfg(loom)] loom::cell::UnsafeCell<T>,
    #[cfg(not(loom))] core::cell::UnsafeCell<T>,
);

impl<T> UnsafeCell<T> {
    /// Wraps a value.
    #[cfg(not(loom))]
    #[inline(always)]
    pub const fn new(v: T) -> Self {
        Self(core::cell::UnsafeCell::new(v))
    }
    /// Wraps a value.
    #[cfg(loom)]
    #[inline(always)]
    pub fn new(v: T) -> Self {
        Self(loom::cell::UnsafeCell::new(v))
    }
    /// Read access through a raw pointer.
    #[inline(always)]
    #[track_caller]
    pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        #[cfg(loom)]
        return self.0.with(f);
        #[cfg(not(loom))]
        return f(self.0.get());
    }
    /// Write access through a raw pointer.
    #[inline(always)]
    #[track_caller]
    pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        #[cfg(loom)]
        return self.0.with_mut(f);
        #[cfg(not(loom))]
        return f(self.0.get());
    }
    /// Unwraps the value.
    #[inline(always)]
    pub fn into_inner(self) -> T {
        self.0.into_inner()
    }
}

/// A use-after-free tripwire for the model checker.
///
/// Every object whose free is deferred embeds one. Readers call [`FreeCheck::check`] when they
/// use the object; the deferred free calls [`FreeCheck::mark_freed`] before releasing it. In a
/// normal build both are no-ops and the type is zero-sized. Under loom the mark is a write to a
/// loom-tracked cell: if the free is not ordered after every reader's check, loom reports a causal
/// race; if a reader checks after the free, the check panics. Loom builds also keep the memory of
/// freed objects (`quarantine`, crate-private) so that a late reader in a *buggy* model trips this check
/// instead of reading freed memory.
#[derive(Debug, Default)]
pub struct FreeCheck {
    #[cfg(loom)]
    freed: loom::cell::UnsafeCell<bool>,
}

// SAFETY: under loom the cell is only touched through `check` (a read) and `mark_freed` (a write),
// and loom itself reports any pair of them not ordered by happens-before; that race report is the
// purpose of the type. Normal builds have no cell at all.
#[cfg(loom)]
unsafe impl Sync for FreeCheck {}

impl FreeCheck {
    /// A fresh, live tripwire.
    #[inline(always)]
    pub fn new() -> Self {
        Self::default()
    }

    /// Asserts, under loom, that the owner has not been freed. A no-op otherwise.
    #[inline(always)]
    #[track_caller]
    pub fn check(&self) {
        #[cfg(loom)]
        self.freed.with(|p| {
            // SAFETY: a shared read of a bool; loom itself checks it against `mark_freed`'s write.
            let freed = unsafe { *p };
            assert!(
                !freed,
                "use after free: object freed while a reader could still see it"
            )
        });
    }

    /// Marks the owner freed (under loom). A no-op otherwise.
    #[inline(always)]
    #[track_caller]
    pub fn mark_freed(&self) {
        #[cfg(loom)]
        // SAFETY: the write loom checks against every reader's `check`.
        self.freed.with_mut(|p| unsafe { *p = true });
    }
}

/// Releases a boxed object whose free was deferred, or, under loom, keeps its memory.
///
/// Under loom a freed object's memory is leaked on purpose after [`FreeCheck::mark_freed`]: a
/// seeded-bug model that frees too early must fail on the tripwire, not on real undefined
/// behaviour. Normal builds drop the box.
#[inline(always)]
pub(crate) fn quarantine<T>(b: alloc::boxed::Box<T>) {
    #[cfg(loom)]
    core::mem::forget(b);
    #[cfg(not(loom))]
    drop(b);
}

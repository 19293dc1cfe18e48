//! What writers take: a raw-lock trait the embedder implements, a default spinlock, a safe
//! data-owning wrapper, and the hashed per-object lock table of seed 000.
//!
//! # Shape
//!
//! In the lock_api style, [`RawLock`] is a small `unsafe` trait — lock, try-lock, unlock — and
//! [`Lock<L, T>`] is the safe generic wrapper that owns the data and hands out a guard. No hit
//! path takes any of probe-core's locks, and probe-core allocates while holding them, so a
//! kernel implements `RawLock` with a mutex (or a spinlock its allocator may be called under) —
//! not with a spinlock that disables interrupts; the optimizer's lock must be one that may
//! sleep. A hypervisor uses its own lock; a process can use [`SpinLock`] with a [`Relax`]
//! strategy that yields. The whole table: [the embedder's contract](crate::embedding).
//!
//! # The hashed lock table
//!
//! Registration and mapping for one object (an inode, the kernel image) must be serialized, but a
//! lock per object is too much memory and one global lock is contention between unrelated
//! objects. Seed 000 settles on a small array of locks chosen by hashing the object, and Andrew
//! Morton's review adds the two rules kept here: each lock sits on its own cache line (otherwise
//! CPUs working on *different* objects still bounce one line), and the slot is chosen by a typed
//! function that takes an [`ObjectId`], not a macro over `void *`.
//!
//! The layout is proven at compile time: [`CachePadded`] is `align(128)` (two 64-byte lines, for
//! the adjacent-line prefetcher of x86), every table slot is a multiple of that in size, and the
//! slot count is a power of two (checked by a `const` assertion at monomorphization).

use crate::sync::{AtomicBool, Ordering, UnsafeCell, spin_loop};
use crate::types::ObjectId;
use core::fmt;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};
use static_assertions::{const_assert, const_assert_eq};

/// The size of the region kept private to one lock or one reader slot: two 64-byte cache lines,
/// because x86's adjacent-line prefetcher pulls lines in pairs.
pub const CACHE_LINE: usize = 128;

/// Pads and aligns a value to [`CACHE_LINE`] bytes so nothing else shares its lines.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CachePadded<T>(T);

const_assert_eq!(core::mem::align_of::<CachePadded<u8>>(), CACHE_LINE);
const_assert_eq!(core::mem::size_of::<CachePadded<u8>>(), CACHE_LINE);

impl<T> CachePadded<T> {
    /// Pads `v`.
    pub const fn new(v: T) -> Self {
        Self(v)
    }
}

impl<T> Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for CachePadded<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// A raw lock: no data, just mutual exclusion. The embedder's locks implement this.
///
/// Which of probe-core's locks may sleep (the optimizer's: yes) and which a hit ever takes
/// (none): [the embedder's contract](crate::embedding).
///
/// # Safety
///
/// Implementations must provide mutual exclusion — between a successful `lock`/`try_lock` and the
/// matching `unlock`, no other `lock`/`try_lock` succeeds — and acquire/release semantics: what
/// happened before `unlock` happens-before whatever follows the next successful acquisition.
pub unsafe trait RawLock: Send + Sync {
    /// Acquires the lock, waiting as long as it takes.
    fn lock(&self);
    /// Acquires the lock if it is free, without waiting.
    fn try_lock(&self) -> bool;
    /// Releases the lock.
    ///
    /// # Safety
    ///
    /// The caller holds the lock (acquired by this context and not yet released).
    unsafe fn unlock(&self);
}

/// How a spinning waiter passes time: a CPU pause hint, a scheduler yield, a hypervisor's
/// "vCPU is spinning" hint.
pub trait Relax {
    /// Called once per failed poll.
    fn relax();
}

/// Relax with the CPU's spin-loop hint (`pause` on x86, `yield` on aarch64).
#[derive(Debug, Default, Clone, Copy)]
pub struct SpinRelax;

impl Relax for SpinRelax {
    #[inline(always)]
    fn relax() {
        spin_loop();
    }
}

/// Relax by yielding the OS thread (`std` feature).
#[cfg(feature = "std")]
#[derive(Debug, Default, Clone, Copy)]
pub struct YieldRelax;

#[cfg(feature = "std")]
impl Relax for YieldRelax {
    fn relax() {
        extern crate std;
        std::thread::yield_now();
    }
}

/// A test-and-test-and-set spinlock, generic over how it waits.
///
/// # Implementation details
///
/// `lock` tries a compare-exchange; while that fails it polls with plain loads (which keep the line
/// shared instead of bouncing it in exclusive state between waiters) and calls `R::relax()`.
/// Acquire on success pairs with the Release store in `unlock`.
pub struct SpinLock<R: Relax = SpinRelax> {
    locked: AtomicBool,
    _relax: PhantomData<fn() -> R>,
}

impl<R: Relax> fmt::Debug for SpinLock<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Relaxed: a diagnostic snapshot.
        f.debug_struct("SpinLock")
            .field("locked", &self.locked.load(Ordering::Relaxed))
            .finish()
    }
}

impl<R: Relax> Default for SpinLock<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: Relax> SpinLock<R> {
    /// An unlocked spinlock.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            locked: AtomicBool::new(false),
            _relax: PhantomData,
        }
    }

    /// An unlocked spinlock.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            locked: AtomicBool::new(false),
            _relax: PhantomData,
        }
    }
}

// SAFETY: the compare-exchange from `false` to `true` succeeds for one context at a time, and
// only the holder stores `false`; Acquire on success pairs with the Release store in `unlock`.
unsafe impl<R: Relax> RawLock for SpinLock<R> {
    #[inline]
    fn lock(&self) {
        while !self.try_lock() {
            // Relaxed polling: the Acquire is on the compare-exchange that takes the lock.
            while self.locked.load(Ordering::Relaxed) {
                R::relax();
            }
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        // Acquire pairs with the Release store in `unlock`.
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::LockUnlockRelaxed) {
            self.locked.store(false, Ordering::Relaxed);
            return;
        }
        // Release pairs with the Acquire compare-exchange in `try_lock`.
        self.locked.store(false, Ordering::Release);
    }
}

/// A lock that owns the data it protects, over any [`RawLock`].
///
/// # Example
///
/// ```
/// use probe_core::lock::{Lock, SpinLock};
///
/// let counter: Lock<SpinLock, u64> = Lock::new(SpinLock::new(), 0);
/// *counter.lock() += 1;
/// assert_eq!(*counter.lock(), 1);
/// ```
pub struct Lock<L: RawLock, T> {
    raw: L,
    data: UnsafeCell<T>,
}

// SAFETY: the data is only reached through a guard, which exists only while `raw` is held, so at
// most one context touches it at a time; moving it between contexts needs `T: Send`.
unsafe impl<L: RawLock, T: Send> Sync for Lock<L, T> {}
// SAFETY: owning the lock owns the data.
unsafe impl<L: RawLock, T: Send> Send for Lock<L, T> {}

impl<L: RawLock, T> fmt::Debug for Lock<L, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock").finish_non_exhaustive()
    }
}

impl<L: RawLock + Default, T: Default> Default for Lock<L, T> {
    fn default() -> Self {
        Self::new(L::default(), T::default())
    }
}

/// Holds a [`Lock`]; releases it on drop.
pub struct LockGuard<'a, L: RawLock, T> {
    lock: &'a Lock<L, T>,
    _not_send: PhantomData<*const ()>,
}

impl<L: RawLock, T> Lock<L, T> {
    /// Wraps `data` behind `raw`.
    pub fn new(raw: L, data: T) -> Self {
        Self {
            raw,
            data: UnsafeCell::new(data),
        }
    }

    /// Acquires the lock.
    pub fn lock(&self) -> LockGuard<'_, L, T> {
        self.raw.lock();
        // INVARIANT: `raw` is held until the guard drops.
        LockGuard {
            lock: self,
            _not_send: PhantomData,
        }
    }

    /// Acquires the lock if it is free.
    pub fn try_lock(&self) -> Option<LockGuard<'_, L, T>> {
        // INVARIANT: as in `lock`.
        self.raw.try_lock().then(|| LockGuard {
            lock: self,
            _not_send: PhantomData,
        })
    }

    /// The raw lock (to hold it without touching the data).
    pub fn raw(&self) -> &L {
        &self.raw
    }
}

impl<L: RawLock, T> LockGuard<'_, L, T> {
    /// Runs `f` with shared access to the data.
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        // SAFETY: the guard holds the lock, so no other context accesses the data.
        self.lock.data.with(|p| f(unsafe { &*p }))
    }
}

impl<L: RawLock, T> Deref for LockGuard<'_, L, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock (type invariant), so no other context writes the
        // data while this shared borrow, tied to the guard, lives.
        self.lock.data.with(|p| unsafe { &*p })
    }
}

impl<L: RawLock, T> DerefMut for LockGuard<'_, L, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock (type invariant) and is borrowed mutably, so this is
        // the only access to the data while the borrow lives.
        self.lock.data.with_mut(|p| unsafe { &mut *p })
    }
}

impl<L: RawLock, T> Drop for LockGuard<'_, L, T> {
    fn drop(&mut self) {
        // SAFETY: the guard's existence means the lock is held by this context.
        unsafe { self.lock.raw.unlock() }
    }
}

/// A RAII hold on a raw lock without data.
#[derive(Debug)]
pub struct RawGuard<'a, L: RawLock> {
    raw: &'a L,
    _not_send: PhantomData<*const ()>,
}

impl<'a, L: RawLock> RawGuard<'a, L> {
    /// Acquires `raw`.
    pub fn lock(raw: &'a L) -> Self {
        raw.lock();
        // INVARIANT: held until drop.
        Self {
            raw,
            _not_send: PhantomData,
        }
    }
}

impl<L: RawLock> Drop for RawGuard<'_, L> {
    fn drop(&mut self) {
        // SAFETY: the guard's existence means this context holds the lock.
        unsafe { self.raw.unlock() }
    }
}

/// The default number of slots in a [`LockTable`]: enough to make collisions between the objects
/// being registered at one moment rare, small enough to be 8 KiB.
pub const DEFAULT_LOCK_SLOTS: usize = 64;

/// The hashed per-object lock table (seed 000): `N` raw locks, each alone on its cache lines.
///
/// # Example
///
/// ```
/// use probe_core::lock::{LockTable, SpinLock, RawGuard};
/// use probe_core::probe::ObjectId;
///
/// let table: LockTable<SpinLock, 16> = LockTable::new();
/// let inode = ObjectId(0x1234);
/// let _held = RawGuard::lock(table.lock_for(inode));
/// // Every register/unregister/mmap of this object is serialized by this lock.
/// assert!(std::ptr::eq(table.lock_for(inode), table.lock_for(ObjectId(0x1234))));
/// ```
pub struct LockTable<L: RawLock, const N: usize = DEFAULT_LOCK_SLOTS> {
    slots: [CachePadded<L>; N],
}

impl<L: RawLock, const N: usize> fmt::Debug for LockTable<L, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockTable").field("slots", &N).finish()
    }
}

// The default table's layout: each slot a whole number of padded lines, the count a power of two.
const_assert_eq!(
    core::mem::size_of::<CachePadded<SpinLock>>() % CACHE_LINE,
    0
);
const_assert_eq!(core::mem::align_of::<CachePadded<SpinLock>>(), CACHE_LINE);
const_assert!(DEFAULT_LOCK_SLOTS.is_power_of_two());
const_assert_eq!(
    core::mem::size_of::<LockTable<SpinLock, DEFAULT_LOCK_SLOTS>>(),
    DEFAULT_LOCK_SLOTS * CACHE_LINE
);

impl<L: RawLock + Default, const N: usize> Default for LockTable<L, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<L: RawLock + Default, const N: usize> LockTable<L, N> {
    /// A table of `N` unlocked locks. `N` must be a power of two (checked at compile time).
    pub fn new() -> Self {
        Self::with(|_| L::default())
    }
}

impl<L: RawLock, const N: usize> LockTable<L, N> {
    const LAYOUT_OK: () = {
        assert!(
            N.is_power_of_two(),
            "LockTable slot count must be a power of two"
        );
        assert!(core::mem::size_of::<CachePadded<L>>().is_multiple_of(CACHE_LINE));
        assert!(core::mem::align_of::<CachePadded<L>>() >= CACHE_LINE);
    };

    /// A table whose slot `i` is `make(i)`.
    pub fn with(mut make: impl FnMut(usize) -> L) -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::LAYOUT_OK;
        Self {
            slots: core::array::from_fn(|i| CachePadded::new(make(i))),
        }
    }

    /// The slot index serving `object`.
    ///
    /// Fibonacci hashing: multiply by 2^64/φ and keep the top bits, so object ids that differ
    /// only in low bits (consecutive inode numbers) spread over the whole table.
    #[inline]
    pub fn slot_of(&self, object: ObjectId) -> usize {
        if N == 1 {
            return 0;
        }
        let h = object.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> (64 - N.trailing_zeros())) as usize
    }

    /// The lock that serializes writers of `object`.
    #[inline]
    pub fn lock_for(&self, object: ObjectId) -> &L {
        &self.slots[self.slot_of(object)]
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn slots_are_cache_line_apart() {
        let t: LockTable<SpinLock, 8> = LockTable::new();
        let a = &t.slots[0] as *const _ as usize;
        let b = &t.slots[1] as *const _ as usize;
        assert_eq!(b - a, CACHE_LINE);
        assert_eq!(a % CACHE_LINE, 0);
    }

    #[test]
    fn consecutive_objects_spread_over_the_table() {
        let t: LockTable<SpinLock, 64> = LockTable::new();
        let mut used = [0u32; 64];
        for ino in 1000..1000 + 64 * 16 {
            used[t.slot_of(ObjectId(ino))] += 1;
        }
        // Every slot used, none more than 2x its fair share.
        assert!(used.iter().all(|&n| n > 0 && n <= 32), "{used:?}");
    }

    #[test]
    fn same_object_same_lock() {
        let t: LockTable<SpinLock> = LockTable::new();
        for ino in [0, 1, u64::MAX, 0xdead_beef] {
            assert!(core::ptr::eq(
                t.lock_for(ObjectId(ino)),
                t.lock_for(ObjectId(ino))
            ));
        }
    }

    #[test]
    fn lock_excludes() {
        let l: Lock<SpinLock, u32> = Lock::new(SpinLock::new(), 5);
        let g = l.lock();
        assert!(l.try_lock().is_none());
        drop(g);
        assert_eq!(*l.try_lock().unwrap(), 5);
    }

    #[test]
    fn lock_counts_under_contention() {
        extern crate std;
        use std::sync::Arc;
        let l = Arc::new(Lock::<SpinLock, u64>::new(SpinLock::new(), 0));
        let hs: std::vec::Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        *l.lock() += 1;
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*l.lock(), 40_000);
    }
}

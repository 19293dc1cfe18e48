//! A global allocator that counts this thread's allocations and frees while asked to: what the
//! allocation tests measure with.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The counting allocator (the test binary's global one).
pub struct Counting;

thread_local! {
    /// Count this thread's allocations only while set.
    pub static COUNTING: Cell<bool> = const { Cell::new(false) };
}
/// Allocations counted.
pub static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Frees counted.
pub static FREES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; the counters are side effects only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if COUNTING.with(|c| c.get()) {
            FREES.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Zeroes the counters.
pub fn reset() {
    ALLOCS.store(0, Ordering::Relaxed);
    FREES.store(0, Ordering::Relaxed);
}

/// (allocations, frees) so far.
pub fn counts() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::Relaxed),
        FREES.load(Ordering::Relaxed),
    )
}

//! Fallible allocation.
//!
//! `Box::new` aborts when memory runs out; a kernel cannot. Every allocation probe-core makes goes
//! through [`try_box`] or [`try_vec_with_capacity`], which return [`Error::NoMemory`] instead, so
//! the operation that needed it fails cleanly and changes nothing.
//!
//! Test builds carry a failpoint ([`fail_after`]) that makes the N-th allocation from now fail,
//! so every allocation-failure path is exercised by a test.

use crate::error::{Error, Result};
use alloc::alloc::{Layout, alloc};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// Test builds only: make this thread's allocation number `n` (0-based) from now fail.
/// `None` switches the failpoint off.
#[cfg(test)]
pub(crate) fn fail_after(n: Option<usize>) {
    failpoint::FAIL_AFTER.with(|c| c.set(n));
}

/// Test builds only: the failpoint's remaining count (`None` once it fired or when off): equal
/// to what `fail_after` set exactly when no allocation happened since.
#[cfg(test)]
pub(crate) fn allocations_left() -> Option<usize> {
    failpoint::FAIL_AFTER.with(|c| c.get())
}

#[inline(always)]
fn injected_failure() -> bool {
    #[cfg(test)]
    {
        failpoint::FAIL_AFTER.with(|c| match c.get() {
            Some(0) => {
                c.set(None);
                true
            }
            Some(n) => {
                c.set(Some(n - 1));
                false
            }
            None => false,
        })
    }
    #[cfg(not(test))]
    false
}

/// `Box::new` that reports allocation failure instead of aborting.
pub(crate) fn try_box<T>(value: T) -> Result<Box<T>> {
    if injected_failure() {
        return Err(Error::NoMemory);
    }
    let layout = Layout::new::<T>();
    if layout.size() == 0 {
        return Ok(Box::new(value));
    }
    // SAFETY: `layout` has a non-zero size, checked just above.
    let p = unsafe { alloc(layout) }.cast::<T>();
    if p.is_null() {
        return Err(Error::NoMemory);
    }
    // SAFETY: `p` is a fresh, non-null allocation with `T`'s layout; writing initializes it, and
    // `Box::from_raw` takes ownership of memory allocated by the global allocator with that layout.
    unsafe {
        p.write(value);
        Ok(Box::from_raw(p))
    }
}

/// `Vec::with_capacity` that reports allocation failure instead of aborting.
pub(crate) fn try_vec_with_capacity<T>(n: usize) -> Result<Vec<T>> {
    if injected_failure() {
        return Err(Error::NoMemory);
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::NoMemory)?;
    Ok(v)
}

#[cfg(test)]
mod failpoint {
    extern crate std;
    use std::cell::Cell;
    std::thread_local! {
        /// `Some(n)`: the allocation after `n` more successful ones fails.
        pub(super) static FAIL_AFTER: Cell<Option<usize>> = const { Cell::new(None) };
    }
}

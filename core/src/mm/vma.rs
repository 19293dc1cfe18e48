//! The VMA records: one mapping's fields as atomics (read under speculation, never plain
//! memory), how they are built before they are published, and the graveyard that frees them a
//! grace period after they were unlinked.
//!
//! What a mapping maps (the kernel's `vm_file`) is a field like the others, the object's id,
//! not a pointer to a separately allocated handle: a hit reads the whole mapping from the one
//! record the index leads to, without a second dependent load before it can look the probe up.
//! Replacing the object is an in-place edit inside a write section, validated like any other.

use crate::alloc_util::{try_box, try_vec_with_capacity};
use crate::error::Result;
use crate::rcu::Deferred;
use crate::sync::{AtomicU32, AtomicU64, AtomicUsize, FreeCheck, Ordering, quarantine};
use crate::types::{ObjectId, VmFlags, VmaInfo};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

/// One mapping. Fields are atomics because speculative readers read them while a writer may be
/// changing them (Relaxed, validated by the sequence count — never plain memory).
pub struct Vma {
    pub(super) start: AtomicU64,
    pub(super) end: AtomicU64,
    pub(super) pgoff: AtomicU64,
    pub(super) flags: AtomicU32,
    /// The mapped object's id ([`ObjectId`]).
    pub(super) object: AtomicU64,
    /// Equal to the address space's current `mm_lock_seq` while write-locked.
    pub(super) vm_lock_seq: AtomicUsize,
    pub(super) free_check: FreeCheck,
}

impl fmt::Debug for Vma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vma").finish_non_exhaustive()
    }
}

/// Reads a VMA's fields (Relaxed: under the lock they are stable; under speculation they are
/// validated by the caller).
// Inline: the hit path reads every mapping through it; out of line it cost a call per hit.
#[inline]
pub(super) fn info_of(v: &Vma) -> VmaInfo {
    v.free_check.check();
    // Relaxed loads: the values are validated by the sequence count (speculation) or stable
    // under the lock. A VMA's fields were written before the index's Release store published
    // it, which the reader's Acquire load of the index pairs with.
    VmaInfo {
        start: v.start.load(Ordering::Relaxed),
        end: v.end.load(Ordering::Relaxed),
        pgoff: v.pgoff.load(Ordering::Relaxed),
        flags: VmFlags::from_bits(v.flags.load(Ordering::Relaxed)),
        object: ObjectId(v.object.load(Ordering::Relaxed)),
    }
}

/// VMAs to free after a grace period, gathered before the write section so that the callback's
/// allocation cannot fail after anything changed.
pub(super) struct Graveyard {
    pub(super) vmas: Vec<*mut Vma>,
}

struct SendGraveyard(Graveyard);
// SAFETY: unreachable objects handed to the callback that frees them.
unsafe impl Send for SendGraveyard {}

impl Graveyard {
    pub(super) fn with_capacity(vmas: usize) -> Result<Self> {
        Ok(Self {
            vmas: try_vec_with_capacity(vmas)?,
        })
    }

    /// The callback that frees everything gathered (allocated now, run after a grace period).
    pub(super) fn into_deferred(self) -> Result<Deferred> {
        let g = SendGraveyard(self);
        Deferred::new(move || {
            let g = g;
            // SAFETY: everything here was unlinked before the callback was queued, and a grace
            // period has passed.
            unsafe { g.0.free_now() }
        })
    }

    /// Frees everything gathered.
    ///
    /// # Safety
    ///
    /// No reader can reach any of it.
    pub(super) unsafe fn free_now(self) {
        for v in self.vmas {
            // SAFETY: the caller's contract; each was boxed by `new_vma`.
            let b = unsafe { Box::from_raw(v) };
            b.free_check.mark_freed();
            quarantine(b);
        }
    }
}

/// A fresh VMA, not yet published.
pub(super) fn new_vma(info: &VmaInfo, lock_seq: usize) -> Result<*mut Vma> {
    Ok(Box::into_raw(try_box(Vma {
        start: AtomicU64::new(info.start),
        end: AtomicU64::new(info.end),
        pgoff: AtomicU64::new(info.pgoff),
        flags: AtomicU32::new(info.flags.bits()),
        object: AtomicU64::new(info.object.0),
        vm_lock_seq: AtomicUsize::new(lock_seq),
        free_check: FreeCheck::new(),
    })?))
}

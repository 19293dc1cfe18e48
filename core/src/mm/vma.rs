//! The VMA records: one mapping's fields as atomics (read under speculation, never plain
//! memory), the object handle it points to, how both are built before they are published, and
//! the graveyard that frees them a grace period after they were unlinked.

use crate::alloc_util::{try_box, try_vec_with_capacity};
use crate::error::Result;
use crate::rcu::Deferred;
use crate::sync::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, FreeCheck, Ordering, quarantine};
use crate::types::{ObjectId, VmFlags, VmaInfo};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

/// What a mapping maps (the kernel's `vm_file`): immutable once published, freed only a grace
/// period after no VMA points at it, so a speculative reader may read it — and must not trust
/// what it reads until validation.
#[derive(Debug)]
pub struct ObjectHandle {
    pub(super) object: ObjectId,
    pub(super) free_check: FreeCheck,
}

/// One mapping. Fields are atomics because speculative readers read them while a writer may be
/// changing them (Relaxed, validated by the sequence count — never plain memory).
pub struct Vma {
    pub(super) start: AtomicU64,
    pub(super) end: AtomicU64,
    pub(super) pgoff: AtomicU64,
    pub(super) flags: AtomicU32,
    pub(super) object: AtomicPtr<ObjectHandle>,
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
pub(super) fn info_of(v: &Vma) -> Option<VmaInfo> {
    v.free_check.check();
    // Relaxed loads: the values are validated by the sequence count (speculation) or stable
    // under the lock; the handle pointer is loaded Acquire below.
    let start = v.start.load(Ordering::Relaxed);
    let end = v.end.load(Ordering::Relaxed);
    let pgoff = v.pgoff.load(Ordering::Relaxed);
    let flags = VmFlags::from_bits(v.flags.load(Ordering::Relaxed));
    // Acquire pairs with the Release store that published the handle (`new_vma`, `set_handle`):
    // the handle's contents were written before its pointer.
    let h = v.object.load(Ordering::Acquire);
    if h.is_null() {
        return None;
    }
    // SAFETY: handles are freed only a grace period after being unlinked (module invariant); the
    // caller holds a read guard or the lock.
    let h = unsafe { &*h };
    h.free_check.check();
    Some(VmaInfo {
        start,
        end,
        pgoff,
        flags,
        object: h.object,
    })
}

/// VMAs and handles to free after a grace period, gathered before the write section so that the
/// callback's allocation cannot fail after anything changed.
pub(super) struct Graveyard {
    pub(super) vmas: Vec<*mut Vma>,
    pub(super) handles: Vec<*mut ObjectHandle>,
}

struct SendGraveyard(Graveyard);
// SAFETY: unreachable objects handed to the callback that frees them.
unsafe impl Send for SendGraveyard {}

impl Graveyard {
    pub(super) fn with_capacity(vmas: usize, handles: usize) -> Result<Self> {
        Ok(Self {
            vmas: try_vec_with_capacity(vmas)?,
            handles: try_vec_with_capacity(handles)?,
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
        for h in self.handles {
            // SAFETY: the caller's contract; each was boxed by `new_handle`.
            let b = unsafe { Box::from_raw(h) };
            b.free_check.mark_freed();
            quarantine(b);
        }
        for v in self.vmas {
            // SAFETY: the caller's contract; each was boxed by `new_vma`.
            let b = unsafe { Box::from_raw(v) };
            b.free_check.mark_freed();
            quarantine(b);
        }
    }
}

pub(super) fn new_handle(object: ObjectId) -> Result<*mut ObjectHandle> {
    Ok(Box::into_raw(try_box(ObjectHandle {
        object,
        free_check: FreeCheck::new(),
    })?))
}

/// A fresh VMA (and its handle), not yet published.
pub(super) fn new_vma(info: &VmaInfo, lock_seq: usize) -> Result<*mut Vma> {
    let h = new_handle(info.object)?;
    match try_box(Vma {
        start: AtomicU64::new(info.start),
        end: AtomicU64::new(info.end),
        pgoff: AtomicU64::new(info.pgoff),
        flags: AtomicU32::new(info.flags.bits()),
        // Published with the VMA itself (the index's Release store orders it).
        object: AtomicPtr::new(h),
        vm_lock_seq: AtomicUsize::new(lock_seq),
        free_check: FreeCheck::new(),
    }) {
        Ok(b) => Ok(Box::into_raw(b)),
        Err(e) => {
            // SAFETY: never published.
            drop(unsafe { Box::from_raw(h) });
            Err(e)
        }
    }
}

//! Address spaces: where a trap address becomes an (object, offset).
//!
//! A probe lives at (object, offset); a CPU traps at a virtual address of some address space.
//! An address space is a set of mappings (VMAs): `[start, end)` maps the object from offset
//! `pgoff` on, with flags (executable, shared, huge). The trap at `addr` belongs to the probe at
//! `(object, addr - start + pgoff)` — *if* that VMA really mapped that object there at the moment
//! of the lookup. Address spaces change under the lookup all the time (mmap, munmap, mprotect,
//! mremap, fork, exit); this module makes the lookup cheap and its answer trustworthy.
//!
//! # Protocol: speculate, then validate (seed 003)
//!
//! Writers hold the address space's lock and open a write section on `mm_lock_seq` (a
//! [`SeqCount`]: odd while inside). Before changing a VMA they *write-lock* it by setting its
//! `vm_lock_seq` to the current (odd) `mm_lock_seq` — the Linux meaning: a VMA is write-locked
//! exactly while its `vm_lock_seq` equals the address space's current sequence, and closing the
//! write section unlocks every VMA it locked at once. They then edit VMA fields in place
//! (Relaxed atomic stores), publish index changes (one copy-on-write [`Batch`](crate::tree::Batch)), and close the
//! section.
//!
//! The hit path, inside an RCU read section:
//!
//! 1. `try_begin` on `mm_lock_seq` — fail at once if a writer is inside (no spinning).
//! 2. find the VMA by address in the copy-on-write index (lock-free, bounded);
//! 3. read its fields (the object's id among them) through Relaxed atomics — *untrusted*
//!    values: a writer may be changing them; the VMA's memory stays valid because VMAs are freed
//!    only after a grace period;
//! 4. look the probe up;
//! 5. validate: the VMA is not write-locked and `mm_lock_seq` still equals the begin value. Only
//!    then is the (object, offset) — and the probe found for it — trusted. Any doubt means the
//!    locked path.
//!
//! Why both checks, and why at the end: the first draft of the 2024 series compared only the
//! VMA's `vm_lock_seq` before and after, which happily "validates" a read made entirely inside
//! a write section that had locked the VMA before the read began (Peter Zijlstra's objection in
//! seed 003). The `mm_lock_seq` begin/validate pair is what proves no writer ran; the VMA check
//! is the per-VMA lock's meaning kept for embedders whose writers lock single VMAs.
//!
//! # Invariants
//!
//! * INVARIANT: every change to a VMA's fields (its object included) or to the index happens
//!   inside a write section of `mm_lock_seq`, with the VMA write-locked, under the lock.
//! * INVARIANT: a VMA that a reader may have reached is freed only through
//!   [`Rcu::defer`](crate::rcu::Rcu::defer) after it was unlinked (removed from the index).
//! * INVARIANT: VMAs in the index never overlap, are page-aligned, and are non-empty (checked by
//!   every operation before it changes anything; a failed operation changes nothing).

mod speculation;
#[cfg(all(test, not(loom)))]
mod tests;
mod vma;
mod writer;

use crate::error::{Error, Result};
use crate::lock::{CachePadded, RawGuard, RawLock, SpinLock};
use crate::seqcount::SeqCount;
use crate::tree::CowTree;
use alloc::vec::Vec;
use core::fmt;
use vma::Graveyard;

pub use crate::types::{MmId, PAGE_SIZE, VmFlags, VmaInfo};
pub use speculation::{AddressSpaceOps, Speculation};
pub use vma::Vma;
pub use writer::MmWriter;

/// The reference address space. See the [module docs](self).
pub struct AddressSpace<L: RawLock = SpinLock> {
    id: MmId,
    /// `mm_lock_seq`.
    seq: SeqCount,
    /// The write lock (the kernel's `mmap_lock`, write side). On its own cache line: a
    /// writer takes it for a whole operation, and hits read `seq` and the index's root.
    lock: CachePadded<L>,
    /// VMAs by start address.
    vmas: CowTree<u64, Vma>,
}

// SAFETY: every shared field is atomic or a `CowTree` (itself `Sync`); raw VMA pointers are only
// dereferenced under the lock or a read guard.
unsafe impl<L: RawLock> Sync for AddressSpace<L> {}
// SAFETY: as above.
unsafe impl<L: RawLock> Send for AddressSpace<L> {}

impl<L: RawLock> fmt::Debug for AddressSpace<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddressSpace")
            .field("id", &self.id)
            .field("vmas", &self.vmas.len())
            .finish()
    }
}

fn check_range(start: u64, len: u64) -> Result<u64> {
    if len == 0 || !start.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(Error::BadRange);
    }
    start.checked_add(len).ok_or(Error::BadRange)
}

impl<L: RawLock + Default> AddressSpace<L> {
    /// An empty address space.
    pub fn new(id: MmId) -> Self {
        Self {
            id,
            seq: SeqCount::new(),
            lock: CachePadded::new(L::default()),
            vmas: CowTree::new(),
        }
    }
}

impl<L: RawLock> AddressSpace<L> {
    /// Its id.
    pub fn id(&self) -> MmId {
        self.id
    }

    /// Takes the write lock: every change to the address space goes through the returned writer.
    pub fn write(&self) -> MmWriter<'_, L> {
        MmWriter {
            mm: self,
            _lock: RawGuard::lock(&self.lock),
        }
    }

    /// Number of mappings (a snapshot).
    pub fn len(&self) -> usize {
        self.vmas.len()
    }

    /// No mappings (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every mapping, in address order (takes the lock).
    pub fn mappings(&self) -> Vec<VmaInfo> {
        self.write().mappings()
    }
}

impl<L: RawLock> Drop for AddressSpace<L> {
    fn drop(&mut self) {
        // `&mut self`: no reader is left. Free the VMAs still mapped; the index frees its own
        // nodes.
        let mut grave = Graveyard { vmas: Vec::new() };
        // SAFETY: exclusive access.
        unsafe {
            self.vmas.for_each(|_, v| {
                grave.vmas.push(v as *mut Vma);
                true
            })
        };
        // SAFETY: unreachable now.
        unsafe { grave.free_now() };
    }
}

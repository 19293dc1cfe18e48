//! The hit side of an address space: speculate, find, validate — and the locked find when
//! speculation cannot be trusted. [`AddressSpaceOps`] is the shape an embedder's own mm
//! implements; the reference [`AddressSpace`] implements it over its seqcount and index.

use super::AddressSpace;
use super::vma::{Vma, info_of};
use crate::lock::RawLock;
use crate::seqcount::SeqToken;
use crate::sync::Ordering;
use crate::types::{MmId, ObjectId, VmFlags, VmaInfo};

/// A speculative lookup in progress: the begin value and the VMA it found.
#[derive(Clone, Copy, Debug)]
pub struct Speculation {
    token: SeqToken,
    vma: *const Vma,
}

/// An address space the hit path can resolve in: the reference [`AddressSpace`], or an
/// embedder's own (a kernel's mm, a hypervisor's guest memory map) with the same shape.
///
/// # Safety
///
/// `speculate_find` must be safe to call inside a read section while writers run (touch only
/// memory whose free is deferred past the read section); `speculate_validate` must return `true`
/// only if no change to the address space ran between `speculate_begin` and it; `locked_find`
/// must answer under whatever excludes writers, for as long as its callback runs.
///
/// Who calls each method, under which lock, and whether it may allocate, sleep or fail: [the
/// embedder's contract](crate::embedding).
pub unsafe trait AddressSpaceOps {
    /// Which address space (for the breakpoint patcher).
    fn id(&self) -> MmId;
    /// Starts a speculation; `None` at once if a writer is inside.
    fn speculate_begin(&self) -> Option<Speculation>;
    /// The (object, offset) mapped executable at `addr`, *untrusted* until validated.
    fn speculate_find(&self, spec: &mut Speculation, addr: u64) -> Option<(ObjectId, u64)>;
    /// Did the address space stay unchanged (and the found VMA unlocked) since `speculate_begin`?
    fn speculate_validate(&self, spec: &Speculation) -> bool;
    /// Runs `f` with writers excluded, on the mapping at `addr` (if any).
    fn locked_find<T>(&self, addr: u64, f: impl FnOnce(Option<VmaInfo>) -> T) -> T;
    /// A stamp of the address space's current state, `None` while a writer is inside.
    fn stamp(&self) -> Option<u64>;
    /// Has no change to the address space begun since `stamp` was taken?
    fn unchanged_since(&self, stamp: u64) -> bool;
}

// SAFETY: `speculate_find` touches only the index (copy-on-write, RCU-freed) and VMAs
// (RCU-freed), all through atomics; `speculate_validate` is the seqcount validation plus the
// VMA lock check; `locked_find` holds the write lock while `f` runs.
unsafe impl<L: RawLock> AddressSpaceOps for AddressSpace<L> {
    fn id(&self) -> MmId {
        self.id
    }

    #[inline]
    fn speculate_begin(&self) -> Option<Speculation> {
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::MmOnlyVmaLockSeq) {
            // Andrii's first draft: no mm_lock_seq at all; the token is replaced by the VMA's
            // `vm_lock_seq` in `speculate_find`.
            return Some(Speculation {
                token: SeqToken::from_raw(0),
                vma: core::ptr::null(),
            });
        }
        Some(Speculation {
            token: self.seq.try_begin()?,
            vma: core::ptr::null(),
        })
    }

    #[inline]
    fn speculate_find(&self, spec: &mut Speculation, addr: u64) -> Option<(ObjectId, u64)> {
        // SAFETY: the caller is inside a read section of the domain the index retires through.
        let (_, v) = unsafe { self.vmas.floor(&addr) }?;
        // SAFETY: reached under the guard; VMAs are freed only after a grace period.
        let vma = unsafe { &*v };
        spec.vma = v;
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::MmOnlyVmaLockSeq) {
            // Relaxed: the draft's "before" value of the VMA's lock sequence.
            spec.token = SeqToken::from_raw(vma.vm_lock_seq.load(Ordering::Relaxed));
        }
        let info = info_of(vma);
        if !info.contains(addr) || !info.flags.contains(VmFlags::EXEC) {
            return None;
        }
        Some((info.object, info.offset_of(addr)))
    }

    #[inline]
    fn speculate_validate(&self, spec: &Speculation) -> bool {
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::MmOnlyVmaLockSeq) {
            // SAFETY: as in `speculate_find`.
            let vma = unsafe { &*spec.vma };
            crate::sync::fence(Ordering::Acquire);
            // The draft: the VMA's lock sequence unchanged means "nothing changed".
            return vma.vm_lock_seq.load(Ordering::Relaxed) == spec.token.value();
        }
        if !spec.vma.is_null() {
            // SAFETY: as in `speculate_find` (the caller still holds the same read section).
            let vma = unsafe { &*spec.vma };
            // Relaxed: a write-locked VMA has `vm_lock_seq` == the current (odd) sequence; the
            // seqcount validation below orders this load before its re-check.
            if vma.vm_lock_seq.load(Ordering::Relaxed) == self.seq.raw() {
                return false;
            }
        }
        self.seq.validate(spec.token)
    }

    fn locked_find<T>(&self, addr: u64, f: impl FnOnce(Option<VmaInfo>) -> T) -> T {
        let w = self.write();
        f(w.find(addr))
    }

    #[inline]
    fn stamp(&self) -> Option<u64> {
        self.seq.try_begin().map(|t| t.value() as u64)
    }

    #[inline]
    fn unchanged_since(&self, stamp: u64) -> bool {
        // `mm_lock_seq` only grows: equal means no write section began since the stamp.
        self.seq.validate_raw(stamp as usize)
    }
}

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
//! (Relaxed atomic stores), publish index changes (one copy-on-write [`Batch`]), and close the
//! section.
//!
//! The hit path, inside an RCU read section:
//!
//! 1. `try_begin` on `mm_lock_seq` — fail at once if a writer is inside (no spinning).
//! 2. find the VMA by address in the copy-on-write index (lock-free, bounded);
//! 3. read its fields and its object handle through Relaxed atomics — *untrusted* values: a
//!    writer may be changing them; the handle's memory stays valid because handles and VMAs are
//!    freed only after a grace period;
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
//! * INVARIANT: every change to a VMA's fields, to the index, or to a handle pointer happens
//!   inside a write section of `mm_lock_seq`, with the VMA write-locked, under the lock.
//! * INVARIANT: a VMA or object handle that a reader may have reached is freed only through
//!   [`Rcu::defer`] after it was unlinked (removed from the index, or the handle replaced).
//! * INVARIANT: VMAs in the index never overlap, are page-aligned, and are non-empty (checked by
//!   every operation before it changes anything; a failed operation changes nothing).

use crate::alloc_util::{try_box, try_vec_with_capacity};
use crate::error::{Error, Result};
use crate::lock::{RawGuard, RawLock, SpinLock};
use crate::rcu::{Deferred, Rcu};
use crate::seqcount::{SeqCount, SeqToken};
use crate::sync::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, FreeCheck, Ordering, quarantine};
use crate::tree::{Batch, CowTree};
use crate::types::ObjectId;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

pub use crate::types::{MmId, PAGE_SIZE, VmFlags, VmaInfo};

/// What a mapping maps (the kernel's `vm_file`): immutable once published, freed only a grace
/// period after no VMA points at it, so a speculative reader may read it — and must not trust
/// what it reads until validation.
#[derive(Debug)]
pub struct ObjectHandle {
    object: ObjectId,
    free_check: FreeCheck,
}

/// One mapping. Fields are atomics because speculative readers read them while a writer may be
/// changing them (Relaxed, validated by the sequence count — never plain memory).
pub struct Vma {
    start: AtomicU64,
    end: AtomicU64,
    pgoff: AtomicU64,
    flags: AtomicU32,
    object: AtomicPtr<ObjectHandle>,
    /// Equal to the address space's current `mm_lock_seq` while write-locked.
    vm_lock_seq: AtomicUsize,
    free_check: FreeCheck,
}

impl fmt::Debug for Vma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vma").finish_non_exhaustive()
    }
}

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

/// The reference address space. See the [module docs](self).
pub struct AddressSpace<L: RawLock = SpinLock> {
    id: MmId,
    /// `mm_lock_seq`.
    seq: SeqCount,
    /// The write lock (the kernel's `mmap_lock`, write side).
    lock: L,
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
            lock: L::default(),
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

/// Reads a VMA's fields (Relaxed: under the lock they are stable; under speculation they are
/// validated by the caller).
fn info_of(v: &Vma) -> Option<VmaInfo> {
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

// SAFETY: `speculate_find` touches only the index (copy-on-write, RCU-freed), VMAs and handles
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
        let info = info_of(vma)?;
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

/// The write side of an [`AddressSpace`]: holds its lock. Each operation is one write section:
/// validated first, then applied whole, or not at all.
pub struct MmWriter<'a, L: RawLock> {
    mm: &'a AddressSpace<L>,
    _lock: RawGuard<'a, L>,
}

impl<L: RawLock> fmt::Debug for MmWriter<'_, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmWriter").field("mm", &self.mm.id).finish()
    }
}

/// VMAs and handles to free after a grace period, gathered before the write section so that the
/// callback's allocation cannot fail after anything changed.
struct Graveyard {
    vmas: Vec<*mut Vma>,
    handles: Vec<*mut ObjectHandle>,
}

struct SendGraveyard(Graveyard);
// SAFETY: unreachable objects handed to the callback that frees them.
unsafe impl Send for SendGraveyard {}

impl Graveyard {
    fn with_capacity(vmas: usize, handles: usize) -> Result<Self> {
        Ok(Self {
            vmas: try_vec_with_capacity(vmas)?,
            handles: try_vec_with_capacity(handles)?,
        })
    }

    /// The callback that frees everything gathered (allocated now, run after a grace period).
    fn into_deferred(self) -> Result<Deferred> {
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
    unsafe fn free_now(self) {
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

fn new_handle(object: ObjectId) -> Result<*mut ObjectHandle> {
    Ok(Box::into_raw(try_box(ObjectHandle {
        object,
        free_check: FreeCheck::new(),
    })?))
}

/// A fresh VMA (and its handle), not yet published.
fn new_vma(info: &VmaInfo, lock_seq: usize) -> Result<*mut Vma> {
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

impl<'a, L: RawLock> MmWriter<'a, L> {
    /// The address space.
    pub fn mm(&self) -> &'a AddressSpace<L> {
        self.mm
    }

    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<VmaInfo> {
        // SAFETY: the lock is held.
        let (_, v) = unsafe { self.mm.vmas.floor_locked(&addr) }?;
        // SAFETY: in the index under the lock: allocated.
        let info = info_of(unsafe { &*v })?;
        info.contains(addr).then_some(info)
    }

    /// Every mapping, in address order.
    pub fn mappings(&self) -> Vec<VmaInfo> {
        let mut out = Vec::new();
        // SAFETY: the lock is held: the published index is the writers' index.
        unsafe {
            self.mm.vmas.for_each(|_, v| {
                if let Some(i) = info_of(&*v) {
                    out.push(i);
                }
                true
            })
        };
        out
    }

    /// The VMAs intersecting `[start, end)`, in order, as (pointer, info).
    fn intersecting(&self, start: u64, end: u64) -> Result<Vec<(*const Vma, VmaInfo)>> {
        let mut out = try_vec_with_capacity(4)?;
        let mut from = start;
        // SAFETY: the lock is held.
        if let Some((_, v)) = unsafe { self.mm.vmas.floor_locked(&start) } {
            // SAFETY: in the index under the lock.
            if let Some(i) = info_of(unsafe { &*v }).filter(|i| i.end > start) {
                out.push((v, i));
                from = i.end;
            }
        }
        let mut err = Ok(());
        if from < end {
            // SAFETY: the lock is held; nothing is freed during the walk.
            unsafe {
                self.mm.vmas.range(&from, &end, |_, v| {
                    if let Some(i) = info_of(&*v) {
                        if out.len() == out.capacity() && out.try_reserve(out.len()).is_err() {
                            err = Err(Error::NoMemory);
                            return false;
                        }
                        out.push((v, i));
                    }
                    true
                })
            };
        }
        err.map(|()| out)
    }

    /// Runs one write section: write-locks `locked` VMAs, runs the index batch, then `edit`
    /// (infallible in-place changes), then defers `grave`'s free.
    fn section<R: Rcu>(
        &self,
        rcu: &R,
        locked: &[*const Vma],
        batch: impl FnOnce(&mut Batch<u64, Vma>, usize) -> Result<()>,
        edit: impl FnOnce(),
        grave: Option<Deferred>,
    ) -> Result<()> {
        // SAFETY: the address space's lock is held: writers are serialized.
        let w = unsafe { self.mm.seq.write_begin() };
        let s = self.mm.seq.raw();
        for v in locked {
            // SAFETY: in the index under the lock.
            // Relaxed: ordered before the edits by the write section's release fence; readers
            // compare it with `mm_lock_seq` and then validate the sequence.
            unsafe { &**v }.vm_lock_seq.store(s, Ordering::Relaxed);
        }
        // SAFETY: the lock is held; the address space's one domain is the caller's.
        let r = unsafe { self.mm.vmas.batch(rcu, |b| batch(b, s)) };
        if r.is_ok() {
            edit();
            if let Some(g) = grave {
                #[cfg(loom)]
                if crate::seeded::is(crate::seeded::Bug::MmFreeWithoutDeferral) {
                    drop(w);
                    g.run();
                    return r;
                }
                rcu.defer(g);
            }
        }
        drop(w);
        r
    }

    /// Maps `[start, start + len)` to `object` from offset `pgoff`.
    ///
    /// # Errors
    ///
    /// [`Error::BadRange`] (empty, unaligned or overflowing), [`Error::Overlap`] (any part already
    /// mapped), [`Error::NoMemory`]. Nothing changes on error.
    pub fn map<R: Rcu>(
        &self,
        rcu: &R,
        start: u64,
        len: u64,
        pgoff: u64,
        object: ObjectId,
        flags: VmFlags,
    ) -> Result<VmaInfo> {
        let end = check_range(start, len)?;
        if !pgoff.is_multiple_of(PAGE_SIZE) || pgoff.checked_add(len).is_none() {
            return Err(Error::BadRange);
        }
        if !self.intersecting(start, end)?.is_empty() {
            return Err(Error::Overlap);
        }
        let info = VmaInfo {
            start,
            end,
            pgoff,
            flags,
            object,
        };
        let v = new_vma(&info, 0)?;
        let r = self.section(
            rcu,
            &[],
            |b, s| {
                // SAFETY: `v` is ours until published by this batch.
                unsafe { &*v }.vm_lock_seq.store(s, Ordering::Relaxed);
                b.insert(start, v).map(|_| ())
            },
            || {},
            None,
        );
        if r.is_err() {
            // SAFETY: never published.
            unsafe {
                Graveyard {
                    vmas: alloc::vec![v],
                    handles: alloc::vec![(*v).object.load(Ordering::Relaxed)],
                }
                .free_now()
            };
        }
        r.map(|()| info)
    }

    /// Splits the mapping containing `addr` into `[start, addr)` and `[addr, end)`. A no-op if
    /// `addr` is already a boundary.
    ///
    /// # Errors
    ///
    /// [`Error::BadRange`] (unaligned), [`Error::NotMapped`] (no mapping at `addr`),
    /// [`Error::NoMemory`].
    pub fn split<R: Rcu>(&self, rcu: &R, addr: u64) -> Result<()> {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(Error::BadRange);
        }
        let Some(info) = self.find(addr) else {
            return Err(Error::NotMapped);
        };
        if info.start == addr {
            return Ok(());
        }
        self.split_at(rcu, &[addr])
    }

    /// Splits at every address in `at` that falls strictly inside a mapping, one cut per write
    /// section (each cut is invisible to readers: every address keeps its object and offset).
    fn split_at<R: Rcu>(&self, rcu: &R, at: &[u64]) -> Result<()> {
        for &a in at {
            self.split_one(rcu, a)?;
        }
        Ok(())
    }

    fn split_one<R: Rcu>(&self, rcu: &R, a: u64) -> Result<()> {
        // SAFETY: the lock is held.
        let Some((_, v)) = (unsafe { self.mm.vmas.floor_locked(&a) }) else {
            return Ok(());
        };
        // SAFETY: in the index under the lock.
        let Some(i) = info_of(unsafe { &*v }) else {
            return Ok(());
        };
        if !(i.start < a && a < i.end) {
            return Ok(());
        }
        let t = new_vma(
            &VmaInfo {
                start: a,
                pgoff: i.pgoff + (a - i.start),
                ..i
            },
            0,
        )?;
        let r = self.section(
            rcu,
            &[v],
            |b, s| {
                // SAFETY: ours until published by this batch.
                unsafe { &*t }.vm_lock_seq.store(s, Ordering::Relaxed);
                b.insert(a, t).map(|_| ())
            },
            || {
                // SAFETY: in the index, write-locked in this section. Relaxed: inside the section.
                unsafe { &*v }.end.store(a, Ordering::Relaxed);
            },
            None,
        );
        if r.is_err() {
            // SAFETY: never published.
            unsafe {
                Graveyard {
                    vmas: alloc::vec![t],
                    handles: alloc::vec![(*t).object.load(Ordering::Relaxed)],
                }
                .free_now()
            };
        }
        r
    }

    /// Checks that `[start, end)` is mapped without holes; returns the intersecting VMAs.
    fn covered(&self, start: u64, end: u64) -> Result<Vec<(*const Vma, VmaInfo)>> {
        let vs = self.intersecting(start, end)?;
        let mut at = start;
        for (_, i) in &vs {
            if i.start > at {
                return Err(Error::NotMapped);
            }
            at = i.end;
        }
        if vs.is_empty() || at < end {
            return Err(Error::NotMapped);
        }
        Ok(vs)
    }

    /// Unmaps `[start, start + len)`, splitting mappings that straddle its ends. Returns the
    /// mappings (pieces) that were removed.
    ///
    /// # Errors
    ///
    /// [`Error::BadRange`], [`Error::NotMapped`] (any part of the range is not mapped),
    /// [`Error::NoMemory`]. Nothing changes on error.
    pub fn unmap<R: Rcu>(&self, rcu: &R, start: u64, len: u64) -> Result<Vec<VmaInfo>> {
        let end = check_range(start, len)?;
        self.covered(start, end)?;
        self.split_at(rcu, &[start, end])?;
        // Now every intersecting VMA lies inside the range. If removing fails below, the split is
        // the only change, and it is invisible (the same addresses map the same bytes).
        let vs = self.covered(start, end)?;
        let mut grave = Graveyard::with_capacity(vs.len(), vs.len())?;
        for (v, _) in &vs {
            grave.vmas.push(*v as *mut Vma);
            // SAFETY: in the index under the lock. Relaxed: under the lock.
            let h = unsafe { &**v }.object.load(Ordering::Relaxed);
            grave.handles.push(h);
        }
        let grave = grave.into_deferred()?;
        let locked: Vec<*const Vma> = vs.iter().map(|x| x.0).collect();
        self.section(
            rcu,
            &locked,
            |b, _| {
                for (_, i) in &vs {
                    b.remove(&i.start)?;
                }
                Ok(())
            },
            || {},
            Some(grave),
        )?;
        Ok(vs.into_iter().map(|x| x.1).collect())
    }

    /// Sets the flags of every mapping in `[start, start + len)` (splitting at its ends).
    /// Returns the mappings as they were before the change.
    ///
    /// # Errors
    ///
    /// As for [`MmWriter::unmap`].
    pub fn protect<R: Rcu>(
        &self,
        rcu: &R,
        start: u64,
        len: u64,
        flags: VmFlags,
    ) -> Result<Vec<VmaInfo>> {
        let end = check_range(start, len)?;
        self.covered(start, end)?;
        self.split_at(rcu, &[start, end])?;
        let vs = self.covered(start, end)?;
        let locked: Vec<*const Vma> = vs.iter().map(|x| x.0).collect();
        self.section(
            rcu,
            &locked,
            |_, _| Ok(()),
            || {
                for (v, _) in &vs {
                    // SAFETY: write-locked in this section. Relaxed: inside the write section.
                    unsafe { &**v }.flags.store(flags.bits(), Ordering::Relaxed);
                }
            },
            None,
        )?;
        Ok(vs.into_iter().map(|x| x.1).collect())
    }

    /// Moves the mapping that is exactly `[old, old + len)` to `[new, new + len)` (same object and
    /// offset). Returns the mapping as it was.
    ///
    /// # Errors
    ///
    /// [`Error::BadRange`]; [`Error::NotMapped`] (no mapping is exactly that range);
    /// [`Error::Overlap`] (the destination is not free); [`Error::NoMemory`].
    pub fn remap<R: Rcu>(&self, rcu: &R, old: u64, len: u64, new: u64) -> Result<VmaInfo> {
        let old_end = check_range(old, len)?;
        let new_end = check_range(new, len)?;
        let vs = self.intersecting(old, old_end)?;
        let [(v, info)] = vs.as_slice() else {
            return Err(Error::NotMapped);
        };
        if info.start != old || info.end != old_end {
            return Err(Error::NotMapped);
        }
        if self.intersecting(new, new_end)?.iter().any(|(w, _)| w != v) {
            return Err(Error::Overlap);
        }
        let (v, info) = (*v, *info);
        self.section(
            rcu,
            &[v],
            |b, _| {
                b.remove(&old)?;
                b.insert(new, v).map(|_| ())
            },
            || {
                // SAFETY: write-locked in this section. Relaxed: inside the write section.
                let vma = unsafe { &*v };
                vma.start.store(new, Ordering::Relaxed);
                vma.end.store(new_end, Ordering::Relaxed);
            },
            None,
        )?;
        Ok(info)
    }

    /// Replaces what the mapping at `addr` maps (a new handle; the old one is freed after a grace
    /// period): the in-place change a speculative reader must never half-see.
    ///
    /// # Errors
    ///
    /// [`Error::NotMapped`], [`Error::NoMemory`].
    pub fn replace_object<R: Rcu>(
        &self,
        rcu: &R,
        addr: u64,
        object: ObjectId,
        pgoff: u64,
    ) -> Result<VmaInfo> {
        if !pgoff.is_multiple_of(PAGE_SIZE) {
            return Err(Error::BadRange);
        }
        // SAFETY: the lock is held.
        let Some((_, v)) = (unsafe { self.mm.vmas.floor_locked(&addr) }) else {
            return Err(Error::NotMapped);
        };
        // SAFETY: in the index under the lock.
        let Some(before) = info_of(unsafe { &*v }) else {
            return Err(Error::NotMapped);
        };
        if !before.contains(addr) {
            return Err(Error::NotMapped);
        }
        let h = new_handle(object)?;
        // SAFETY: in the index under the lock. Relaxed: under the lock.
        let old = unsafe { &*v }.object.load(Ordering::Relaxed);
        let grave = match (Graveyard {
            vmas: Vec::new(),
            handles: alloc::vec![old],
        })
        .into_deferred()
        {
            Ok(g) => g,
            Err(e) => {
                // SAFETY: never published.
                drop(unsafe { Box::from_raw(h) });
                return Err(e);
            }
        };
        self.section(
            rcu,
            &[v],
            |_, _| Ok(()),
            || {
                // SAFETY: write-locked in this section.
                let vma = unsafe { &*v };
                // Release pairs with the Acquire load in `info_of`: the handle's contents first.
                vma.object.store(h, Ordering::Release);
                // Relaxed: inside the write section.
                vma.pgoff.store(pgoff, Ordering::Relaxed);
            },
            Some(grave),
        )?;
        Ok(before)
    }

    /// A copy of this address space with id `child` (its mappings copied; the caller copies the
    /// memory contents, breakpoints included, through its patcher).
    ///
    /// # Errors
    ///
    /// [`Error::NoMemory`]; nothing is created on error.
    pub fn fork<R: Rcu, L2: RawLock + Default>(
        &self,
        rcu: &R,
        child: MmId,
    ) -> Result<AddressSpace<L2>> {
        let c = AddressSpace::<L2>::new(child);
        {
            let w = c.write();
            for i in self.mappings() {
                w.map(rcu, i.start, i.end - i.start, i.pgoff, i.object, i.flags)?;
            }
        }
        Ok(c)
    }

    /// Unmaps everything (exit). Returns what was mapped.
    pub fn clear<R: Rcu>(&self, rcu: &R) -> Result<Vec<VmaInfo>> {
        let all = self.mappings();
        let mut grave = Graveyard::with_capacity(all.len(), all.len())?;
        let mut locked = try_vec_with_capacity(all.len())?;
        // SAFETY: the lock is held.
        unsafe {
            self.mm.vmas.for_each(|_, v| {
                grave.vmas.push(v as *mut Vma);
                grave.handles.push((*v).object.load(Ordering::Relaxed));
                locked.push(v);
                true
            })
        };
        let grave = grave.into_deferred()?;
        self.section(
            rcu,
            &locked,
            |b, _| {
                for i in &all {
                    b.remove(&i.start)?;
                }
                Ok(())
            },
            || {},
            Some(grave),
        )?;
        Ok(all)
    }
}

impl<L: RawLock> Drop for AddressSpace<L> {
    fn drop(&mut self) {
        // `&mut self`: no reader is left. Free the VMAs and handles still mapped; the index frees
        // its own nodes.
        let mut grave = Graveyard {
            vmas: Vec::new(),
            handles: Vec::new(),
        };
        // SAFETY: exclusive access.
        unsafe {
            self.vmas.for_each(|_, v| {
                grave.vmas.push(v as *mut Vma);
                // Relaxed: exclusive access.
                grave.handles.push((*v).object.load(Ordering::Relaxed));
                true
            })
        };
        // SAFETY: unreachable now.
        unsafe { grave.free_now() };
    }
}

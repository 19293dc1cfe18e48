//! The write side: [`MmWriter`] holds the address space's lock, and each operation (map, split,
//! unmap, protect, remap, replace the object, fork, clear) is one write section — checked
//! first, its memory reserved, then applied whole or not at all.

use super::vma::{Graveyard, Vma, info_of, new_vma};
use super::{AddressSpace, check_range};
use crate::alloc_util::try_vec_with_capacity;
use crate::error::{Error, Result};
use crate::lock::{RawGuard, RawLock};
use crate::rcu::{Deferred, Rcu};
use crate::sync::Ordering;
use crate::tree::Batch;
use crate::types::{MmId, ObjectId, PAGE_SIZE, VmFlags, VmaInfo};
use alloc::vec::Vec;
use core::fmt;

/// The write side of an [`AddressSpace`]: holds its lock. Each operation is one write section:
/// validated first, then applied whole, or not at all.
pub struct MmWriter<'a, L: RawLock> {
    pub(super) mm: &'a AddressSpace<L>,
    pub(super) _lock: RawGuard<'a, L>,
}

impl<L: RawLock> fmt::Debug for MmWriter<'_, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmWriter").field("mm", &self.mm.id).finish()
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
        let info = info_of(unsafe { &*v });
        info.contains(addr).then_some(info)
    }

    /// Every mapping, in address order.
    pub fn mappings(&self) -> Vec<VmaInfo> {
        let mut out = Vec::new();
        // SAFETY: the lock is held: the published index is the writers' index.
        unsafe {
            self.mm.vmas.for_each(|_, v| {
                out.push(info_of(&*v));
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
            let i = info_of(unsafe { &*v });
            if i.end > start {
                out.push((v, i));
                from = i.end;
            }
        }
        let mut err = Ok(());
        if from < end {
            // SAFETY: the lock is held; nothing is freed during the walk.
            unsafe {
                self.mm.vmas.range(&from, &end, |_, v| {
                    if out.len() == out.capacity() && out.try_reserve(out.len()).is_err() {
                        err = Err(Error::NoMemory);
                        return false;
                    }
                    out.push((v, info_of(&*v)));
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
        let i = info_of(unsafe { &*v });
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
        let mut grave = Graveyard::with_capacity(vs.len())?;
        for (v, _) in &vs {
            grave.vmas.push(*v as *mut Vma);
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

    /// Replaces what the mapping at `addr` maps (object and offset, edited in place): the change a
    /// speculative reader must never half-see.
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
        let before = info_of(unsafe { &*v });
        if !before.contains(addr) {
            return Err(Error::NotMapped);
        }
        self.section(
            rcu,
            &[v],
            |_, _| Ok(()),
            || {
                // SAFETY: write-locked in this section.
                let vma = unsafe { &*v };
                // Relaxed: inside the write section; a reader that read either field during it
                // fails validation (the section's sequence), so it never trusts a mix of the
                // old object with the new offset.
                vma.object.store(object.0, Ordering::Relaxed);
                vma.pgoff.store(pgoff, Ordering::Relaxed);
            },
            None,
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
        let mut grave = Graveyard::with_capacity(all.len())?;
        let mut locked = try_vec_with_capacity(all.len())?;
        // SAFETY: the lock is held.
        unsafe {
            self.mm.vmas.for_each(|_, v| {
                grave.vmas.push(v as *mut Vma);
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

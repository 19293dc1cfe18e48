//! A code patcher over byte buffers and a one-byte-breakpoint instruction set: the reference
//! embedding for tests, the loom suite and the examples. `no_std` like the rest of the crate.
//!
//! [`ByteText`] holds each object's bytes (what "the file" contains) and, per address space, the
//! bytes written over them (breakpoints, restored originals). Reading an address reads the
//! overlay if written, else the object's byte at the mapped offset. Unmap drops the overlay of the
//! range, mremap moves it, fork copies it — exactly what memory does in a real address space.

use crate::arch::{Arch, TextPatcher};
use crate::error::{Error, Result};
use crate::lock::{Lock, RawLock, SpinLock};
use crate::mm::{MmId, VmaInfo};
use crate::probe::ObjectId;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// A one-byte breakpoint, `0xCC` (as x86's `int3`); any `0xCC` byte is a trap.
#[derive(Debug, Default, Clone, Copy)]
pub struct Int3;

impl Arch for Int3 {
    const BREAKPOINT: &'static [u8] = &[0xCC];
    fn is_trap(bytes: &[u8]) -> bool {
        bytes.first() == Some(&0xCC)
    }
}

impl<L: RawLock + Default> Default for ByteText<L> {
    fn default() -> Self {
        Self::new()
    }
}

/// One byte of XOL memory: (what was written, what instruction fetch sees).
type XolByte = (u8, u8);

/// A [`TextPatcher`] over byte buffers. See the [module docs](self).
///
/// `L` is the lock guarding its maps: probe-core's [`SpinLock`] by default. (The loom suite plugs
/// in a lock loom does not model: this patcher stands in for the embedder's memory, whose
/// internals are not the protocol under test.)
#[derive(Debug)]
pub struct ByteText<L: RawLock + Default = SpinLock> {
    objects: Lock<L, BTreeMap<ObjectId, Vec<u8>>>,
    overlay: Lock<L, BTreeMap<(MmId, u64), u8>>,
    /// XOL memory: per byte, what was written (data) and what instruction fetch sees (updated
    /// only by a flush).
    xol: Lock<L, BTreeMap<(MmId, u64), XolByte>>,
    writes: Lock<L, u64>,
}

impl<L: RawLock + Default> ByteText<L> {
    /// No objects yet.
    pub fn new() -> Self {
        Self {
            objects: Lock::default(),
            overlay: Lock::default(),
            xol: Lock::default(),
            writes: Lock::default(),
        }
    }

    /// Defines `object`'s contents.
    pub fn add_object(&self, object: ObjectId, bytes: Vec<u8>) {
        self.objects.lock().insert(object, bytes);
    }

    /// The byte at `vaddr` of `mm`, mapped by `vma` (0 past the object's end).
    pub fn byte(&self, mm: MmId, vma: &VmaInfo, vaddr: u64) -> u8 {
        if let Some(b) = self.overlay.lock().get(&(mm, vaddr)) {
            return *b;
        }
        let off = vma.offset_of(vaddr);
        self.objects
            .lock()
            .get(&vma.object)
            .and_then(|o| usize::try_from(off).ok().and_then(|i| o.get(i).copied()))
            .unwrap_or(0)
    }

    /// What instruction fetch sees at an XOL address: the bytes as of the last flush covering
    /// them (0 if never flushed).
    pub fn fetch_xol(&self, mm: MmId, addr: u64, buf: &mut [u8]) {
        let x = self.xol.lock();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = x.get(&(mm, addr + i as u64)).map_or(0, |v| v.1);
        }
    }

    /// The addresses of this patcher's own locks (for the store audit, which counts only
    /// probe-core's stores).
    #[cfg(test)]
    pub(crate) fn lock_addrs(&self) -> [usize; 3] {
        [
            self.objects.raw() as *const _ as usize,
            self.overlay.raw() as *const _ as usize,
            self.xol.raw() as *const _ as usize,
        ]
    }

    /// How many code writes were made (breakpoints placed or removed).
    pub fn writes(&self) -> u64 {
        *self.writes.lock()
    }
}

impl<L: RawLock + Default> TextPatcher for ByteText<L> {
    fn read_object(&self, object: ObjectId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let objects = self.objects.lock();
        let o = objects.get(&object).ok_or(Error::OffsetOutOfRange)?;
        let start = usize::try_from(offset).map_err(|_| Error::OffsetOutOfRange)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(Error::OffsetOutOfRange)?;
        buf.copy_from_slice(o.get(start..end).ok_or(Error::OffsetOutOfRange)?);
        Ok(())
    }

    fn read(&self, mm: MmId, vma: &VmaInfo, vaddr: u64, buf: &mut [u8]) -> Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.byte(mm, vma, vaddr + i as u64);
        }
        Ok(())
    }

    fn write(&self, mm: MmId, _vma: &VmaInfo, vaddr: u64, bytes: &[u8]) -> Result<()> {
        let mut o = self.overlay.lock();
        for (i, b) in bytes.iter().enumerate() {
            o.insert((mm, vaddr + i as u64), *b);
        }
        *self.writes.lock() += 1;
        Ok(())
    }

    fn read_xol(&self, mm: MmId, addr: u64, buf: &mut [u8]) -> Result<()> {
        let x = self.xol.lock();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = x.get(&(mm, addr + i as u64)).map_or(0, |v| v.0);
        }
        Ok(())
    }

    fn write_xol(&self, mm: MmId, addr: u64, bytes: &[u8]) -> Result<()> {
        let mut x = self.xol.lock();
        for (i, b) in bytes.iter().enumerate() {
            x.entry((mm, addr + i as u64)).or_insert((0, 0)).0 = *b;
        }
        Ok(())
    }

    fn flush_icache(&self, mm: MmId, addr: u64, len: usize) -> Result<()> {
        let mut x = self.xol.lock();
        for i in 0..len as u64 {
            if let Some(v) = x.get_mut(&(mm, addr + i)) {
                v.1 = v.0;
            }
        }
        Ok(())
    }

    fn unmapped(&self, mm: MmId, start: u64, end: u64) {
        // Only the range's entries: an unmap costs what it drops, not the whole overlay.
        let mut o = self.overlay.lock();
        let gone: Vec<(MmId, u64)> = o.range((mm, start)..(mm, end)).map(|(k, _)| *k).collect();
        for k in gone {
            o.remove(&k);
        }
    }

    fn moved(&self, mm: MmId, from: u64, to: u64, len: u64) {
        let mut o = self.overlay.lock();
        let moved: Vec<(u64, u8)> = o
            .range((mm, from)..(mm, from + len))
            .map(|(&(_, a), &b)| (a, b))
            .collect();
        for (a, b) in moved {
            o.remove(&(mm, a));
            o.insert((mm, a - from + to), b);
        }
    }

    fn forked(&self, parent: MmId, child: MmId) {
        let mut o = self.overlay.lock();
        let copied: Vec<(u64, u8)> = o
            .range((parent, 0)..=(parent, u64::MAX))
            .map(|(&(_, a), &b)| (a, b))
            .collect();
        for (a, b) in copied {
            o.insert((child, a), b);
        }
    }
}

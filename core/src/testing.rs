//! A code patcher over byte buffers and a one-byte-breakpoint instruction set: the reference
//! embedding for tests, the loom suite and the examples; and [`ByteCode`], the same for the
//! [optimizer](crate::optimizer). `no_std` like the rest of the crate.
//!
//! [`ByteText`] holds each object's bytes (what "the file" contains) and, per address space, the
//! bytes written over them (breakpoints, restored originals). Reading an address reads the
//! overlay if written, else the object's byte at the mapped offset. Unmap drops the overlay of the
//! range, mremap moves it, fork copies it — exactly what memory does in a real address space.

use crate::arch::{Arch, CodeSpace, Detour, NotOptimizable, Patch, TextPatcher};
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

/// The counters of a [`ByteCode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeCounts {
    /// Calls to [`CodeSpace::patch`].
    pub batches: u64,
    /// Sites patched over all batches.
    pub sites: u64,
    /// Calls to [`CodeSpace::quiesce`].
    pub quiesces: u64,
    /// Calls to [`CodeSpace::kick`].
    pub kicks: u64,
    /// Trampolines prepared and not yet freed.
    pub live_trampolines: u64,
    /// Patches whose `old` bytes were not what the code held (a protocol error: must stay 0).
    pub mismatches: u64,
    /// Trampolines freed twice or never prepared (must stay 0).
    pub bad_frees: u64,
    /// Patches refused by [`ByteCode::fail_patches`] (the code left as it was).
    pub failed: u64,
    /// Patches still to refuse.
    pub fail_next: u64,
}

/// A [`CodeSpace`] over one byte buffer, for the optimizer's tests, examples and benches.
///
/// The text starts at address 0. Instructions are one byte each unless
/// [`ByteCode::with_lengths`] says otherwise; a jump covers whole instructions adding up to at
/// least `jump_len` bytes (`0`: no jump optimization). The jump is `0xE9` followed by the
/// trampoline's number, padded with `0xCC`. Patches are applied as written (this is the memory,
/// not a live-patch protocol: `probe_arch_x86_64::live_patch` is one), and checked against what
/// the code holds.
#[derive(Debug)]
pub struct ByteCode<L: RawLock + Default = SpinLock> {
    original: Vec<u8>,
    /// Instruction length at each instruction start (0 inside an instruction).
    lengths: Vec<u8>,
    jump_len: usize,
    code: Lock<L, Vec<u8>>,
    branch_targets: Lock<L, BTreeMap<u64, ()>>,
    unrelocatable: Lock<L, BTreeMap<u64, ()>>,
    /// Trampoline number → live.
    trampolines: Lock<L, BTreeMap<u64, bool>>,
    counts: Lock<L, CodeCounts>,
}

/// Where [`ByteCode`]'s trampolines live (number `n` at `TRAMPOLINES + 64 n`).
pub const TRAMPOLINES: u64 = 0x1000_0000;

impl<L: RawLock + Default> ByteCode<L> {
    /// A text of one-byte instructions `original`, with jumps of `jump_len` bytes.
    pub fn new(original: Vec<u8>, jump_len: usize) -> Self {
        let lengths = alloc::vec![1; original.len()];
        Self {
            code: Lock::new(L::default(), original.clone()),
            original,
            lengths,
            jump_len: jump_len.min(crate::arch::MAX_DETOUR),
            branch_targets: Lock::default(),
            unrelocatable: Lock::default(),
            trampolines: Lock::default(),
            counts: Lock::default(),
        }
    }

    /// Makes the next `n` calls to [`CodeSpace::patch`] fail with `Error::Embedder(-5)` (EIO)
    /// and leave the code as it was — the all-or-nothing contract of a failing embedder.
    pub fn fail_patches(&self, n: u64) {
        self.counts.lock().fail_next = n;
    }

    /// Sets the instruction lengths, in order from address 0 (the rest stay one byte).
    pub fn with_lengths(mut self, lengths: &[u8]) -> Self {
        let mut at = 0usize;
        for &n in lengths {
            let n = usize::from(n.max(1));
            if at + n > self.lengths.len() {
                break;
            }
            self.lengths[at] = n as u8;
            for l in &mut self.lengths[at + 1..at + n] {
                *l = 0;
            }
            at += n;
        }
        self
    }

    /// Marks `addr` as a branch target (a jump may not cover it past its first byte).
    pub fn add_branch_target(&self, addr: u64) {
        self.branch_targets.lock().insert(addr, ());
    }

    /// Marks the instruction at `addr` as impossible to relocate.
    pub fn add_unrelocatable(&self, addr: u64) {
        self.unrelocatable.lock().insert(addr, ());
    }

    /// The current code at `[addr, addr + n)` (bytes past the end read as 0).
    pub fn current(&self, addr: u64, n: usize) -> Vec<u8> {
        let c = self.code.lock();
        (0..n)
            .map(|i| {
                usize::try_from(addr)
                    .ok()
                    .and_then(|a| c.get(a + i).copied())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The original code at `[addr, addr + n)`.
    pub fn original(&self, addr: u64, n: usize) -> &[u8] {
        let a = usize::try_from(addr)
            .unwrap_or(usize::MAX)
            .min(self.original.len());
        &self.original[a..(a + n).min(self.original.len())]
    }

    /// The counters.
    pub fn counts(&self) -> CodeCounts {
        *self.counts.lock()
    }

    fn range(&self, addr: u64, n: usize) -> Result<core::ops::Range<usize>> {
        let a = usize::try_from(addr).map_err(|_| Error::OffsetOutOfRange)?;
        let end = a.checked_add(n).ok_or(Error::OffsetOutOfRange)?;
        if end > self.original.len() {
            return Err(Error::OffsetOutOfRange);
        }
        Ok(a..end)
    }
}

impl<L: RawLock + Default + Send + Sync> CodeSpace for ByteCode<L> {
    type Arch = Int3;

    fn read_original(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.original[r]);
        Ok(())
    }

    fn check_boundary(&self, addr: u64) -> Result<()> {
        let r = self.range(addr, 1)?;
        if self.lengths[r.start] == 0 {
            return Err(Error::InsideInstruction);
        }
        Ok(())
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.code.lock()[r]);
        Ok(())
    }

    fn prepare_detour(&self, addr: u64) -> core::result::Result<Detour, NotOptimizable> {
        if self.jump_len == 0 {
            return Err(NotOptimizable::Unsupported);
        }
        let start = usize::try_from(addr).map_err(|_| NotOptimizable::TooShort)?;
        if self.lengths.get(start).copied().unwrap_or(0) == 0 {
            // Not an instruction start (the optimizer checks boundaries before asking).
            return Err(NotOptimizable::Unrelocatable { addr });
        }
        let mut len = 0usize;
        while len < self.jump_len {
            let at = start + len;
            let n = usize::from(*self.lengths.get(at).ok_or(NotOptimizable::TooShort)?);
            if self.unrelocatable.lock().contains_key(&(at as u64)) {
                return Err(NotOptimizable::Unrelocatable { addr: at as u64 });
            }
            if len > 0 && self.branch_targets.lock().contains_key(&(at as u64)) {
                return Err(NotOptimizable::BranchTarget { addr: at as u64 });
            }
            len += n.max(1);
        }
        if start + len > self.original.len() || len > crate::arch::MAX_DETOUR {
            return Err(NotOptimizable::TooShort);
        }
        let mut t = self.trampolines.lock();
        let id = t.len() as u64;
        t.insert(id, true);
        self.counts.lock().live_trampolines += 1;
        let mut jump = [0xCC; crate::arch::MAX_DETOUR];
        jump[0] = 0xE9;
        for (i, b) in id.to_le_bytes().iter().take(len - 1).enumerate() {
            jump[1 + i] = *b;
        }
        Ok(Detour {
            len: len as u8,
            jump,
            trampoline: TRAMPOLINES + 64 * id,
            displaced: TRAMPOLINES + 64 * id + 32,
        })
    }

    fn free_detour(&self, detour: &Detour) {
        let id = (detour.trampoline - TRAMPOLINES) / 64;
        let mut t = self.trampolines.lock();
        let mut c = self.counts.lock();
        match t.get_mut(&id) {
            Some(live) if *live => {
                *live = false;
                c.live_trampolines -= 1;
            }
            _ => c.bad_frees += 1,
        }
    }

    fn patch(&self, batch: &[Patch]) -> Result<()> {
        let mut code = self.code.lock();
        let mut c = self.counts.lock();
        if c.fail_next > 0 {
            c.fail_next -= 1;
            c.failed += 1;
            return Err(crate::Error::Embedder(-5));
        }
        c.batches += 1;
        for p in batch {
            c.sites += 1;
            let Ok(r) = self.range(p.addr, p.old().len()) else {
                c.mismatches += 1;
                continue;
            };
            if code[r.clone()] != *p.old() {
                c.mismatches += 1;
            }
            code[r].copy_from_slice(p.new_bytes());
        }
        Ok(())
    }

    fn quiesce(&self) {
        self.counts.lock().quiesces += 1;
    }

    fn kick(&self) {
        self.counts.lock().kicks += 1;
    }
}

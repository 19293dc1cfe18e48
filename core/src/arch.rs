//! What probe-core needs from an instruction set and from the embedder's code memory.
//!
//! The protocols stay arch-free: [`Arch`] names the breakpoint and recognises traps (the arch
//! crates implement it for x86_64 and aarch64); [`TextPatcher`] reads an object's original bytes
//! and reads and writes code in an address space (a kernel: the page cache and `text_poke` /
//! `access_process_vm`; a process: an alias mapping; a test: a byte buffer).

use crate::error::Result;
use crate::mm::{MmId, VmaInfo};
use crate::probe::ObjectId;

/// The most bytes a breakpoint replaces (x86: 1, aarch64: 4).
pub const MAX_BREAKPOINT: usize = 8;

/// An instruction set, as far as breakpoints go.
pub trait Arch: Send + Sync + 'static {
    /// The breakpoint instruction (at most [`MAX_BREAKPOINT`] bytes).
    const BREAKPOINT: &'static [u8];
    /// Is the instruction starting at `bytes[0]` a trap instruction (ours or the program's)?
    fn is_trap(bytes: &[u8]) -> bool;
}

/// The original bytes a breakpoint replaced, saved when the probe was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SavedInsn {
    bytes: [u8; MAX_BREAKPOINT],
    len: u8,
}

impl SavedInsn {
    /// Saves `bytes` (at most [`MAX_BREAKPOINT`]; longer input is cut).
    pub fn new(bytes: &[u8]) -> Self {
        let n = bytes.len().min(MAX_BREAKPOINT);
        let mut b = [0; MAX_BREAKPOINT];
        b[..n].copy_from_slice(&bytes[..n]);
        Self {
            bytes: b,
            len: n as u8,
        }
    }
    /// The saved bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// The embedder's access to code: original object bytes, and code in an address space.
///
/// probe-core calls `read` and `write` with the address space's lock held and the mapping that
/// contains `vaddr`; the arch crate's live-patch protocol lives behind `write`.
pub trait TextPatcher: Send + Sync {
    /// Reads the object's own bytes at `offset` (what the file holds, before any breakpoint).
    /// Returns [`crate::Error::OffsetOutOfRange`] if `offset + buf.len()` is past its end.
    fn read_object(&self, object: ObjectId, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Reads code at `vaddr` in address space `mm` (mapped by `vma`).
    fn read(&self, mm: MmId, vma: &VmaInfo, vaddr: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes code at `vaddr` in address space `mm` (mapped by `vma`).
    fn write(&self, mm: MmId, vma: &VmaInfo, vaddr: u64, bytes: &[u8]) -> Result<()>;
    /// Reads the bytes of an execute-out-of-line slot of `mm`.
    fn read_xol(&self, mm: MmId, addr: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes an instruction into an execute-out-of-line slot of `mm` (the caller owns the slot).
    fn write_xol(&self, mm: MmId, addr: u64, bytes: &[u8]) -> Result<()>;
    /// Makes `len` bytes written at `addr` of `mm` visible to instruction fetch (x86: nothing
    /// beyond a serializing event; aarch64: `DC CVAU`, `DSB ISH`, `IC IVAU`, `DSB ISH`, `ISB`).
    fn flush_icache(&self, mm: MmId, addr: u64, len: usize) -> Result<()>;
    /// `[start, end)` of `mm` was unmapped. Memory follows mappings in a real address space, so
    /// the default does nothing; a model patcher drops what it kept for the range.
    ///
    /// Called with the address space's write lock held, so hits that cannot speculate wait for
    /// it: its cost must follow the range, not the number of breakpoints anywhere (the contention
    /// report caught an O(all breakpoints) version holding the lock ~1 ms per unmap).
    fn unmapped(&self, _mm: MmId, _start: u64, _end: u64) {}
    /// `len` bytes of `mm` moved from `from` to `to` (mremap). Default: nothing.
    fn moved(&self, _mm: MmId, _from: u64, _to: u64, _len: u64) {}
    /// `child` was forked from `parent` (copy-on-write: the child sees the parent's code,
    /// breakpoints included). Default: nothing.
    fn forked(&self, _parent: MmId, _child: MmId) {}
}

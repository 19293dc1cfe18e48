//! The near-code area: a memfd mapped twice within reach of the text (read+execute for the
//! threads, read+write for us), holding the out-of-line copies and the trampolines; and the map
//! from a probed address to its `ProbeCtx`.

use super::*;

/// A memfd mapped twice: read+execute near the code, read+write for us.
pub(super) struct XolArea {
    pub(super) rx: u64,
    pub(super) rw: *mut u8,
    pub(super) len: usize,
    pub(super) next: usize,
}

// SAFETY: `rw` is only written under the writer mutex.
unsafe impl Send for XolArea {}

pub(super) const XOL_AREA: usize = 1 << 20;
pub(super) const XOL_SLOT: usize = 64;

impl XolArea {
    /// Maps the area within ±1 GiB of `near` (so RIP-relative operands of the code still reach).
    pub(super) fn map(near: u64) -> Result<Self, LiveError> {
        // SAFETY: memfd_create with a valid C string; ftruncate on our own fd.
        let fd = unsafe { libc::memfd_create(c"probe-core-xol".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: our fd.
        if unsafe { libc::ftruncate(fd, XOL_AREA as i64) } != 0 {
            return Err(os("ftruncate"));
        }
        let mut rx = None;
        for k in 1..64u64 {
            for hint in [near.wrapping_sub(k << 24), near.wrapping_add(k << 24)] {
                let hint = hint & !0xFFF;
                // SAFETY: a new shared mapping of our memfd; FIXED_NOREPLACE never replaces an
                // existing mapping.
                let p = unsafe {
                    libc::mmap(
                        hint as *mut libc::c_void,
                        XOL_AREA,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
                        fd,
                        0,
                    )
                };
                if p != libc::MAP_FAILED {
                    rx = Some(p as u64);
                    break;
                }
            }
            if rx.is_some() {
                break;
            }
        }
        // SAFETY: a new shared read+write mapping of our memfd.
        let rw = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                XOL_AREA,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        // SAFETY: the mappings keep the memory alive.
        unsafe { libc::close(fd) };
        let rx = rx.ok_or(LiveError::Full)?;
        if rw == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        Ok(Self {
            rx,
            rw: rw.cast(),
            len: XOL_AREA,
            next: 0,
        })
    }

    /// Reserves `len` bytes (a power of two, at least 64), aligned to `len` from the area's
    /// start (so the quiescence scan finds a trampoline's start from any address inside it), and
    /// returns their executable address.
    pub(super) fn alloc(&mut self, len: usize) -> Option<u64> {
        let start = self.next.next_multiple_of(len);
        if start + len > self.len {
            return None;
        }
        self.next = start + len;
        Some(self.rx + start as u64)
    }

    /// Writes `bytes` at executable address `at` (reserved by `alloc`), through the alias.
    ///
    /// The caller guarantees no thread executes `[at, at + len)` now: a fresh reservation is
    /// published only after this write (XolMap's Release store, or the optimizer's patch that
    /// writes the jump to it), and a freed trampoline is reused only after a quiescence wait.
    pub(super) fn write(&mut self, at: u64, bytes: &[u8]) {
        let off = (at - self.rx) as usize;
        assert!(off + bytes.len() <= self.len, "write outside the XOL area");
        // SAFETY: in bounds of the alias mapping (checked); nobody executes it (above).
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.rw.add(off), bytes.len()) };
    }

    /// Writes `copy` (made for the next slot's address) and returns that address.
    pub(super) fn push(
        &mut self,
        make: impl FnOnce(u64) -> Result<xol::XolCopy, Refusal>,
    ) -> Result<u64, LiveError> {
        let at = self.alloc(XOL_SLOT).ok_or(LiveError::Full)?;
        match make(at) {
            Ok(copy) => {
                self.write(at, copy.bytes());
                Ok(at)
            }
            Err(e) => {
                // Give the fresh slot back: nothing references it.
                self.next = (at - self.rx) as usize;
                Err(LiveError::Refused(e))
            }
        }
    }
}

/// Probe address → its [`ProbeCtx`] (XOL copy address, trampoline hit list), readable from the
/// trap handler: open addressing over a fixed table, insert-only (a context and its copy are
/// kept for the life of the process).
///
/// # Invariants
///
/// * INVARIANT: a nonzero key is never changed again, and its value was stored before it.
pub(super) struct XolMap {
    pub(super) keys: Box<[AtomicU64]>,
    pub(super) vals: Box<[AtomicU64]>,
}

pub(super) const XOL_MAP: usize = 1 << 14;

impl XolMap {
    pub(super) fn new() -> Self {
        Self {
            keys: (0..XOL_MAP).map(|_| AtomicU64::new(0)).collect(),
            vals: (0..XOL_MAP).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub(super) fn start(addr: u64) -> usize {
        (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 50) as usize % XOL_MAP
    }
    /// Lock-free lookup (the handler).
    pub(super) fn get(&self, addr: u64) -> Option<&'static ProbeCtx> {
        let mut i = Self::start(addr);
        for _ in 0..XOL_MAP {
            // Acquire pairs with the Release store of the key in `insert`: the value is visible.
            match self.keys[i].load(Ordering::Acquire) {
                0 => return None,
                // Relaxed: ordered by the Acquire load of its key just above (pairs with `insert`).
                k if k == addr => {
                    let p = self.vals[i].load(Ordering::Relaxed) as *const ProbeCtx;
                    // SAFETY: values are leaked `ProbeCtx`s (`insert`), never freed.
                    return Some(unsafe { &*p });
                }
                _ => i = (i + 1) % XOL_MAP,
            }
        }
        None
    }
    /// Insert (writers, under the writer mutex).
    pub(super) fn insert(&self, addr: u64, ctx: &'static ProbeCtx) -> Result<(), LiveError> {
        let val = ctx as *const ProbeCtx as u64;
        let mut i = Self::start(addr);
        for _ in 0..XOL_MAP / 2 {
            // Relaxed: only writers (serialized by the writer mutex) write the keys.
            if self.keys[i].load(Ordering::Relaxed) == 0 {
                // Relaxed: published by the Release store of the key just below.
                self.vals[i].store(val, Ordering::Relaxed);
                // INVARIANT: value first, key last. Release pairs with the Acquire in `get`.
                self.keys[i].store(addr, Ordering::Release);
                return Ok(());
            }
            i = (i + 1) % XOL_MAP;
        }
        Err(LiveError::Full)
    }
}

//! Near-code areas: memfds each mapped twice within reach of some object's code (read+execute
//! for the threads, read+write for us), holding the out-of-line copies and the trampolines of
//! the probes near it; and the map from a probed address to its `ProbeCtx`.
//!
//! One area serves every object within reach of it: an x86-64 `jmp rel32` and a RIP-relative
//! operand reach ±2 GiB, so an area within 1 GiB of both ends of itself from a probe serves that
//! probe (a shared library is far smaller than the slack). The executable and the shared
//! libraries are usually terabytes apart, so a process gets one area near the executable and one
//! near the libraries, mapped when the first probe there is attached.
//!
//! # Invariants
//!
//! * INVARIANT: an area's slot in [`Areas`]'s lock-free table is written once (its resume table
//!   first, its start last, Release) and never cleared: areas live as long as the process.

use super::*;

/// A memfd mapped twice: read+execute near the code, read+write for us.
pub(super) struct XolArea {
    pub(super) rx: u64,
    pub(super) rw: *mut u8,
    pub(super) len: usize,
    pub(super) next: usize,
    /// Per 64-byte block: for an XOL copy, where it jumps back to (0 otherwise); read by the
    /// quiescence scan through [`Areas::resume_of`].
    pub(super) resume: &'static [AtomicU64],
}

// SAFETY: `rw` is only written under the areas' mutex.
unsafe impl Send for XolArea {}

pub(super) const XOL_AREA: usize = 1 << 20;
pub(super) const XOL_SLOT: usize = 64;
/// How many areas a process may have (one or more per far-apart group of objects: a full area
/// gets a neighbour).
pub(super) const MAX_AREAS: usize = 64;
/// How far an area may be from a probe it serves, either end (the instruction set's: a fraction
/// of its direct jump's reach).
const REACH: u64 = isa::AREA_REACH;

impl XolArea {
    /// Maps an area within reach of `near` (`isa::AREA_REACH`: so a jump from the code, and
    /// the code's PC-relative operands from a copy, still reach).
    pub(super) fn map(near: u64) -> Result<Self, LiveError> {
        // SAFETY: memfd_create with a valid C string; ftruncate on our own fd.
        let fd = unsafe { libc::memfd_create(c"probe-core-xol".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: our fd.
        if unsafe { libc::ftruncate(fd, XOL_AREA as i64) } != 0 {
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
            return Err(os("ftruncate"));
        }
        let mut rx = None;
        'search: for k in 1..60u64 {
            for hint in [
                near.wrapping_sub(k * isa::AREA_STEP),
                near.wrapping_add(k * isa::AREA_STEP),
            ] {
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
                if p == libc::MAP_FAILED {
                    continue;
                }
                // A kernel (or emulator) that does not know MAP_FIXED_NOREPLACE takes the
                // address as a hint only: keep the mapping only if it is within reach.
                let (lo, hi) = (p as u64, p as u64 + XOL_AREA as u64);
                if lo.abs_diff(near) < REACH && hi.abs_diff(near) < REACH {
                    rx = Some(lo);
                    break 'search;
                }
                // SAFETY: the mapping just made, nobody else knows it.
                unsafe { libc::munmap(p, XOL_AREA) };
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
        let resume: Box<[AtomicU64]> = (0..XOL_AREA / XOL_SLOT)
            .map(|_| AtomicU64::new(0))
            .collect();
        Ok(Self {
            rx,
            rw: rw.cast(),
            len: XOL_AREA,
            next: 0,
            // INVARIANT (module): areas live as long as the process.
            resume: Box::leak(resume),
        })
    }

    /// Whether this area serves a probe at `addr` (both its ends within reach).
    fn reaches(&self, addr: u64) -> bool {
        let (lo, hi) = (self.rx, self.rx + self.len as u64);
        lo.abs_diff(addr) < REACH && hi.abs_diff(addr) < REACH
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
    fn write(&mut self, at: u64, bytes: &[u8]) {
        let off = (at - self.rx) as usize;
        assert!(off + bytes.len() <= self.len, "write outside the XOL area");
        // SAFETY: in bounds of the alias mapping (checked); nobody executes it (above).
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.rw.add(off), bytes.len()) };
    }
}

/// Every near-code area: the list the writers allocate from, and a fixed table the quiescence
/// scan reads without a lock (module invariant).
pub(super) struct Areas {
    list: Mutex<Vec<XolArea>>,
    /// Freed trampolines, reusable (freed after a quiescence wait); each stays in its area.
    free_trampolines: Mutex<Vec<u64>>,
    starts: Box<[AtomicU64]>,
    resumes: Box<[AtomicPtr<AtomicU64>]>,
}

impl Areas {
    pub(super) fn new() -> Self {
        Self {
            list: Mutex::new(Vec::new()),
            free_trampolines: Mutex::new(Vec::new()),
            starts: (0..MAX_AREAS).map(|_| AtomicU64::new(0)).collect(),
            resumes: (0..MAX_AREAS)
                .map(|_| AtomicPtr::new(core::ptr::null_mut()))
                .collect(),
        }
    }

    /// Runs `f` on an area serving `addr` with room for `len` more bytes, mapping one near it
    /// first if none has.
    fn with_near<T>(
        &self,
        addr: u64,
        len: usize,
        f: impl FnOnce(&mut XolArea) -> Result<T, LiveError>,
    ) -> Result<T, LiveError> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let i = match list
            .iter()
            .position(|a| a.reaches(addr) && a.next.next_multiple_of(len) + len <= a.len)
        {
            Some(i) => i,
            None => {
                if list.len() == MAX_AREAS {
                    return Err(LiveError::Full);
                }
                let area = XolArea::map(addr)?;
                let i = list.len();
                // Relaxed: published by the Release store of the start just below.
                self.resumes[i].store(area.resume.as_ptr().cast_mut(), Ordering::Relaxed);
                // INVARIANT (module): resume table first, start last. Release pairs with the
                // Acquire in `resume_of`.
                self.starts[i].store(area.rx, Ordering::Release);
                list.push(area);
                i
            }
        };
        f(&mut list[i])
    }

    /// Prepares the XOL copy of the probe at `addr` (`make` builds it for the slot's address)
    /// in an area near it; records where it jumps back (`resume`). Returns the copy's address.
    pub(super) fn push_xol(
        &self,
        addr: u64,
        resume: u64,
        make: impl FnOnce(u64) -> Result<Vec<u8>, LiveError>,
    ) -> Result<u64, LiveError> {
        self.with_near(addr, XOL_SLOT, |area| {
            let at = area.alloc(XOL_SLOT).ok_or(LiveError::Full)?;
            match make(at) {
                Ok(copy) => {
                    area.write(at, &copy);
                    isa::code_written(at, copy.len());
                    let block = ((at - area.rx) as usize) / XOL_SLOT;
                    // Release pairs with the Acquire in `resume_of`.
                    area.resume[block].store(resume, Ordering::Release);
                    Ok(at)
                }
                Err(e) => {
                    // Give the fresh slot back: nothing references it.
                    area.next = (at - area.rx) as usize;
                    Err(e)
                }
            }
        })
    }

    /// A trampoline's room (`len` bytes) near `addr`: a freed one within reach, or a new one.
    pub(super) fn alloc_trampoline(&self, addr: u64, len: usize) -> Option<(u64, bool)> {
        {
            let mut free = self
                .free_trampolines
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(i) = free
                .iter()
                .position(|&t| t.abs_diff(addr) < REACH && (t + len as u64).abs_diff(addr) < REACH)
            {
                return Some((free.swap_remove(i), true));
            }
        }
        self.with_near(addr, len, |area| area.alloc(len).ok_or(LiveError::Full))
            .ok()
            .map(|at| (at, false))
    }

    /// Gives a trampoline back for reuse (after a quiescence wait).
    pub(super) fn free_trampoline(&self, at: u64) {
        self.free_trampolines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(at);
    }

    /// Writes code at `at`, inside an area (reserved by `push_xol` or `alloc_trampoline`).
    pub(super) fn write(&self, at: u64, bytes: &[u8]) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = list
            .iter_mut()
            .find(|a| at >= a.rx && at < a.rx + a.len as u64)
        {
            a.write(at, bytes);
            isa::code_written(at, bytes.len());
        }
    }

    /// For the quiescence scan (lock-free): if `rip` is in an area, its start and the resume
    /// address of its 64-byte block (0 for a trampoline block).
    pub(super) fn resume_of(&self, rip: u64) -> Option<(u64, u64)> {
        for (start, resume) in self.starts.iter().zip(self.resumes.iter()) {
            // Acquire pairs with the Release store in `with_near`.
            let lo = start.load(Ordering::Acquire);
            if lo == 0 {
                return None;
            }
            if rip >= lo && rip < lo + XOL_AREA as u64 {
                // Relaxed: stored before the start this thread loaded with Acquire.
                let table = resume.load(Ordering::Relaxed);
                let block = ((rip - lo) as usize) / XOL_SLOT;
                // SAFETY: the table has XOL_AREA / XOL_SLOT entries and lives for the process
                // (module invariant); `block` is below that.
                let r = unsafe { &*table.add(block) };
                // Acquire pairs with the Release store in `push_xol`.
                return Some((lo, r.load(Ordering::Acquire)));
            }
        }
        None
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

pub(super) const XOL_MAP: usize = 1 << 16;

impl XolMap {
    pub(super) fn new() -> Self {
        Self {
            keys: (0..XOL_MAP).map(|_| AtomicU64::new(0)).collect(),
            vals: (0..XOL_MAP).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub(super) fn start(addr: u64) -> usize {
        (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - XOL_MAP.trailing_zeros())) as usize
            % XOL_MAP
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

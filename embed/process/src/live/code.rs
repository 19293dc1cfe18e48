//! The process's code as the optimizer's `CodeSpace`: writes through `/proc/self/mem` with the
//! x86 crate's int3-first live patch and `membarrier` as its sync, trampolines, and the table of
//! prepared jump ranges the quiescence scan reads.

use super::*;

/// The process's code as the optimizer's [`CodeSpace`]: every executable file mapping.
pub(super) struct ProcessCode {
    /// The images of the objects mapped (or probed) so far.
    pub(super) images: Images,
    /// The process's file mappings, from `/proc/self/maps`: the hit path resolves an address to
    /// its (object, file offset) key by speculating on it (core's seqcount protocol), lock-free;
    /// the writers find an address's object and function through it.
    pub(super) mm: AddressSpace,
    pub(super) mem: ProcMem,
    /// XOL copies and trampolines, in areas near the code they serve.
    pub(super) areas: Areas,
    /// Jump ranges of prepared detours: a thread stopped strictly inside one must not resume
    /// after its jump goes in (the quiescence scan reads this).
    pub(super) ranges: RangeTable,
    /// How a trampoline saves the extended state around full-state consumers, chosen at
    /// install from CPUID ([`probe_arch_x86_64::xstate`]).
    #[cfg(target_arch = "x86_64")]
    pub(super) xstate: XState,
    /// Probe address → its [`ProbeCtx`] (XOL copy, consumer list for trampolines).
    pub(super) xol_map: XolMap,
    /// Retired trampolines ([`CodeSpace::retire_detour`]: nothing can enter them any more),
    /// until `free_detour`.
    pub(super) retiring: Box<[AtomicU64]>,
    /// Retired trampolines the table had no room for, until their `free_detour`: while any
    /// is, every trampoline counts as retiring (a wait that may last longer, never a free
    /// under a thread).
    pub(super) retiring_overflow: AtomicU64,
    /// Which trampolines `retiring_overflow` counts (the optimizer's side only).
    pub(super) overflowed: Mutex<Vec<u64>>,
    /// Statistics (Relaxed counters, writer side only).
    pub(super) trampolines_made: AtomicU64,
    pub(super) trampolines_reused: AtomicU64,
    pub(super) trampolines_freed: AtomicU64,
}

pub(super) const RETIRING: usize = 1024;

impl ProcessCode {
    /// The quiescence test for one thread, from its signal handler: could it still be inside
    /// code that the optimizer is about to overwrite or free? `rip` is where it was interrupted,
    /// `tramp` the trampoline whose consumers it is running (and how deep).
    ///
    /// * strictly inside a prepared jump range (past its first byte): the jump would land in
    ///   the middle of it when written;
    /// * in an XOL copy that jumps back strictly inside a prepared jump range (same reason);
    /// * in a retiring trampoline, or running consumers called from one (its return address is
    ///   there).
    ///
    /// A thread in another probe's copy or a live trampoline is not inside: a busy program whose
    /// threads keep hitting probes still quiesces.
    pub(super) fn inside(&self, rip: u64, tramp: (u64, u32)) -> bool {
        if tramp.1 > 1 || (tramp.1 == 1 && self.is_retiring(tramp.0)) {
            return true;
        }
        if self.ranges.inside(rip) {
            return true;
        }
        let Some((lo, resume)) = self.areas.resume_of(rip) else {
            return false;
        };
        if resume != 0 {
            return self.ranges.inside(resume);
        }
        // A trampoline block: which trampoline (they are TRAMPOLINE-aligned from `lo`)?
        let start = lo + (rip - lo) / TRAMPOLINE as u64 * TRAMPOLINE as u64;
        self.is_retiring(start)
    }

    /// A freed detour's trampoline: out of the range table and the retiring list, back to its
    /// area's free list. The optimizer calls this after a quiescence wait that followed the
    /// removal of every way into the trampoline: it can be reused.
    pub(super) fn release_trampoline(&self, tramp: u64) {
        self.ranges.remove(tramp);
        let mut listed = false;
        for r in self.retiring.iter() {
            // Relaxed: the retiring table is written only by the optimizer's (this) thread.
            if r.load(Ordering::Relaxed) == tramp {
                // Relaxed: only this (the optimizer's) thread writes the table.
                r.store(0, Ordering::Relaxed);
                listed = true;
            }
        }
        let mut over = self.overflowed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = over.iter().position(|t| *t == tramp).filter(|_| !listed) {
            // One of the overflow's: its free follows a wait that counted every trampoline.
            over.swap_remove(i);
            // Relaxed: readers only compare it with zero, and a stale non-zero answer only
            // makes a wait longer.
            self.retiring_overflow.fetch_sub(1, Ordering::Relaxed);
        }
        drop(over);
        self.areas.free_trampoline(tramp);
        // Relaxed: statistics.
        self.trampolines_freed.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn is_retiring(&self, tramp: u64) -> bool {
        // Acquire pairs with the Release store in `retire` (both loads).
        self.retiring_overflow.load(Ordering::Acquire) > 0
            || self
                .retiring
                .iter()
                .any(|r| r.load(Ordering::Acquire) == tramp)
    }

    pub(super) fn retire(&self, tramp: u64) {
        if self
            .retiring
            .iter()
            // Relaxed: the table is written only by the optimizer's (this) thread.
            .any(|r| r.load(Ordering::Relaxed) == tramp)
        {
            return;
        }
        for r in self.retiring.iter() {
            // Relaxed: the retiring table is written only by the optimizer's (this) thread.
            if r.load(Ordering::Relaxed) == 0 {
                // Release pairs with the Acquire in `is_retiring`.
                r.store(tramp, Ordering::Release);
                return;
            }
        }
        // No room: count it (see `retiring_overflow`).
        let mut over = self.overflowed.lock().unwrap_or_else(|e| e.into_inner());
        if !over.contains(&tramp) {
            over.push(tramp);
            // Release pairs with the Acquire in `is_retiring`.
            self.retiring_overflow.fetch_add(1, Ordering::Release);
        }
    }
}

/// The `CodeSpace` methods both instruction sets' impls share: the original code from the
/// object images, boundaries, live reads, retiring trampolines, the quiescence wait, the
/// optimizer thread's kick.
macro_rules! shared_code_space_methods {
    () => {
        fn read_original(&self, addr: u64, buf: &mut [u8]) -> probe_core::Result<()> {
            self.original_at(addr, buf)
        }

        fn check_boundary(&self, addr: u64) -> probe_core::Result<()> {
            self.boundary_at(addr)
        }

        fn read(&self, addr: u64, buf: &mut [u8]) -> probe_core::Result<()> {
            self.read_live(addr, buf)
        }

        fn retire_detour(&self, detour: &Detour) {
            // From now until its free, a thread found inside it keeps the quiescence wait
            // waiting. Only a trampoline nothing can enter any more is retired: a live one
            // (its probe forced back to a breakpoint by a collision, say) is entered by every
            // hit, and a wait that looked in it would never end.
            self.retire(detour.trampoline);
        }

        fn quiesce(&self) {
            quiesce(self);
        }

        fn kick(&self) {
            // Called with the optimizer's lock held: only wake the optimizer thread, if any.
            if let Some(t) = OPTIMIZER_THREAD.get() {
                t.unpark();
            }
        }
    };
}
pub(super) use shared_code_space_methods;

/// Writes code through `/proc/self/mem` (what debuggers use): the kernel writes the page for
/// us, breaking copy-on-write of the file-backed text, and the page's protection never changes.
pub(super) struct ProcMem(pub(super) File);

impl ProcessCode {
    pub(super) fn original_at(&self, addr: u64, buf: &mut [u8]) -> probe_core::Result<()> {
        let (image, off) = self
            .locate(addr)
            .ok_or(probe_core::Error::OffsetOutOfRange)?;
        image
            .original(off, buf)
            .ok_or(probe_core::Error::OffsetOutOfRange)
    }

    pub(super) fn boundary_at(&self, addr: u64) -> probe_core::Result<()> {
        let (start, func) = self
            .function_code(addr)
            .ok_or(probe_core::Error::OffsetOutOfRange)?;
        isa::check_boundary(&func, start, addr)
    }

    pub(super) fn read_live(&self, addr: u64, buf: &mut [u8]) -> probe_core::Result<()> {
        // Called from the trap handler for an address just executed (mapped, readable text).
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `addr..addr+len` is the trapping instruction's bytes, in a mapped text page
            // (the CPU just fetched it); a volatile read because other threads patch it.
            *b = unsafe { core::ptr::read_volatile((addr as usize + i) as *const u8) };
        }
        Ok(())
    }

    /// The sites of `batch` whose object is still mapped where its probe was armed.
    ///
    /// A site whose object is no longer mapped there (`dlclose`, then perhaps another file at
    /// that address) has no code of ours left to change: its patch is done by leaving it alone
    /// — the pages went with the mapping, and writing there now could only corrupt whatever is
    /// mapped there next. Linux's uprobes get this from the mm; we check the model, which
    /// `refresh_mappings` keeps (the window between the program's `munmap` and our refresh is
    /// the one place this can be wrong: a write there fails with EIO, and the batch rolls back
    /// and is retried).
    pub(super) fn sites_still_mapped(&self, batch: &[Patch]) -> Vec<Patch> {
        batch
            .iter()
            .filter(|p| {
                let here = self.mm.locked_find(p.addr, |v| v.map(|v| v.object));
                let ours = self
                    .xol_map
                    .get(p.addr)
                    // Relaxed: written under the writer lock, which our caller holds too.
                    .map(|c| ObjectId(c.object.load(Ordering::Relaxed)));
                here.is_some() && here == ours
            })
            .copied()
            .collect()
    }

    /// Where `addr` is now: its object's image and its file offset (writers: takes the model's
    /// lock).
    pub(super) fn locate(&self, addr: u64) -> Option<(Arc<Image>, u64)> {
        let (object, offset) = self.mm.locked_find(addr, |v| {
            v.filter(|v| v.flags.contains(probe_core::mm::VmFlags::EXEC))
                .map(|v| (v.object, v.offset_of(addr)))
        })?;
        Some((self.images.get(object)?, offset))
    }

    /// The function containing `addr`, as mapped now: its runtime start and its original bytes.
    pub(super) fn function_code(&self, addr: u64) -> Option<(u64, Vec<u8>)> {
        let (image, off) = self.locate(addr)?;
        let &(start, end, _) = image.function_at(off)?;
        let mut func = std::vec![0u8; usize::try_from(end - start).ok()?];
        image.original(start, &mut func)?;
        Some((addr - (off - start), func))
    }

    /// Where file offset `offset` of `object` is mapped executable now, if it is.
    pub(super) fn address_of(&self, key: ProbeKey) -> Option<u64> {
        self.mm.mappings().iter().find_map(|m| {
            (m.object == key.object
                && m.flags.contains(probe_core::mm::VmFlags::EXEC)
                && key.offset >= m.pgoff
                && key.offset - m.pgoff < m.end - m.start)
                .then(|| m.start + (key.offset - m.pgoff))
        })
    }
}

/// Prepared jump ranges, keyed by their trampoline: written by the optimizer's thread, read by
/// the quiescence signal handler (lock-free).
///
/// # Invariants
///
/// * INVARIANT: an entry's `start`/`end` are stored before its `tramp` key (Release) and the key
///   is cleared before they are reused.
pub(super) struct RangeTable {
    pub(super) tramp: Box<[AtomicU64]>,
    pub(super) start: Box<[AtomicU64]>,
    pub(super) end: Box<[AtomicU64]>,
}

pub(super) const RANGES: usize = 4096;

impl RangeTable {
    pub(super) fn new() -> Self {
        let v = || (0..RANGES).map(|_| AtomicU64::new(0)).collect();
        Self {
            tramp: v(),
            start: v(),
            end: v(),
        }
    }
    /// Writers only (the optimizer's lock serializes them).
    pub(super) fn insert(&self, tramp: u64, start: u64, end: u64) -> bool {
        for i in 0..RANGES {
            // Relaxed: only writers (serialized by the optimizer's lock) write the keys.
            if self.tramp[i].load(Ordering::Relaxed) == 0 {
                // Relaxed: published by the Release store of the key below.
                self.start[i].store(start, Ordering::Relaxed);
                self.end[i].store(end, Ordering::Relaxed);
                // INVARIANT: bounds first. Release pairs with the Acquire in `inside`.
                self.tramp[i].store(tramp, Ordering::Release);
                return true;
            }
        }
        false
    }
    pub(super) fn remove(&self, tramp: u64) {
        for k in self.tramp.iter() {
            // Relaxed: the table's keys are written only by the optimizer's (this) thread.
            if k.load(Ordering::Relaxed) == tramp {
                // Relaxed: the scan that follows any reuse runs after a quiescence wait's
                // synchronization (signals and SeqCst counters).
                k.store(0, Ordering::Relaxed);
            }
        }
    }
    /// Is `rip` strictly inside a prepared jump range (past its first byte)?
    pub(super) fn inside(&self, rip: u64) -> bool {
        (0..RANGES).any(|i| {
            // Acquire pairs with the Release store in `insert`.
            self.tramp[i].load(Ordering::Acquire) != 0
                && rip > self.start[i].load(Ordering::Relaxed)
                // Relaxed: ordered after the Acquire load of the key (`insert` stored the bounds first).
                && rip < self.end[i].load(Ordering::Relaxed)
        })
    }
}

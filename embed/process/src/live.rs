//! Probes on the running process itself (x86_64 Linux): the process is the
//! "kernel", its threads are the "CPUs", its code pages are the "text".
//!
//! # What happens on a hit
//!
//! ```text
//!  thread runs INT3 at addr ──SIGTRAP──▶ handler (SA_SIGINFO, on the thread's stack, below the red zone)
//!     claim a pooled pair of RCU readers          (one atomic swap on this thread's own line)
//!     optimizer.on_breakpoint(addr)               (lock-free tree lookup, no store)
//!       Probe { fire, then }        → if fire: resolve addr → (object, file offset) by
//!                                     speculating on the address-space model, then run the
//!                                     consumers found in the registry under that key
//!         then: Step                → RIP = the probe's XOL copy (relocated insn + jmp back)
//!         then: Detour(d)           → RIP = d.displaced (the trampoline's displaced code)
//!       Restart                     → RIP = addr (the breakpoint went away meanwhile)
//!       NotOurs                     → the program's previous SIGTRAP handler
//!     release the readers; return (sigreturn resumes at RIP)
//! ```
//!
//! # Why the handler may do this
//!
//! A signal can interrupt a thread anywhere — inside `malloc`, holding any lock, or inside
//! probe-core's own writer paths. The handler therefore allocates nothing and takes no lock:
//! the optimizer's and the registry's read paths are lock-free and store-free (core proves this
//! with a test), and RCU readers come from a pool allocated at [`Live::install`], claimed with an
//! atomic swap. The interrupted thread can never hold a pooled reader (only handlers do, and
//! SIGTRAP is blocked while its own handler runs), so a claim waits at most for other threads'
//! handlers, which do not wait for anything. Writers (`attach`, `detach`) take a mutex the handler
//! never touches.
//!
//! # Writing code without W+X
//!
//! Code is written through `/proc/self/mem` (what debuggers use): the kernel writes the page for
//! us, breaking copy-on-write of the file-backed text, and the page's protection never changes —
//! no page is ever writable and executable. Multi-byte changes go through the int3-first protocol
//! ([`probe_arch_x86_64::live_patch`]) with `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` as the
//! cross-core sync. XOL copies live in a memfd mapped twice near the code: read+execute for the
//! threads, read+write for us.
//!
//! # XOL copies are per probe, not per thread
//!
//! Linux gives each thread its own XOL slot because its copy is single-stepped and fixed up
//! afterwards. Our copies ([`probe_arch_x86_64::xol`]) are pure code ending in a jump back — nothing to fix
//! up — so one copy per probe serves every thread at once, prepared when the probe is attached;
//! a hit only sets RIP.
//!
//! # The jump path
//!
//! Each optimizable probe gets a trampoline in the same near area: it steps over the red zone,
//! pushes the general registers and flags as the consumers' [`Regs`], and calls
//! `trampoline_entry` with the probe's own context (a trampoline serves one probe, so no lookup:
//! the context holds the probe's current consumer list, published by attach/detach under RCU).
//! If any consumer is a closure ([`Live::attach`]) the entry saves the whole extended state
//! with the cheapest correct instruction for this CPU ([`probe_arch_x86_64::xstate`]: `XSAVEC` over XCR0
//! here), hands the consumers the ABI's clean state, and restores it after; if every consumer is
//! register-only ([`Live::attach_raw`]) it saves nothing more. Then the trampoline pops
//! everything, runs the displaced instructions (relocated) and jumps back. The optimizer turns
//! probes into `jmp rel32` in delayed batches ([`Live::run_optimizer`], or the thread of
//! [`Live::start_optimizer`]) with the int3-first protocol.
//!
//! # Quiescence: when no thread can be inside
//!
//! Before a jump goes in, no thread may be stopped strictly inside the bytes it covers; before a
//! trampoline is reused, no thread may be inside it or running consumers called from it. A
//! process has no `synchronize_rcu_tasks`, so the wait ([`CodeSpace::quiesce`]) asks every other
//! thread: it sends each a real-time signal carrying a round number, and each answers from its
//! handler whether the interrupted RIP is strictly inside a prepared jump range, in an XOL copy
//! that jumps back into one, or in a trampoline that is retiring (or whether it is running that
//! trampoline's consumers, a thread-local flag). A round with every thread answering "outside"
//! ends the wait ([`probe_core::scan`]; the round number keeps late answers to an abandoned round
//! from completing a new one — loom-checked with its seeded bug). The SIGTRAP handler blocks the
//! scan's signal, so a thread redirected into a trampoline answers from there, never from just
//! before. Threads hitting *other* probes do not hold the wait up.
//!
//! One case the scan does not see: a thread interrupted inside a retiring trampoline by the
//! program's own signal handler, still running that handler when the scan asks (the scan sees the
//! innermost frame only). Trampolines are reused only after such a wait, so the window is a
//! program handler that outlives a whole optimizer batch at exactly that spot.
//!
//! Every thread must be able to take the scan's signal (`SIGRTMIN + 7`): a thread that blocks
//! it for good keeps every quiescence wait, and so the optimizer, waiting.
//!
//! XOL copies are not freed: there is one per probed address, reused when the address is probed
//! again, so their memory is bounded by the number of distinct addresses ever probed. Freeing
//! them would take the same scan; not done.

use probe_arch_x86_64::X86_64;
use probe_arch_x86_64::insn::{self, Insn, Refusal};
use probe_arch_x86_64::live_patch::{CodeWriter, patch_batch};
use probe_arch_x86_64::xol;
use probe_arch_x86_64::xstate::{SaveInsn, XState};
use probe_core::arch::{CodeSpace, Detour, NotOptimizable, Patch};
use probe_core::mm::{AddressSpace, AddressSpaceOps, MmId};
use probe_core::optimizer::{Optimizer, Then, Trap};
use probe_core::probe::{ObjectId, ProbeKey};
use probe_core::rcu::{Rcu, SlotRcu};
use probe_core::registry::Registry;
use probe_core::sync::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::boxed::Box;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::string::{String, ToString};
use std::sync::{Arc, Mutex, OnceLock};
use std::vec::Vec;

/// The registers a consumer sees: the interrupted thread's, as saved by the kernel (breakpoint
/// path) or pushed by the trampoline (jump path, where this struct *is* the pushed frame: its
/// layout is part of the trampoline's code).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    /// The probed instruction's address.
    pub rip: u64,
    pub rflags: u64,
}

/// A consumer: runs on every hit of its probe, in the signal handler of the thread that hit it,
/// so it must be async-signal-safe (no allocation, no locks another thread might hold).
pub type Consumer = dyn Fn(&Regs) + Send + Sync;

/// A register-only consumer ([`Live::attach_raw`]): integer code that touches no x87, MXCSR or
/// vector state — what an eBPF program's JIT output or a kernel optprobe handler is. Called with
/// the registers and the context pointer given at attach.
pub type RawConsumer = unsafe extern "C" fn(regs: &Regs, ctx: *mut core::ffi::c_void);

/// What the registry holds per consumer: a closure that may use any register state, or a
/// register-only function with its context.
enum Hook {
    /// A closure: its hits save and restore the whole extended state around it.
    Full(Arc<Consumer>),
    /// A register-only function: hits whose every consumer is one skip the extended state.
    Raw {
        /// The function.
        f: RawConsumer,
        /// Its context pointer, passed back on every call.
        ctx: usize,
    },
}

impl Hook {
    /// Calls it.
    #[inline(always)]
    fn call(&self, regs: &Regs) {
        match self {
            Hook::Full(c) => c(regs),
            // SAFETY: `attach_raw`'s contract: `f` may be called with any registers and `ctx`
            // until its detach returned (the hit holds a read section detach waits for).
            Hook::Raw { f, ctx } => unsafe { f(regs, *ctx as *mut core::ffi::c_void) },
        }
    }
}

/// Why a live operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum LiveError {
    /// [`Live::install`] was already called in this process.
    AlreadyInstalled,
    /// A system call failed.
    Os {
        /// What was being done.
        what: &'static str,
        /// `errno`.
        errno: i32,
    },
    /// The executable could not be read or parsed.
    Executable(String),
    /// No function symbol of that name (or containing that address).
    NoSymbol,
    /// The instruction there cannot be probed.
    Refused(Refusal),
    /// probe-core refused (inside an instruction, already a trap there, no memory, …).
    Core(probe_core::Error),
    /// The XOL area is full.
    Full,
    /// [`Live::attach_raw`] was given no function.
    NullConsumer,
}

impl fmt::Display for LiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyInstalled => f.write_str("live probes are already installed"),
            Self::Os { what, errno } => write!(f, "{what}: errno {errno}"),
            Self::Executable(e) => write!(f, "reading the executable: {e}"),
            Self::NoSymbol => f.write_str("no such function symbol"),
            Self::Refused(r) => write!(f, "cannot probe this instruction: {r}"),
            Self::Core(e) => write!(f, "{e:?}"),
            Self::Full => f.write_str("the XOL area is full"),
            Self::NullConsumer => f.write_str("attach_raw was given a null function"),
        }
    }
}

impl std::error::Error for LiveError {}

impl From<probe_core::Error> for LiveError {
    fn from(e: probe_core::Error) -> Self {
        Self::Core(e)
    }
}

fn os(what: &'static str) -> LiveError {
    LiveError::Os {
        what,
        errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
    }
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;

const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

/// The heavy half of the hit path's asymmetric fence ([`SlotRcu::with_heavy_barrier`]): every
/// running thread of the process executes a full barrier. Registered at install, after which
/// the kernel does not fail it; if it ever did, the grace period it belongs to would be unsound,
/// so the process stops rather than free memory a reader may hold.
fn heavy_barrier() {
    if membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED).is_err() {
        std::process::abort();
    }
}

/// The RCU domain of the hit path (shared by the optimizer and the registry): asymmetric (readers pay a compiler fence, grace periods a
/// membarrier) when the kernel has `MEMBARRIER_CMD_PRIVATE_EXPEDITED`, symmetric otherwise.
fn hit_rcu() -> SlotRcu {
    if membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED).is_ok() {
        // SAFETY: registered, so `heavy_barrier` makes every thread of this process (the only
        // ones that hold our readers) execute a full barrier before it returns.
        unsafe { SlotRcu::with_heavy_barrier(heavy_barrier) }
    } else {
        SlotRcu::new()
    }
}

fn membarrier(cmd: libc::c_int) -> Result<(), LiveError> {
    // SAFETY: membarrier takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(os("membarrier"))
    }
}

/// The executable as loaded: its bytes (the original code), segments, functions, load bias.
struct Image {
    bytes: Vec<u8>,
    /// (vaddr, file offset, file size), link-time addresses.
    segments: Vec<(u64, u64, u64)>,
    /// (runtime start, runtime end, name), sorted by start.
    functions: Vec<(u64, u64, String)>,
    bias: u64,
    inode: u64,
}

impl Image {
    fn load() -> Result<Self, LiveError> {
        use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};
        let exe = |e: &dyn fmt::Display| LiveError::Executable(e.to_string());
        let meta = std::fs::metadata("/proc/self/exe").map_err(|e| exe(&e))?;
        let inode = object_id(libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino()).0;
        let bytes = std::fs::read("/proc/self/exe").map_err(|e| exe(&e))?;
        let obj = object::File::parse(&*bytes).map_err(|e| exe(&e))?;
        let segments: Vec<(u64, u64, u64)> = obj
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (s.address(), off, size)
            })
            .collect();
        // The bias: where the mapping of file offset 0 starts, minus the segment's address.
        let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| exe(&e))?;
        let start = maps
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let ino = parse_maps_line(l)?.object.0;
                let off = u64::from_str_radix(f.get(2)?, 16).ok()?;
                let start = u64::from_str_radix(f.first()?.split('-').next()?, 16).ok()?;
                (ino == inode && off == 0).then_some(start)
            })
            .ok_or_else(|| LiveError::Executable("not in /proc/self/maps".into()))?;
        let seg0 = segments.iter().find(|s| s.1 == 0).map_or(0, |s| s.0);
        let bias = start.wrapping_sub(seg0 & !0xFFF);
        let mut functions: Vec<(u64, u64, String)> = obj
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
            .filter_map(|s| {
                let a = s.address().wrapping_add(bias);
                Some((a, a.checked_add(s.size())?, s.name().ok()?.to_string()))
            })
            .collect();
        functions.sort();
        functions.dedup_by_key(|f| f.0);
        Ok(Self {
            bytes,
            segments,
            functions,
            bias,
            inode,
        })
    }

    /// The file offset of runtime address `addr`, if a segment holds it in the file.
    fn file_offset(&self, addr: u64) -> Option<u64> {
        let link = addr.wrapping_sub(self.bias);
        self.segments.iter().find_map(|&(va, off, size)| {
            (link >= va && link - va < size).then(|| off + (link - va))
        })
    }

    fn original(&self, addr: u64, buf: &mut [u8]) -> Option<()> {
        let off = usize::try_from(self.file_offset(addr)?).ok()?;
        buf.copy_from_slice(self.bytes.get(off..off.checked_add(buf.len())?)?);
        Some(())
    }

    fn function_at(&self, addr: u64) -> Option<&(u64, u64, String)> {
        let i = self
            .functions
            .partition_point(|f| f.0 <= addr)
            .checked_sub(1)?;
        let f = &self.functions[i];
        (addr < f.1).then_some(f)
    }
}

/// An object's identity: its device and inode, folded into one `u64` (device numbers in the top
/// 24 bits, the inode in the low 40 — inodes of real filesystems stay far below 2⁴⁰).
fn object_id(major: u32, minor: u32, inode: u64) -> ObjectId {
    ObjectId(
        (u64::from(major & 0xFFF) << 52)
            | (u64::from(minor & 0xFFF) << 40)
            | (inode & ((1 << 40) - 1)),
    )
}

/// One file-backed line of `/proc/self/maps`: `start-end perms offset major:minor inode path`.
fn parse_maps_line(l: &str) -> Option<probe_core::mm::VmaInfo> {
    use probe_core::mm::{VmFlags, VmaInfo};
    let f: Vec<&str> = l.split_whitespace().collect();
    let (lo, hi) = f.first()?.split_once('-')?;
    let perms = f.get(1)?.as_bytes();
    let pgoff = u64::from_str_radix(f.get(2)?, 16).ok()?;
    let (major, minor) = f.get(3)?.split_once(':')?;
    let inode: u64 = f.get(4)?.parse().ok()?;
    if inode == 0 {
        return None;
    }
    let mut flags = VmFlags::NONE;
    if perms.get(2) == Some(&b'x') {
        flags = flags | VmFlags::EXEC;
    }
    if perms.get(3) == Some(&b's') {
        flags = flags | VmFlags::SHARED;
    }
    Some(VmaInfo {
        start: u64::from_str_radix(lo, 16).ok()?,
        end: u64::from_str_radix(hi, 16).ok()?,
        pgoff,
        flags,
        object: object_id(
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
            inode,
        ),
    })
}

/// Writes code through `/proc/self/mem`; syncs cores with membarrier.
struct ProcMem(File);

impl CodeWriter for ProcMem {
    fn write(&self, addr: u64, bytes: &[u8]) -> probe_core::Result<()> {
        // A failed write reports the errno; the live patch rolls the batch back. (A short
        // write to our own mapped text does not happen short of memory exhaustion.)
        self.0
            .write_all_at(bytes, addr)
            .map_err(|e| probe_core::Error::Embedder(e.raw_os_error().unwrap_or(-1)))
    }
    fn sync_cores(&self) {
        let r = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE);
        debug_assert!(r.is_ok());
    }
}

/// The process's code as the optimizer's [`CodeSpace`].
struct ProcessCode {
    image: Image,
    mem: ProcMem,
    /// XOL copies and trampolines (the optimizer calls `prepare_detour` with its lock held, from
    /// inside `attach`, so the area has its own lock).
    area: Mutex<XolArea>,
    /// Where the area's executable view is, for the quiescence scan (immutable).
    area_range: (u64, u64),
    /// Freed trampolines, reusable (they were freed after a quiescence wait).
    free_trampolines: Mutex<Vec<u64>>,
    /// Jump ranges of prepared detours: a thread stopped strictly inside one must not resume
    /// after its jump goes in (the quiescence scan reads this).
    ranges: RangeTable,
    /// How a trampoline saves the extended state around full-state consumers, chosen at
    /// install from CPUID ([`probe_arch_x86_64::xstate`]).
    xstate: XState,
    /// Probe address → its [`ProbeCtx`] (XOL copy, consumer list for trampolines).
    xol_map: XolMap,
    /// Per 64-byte block of the area: for an XOL copy, where it jumps back to (0 otherwise).
    slot_resume: Box<[AtomicU64]>,
    /// Trampolines whose jump was taken out (found in `patch`), until `free_detour`.
    retiring: Box<[AtomicU64]>,
    /// Statistics (Relaxed counters, writer side only).
    trampolines_made: AtomicU64,
    trampolines_reused: AtomicU64,
    trampolines_freed: AtomicU64,
}

const RETIRING: usize = 1024;

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
    fn inside(&self, rip: u64, tramp: (u64, u32)) -> bool {
        if tramp.1 > 1 || (tramp.1 == 1 && self.is_retiring(tramp.0)) {
            return true;
        }
        if self.ranges.inside(rip) {
            return true;
        }
        let (lo, hi) = self.area_range;
        if rip < lo || rip >= hi {
            return false;
        }
        let block = ((rip - lo) / 64) as usize;
        // Acquire pairs with the Release store in `Live::attach`.
        let resume = self.slot_resume[block].load(Ordering::Acquire);
        if resume != 0 {
            return self.ranges.inside(resume);
        }
        // A trampoline block: which trampoline (they are TRAMPOLINE-aligned from `lo`)?
        let start = lo + (rip - lo) / TRAMPOLINE as u64 * TRAMPOLINE as u64;
        self.is_retiring(start)
    }

    fn is_retiring(&self, tramp: u64) -> bool {
        // Acquire pairs with the Release store in `retire`.
        self.retiring
            .iter()
            .any(|r| r.load(Ordering::Acquire) == tramp)
    }

    fn retire(&self, tramp: u64) {
        if self.is_retiring(tramp) {
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
    }
}

impl CodeSpace for ProcessCode {
    type Arch = X86_64;

    fn read_original(&self, addr: u64, buf: &mut [u8]) -> probe_core::Result<()> {
        self.image
            .original(addr, buf)
            .ok_or(probe_core::Error::OffsetOutOfRange)
    }

    fn check_boundary(&self, addr: u64) -> probe_core::Result<()> {
        let &(start, end, _) = self
            .image
            .function_at(addr)
            .ok_or(probe_core::Error::OffsetOutOfRange)?;
        let mut func = std::vec![0u8; (end - start) as usize];
        self.read_original(start, &mut func)?;
        insn::check_boundary(&func, start, addr)
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> probe_core::Result<()> {
        // Called from the trap handler for an address just executed (mapped, readable text).
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `addr..addr+len` is the trapping instruction's bytes, in a mapped text page
            // (the CPU just fetched it); a volatile read because other threads patch it.
            *b = unsafe { core::ptr::read_volatile((addr as usize + i) as *const u8) };
        }
        Ok(())
    }

    fn prepare_detour(&self, addr: u64) -> Result<Detour, NotOptimizable> {
        // The trampoline hands its hit this probe's context directly (attach made it).
        let ctx = self.xol_map.get(addr).ok_or(NotOptimizable::Unsupported)?;
        let &(start, end, _) = self
            .image
            .function_at(addr)
            .ok_or(NotOptimizable::TooShort)?;
        let mut func = std::vec![0u8; (end - start) as usize];
        self.image
            .original(start, &mut func)
            .ok_or(NotOptimizable::TooShort)?;
        let range = probe_arch_x86_64::detour::analyze(&func, start, addr)?;
        let reused = self
            .free_trampolines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        // Relaxed: statistics.
        self.trampolines_made.fetch_add(1, Ordering::Relaxed);
        let at = match reused {
            Some(at) => {
                // Relaxed: statistics.
                self.trampolines_reused.fetch_add(1, Ordering::Relaxed);
                at
            }
            None => {
                let mut area = self.area.lock().unwrap_or_else(|e| e.into_inner());
                area.alloc(TRAMPOLINE).ok_or(NotOptimizable::NoMemory)?
            }
        };
        let (code, displaced) = trampoline(at, ctx, self.xstate.size, &range)
            .map_err(|_| NotOptimizable::OutOfReach)?;
        let jump = range.jump_bytes(at).ok_or(NotOptimizable::OutOfReach)?;
        if !self.ranges.insert(at, addr, addr + range.len() as u64) {
            return Err(NotOptimizable::NoMemory);
        }
        self.area
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(at, &code);
        Ok(Detour {
            len: range.len() as u8,
            jump,
            trampoline: at,
            displaced,
        })
    }

    fn free_detour(&self, detour: &Detour) {
        // The optimizer calls this after a quiescence wait that followed the removal of every
        // way into the trampoline: it can be reused.
        self.ranges.remove(detour.trampoline);
        for r in self.retiring.iter() {
            // Relaxed: the retiring table is written only by the optimizer's (this) thread.
            if r.load(Ordering::Relaxed) == detour.trampoline {
                // Relaxed: only this (the optimizer's) thread writes the table.
                r.store(0, Ordering::Relaxed);
            }
        }
        self.free_trampolines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(detour.trampoline);
        // Relaxed: statistics.
        self.trampolines_freed.fetch_add(1, Ordering::Relaxed);
    }

    fn patch(&self, batch: &[Patch]) -> probe_core::Result<()> {
        // All or nothing: a failed batch was rolled back, and its trampolines stay in use.
        patch_batch(&self.mem, batch)?;
        // A jump gone out cuts its trampoline off: from now until it is freed, a thread found
        // inside it keeps the quiescence wait waiting (the wait comes after this returns).
        for p in batch {
            if let ([probe_arch_x86_64::JMP_REL32, a, b, c, d, ..], [n, ..]) =
                (p.old(), p.new_bytes())
                && *n != probe_arch_x86_64::JMP_REL32
            {
                let rel = i32::from_le_bytes([*a, *b, *c, *d]);
                self.retire(p.addr.wrapping_add(5).wrapping_add(rel as i64 as u64));
            }
        }
        Ok(())
    }

    fn quiesce(&self) {
        quiesce(self);
    }

    fn kick(&self) {
        // Called with the optimizer's lock held: only wake the optimizer thread, if there is one.
        if let Some(t) = OPTIMIZER_THREAD.get() {
            t.unpark();
        }
    }
}

/// A memfd mapped twice: read+execute near the code, read+write for us.
struct XolArea {
    rx: u64,
    rw: *mut u8,
    len: usize,
    next: usize,
}

// SAFETY: `rw` is only written under the writer mutex.
unsafe impl Send for XolArea {}

const XOL_AREA: usize = 1 << 20;
const XOL_SLOT: usize = 64;

impl XolArea {
    /// Maps the area within ±1 GiB of `near` (so RIP-relative operands of the code still reach).
    fn map(near: u64) -> Result<Self, LiveError> {
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
    fn alloc(&mut self, len: usize) -> Option<u64> {
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

    /// Writes `copy` (made for the next slot's address) and returns that address.
    fn push(
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
struct XolMap {
    keys: Box<[AtomicU64]>,
    vals: Box<[AtomicU64]>,
}

const XOL_MAP: usize = 1 << 14;

impl XolMap {
    fn new() -> Self {
        Self {
            keys: (0..XOL_MAP).map(|_| AtomicU64::new(0)).collect(),
            vals: (0..XOL_MAP).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn start(addr: u64) -> usize {
        (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 50) as usize % XOL_MAP
    }
    /// Lock-free lookup (the handler).
    fn get(&self, addr: u64) -> Option<&'static ProbeCtx> {
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
    fn insert(&self, addr: u64, ctx: &'static ProbeCtx) -> Result<(), LiveError> {
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

/// A pooled RCU reader of the hit path's one domain, claimed by a hit with one swap. Each on its
/// own cache lines, and each thread starts from the entry it used last: in the common case a hit
/// writes only lines no other thread writes.
#[repr(align(128))]
struct Pooled {
    busy: AtomicBool,
    reader: <SlotRcu as Rcu>::Reader<'static>,
}

/// The most trap handlers that run at the same moment without waiting for a pooled reader.
const POOL: usize = 256;

/// The optimizer and the registry share one RCU domain (clones of one `Arc`), as the kprobes
/// layer's do: a trap's one read section covers the optimizer's site, the address-space model
/// and the consumer list, and a grace period costs one heavy barrier, not one per domain.
type Opt = Optimizer<ProcessCode, Arc<SlotRcu>>;
type Reg = Registry<Hook, Arc<SlotRcu>>;

/// Serializes attach/detach/run_optimizer (the handler never takes it), and holds the writers'
/// reader of the registry (to read a probe's consumers when its hit list is rebuilt).
struct Writer {
    reader: <SlotRcu as Rcu>::Reader<'static>,
}

/// Per probed address, for the life of the process (like its XOL copy, which it names): what a
/// hit at that address needs without looking anything up.
///
/// # Invariants
///
/// * INVARIANT: `list` is null or a `HitList` built from the registry's consumers of this
///   address's key, published by a writer (under the writer mutex) with a Release swap; a list
///   swapped out is freed only after a grace period of the registry's RCU domain, and every hit
///   reads `list` inside one of that domain's read sections.
/// * INVARIANT: `list` is null exactly while the probe has no consumer (the last detach clears it
///   before the optimizer hears of it), so a trampoline still in the code after its probe was
///   unregistered fires nothing — the optimizer's `on_trampoline` answer, without its lookup.
struct ProbeCtx {
    addr: u64,
    xol: u64,
    list: AtomicPtr<HitList>,
}

/// A probe's consumers as its trampoline runs them.
struct HitList {
    /// Some consumer may use any register state: save and restore the extended state.
    full: bool,
    hooks: Box<[Arc<Hook>]>,
}

/// The live embedding. One per process: [`Live::install`].
pub struct Live {
    opt: &'static Opt,
    reg: &'static Reg,
    pool: Box<[Pooled]>,
    writer: Mutex<Writer>,
    /// The process's file mappings, from `/proc/self/maps`: the hit path resolves an address to
    /// its (object, file offset) key by speculating on it (core's seqcount protocol), lock-free.
    mm: AddressSpace,
    previous: libc::sigaction,
}

// SAFETY: `previous` is a plain C struct read by the handler; everything else is Sync.
unsafe impl Sync for Live {}
// SAFETY: as above.
unsafe impl Send for Live {}

static LIVE: OnceLock<&'static Live> = OnceLock::new();

/// How often a hit did not find its thread's pool entry free and took another: the only shared
/// line a hit writes, and only then ([`Live::pool_moves`]).
static POOL_MOVES: AtomicU64 = AtomicU64::new(0);

/// The delayed optimizer's thread, once started ([`Live::start_optimizer`]).
static OPTIMIZER_THREAD: OnceLock<std::thread::Thread> = OnceLock::new();

std::thread_local! {
    /// The pool entry this thread used last (a hint; any free entry will do).
    static POOL_HINT: core::cell::Cell<usize> = const { core::cell::Cell::new(usize::MAX) };
    /// The trampoline whose consumers this thread is running (its return address is inside it),
    /// and how deep such calls are nested: the quiescence scan counts the thread as inside it.
    static IN_TRAMPOLINE: core::cell::Cell<(u64, u32)> = const { core::cell::Cell::new((0, 0)) };
    /// Set while this thread writes the address-space model: a trap taken by this very thread
    /// then must not wait for the write to end (it never would).
    static IN_MM_WRITE: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// A probe attached by [`Live::attach`] or [`Live::attach_raw`]; give it back to
/// [`Live::detach`].
#[derive(Clone)]
pub struct Attached {
    addr: u64,
    key: ProbeKey,
    consumer: Arc<Hook>,
}

impl fmt::Debug for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attached")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Attached {
    /// The probed address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Its (inode, file offset) key.
    pub fn key(&self) -> ProbeKey {
        self.key
    }
}

impl Live {
    /// Installs the SIGTRAP handler (remembering the program's, which still gets every trap that
    /// is not ours), reads the executable's symbols, registers for membarrier SYNC_CORE and maps
    /// the XOL area near the code. Once per process.
    ///
    /// ```no_run
    /// use probe_process::live::{Consumer, Live, Regs};
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// let live = Live::install()?;
    /// live.start_optimizer(std::time::Duration::from_millis(5)); // kprobes' delayed optimizer
    /// let hits = Arc::new(AtomicU64::new(0));
    /// let h = hits.clone();
    /// // Runs in the hitting thread's signal handler or trampoline: keep it async-signal-safe.
    /// let consumer: Arc<Consumer> = Arc::new(move |r: &Regs| {
    ///     h.fetch_add(r.rdi & 1, Ordering::Relaxed);
    /// });
    /// let probe = live.attach_symbol("my_function", 0, consumer)?; // or `attach(addr, …)`
    /// // … threads call my_function: a breakpoint hit now, a jump hit once optimized …
    /// live.detach(probe)?; // original bytes back; the consumer never runs again
    /// # Ok::<(), probe_process::live::LiveError>(())
    /// ```
    pub fn install() -> Result<&'static Live, LiveError> {
        Self::install_xstate(XState::detect())
    }

    /// [`Live::install`] with the extended-state save forced to `save` where this CPU has it
    /// ([`XState::with`], which sizes it for this CPU; `install` uses [`XState::detect`], the
    /// cheapest correct choice). Forcing [`SaveInsn::Fxsave`] on a CPU with AVX corrupts the
    /// interrupted code's vector registers — what some interceptors ship; it exists so a test
    /// can show that its oracle catches exactly that. It takes the instruction, not an
    /// [`XState`], so no caller can hand the trampolines an area size this CPU overflows.
    pub fn install_with(save: SaveInsn) -> Result<&'static Live, LiveError> {
        Self::install_xstate(XState::with(save))
    }

    fn install_xstate(xstate: XState) -> Result<&'static Live, LiveError> {
        static ONCE: Mutex<bool> = Mutex::new(false);
        let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return Err(LiveError::AlreadyInstalled);
        }
        membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE)?;
        let image = Image::load()?;
        let near = image.functions.first().map_or(0, |f| f.0);
        let xol = XolArea::map(near)?;
        let area_range = (xol.rx, xol.rx + xol.len as u64);
        let mem = File::options()
            .read(true)
            .write(true)
            .open("/proc/self/mem")
            .map_err(|e| LiveError::Executable(e.to_string()))?;
        let rcu = Arc::new(hit_rcu());
        let opt: &'static Opt = Box::leak(Box::new(Optimizer::new(
            ProcessCode {
                image,
                mem: ProcMem(mem),
                area: Mutex::new(xol),
                area_range,
                free_trampolines: Mutex::new(Vec::new()),
                ranges: RangeTable::new(),
                xstate,
                xol_map: XolMap::new(),
                slot_resume: (0..XOL_AREA / 64).map(|_| AtomicU64::new(0)).collect(),
                retiring: (0..RETIRING).map(|_| AtomicU64::new(0)).collect(),
                trampolines_made: AtomicU64::new(0),
                trampolines_reused: AtomicU64::new(0),
                trampolines_freed: AtomicU64::new(0),
            },
            rcu.clone(),
        )));
        let reg: &'static Reg = Box::leak(Box::new(Registry::new(rcu)));
        let mut pool = Vec::with_capacity(POOL);
        for _ in 0..POOL {
            pool.push(Pooled {
                busy: AtomicBool::new(false),
                reader: reg.rcu().register()?,
            });
        }
        // The program's handler, which keeps every trap that is not ours.
        // SAFETY: a zeroed sigaction is valid for sigaction to fill; a null `act` only queries.
        let mut previous: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::sigaction(libc::SIGTRAP, core::ptr::null(), &mut previous) } != 0 {
            return Err(os("sigaction"));
        }
        let live: &'static Live = Box::leak(Box::new(Live {
            opt,
            reg,
            pool: pool.into_boxed_slice(),
            writer: Mutex::new(Writer {
                reader: reg.rcu().register()?,
            }),
            mm: AddressSpace::new(MmId(1)),
            previous,
        }));
        live.refresh_locked()?;
        // Publish before the handler can run.
        let _ = LIVE.set(live);
        // SAFETY: installing a handler that follows the rules in the module docs.
        unsafe {
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = on_sigtrap as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            // The quiescence signal waits while a SIGTRAP handler runs: its answer then names
            // the RIP the trap handler chose (an XOL copy, a trampoline), never a stale one.
            libc::sigaddset(&mut sa.sa_mask, quiesce_signal());
            if libc::sigaction(libc::SIGTRAP, &sa, core::ptr::null_mut()) != 0 {
                return Err(os("sigaction"));
            }
            let mut q: libc::sigaction = core::mem::zeroed();
            q.sa_sigaction = on_quiesce as *const () as usize;
            q.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut q.sa_mask);
            if libc::sigaction(quiesce_signal(), &q, core::ptr::null_mut()) != 0 {
                return Err(os("sigaction"));
            }
        }
        *done = true;
        Ok(live)
    }

    /// The runtime address of function `name` in the executable.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.opt
            .space()
            .image
            .functions
            .iter()
            .find(|f| f.2 == name)
            .map(|f| f.0)
    }

    /// Attaches `consumer` to the function `name`, at `offset` bytes into it (any instruction
    /// boundary).
    pub fn attach_symbol(
        &self,
        name: &str,
        offset: u64,
        consumer: Arc<Consumer>,
    ) -> Result<Attached, LiveError> {
        let (start, end) = self
            .opt
            .space()
            .image
            .functions
            .iter()
            .find(|f| f.2 == name)
            .map(|f| (f.0, f.1))
            .ok_or(LiveError::NoSymbol)?;
        if offset >= end - start {
            // Past the function's end (into the next function, or padding).
            return Err(LiveError::Core(probe_core::Error::OffsetOutOfRange));
        }
        self.attach(start + offset, consumer)
    }

    /// Attaches `consumer` at `addr`, which must start an instruction of a function in the
    /// executable's symbol table. Hits on any thread run it from then on, until
    /// [`Live::detach`]. The consumer may use any register state: its jump-path hits save and
    /// restore the whole extended state (x87, SSE, AVX, AVX-512, AMX) around it.
    pub fn attach(&self, addr: u64, consumer: Arc<Consumer>) -> Result<Attached, LiveError> {
        self.attach_hook(addr, Hook::Full(consumer))
    }

    /// Attaches a register-only consumer at `addr`: `f(regs, ctx)` runs on every hit until
    /// [`Live::detach`]. A probe whose every consumer is register-only is hit without saving the
    /// extended state (general registers and flags only — the kernel optprobe's cost class); one
    /// with any [`Live::attach`] consumer takes the full-state path, for all its consumers.
    /// Where the instruction cannot be optimized the probe stays a breakpoint, with the same
    /// contract.
    ///
    /// Errors: [`LiveError::NullConsumer`] for `None`; otherwise as [`Live::attach`].
    ///
    /// # Safety
    ///
    /// `f` touches no x87, MXCSR, SSE/AVX/AVX-512 or AMX state (integer code: eBPF JIT output,
    /// code built without SSE), is async-signal-safe (it runs in signal handlers and in the
    /// middle of arbitrary code: no allocation, no lock another thread may hold), and may be
    /// called with `ctx` from any thread until `detach` of this probe returned.
    pub unsafe fn attach_raw(
        &self,
        addr: u64,
        f: Option<RawConsumer>,
        ctx: *mut core::ffi::c_void,
    ) -> Result<Attached, LiveError> {
        let f = f.ok_or(LiveError::NullConsumer)?;
        self.attach_hook(
            addr,
            Hook::Raw {
                f,
                ctx: ctx as usize,
            },
        )
    }

    fn attach_hook(&self, addr: u64, hook: Hook) -> Result<Attached, LiveError> {
        let consumer = Arc::new(hook);
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let space = self.opt.space();
        space.check_boundary(addr)?;
        self.refresh_locked()?;
        let key = self.key_at(addr).ok_or(LiveError::NoSymbol)?;
        if space.xol_map.get(addr).is_none() {
            let mut orig = [0u8; insn::MAX_INSN];
            let end = space.image.function_at(addr).map_or(addr, |f| f.1);
            let n = ((end - addr) as usize).min(insn::MAX_INSN);
            space.read_original(addr, &mut orig[..n])?;
            let i = Insn::decode(&orig[..n], addr).map_err(LiveError::Refused)?;
            let slot = space
                .area
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(|at| xol::prepare(&i, at))?;
            let block = ((slot - space.area_range.0) / 64) as usize;
            // Release pairs with the Acquire in `ProcessCode::inside`.
            space.slot_resume[block].store(i.next(), Ordering::Release);
            // Kept for the life of the process, like the XOL copy it names (bounded by the
            // number of distinct addresses ever probed).
            let ctx: &'static ProbeCtx = Box::leak(Box::new(ProbeCtx {
                addr,
                xol: slot,
                list: AtomicPtr::new(core::ptr::null_mut()),
            }));
            space.xol_map.insert(addr, ctx)?;
        }
        self.reg.register(key, consumer.clone())?;
        let armed = self.opt.register(addr);
        if let Err(e) = armed {
            let _ = self.reg.unregister(&key, &consumer);
            self.reg.sync();
            return Err(e.into());
        }
        self.publish(&w, addr, key);
        Ok(Attached {
            addr,
            key,
            consumer,
        })
    }

    /// Detaches a probe: once this returns its consumer never runs again, and if it was the
    /// last one at its address the original instruction is back.
    pub fn detach(&self, a: Attached) -> Result<(), LiveError> {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.reg.unregister(&a.key, &a.consumer)?;
        // The trampoline's list loses it (and becomes null with the last one) before the
        // optimizer hears of the detach.
        self.publish(&w, a.addr, a.key);
        self.opt.unregister(a.addr)?;
        self.opt.wait_for_optimizer();
        // No hit still holds the old consumer list after this.
        self.reg.sync();
        Ok(())
    }

    /// Rebuilds the hit list of the probe at `addr` from the registry's consumers of `key` and
    /// publishes it; frees the old one after a grace period (the [`ProbeCtx`] invariants).
    fn publish(&self, w: &Writer, addr: u64, key: ProbeKey) {
        let Some(ctx) = self.opt.space().xol_map.get(addr) else {
            return;
        };
        let hooks: Vec<Arc<Hook>> = {
            let read = self.reg.read(&w.reader);
            read.lookup(&key)
                .map(|p| p.consumers().to_vec())
                .unwrap_or_default()
        };
        let new = if hooks.is_empty() {
            core::ptr::null_mut()
        } else {
            Box::into_raw(Box::new(HitList {
                full: hooks.iter().any(|h| matches!(**h, Hook::Full(_))),
                hooks: hooks.into_boxed_slice(),
            }))
        };
        // AcqRel: Release publishes the new list to hits (pairs with their Acquire load in
        // `trampoline_entry`); Acquire orders our later free after the previous publisher's
        // writes to the old one.
        let old = ctx.list.swap(new, Ordering::AcqRel);
        if !old.is_null() {
            // Every hit that may hold `old` is inside a registry read section.
            self.reg.sync();
            // SAFETY: `old` came from `Box::into_raw` here, is unreachable now, and a grace period
            // passed since it was (INVARIANT of ProbeCtx).
            drop(unsafe { Box::from_raw(old) });
        }
    }

    /// Trampolines prepared, of them reused after a quiescence wait, and freed so far.
    pub fn trampoline_stats(&self) -> (u64, u64, u64) {
        let s = self.opt.space();
        // Relaxed: statistics.
        (
            s.trampolines_made.load(Ordering::Relaxed),
            s.trampolines_reused.load(Ordering::Relaxed),
            s.trampolines_freed.load(Ordering::Relaxed),
        )
    }

    /// How many hits so far found their thread's pooled reader taken and moved to another entry.
    /// Every other hit writes only lines of its own thread's entry (and its RCU slot), so this
    /// staying flat while threads hit is the proof that the common case shares no line.
    pub fn pool_moves(&self) -> u64 {
        // Relaxed: a statistic.
        POOL_MOVES.load(Ordering::Relaxed)
    }

    fn claim(&self) -> &Pooled {
        // A const-initialized thread-local: no allocation, safe in a signal handler.
        let hint = POOL_HINT.with(|h| h.get());
        let start = if hint == usize::MAX {
            // SAFETY: gettid has no preconditions (and is async-signal-safe).
            let tid = unsafe { libc::gettid() };
            tid as usize
        } else {
            hint
        } % POOL;
        loop {
            for k in 0..POOL {
                let i = (start + k) % POOL;
                let p = &self.pool[i];
                // Acquire pairs with the Release store in `release`: the previous user's reads
                // are done.
                if !p.busy.swap(true, Ordering::Acquire) {
                    if i != start {
                        // The uncommon path: this thread's entry was taken.
                        // Relaxed: a statistic.
                        POOL_MOVES.fetch_add(1, Ordering::Relaxed);
                    }
                    if i != start || hint == usize::MAX {
                        // Remember it (and never ask for the thread id again: a system call).
                        POOL_HINT.with(|h| h.set(i));
                    }
                    return p;
                }
            }
            core::hint::spin_loop();
        }
    }

    /// Runs the consumers of the probe at `addr` (hit path: lock-free, allocation-free).
    fn run_consumers(&self, reader: &<SlotRcu as Rcu>::Reader<'static>, addr: u64, regs: &Regs) {
        let Some(key) = self.key_of(reader, addr) else {
            return;
        };
        let read = self.reg.read(reader);
        if let Some(p) = read.lookup(&key) {
            for c in p.consumers() {
                c.call(regs);
            }
        }
    }

    /// The (object, file offset) mapped executable at `addr`, by speculation on the address-space
    /// model (hit path: lock-free, allocation-free).
    ///
    /// The kernel falls back to taking the mm lock when speculation fails; a signal handler may
    /// not (the interrupted thread may hold it). Here a failed speculation is retried: the only
    /// writer is `refresh_mappings`, a short write section on an ordinary thread that never
    /// waits for a trap handler, so the retry ends. The one thread that cannot wait for it — the
    /// writer itself, trapping inside its own write section — uses the executable's static
    /// mapping, computed from its ELF segments, instead.
    fn key_of(&self, reader: &<SlotRcu as Rcu>::Reader<'static>, addr: u64) -> Option<ProbeKey> {
        if IN_MM_WRITE.with(|w| w.get()) {
            let space = self.opt.space();
            return Some(ProbeKey {
                object: ObjectId(space.image.inode),
                offset: space.image.file_offset(addr)?,
            });
        }
        loop {
            // The model's VMAs and handles are freed through the registry's domain: hold one of
            // its read sections while speculating.
            let _guard = self.reg.rcu().read_lock(reader);
            let Some(mut spec) = self.mm.speculate_begin() else {
                core::hint::spin_loop();
                continue;
            };
            let found = self.mm.speculate_find(&mut spec, addr);
            if self.mm.speculate_validate(&spec) {
                return found.map(|(object, offset)| ProbeKey { object, offset });
            }
        }
    }

    /// Re-reads `/proc/self/maps` into the address-space model if the file mappings changed
    /// (called by `attach`; call it after `dlopen`).
    pub fn refresh_mappings(&self) -> Result<(), LiveError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh_locked()
    }

    fn refresh_locked(&self) -> Result<(), LiveError> {
        let maps = std::fs::read_to_string("/proc/self/maps")
            .map_err(|e| LiveError::Executable(e.to_string()))?;
        let want: Vec<probe_core::mm::VmaInfo> = maps.lines().filter_map(parse_maps_line).collect();
        if self.mm.mappings() == want {
            return Ok(());
        }
        // Apply the difference only: a mapping that did not change is never taken out, so a hit
        // resolving in it never finds it missing between two write sections (a clear-and-refill
        // did exactly that; the exact-hit test caught it).
        let have = self.mm.mappings();
        IN_MM_WRITE.with(|w| w.set(true));
        let result = (|| {
            let w = self.mm.write();
            let rcu = self.reg.rcu();
            for m in have.iter().filter(|m| !want.contains(m)) {
                w.unmap(rcu, m.start, m.end - m.start)?;
            }
            for m in want.iter().filter(|m| !have.contains(m)) {
                w.map(rcu, m.start, m.end - m.start, m.pgoff, m.object, m.flags)?;
            }
            Ok::<(), probe_core::Error>(())
        })();
        IN_MM_WRITE.with(|w| w.set(false));
        result.map_err(LiveError::Core)
    }

    /// The (object, file offset) key the address-space model gives `addr` (for tests and tools;
    /// takes the model's lock).
    pub fn key_at(&self, addr: u64) -> Option<ProbeKey> {
        self.mm.locked_find(addr, |v| {
            v.map(|v| ProbeKey {
                object: v.object,
                offset: v.offset_of(addr),
            })
        })
    }

    /// Starts kprobes' delayed optimizer: a thread that, `delay` after an attach or detach
    /// queued work, applies everything queued meanwhile in one batch ([`Live::run_optimizer`]).
    /// Without it, the embedder calls `run_optimizer` itself. Returns `false` if already started.
    pub fn start_optimizer(&'static self, delay: std::time::Duration) -> bool {
        let mut started = false;
        OPTIMIZER_THREAD.get_or_init(|| {
            started = true;
            std::thread::Builder::new()
                .name("probe-optimizer".into())
                .spawn(move || {
                    loop {
                        // Woken by `kick` (spurious wake-ups just cost an empty run).
                        std::thread::park();
                        std::thread::sleep(delay);
                        self.run_optimizer();
                    }
                })
                .map(|h| h.thread().clone())
                .unwrap_or_else(|_| std::thread::current())
        });
        started
    }

    /// Turns queued probes into jumps (and jumps of detached probes back), in one batch:
    /// kprobes' delayed optimizer. Attach queues, this applies. Call it from a timer thread, or
    /// after a burst of attaches.
    pub fn run_optimizer(&self) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.opt.wait_for_optimizer();
    }

    /// Whether the probe at `addr` is a jump in the code now (not merely queued to become one).
    pub fn is_optimized(&self, addr: u64) -> bool {
        self.opt
            .state(addr)
            .is_ok_and(|s| s.code == probe_core::optimizer::Code::Jump)
    }

    /// The breakpoint handler's own work for a trap at `addr` (INT3 executed there): claim the
    /// pooled readers, ask the optimizer, run the consumers with `regs()`, pick where the thread
    /// goes next (`None`: not ours, chain to the program's handler), release.
    fn breakpoint_hit(&self, addr: u64, regs: impl FnOnce() -> Regs) -> Option<u64> {
        let pooled = self.claim();
        let answer = {
            // One domain: this read section covers the consumers' lookup below too (their own
            // sections nest in it, a counter on this reader).
            let guard = self.opt.rcu().read_lock(&pooled.reader);
            match self.opt.on_breakpoint(&guard, addr) {
                Trap::Probe { fire, then } => {
                    if fire {
                        self.run_consumers(&pooled.reader, addr, &regs());
                    }
                    match then {
                        Then::Step => self.opt.space().xol_map.get(addr).map(|c| c.xol),
                        Then::Detour(d) => Some(d.displaced),
                    }
                }
                // No probe at addr and no breakpoint there now. Either ours was removed after
                // the thread trapped on it (re-execute the restored instruction), or the trap
                // was the program's two-byte `INT 3` (CD 03), whose second byte is at addr: that
                // one is not ours (re-executing from addr would run its immediate as code).
                Trap::Restart => {
                    let mut two = [0u8; 2];
                    let space = self.opt.space();
                    match space.read(addr.wrapping_sub(1), &mut two) {
                        Ok(()) if two == [0xCD, 0x03] => None,
                        _ => Some(addr),
                    }
                }
                Trap::NotOurs => None,
            }
        };
        Live::release(pooled);
        answer
    }

    /// The SIGTRAP handler's own work for a hit at `addr` — everything it does except the
    /// signal's delivery and return — run directly, for measuring (`live_hits` times it against
    /// the whole breakpoint path). Returns where the thread would continue.
    #[doc(hidden)]
    pub fn breakpoint_work(&self, addr: u64) -> Option<u64> {
        self.breakpoint_hit(addr, || Regs {
            rip: addr,
            ..Regs::default()
        })
    }

    fn release(p: &Pooled) {
        // Release pairs with the Acquire swap in `claim`.
        p.busy.store(false, Ordering::Release);
    }
}

/// Prepared jump ranges, keyed by their trampoline: written by the optimizer's thread, read by
/// the quiescence signal handler (lock-free).
///
/// # Invariants
///
/// * INVARIANT: an entry's `start`/`end` are stored before its `tramp` key (Release) and the key
///   is cleared before they are reused.
struct RangeTable {
    tramp: Box<[AtomicU64]>,
    start: Box<[AtomicU64]>,
    end: Box<[AtomicU64]>,
}

const RANGES: usize = 4096;

impl RangeTable {
    fn new() -> Self {
        let v = || (0..RANGES).map(|_| AtomicU64::new(0)).collect();
        Self {
            tramp: v(),
            start: v(),
            end: v(),
        }
    }
    /// Writers only (the optimizer's lock serializes them).
    fn insert(&self, tramp: u64, start: u64, end: u64) -> bool {
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
    fn remove(&self, tramp: u64) {
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
    fn inside(&self, rip: u64) -> bool {
        (0..RANGES).any(|i| {
            // Acquire pairs with the Release store in `insert`.
            self.tramp[i].load(Ordering::Acquire) != 0
                && rip > self.start[i].load(Ordering::Relaxed)
                // Relaxed: ordered after the Acquire load of the key (`insert` stored the bounds first).
                && rip < self.end[i].load(Ordering::Relaxed)
        })
    }
}

/// Bytes reserved per trampoline.
const TRAMPOLINE: usize = 512;

/// The red zone below RSP that leaf code may use at any instruction boundary (SysV x86-64).
const RED_ZONE: u64 = 128;

/// A trampoline at `at` for the probe whose context is `ctx` (its jump range `range`): returns
/// its code and the address of its displaced-instructions entry.
///
/// ```text
/// at:        lea rsp, [rsp-128]                 ; step over the red zone (no flags change)
///            pushfq ; lea rsp, [rsp-8]          ; rflags, the rip slot
///            push r15 … r8 ; lea rsp, [rsp-8]   ; the rsp slot
///            push rbp, rdi, rsi, rdx, rcx, rbx, rax   ; RSP now points at a `Regs`
///            cld ; mov rbx, rsp
///            sub rsp, xsave_size ; and rsp, -64 ; the extended-state area (touched only if used)
///            mov rdi, rbx ; movabs rsi, ctx ; mov rdx, rsp ; movabs rcx, at
///            movabs rax, trampoline_entry ; call rax
///            mov rsp, rbx
///            test byte [rsp+rflags+1], 4 ; jz 1f ; std ; 1:   ; DF (clear since the cld)
///            mov eax, [rsp+rflags] ; and eax, 0x800 ; shl eax, 20 ; sub eax, 1   ; OF
///            mov ah, [rsp+rflags] ; sahf                      ; SF ZF AF PF CF
///            pop rax … rbp ; lea rsp, [rsp+8] ; pop r8 … r15
///            lea rsp, [rsp+8+8+128]             ; the rip and rflags slots, the red zone
/// displaced: the covered instructions, relocated ; jmp addr + len
/// ```
///
/// The trampoline saves only what every hit needs (general registers and flags, as the
/// consumers' `Regs`); `trampoline_entry` saves the extended state when, and only when, a
/// consumer of the probe may change it.
///
/// # Implementation details
///
/// The flags are restored without `popfq`, which costs about 8 ns a pair with `pushfq` here (it
/// is microcoded: it may change IF, TF, AC, ID), a third of the register-only path. The flags
/// that code between the `pushfq` and the return can change are the six arithmetic ones and DF
/// (the `cld`): SF, ZF, AF, PF and CF come back through `sahf` from the saved low byte, OF
/// through a subtraction that overflows exactly when the saved OF was set (`0x8000_0000 - 1`),
/// DF through an `std` taken only when it was set. TF, AC and ID are never changed by compiled
/// code, so they still hold the interrupted values. A CPU without `lahf`/`sahf` in 64-bit mode
/// (CPUID 8000_0001h ECX bit 0, absent only on the first x86-64 parts) gets `popfq`.
fn trampoline(
    at: u64,
    ctx: &'static ProbeCtx,
    xsave_size: u32,
    range: &probe_arch_x86_64::detour::JumpRange,
) -> Result<(Vec<u8>, u64), Refusal> {
    let mut c: Vec<u8> = Vec::with_capacity(TRAMPOLINE);
    let lea_rsp = |c: &mut Vec<u8>, d: i8| c.extend_from_slice(&[0x48, 0x8D, 0x64, 0x24, d as u8]);
    lea_rsp(&mut c, -128); // lea rsp, [rsp-128]
    c.push(0x9C); // pushfq
    lea_rsp(&mut c, -8); // the rip slot
    for r in (0..8u8).rev() {
        c.extend_from_slice(&[0x41, 0x50 + r]); // push r15 … r8
    }
    lea_rsp(&mut c, -8); // the rsp slot
    c.extend_from_slice(&[0x55, 0x57, 0x56, 0x52, 0x51, 0x53, 0x50]); // rbp rdi rsi rdx rcx rbx rax
    c.push(0xFC); // cld
    c.extend_from_slice(&[0x48, 0x89, 0xE3]); // mov rbx, rsp
    c.extend_from_slice(&[0x48, 0x81, 0xEC]); // sub rsp, imm32
    c.extend_from_slice(&xsave_size.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x83, 0xE4, 0xC0]); // and rsp, -64
    c.extend_from_slice(&[0x48, 0x89, 0xDF]); // mov rdi, rbx
    c.extend_from_slice(&[0x48, 0xBE]); // movabs rsi, ctx
    c.extend_from_slice(&(ctx as *const ProbeCtx as u64).to_le_bytes());
    c.extend_from_slice(&[0x48, 0x89, 0xE2]); // mov rdx, rsp
    c.extend_from_slice(&[0x48, 0xB9]); // movabs rcx, at
    c.extend_from_slice(&at.to_le_bytes());
    c.extend_from_slice(&[0x48, 0xB8]); // movabs rax, trampoline_entry
    c.extend_from_slice(&(trampoline_entry as *const () as u64).to_le_bytes());
    c.extend_from_slice(&[0xFF, 0xD0]); // call rax
    c.extend_from_slice(&[0x48, 0x89, 0xDC]); // mov rsp, rbx
    let sahf = sahf_in_long_mode();
    if sahf {
        // The flags, from the frame's rflags slot, with RAX (restored below) as scratch.
        let fl = (core::mem::offset_of!(Regs, rflags) as u32).to_le_bytes();
        let fl1 = (core::mem::offset_of!(Regs, rflags) as u32 + 1).to_le_bytes();
        c.extend_from_slice(&[0xF6, 0x84, 0x24]); // test byte [rsp+rflags+1], 4 (DF)
        c.extend_from_slice(&fl1);
        c.push(0x04);
        c.extend_from_slice(&[0x74, 0x01, 0xFD]); // jz +1 ; std
        c.extend_from_slice(&[0x8B, 0x84, 0x24]); // mov eax, [rsp+rflags]
        c.extend_from_slice(&fl);
        c.extend_from_slice(&[0x25, 0x00, 0x08, 0x00, 0x00]); // and eax, 0x800 (OF)
        c.extend_from_slice(&[0xC1, 0xE0, 0x14]); // shl eax, 20
        c.extend_from_slice(&[0x83, 0xE8, 0x01]); // sub eax, 1: OF = the saved OF
        c.extend_from_slice(&[0x8A, 0xA4, 0x24]); // mov ah, [rsp+rflags]
        c.extend_from_slice(&fl);
        c.push(0x9E); // sahf: SF ZF AF PF CF
    }
    c.extend_from_slice(&[0x58, 0x5B, 0x59, 0x5A, 0x5E, 0x5F, 0x5D]); // rax rbx rcx rdx rsi rdi rbp
    lea_rsp(&mut c, 8);
    for r in 0..8u8 {
        c.extend_from_slice(&[0x41, 0x58 + r]); // pop r8 … r15
    }
    if sahf {
        // lea rsp, [rsp+8+8+128]: the rip and rflags slots, the red zone
        c.extend_from_slice(&[0x48, 0x8D, 0xA4, 0x24, 0x90, 0, 0, 0]);
    } else {
        lea_rsp(&mut c, 8);
        c.push(0x9D); // popfq
        c.extend_from_slice(&[0x48, 0x8D, 0xA4, 0x24, 0x80, 0, 0, 0]); // lea rsp, [rsp+128]
    }
    let displaced = at + c.len() as u64;
    c.extend_from_slice(range.displaced(displaced)?.bytes());
    if c.len() > TRAMPOLINE {
        return Err(Refusal::TooLong);
    }
    Ok((c, displaced))
}

/// Whether `lahf`/`sahf` work in 64-bit mode (CPUID 8000_0001h ECX bit 0).
fn sahf_in_long_mode() -> bool {
    // SAFETY: CPUID is unprivileged and present on every x86-64 CPU; leaf 8000_0001h exists on
    // all of them (the extended maximum is checked first anyway).
    {
        core::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0001
            && core::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 != 0
    }
}

/// Called by every trampoline (sysv64: the pushed `Regs` frame in RDI, the probe's context in
/// RSI, the extended-state area in RDX, the trampoline's own address in RCX), on the probed
/// thread's stack with its general registers and flags saved.
///
/// # Implementation details
///
/// This function, and everything it runs before [`run_full`] saves the extended state and after
/// it restores it, must touch no vector, x87 or MXCSR state: the interrupted code's values are
/// still in those registers. It is integer code by construction (no floats, no copies of large
/// values — the consumers get a reference to the pushed frame, never a copy), and a test
/// (`tests/state_preservation.rs`) disassembles it and everything it calls directly to prove it.
/// Per hit: one thread-local read, the pool claim (a swap on this thread's own line), one
/// registry read section, one load of the probe's list — no tree lookup and no address-space
/// resolve: the trampoline *is* the probe's, as a kernel optprobe's is.
#[inline(never)]
extern "sysv64" fn trampoline_entry(
    frame: *mut Regs,
    ctx: &'static ProbeCtx,
    area: *mut u8,
    tramp: u64,
) {
    let Some(live) = LIVE.get().copied() else {
        return;
    };
    let outer = IN_TRAMPOLINE.with(|t| t.replace((tramp, t.get().1 + 1)));
    // SAFETY: the trampoline passes the frame it just pushed, laid out as `Regs`; the two slots
    // it left for RSP and RIP are filled here, once, before anyone reads the frame.
    let regs = unsafe {
        (*frame).rsp = frame as u64 + core::mem::size_of::<Regs>() as u64 + RED_ZONE;
        (*frame).rip = ctx.addr;
        &*frame
    };
    let pooled = live.claim();
    {
        let _guard = live.reg.rcu().read_lock(&pooled.reader);
        // Acquire pairs with the AcqRel swap in `Live::publish`.
        let list = ctx.list.load(Ordering::Acquire);
        if !list.is_null() {
            // SAFETY: a published list stays allocated until a grace period after it is swapped
            // out, and we are inside a read section of that domain (INVARIANT of ProbeCtx).
            let list = unsafe { &*list };
            if list.full {
                // SAFETY: `area` is the trampoline's `xsave_size` bytes, 64-byte aligned, below
                // the frame, sized for `live`'s XState.
                unsafe { run_full(&live.opt.space().xstate, list, regs, area) };
            } else {
                for h in list.hooks.iter() {
                    h.call(regs);
                }
            }
        }
    }
    Live::release(pooled);
    IN_TRAMPOLINE.with(|t| t.set(outer));
}

/// The full-state hit: save the extended state, give the consumers the ABI's clean state, run
/// them, restore.
///
/// # Safety
///
/// `area` is `xs.size` writable bytes, 64-byte aligned, on this thread's stack below the frame.
#[inline(never)]
unsafe fn run_full(xs: &XState, list: &HitList, regs: &Regs, area: *mut u8) {
    // Touch the area from its top byte down, one byte per 4 KiB and the bottom byte last, as a
    // stack probe does: no two touches (nor the frame above and the first) are a page apart, so
    // a thread near the end of its stack faults on its guard page here instead of the save
    // writing past it.
    let mut off = (xs.size as usize).saturating_sub(1);
    loop {
        // SAFETY: inside `area` (the caller's contract).
        unsafe { core::ptr::read_volatile(area.add(off)) };
        if off == 0 {
            break;
        }
        off = off.saturating_sub(4096);
    }
    // SAFETY: the caller's contract; `xs` is this CPU's (or forced for a test).
    unsafe {
        xs.save(area);
        xs.reset_for_abi(area);
    }
    for h in list.hooks.iter() {
        h.call(regs);
    }
    // SAFETY: `area` holds what `save` just wrote, on this thread.
    unsafe { xs.restore(area) };
}

/// The signal the quiescence scan sends to every other thread.
fn quiesce_signal() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

/// The scan's rounds ([`probe_core::scan`]: why the round number travels with the signal).
static SCAN: OnceLock<probe_core::scan::ScanRounds> = OnceLock::new();

fn rounds() -> &'static probe_core::scan::ScanRounds {
    SCAN.get_or_init(probe_core::scan::ScanRounds::new)
}

/// Runs on each thread the scan signals: is this thread inside code that is being replaced or
/// freed? Answers the round named in the signal's value.
extern "C" fn on_quiesce(_sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let (Some(live), Some(rounds)) = (LIVE.get().copied(), SCAN.get()) else {
        return;
    };
    // SAFETY: the kernel passes valid siginfo/ucontext to an SA_SIGINFO handler; the value was
    // sent by `scan` with rt_tgsigqueueinfo.
    let (round, rip) = unsafe {
        (
            (*info).si_value().sival_ptr as u64 as u32,
            (*uc.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] as u64,
        )
    };
    let inside = live
        .opt
        .space()
        .inside(rip, IN_TRAMPOLINE.with(|t| t.get()));
    rounds.answer(round, inside);
}

/// One scan: signals every other thread of the process and waits for their answers. Returns
/// `true` if all answered and none was inside.
fn scan() -> bool {
    // SAFETY: getpid/gettid have no preconditions.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let rounds = rounds();
    let round = rounds.begin();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    let mut sent = 0u64;
    for t in tasks.flatten() {
        let Some(tid) = t
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if tid == me {
            continue;
        }
        // SAFETY: a zeroed siginfo with the fields rt_tgsigqueueinfo reads filled in.
        let r = unsafe {
            let mut si: libc::siginfo_t = core::mem::zeroed();
            si.si_signo = quiesce_signal();
            si.si_code = libc::SI_QUEUE;
            // si_pid/si_uid/si_value sit after the three ints; write the value through the
            // sigqueue layout: { si_pid: i32, si_uid: u32, si_value: sigval }.
            let base = (&mut si as *mut libc::siginfo_t).cast::<u8>().add(16);
            base.cast::<i32>().write(pid);
            base.add(4).cast::<u32>().write(libc::getuid());
            base.add(8).cast::<u64>().write(u64::from(round));
            libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, quiesce_signal(), &si)
        };
        if r == 0 {
            sent += 1;
        }
    }
    // Threads answer from their handler; a thread that exits meanwhile never does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    while rounds.answered(round) < sent {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::yield_now();
    }
    !rounds.busy()
}

/// The quiescence wait: membarrier (every thread serializes), then scans until a round in which
/// every other thread answered from outside the XOL area, outside every prepared jump range's
/// interior, and not inside consumers called from a trampoline. The calling thread is outside by
/// construction (it is running the optimizer).
fn quiesce(space: &ProcessCode) {
    let _ = space;
    let _ = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE);
    static SCANNING: Mutex<()> = Mutex::new(());
    let _one = SCANNING.lock().unwrap_or_else(|e| e.into_inner());
    while !scan() {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

fn regs_of(g: &[libc::greg_t; 23], rip: u64) -> Regs {
    use libc::*;
    let r = |i: i32| g[i as usize] as u64;
    Regs {
        rax: r(REG_RAX),
        rbx: r(REG_RBX),
        rcx: r(REG_RCX),
        rdx: r(REG_RDX),
        rsi: r(REG_RSI),
        rdi: r(REG_RDI),
        rbp: r(REG_RBP),
        rsp: r(REG_RSP),
        r8: r(REG_R8),
        r9: r(REG_R9),
        r10: r(REG_R10),
        r11: r(REG_R11),
        r12: r(REG_R12),
        r13: r(REG_R13),
        r14: r(REG_R14),
        r15: r(REG_R15),
        rip,
        rflags: r(REG_EFL),
    }
}

/// The SIGTRAP handler. See the module docs for what it may and may not do.
extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let Some(live) = LIVE.get().copied() else {
        return;
    };
    // Only a trap instruction (INT3, `INT 3`) is ours to look at: the kernel reports those with
    // SI_KERNEL. A `raise`/`kill`, a single-step or a hardware breakpoint goes to the program.
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    if unsafe { (*info).si_code } != libc::SI_KERNEL {
        chain(&live.previous, sig, info, uc);
        return;
    }
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    let gregs = unsafe { &mut (*uc.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as u64;
    // INT3 traps with RIP after itself.
    let addr = rip.wrapping_sub(1);
    let answer = live.breakpoint_hit(addr, || regs_of(gregs, addr));
    match answer {
        Some(next) => {
            gregs[libc::REG_RIP as usize] = next as i64;
        }
        None => chain(&live.previous, sig, info, uc),
    }
}

/// Passes a trap that is not ours to the program's previous SIGTRAP disposition.
fn chain(
    prev: &libc::sigaction,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    let h = prev.sa_sigaction;
    if h == libc::SIG_IGN {
        return;
    }
    if h == libc::SIG_DFL {
        // Default action (terminate with a core): restore it and re-raise; it is delivered when
        // this handler returns.
        // SAFETY: async-signal-safe calls.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the program installed this function as an SA_SIGINFO handler.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { core::mem::transmute(h) };
        f(sig, info, uc);
    } else {
        // SAFETY: the program installed this function as a plain handler.
        let f: extern "C" fn(libc::c_int) = unsafe { core::mem::transmute(h) };
        f(sig);
    }
}

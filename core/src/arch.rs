//! What probe-core needs from an instruction set and from the embedder's code memory.
//!
//! The protocols stay arch-free: [`Arch`] names the breakpoint and recognises traps (the arch
//! crates implement it for x86_64 and aarch64); [`TextPatcher`] reads an object's original bytes
//! and reads and writes code in an address space (a kernel: the page cache and `text_poke` /
//! `access_process_vm`; a process: an alias mapping; a test: a byte buffer).

use crate::error::Result;
use crate::types::{MmId, ObjectId, VmaInfo};

pub use crate::types::{MAX_BREAKPOINT, SavedInsn};

/// An instruction set, as far as breakpoints go.
pub trait Arch: Send + Sync + 'static {
    /// The breakpoint instruction (at most [`MAX_BREAKPOINT`] bytes).
    const BREAKPOINT: &'static [u8];
    /// Is the instruction starting at `bytes[0]` a trap instruction (ours or the program's)?
    fn is_trap(bytes: &[u8]) -> bool;
}

/// The embedder's access to code: original object bytes, and code in an address space.
///
/// probe-core calls `read` and `write` with the address space's lock held and the mapping that
/// contains `vaddr`; the arch crate's live-patch protocol lives behind `write`.
///
/// Who calls each method, under which lock, and whether it may allocate, sleep or fail: [the
/// embedder's contract](crate::embedding).
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

/// The most bytes a jump-optimized probe may cover. x86: a 5-byte `jmp rel32` rounded up to
/// whole instructions — the last covered instruction starts at most 4 bytes in and is at most 15
/// long, so 19.
pub const MAX_DETOUR: usize = 19;

/// What a jump at a probe's address replaces and where it leads: the arch's answer when the
/// instructions there can be relocated into a trampoline.
///
/// The trampoline has two entries. `trampoline` is where the jump goes: it saves registers,
/// calls into probe-core ([`crate::optimizer::Optimizer::on_trampoline`]) to run the consumers,
/// restores them, runs the displaced instructions and jumps back to `addr + len`. `displaced` is
/// the same code past the call: a breakpoint hit that already ran the consumers continues there
/// (so consumers run once per hit, whichever way the CPU came in).
///
/// # The trampoline's contract
///
/// What the embedder's trampoline code (the arch crate writes its instructions) must do, from
/// `trampoline`:
///
/// 1. keep the interrupted code's state: everything the consumers or the call may change —
///    the general registers and flags (x86-64: also step over the 128-byte red zone before
///    pushing anything), and the extended (FP/vector) state unless every consumer is known to
///    leave it alone;
/// 2. call in with its probe — [`crate::kprobes::KprobesGuard::on_trampoline`] (or
///    [`crate::optimizer::Optimizer::on_trampoline`] and the embedder's own consumers) inside
///    one read section — and run what it answers; the answer may be "none" (disabled, or being
///    removed: a trampoline can be entered until the next quiescence wait);
/// 3. restore that state exactly (the x86 crate's `state_preservation` test is the oracle);
/// 4. at `displaced`: run the relocated displaced instructions, then jump to `addr + len`.
///
/// The trampoline's memory must stay valid until [`CodeSpace::free_detour`]: probe-core calls
/// it only after a quiescence wait that followed the removal of every way in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detour {
    /// Bytes the jump replaces: whole instructions, at least the jump's own length.
    pub len: u8,
    /// The bytes written over `[addr, addr + len)` when optimized: the jump, then padding.
    pub jump: [u8; MAX_DETOUR],
    /// The trampoline's consumer-calling entry (the jump's target).
    pub trampoline: u64,
    /// The trampoline's displaced-instructions entry (where a breakpoint hit continues).
    pub displaced: u64,
}

impl Detour {
    /// The jump bytes, exactly `len` of them.
    pub fn jump_bytes(&self) -> &[u8] {
        &self.jump[..usize::from(self.len).min(MAX_DETOUR)]
    }
}

/// Why a probe cannot be jump-optimized (it stays a working breakpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotOptimizable {
    /// The arch (or the embedder) has no jump optimization.
    Unsupported,
    /// The code ends before a whole jump fits (the end of a function or of the text).
    TooShort,
    /// An instruction inside the jump range is the target of a branch: a CPU jumping there would
    /// land in the middle of the jump.
    BranchTarget {
        /// The target's address.
        addr: u64,
    },
    /// An instruction inside the jump range cannot be relocated into a trampoline.
    Unrelocatable {
        /// The instruction's address.
        addr: u64,
    },
    /// No trampoline could be placed within the jump's reach.
    OutOfReach,
    /// The code around the probe does not decode as instructions, so the jump range cannot be
    /// proved safe.
    Undecodable {
        /// Where decoding failed.
        addr: u64,
    },
    /// The function holds an indirect jump (a jump table may lead anywhere, the jump range
    /// included): kprobes refuses these too.
    IndirectJump {
        /// The indirect jump's address.
        addr: u64,
    },
    /// The trampoline could not be allocated.
    NoMemory,
}

impl core::fmt::Display for NotOptimizable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unsupported => f.write_str("jump optimization is not supported here"),
            Self::TooShort => f.write_str("the code ends before a whole jump fits"),
            Self::BranchTarget { addr } => {
                write!(f, "{addr:#x}, inside the jump range, is a branch target")
            }
            Self::Unrelocatable { addr } => {
                write!(f, "the instruction at {addr:#x} cannot be relocated")
            }
            Self::OutOfReach => f.write_str("no trampoline within the jump's reach"),
            Self::Undecodable { addr } => write!(f, "the code at {addr:#x} does not decode"),
            Self::IndirectJump { addr } => {
                write!(f, "the function has an indirect jump at {addr:#x}")
            }
            Self::NoMemory => f.write_str("no memory for a trampoline"),
        }
    }
}

/// One site of a live-patch batch: at `addr`, replace `old` by `new` (same length, at most
/// [`MAX_DETOUR`] bytes). Owned and fixed-size, so the optimizer builds whole batches in memory it
/// reserved when the probes were registered: a run never allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patch {
    /// Where.
    pub addr: u64,
    len: u8,
    old: [u8; MAX_DETOUR],
    new: [u8; MAX_DETOUR],
}

impl Patch {
    /// A patch of `old` to `new` at `addr`, or `None` if their lengths differ or exceed
    /// [`MAX_DETOUR`].
    pub fn new(addr: u64, old: &[u8], new: &[u8]) -> Option<Self> {
        if old.len() != new.len() || old.len() > MAX_DETOUR {
            return None;
        }
        let mut p = Self {
            addr,
            len: old.len() as u8,
            old: [0; MAX_DETOUR],
            new: [0; MAX_DETOUR],
        };
        p.old[..old.len()].copy_from_slice(old);
        p.new[..new.len()].copy_from_slice(new);
        Some(p)
    }
    /// What the code holds now.
    pub fn old(&self) -> &[u8] {
        &self.old[..usize::from(self.len)]
    }
    /// What it must hold when the batch returns.
    pub fn new_bytes(&self) -> &[u8] {
        &self.new[..usize::from(self.len)]
    }
}

/// The embedder's code space as the [optimizer](crate::optimizer) sees it: one text (the kernel
/// image, a guest's text, a process's code) with its arch analysis, its live-patch protocol and
/// its quiescence wait.
///
/// probe-core calls every method except [`CodeSpace::read`] with the optimizer's lock held.
/// Who calls each method, under which lock, and whether it may allocate, sleep or fail: [the
/// embedder's contract](crate::embedding).
pub trait CodeSpace: Send + Sync {
    /// The instruction set (breakpoint bytes, trap recognition).
    type Arch: Arch;

    /// The code's original bytes at `addr` (before any probe wrote there). Fails with
    /// [`crate::Error::OffsetOutOfRange`] outside the text.
    fn read_original(&self, addr: u64, buf: &mut [u8]) -> Result<()>;

    /// Checks that `addr` is the first byte of an instruction (the arch decodes the function
    /// around it). Fails with [`crate::Error::InsideInstruction`] if not, or
    /// [`crate::Error::OffsetOutOfRange`] outside the text.
    fn check_boundary(&self, addr: u64) -> Result<()>;

    /// The code's current bytes at `addr`, as instruction fetch would see them. Called on the hit
    /// path (a trap no probe owns), so it must not block or allocate.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()>;

    /// The arch's jump analysis at `addr` (whole instructions covered, relocatability, branch
    /// targets, reach) and, if it passes, a trampoline. Called once per probe, at registration.
    fn prepare_detour(&self, addr: u64) -> core::result::Result<Detour, NotOptimizable>;

    /// Frees a trampoline. probe-core calls it only after a quiescence wait that followed the
    /// removal of every way into it (and after [`CodeSpace::retire_detour`] on it).
    fn free_detour(&self, detour: &Detour);

    /// The trampoline can no longer be entered by a new hit: its probe left the table (no trap
    /// answer names it any more) and its jump is out of the code. probe-core calls this once per
    /// trampoline, before the quiescence wait that precedes [`CodeSpace::free_detour`] — never
    /// for the trampoline of a probe that is still in the table, whose jump may go back in (a
    /// collision forced it out) and whose trap answers still lead into it.
    ///
    /// An embedder whose quiescence wait looks for CPUs *inside* trampolines looks only in the
    /// retired ones. A wait that looked in live ones would wait for ever on a hot probe: some
    /// CPU is always inside its trampoline. The default does nothing (a wait like
    /// `synchronize_rcu_tasks()` needs no list).
    fn retire_detour(&self, detour: &Detour) {
        let _ = detour;
    }

    /// Rewrites every site of `batch` with the arch's live-patch protocol while other CPUs may be
    /// executing there, and returns once every CPU will fetch the new bytes. On x86 that is the
    /// int3-first protocol (`probe_arch_x86_64::live_patch`): three cross-CPU synchronizations
    /// per batch, whatever its size. A CPU must never execute a half-written instruction.
    ///
    /// # Errors
    ///
    /// The embedder's failure ([`crate::Error::Embedder`], say: a page it could not make
    /// writable). **All or nothing:** when it returns an error, every site of the batch holds
    /// its `old` bytes again (the arch crate's fallible live patch rolls a partial batch back).
    /// The optimizer then changes no state: a run keeps its lists and retries on the next run;
    /// a registration or an enable fails and changes nothing; a disable keeps the (harmless)
    /// breakpoint of its now-disabled probe and has the next run remove it.
    fn patch(&self, batch: &[Patch]) -> Result<()>;

    /// Waits until no CPU can still be executing inside code that was just replaced or inside a
    /// trampoline that was just cut off — including a CPU stopped between two of the displaced
    /// instructions, or redirected into a trampoline by a trap answer it has not acted on yet.
    /// A kernel: `synchronize_rcu_tasks()`; a hypervisor: every vCPU through an exit; a process:
    /// `membarrier` plus a grace period of its threads.
    fn quiesce(&self);

    /// Asks the embedder to call [`crate::optimizer::Optimizer::run_optimizer`] after its delay
    /// (the kernel's `OPTIMIZE_DELAY`). Called at most once until that run starts. The default
    /// does nothing: the embedder runs the optimizer itself, or waits for it.
    fn kick(&self) {}
}

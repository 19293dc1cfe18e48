//! The x86-64 half of the embedding: the registers a consumer sees, instruction boundaries and
//! XOL copies (`probe-arch-x86_64`), the SIGTRAP handler's reading of the signal frame, and the
//! optimizer's `CodeSpace` — writes through `/proc/self/mem` with the int3-first live patch and
//! `membarrier` SYNC_CORE as its cross-core sync, detours to trampolines.

use super::*;
use probe_arch_x86_64::X86_64;
use probe_arch_x86_64::insn::{self, Insn};
use probe_arch_x86_64::live_patch::{CodeWriter, patch_batch};
use probe_arch_x86_64::xol;
pub(super) use probe_arch_x86_64::xstate::{SaveInsn, XState};

/// Why the arch refuses to probe an instruction.
pub use probe_arch_x86_64::insn::Refusal;
/// The registers a consumer sees: the interrupted thread's, as saved by the kernel (breakpoint
/// path) or pushed by the trampoline (jump path, where it *is* the pushed frame: the arch
/// crate's [`probe_arch_x86_64::trampoline::Regs`]).
pub use probe_arch_x86_64::trampoline::Regs;

/// How far a near-code area may be from the code it serves (either end): `jmp rel32` and
/// RIP-relative operands reach ±2 GiB; half of it leaves room for the object's own size.
pub(super) const AREA_REACH: u64 = 1 << 30;
/// The steps in which an area's address is searched for, outwards from the code.
pub(super) const AREA_STEP: u64 = 1 << 24;

/// The offsets of the instruction boundaries of `code`, which runs at `at`.
pub(super) fn boundaries(code: &[u8], at: u64) -> Result<Vec<u64>, Refusal> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < code.len() {
        out.push(off as u64);
        off += insn::length(&code[off..], at + off as u64)?;
    }
    Ok(out)
}

/// Whether `addr` starts an instruction of the function `func` at `start`.
pub(super) fn check_boundary(func: &[u8], start: u64, addr: u64) -> probe_core::Result<()> {
    insn::check_boundary(func, start, addr)
}

/// How a hit at a probed address continues (prepared at attach, for the life of the address).
pub(super) struct StepPlan {
    insn: Insn,
}

impl StepPlan {
    /// Decodes the instruction at `addr` (`code`: its bytes, to the function's end).
    pub(super) fn new(code: &[u8], addr: u64) -> Result<Self, LiveError> {
        let n = code.len().min(insn::MAX_INSN);
        Ok(Self {
            insn: Insn::decode(&code[..n], addr).map_err(LiveError::Refused)?,
        })
    }
    /// Where the copy continues in the original code.
    pub(super) fn resume(&self) -> u64 {
        self.insn.next()
    }
    /// Nothing is simulated on x86-64: every instruction runs from its copy.
    pub(super) fn simulated(&self) -> u32 {
        0
    }
    /// The copy's bytes, for the slot at `slot`.
    pub(super) fn copy(&self, slot: u64) -> Result<Vec<u8>, LiveError> {
        xol::prepare(&self.insn, slot)
            .map(|c| c.bytes().to_vec())
            .map_err(LiveError::Refused)
    }
}

/// A trap at `addr` that the optimizer does not know and that is not a breakpoint now: the
/// program's two-byte `INT 3` (CD 03), whose second byte is at `addr`, is not ours (re-executing
/// from `addr` would run its immediate as code); anything else was our breakpoint, removed after
/// the thread trapped on it.
pub(super) fn restart_is_foreign(space: &ProcessCode, addr: u64) -> bool {
    let mut two = [0u8; 2];
    matches!(space.read(addr.wrapping_sub(1), &mut two), Ok(()) if two == [0xCD, 0x03])
}

/// The interrupted PC in a signal frame.
pub(super) fn pc_of(uc: *mut libc::c_void) -> u64 {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    unsafe { (*uc.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] as u64 }
}

pub(super) fn regs_of(g: &[libc::greg_t; 23], rip: u64) -> Regs {
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
pub(super) extern "C" fn on_sigtrap(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
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
        Next::Xol(ctx) => {
            // Relaxed: ordered by `on_breakpoint`'s Acquire of the probe, which the optimizer
            // published after `prepare_ctx` stored the copy.
            gregs[libc::REG_RIP as usize] = ctx.xol.load(Ordering::Relaxed) as i64;
        }
        Next::Pc(next) => gregs[libc::REG_RIP as usize] = next as i64,
        Next::NotOurs => chain(&live.previous, sig, info, uc),
    }
}

/// Writes code through `/proc/self/mem`; syncs cores with membarrier SYNC_CORE.
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

impl CodeSpace for ProcessCode {
    type Arch = X86_64;

    shared_code_space_methods!();

    fn prepare_detour(&self, addr: u64) -> Result<Detour, NotOptimizable> {
        // The trampoline hands its hit this probe's context directly (attach made it).
        let ctx = self.xol_map.get(addr).ok_or(NotOptimizable::Unsupported)?;
        let (start, func) = self.function_code(addr).ok_or(NotOptimizable::TooShort)?;
        let range = probe_arch_x86_64::detour::analyze(&func, start, addr)?;
        let (at, reused) = self
            .areas
            .alloc_trampoline(addr, TRAMPOLINE)
            .ok_or(NotOptimizable::NoMemory)?;
        // Relaxed: statistics.
        self.trampolines_made.fetch_add(1, Ordering::Relaxed);
        if reused {
            // Relaxed: statistics.
            self.trampolines_reused.fetch_add(1, Ordering::Relaxed);
        }
        let built = trampoline(at, ctx, self.xstate.size, &range)
            .ok()
            .and_then(|(code, displaced)| Some((code, displaced, range.jump_bytes(at)?)));
        let Some((code, displaced, jump)) = built else {
            self.areas.free_trampoline(at);
            return Err(NotOptimizable::OutOfReach);
        };
        if !self.ranges.insert(at, addr, addr + range.len() as u64) {
            self.areas.free_trampoline(at);
            return Err(NotOptimizable::NoMemory);
        }
        self.areas.write(at, &code);
        Ok(Detour {
            len: range.len() as u8,
            jump,
            trampoline: at,
            displaced,
        })
    }

    fn free_detour(&self, detour: &Detour) {
        self.release_trampoline(detour.trampoline);
    }

    fn patch(&self, batch: &[Patch]) -> probe_core::Result<()> {
        let live = self.sites_still_mapped(batch);
        let batch = &live[..];
        // All or nothing: a failed batch was rolled back, and its trampolines stay in use.
        patch_batch(&self.mem, batch)?;
        Ok(())
    }
}

/// After a probe's hit list changed: nothing to do on x86-64 (the trampoline saves whatever
/// its consumers need).
pub(super) fn after_publish(_opt: &Opt, _addr: u64, _full: bool) {}

/// After code was written into a near-code area: nothing on x86-64 (instruction fetch is
/// coherent with stores, and a thread only reaches new code after a serializing event).
pub(super) fn code_written(_rx: u64, _len: usize) {}

/// Never under an emulator that needs its own handling (see the aarch64 half).
pub(super) fn emulated() -> bool {
    false
}

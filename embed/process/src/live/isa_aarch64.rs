//! The aarch64 half of the embedding: the registers a consumer sees, instruction boundaries,
//! XOL copies and simulations (`probe-arch-aarch64`), the SIGTRAP handler's reading of the
//! signal frame, and the optimizer's `CodeSpace` — every code change made the way the arch
//! crate's [`probe_arch_aarch64::patch::plan`] says it may be.
//!
//! # Changing code under the Arm ARM's rule
//!
//! A single aligned 32-bit store may change code other threads run only when the old and the
//! new word are both in the concurrent-modification set (`B`, `BL`, `NOP`, `BRK`, …). Arming a
//! probe writes `BRK` over an arbitrary instruction, so it is a *stopped* change: every other
//! thread of the process is parked first ([`StopMachine`], below: a signal whose handler waits
//! until the change is made; returning from it is an exception return, which is context
//! synchronizing), the word is written through `/proc/self/mem`, the arch crate's
//! `DC CVAU / DSB ISH / IC IVAU / DSB ISH / ISB` runs over it on the `CTR_EL0` line sizes, and
//! the threads are let go. `BRK` ↔ `B` (the jump path's change) is concurrent: one store, the
//! cache maintenance, then `membarrier` SYNC_CORE so every thread context-synchronizes.
//!
//! # For the emulator
//!
//! Under qemu-user a store through `/proc/self/mem` reaches memory but not code qemu has already
//! translated (the kernel's write bypasses qemu's write-protection of translated pages). A
//! `mprotect` of the page to read+write+execute and back makes qemu drop its translations; on
//! hardware it is not needed and is not done. [`emulated`] tells the two apart: qemu-user shows
//! the host's `/proc/cpuinfo`, which on an x86 host names no Arm CPU. That `mprotect` is the
//! only part of this file that exists for the emulator.

use super::*;
use probe_arch_aarch64::cache::CacheGeometry;
use probe_arch_aarch64::insn::{Class, Cpu, classify_word};
use probe_arch_aarch64::patch::{self, PatchError, StopMachine, Stopped, WordWriter};
use probe_arch_aarch64::trampoline::{self as tramp, BuildError};
use probe_arch_aarch64::xol::{self, XOL_BRK_IMM};
use probe_arch_aarch64::{Aarch64, INSN_LEN, b, brk};

/// Why the arch refuses to probe an instruction.
pub use probe_arch_aarch64::insn::Refusal;

/// How far a near-code area may be from the code it serves (either end): `B` reaches ±128 MiB,
/// half of it leaves room for the object's own size. (An XOL copy out of `B`'s reach returns by
/// a second `BRK` instead, so this bounds speed, not correctness.)
pub(super) const AREA_REACH: u64 = 1 << 26;
/// The steps in which an area's address is searched for, outwards from the code.
pub(super) const AREA_STEP: u64 = 1 << 20;

/// A trampoline's room in a near-code area (aligned to it, so the quiescence scan finds a
/// trampoline's start from any address inside it).
pub(super) use probe_arch_aarch64::trampoline::TRAMPOLINE;

/// The registers a consumer sees: the interrupted thread's, from the signal frame (breakpoint
/// path) or the trampoline's frame (jump path, where it *is* the frame: the arch crate's
/// [`probe_arch_aarch64::trampoline::Regs`]).
pub use probe_arch_aarch64::trampoline::Regs;

/// The offsets of the instruction boundaries of `code`: every word.
pub(super) fn boundaries(code: &[u8], _at: u64) -> Result<Vec<u64>, Refusal> {
    Ok((0..code.len() / INSN_LEN)
        .map(|i| (i * INSN_LEN) as u64)
        .collect())
}

/// Whether `addr` starts an instruction of the function `func` at `start`.
pub(super) fn check_boundary(func: &[u8], start: u64, addr: u64) -> probe_core::Result<()> {
    if addr < start || addr - start >= func.len() as u64 {
        return Err(probe_core::Error::OffsetOutOfRange);
    }
    if !(addr - start).is_multiple_of(INSN_LEN as u64) {
        return Err(probe_core::Error::InsideInstruction);
    }
    Ok(())
}

/// How a hit at a probed address continues: a copy that runs out of line, or (PC-relative
/// instructions) a simulation from the original PC.
pub(super) struct StepPlan {
    word: u32,
    addr: u64,
    simulate: bool,
}

impl StepPlan {
    /// Classifies the instruction at `addr` (`code`: its bytes, to the function's end).
    pub(super) fn new(code: &[u8], addr: u64) -> Result<Self, LiveError> {
        let word = probe_arch_aarch64::word(code).ok_or(LiveError::NoFunctionAt(addr))?;
        let simulate = match classify_word(word).map_err(LiveError::Refused)? {
            Class::Simulate(_) => true,
            Class::Step => false,
        };
        Ok(Self {
            word,
            addr,
            simulate,
        })
    }
    /// Where the copy continues in the original code.
    pub(super) fn resume(&self) -> u64 {
        self.addr + INSN_LEN as u64
    }
    /// The instruction word if a hit simulates it, else 0.
    pub(super) fn simulated(&self) -> u32 {
        if self.simulate { self.word } else { 0 }
    }
    /// The copy's bytes, for the slot at `slot` (a simulated instruction's slot holds two XOL
    /// breakpoints: it is never run).
    pub(super) fn copy(&self, slot: u64) -> Result<Vec<u8>, LiveError> {
        let trap = brk(XOL_BRK_IMM).to_le_bytes();
        match xol::prepare(self.word, self.addr, slot).map_err(LiveError::Refused)? {
            xol::Plan::Step(c) if !self.simulate => Ok(c.bytes().to_vec()),
            _ => Ok([trap, trap].concat()),
        }
    }
}

/// No aarch64 trap is the program's by its encoding alone (a `BRK` the optimizer does not know
/// at an address that holds no `BRK` now was ours, removed meanwhile).
pub(super) fn restart_is_foreign(_space: &ProcessCode, _addr: u64) -> bool {
    false
}

/// The interrupted PC in a signal frame.
pub(super) fn pc_of(uc: *mut libc::c_void) -> u64 {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    unsafe { (*uc.cast::<libc::ucontext_t>()).uc_mcontext.pc }
}

fn regs_of(mc: &libc::mcontext_t) -> Regs {
    Regs {
        x: mc.regs,
        sp: mc.sp,
        pc: mc.pc,
        pstate: mc.pstate,
    }
}

/// The signal frame as the simulation's CPU: general registers, NZCV, the vector registers
/// in the frame's FPSIMD record, and memory (the literal pool, in mapped code).
struct FrameCpu<'a> {
    mc: &'a mut libc::mcontext_t,
}

/// The FPSIMD record's magic in the frame's `__reserved` area (Linux `FPSIMD_MAGIC`).
const FPSIMD_MAGIC: u32 = 0x4650_8001;
/// The SVE record's magic (Linux `SVE_MAGIC`).
const SVE_MAGIC: u32 = 0x5356_4501;

impl Cpu for FrameCpu<'_> {
    type Fault = ();
    fn x(&self, n: u8) -> u64 {
        self.mc.regs.get(usize::from(n)).copied().unwrap_or(0)
    }
    fn set_x(&mut self, n: u8, value: u64) {
        if let Some(r) = self.mc.regs.get_mut(usize::from(n)) {
            *r = value;
        }
    }
    fn nzcv(&self) -> u32 {
        (self.mc.pstate & 0xF000_0000) as u32
    }
    fn set_v(&mut self, n: u8, value: u128) {
        // The records follow `pstate`, 16-byte aligned: walk them. V<n> is in the FPSIMD record
        // (head: magic u32, size u32; fpsr, fpcr; V0–V31 at offset 16), and — when the thread's
        // SVE state is live — also the low 128 bits of Z<n> in the SVE record (head; vl u16;
        // …; Z0–Z31 of `vl` bytes each at offset 16), which sigreturn then restores instead:
        // both are written (a vector load zeroes the rest of Z<n>, as the architecture does).
        if n >= 32 {
            return;
        }
        let base = (&raw mut self.mc.pstate).cast::<u8>().wrapping_add(8);
        let base = base.wrapping_add(base.align_offset(16));
        let mut off = 0usize;
        while off + 16 <= 4096 {
            // SAFETY: inside the frame's 4 KiB `__reserved` area, which the kernel filled with
            // records (each head is two u32s; a zero head ends them).
            let (magic, size) = unsafe {
                (
                    base.add(off).cast::<u32>().read_unaligned(),
                    base.add(off + 4).cast::<u32>().read_unaligned() as usize,
                )
            };
            if magic == 0 || size == 0 || off + size > 4096 {
                return;
            }
            if magic == FPSIMD_MAGIC && size >= 16 + 32 * 16 {
                // SAFETY: V<n> of the FPSIMD record, inside it (checked size).
                unsafe {
                    base.add(off + 16 + usize::from(n) * 16)
                        .cast::<u128>()
                        .write_unaligned(value)
                };
            }
            if magic == SVE_MAGIC && size > 16 {
                // SAFETY: the SVE record's `vl`, inside its 16-byte head.
                let vl = usize::from(unsafe { base.add(off + 8).cast::<u16>().read_unaligned() });
                let z = off + 16 + usize::from(n) * vl;
                if vl >= 16 && z + vl <= off + size {
                    // SAFETY: Z<n> of the SVE record, inside it (checked).
                    unsafe {
                        base.add(z).cast::<u128>().write_unaligned(value);
                        core::ptr::write_bytes(base.add(z + 16), 0, vl - 16);
                    }
                }
            }
            off += size;
        }
    }
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), ()> {
        // The literal of an `LDR (literal)` in mapped code of the object probed.
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: the literal pool of code the thread was just running: mapped, readable.
            *b = unsafe { core::ptr::read_volatile((addr as usize + i) as *const u8) };
        }
        Ok(())
    }
}

/// The SIGTRAP handler. See the module docs of `live` for what it may and may not do.
pub(super) extern "C" fn on_sigtrap(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    /// `si_code` of a `BRK` (Linux `TRAP_BRKPT`).
    const TRAP_BRKPT: libc::c_int = 1;
    let Some(live) = LIVE.get().copied() else {
        return;
    };
    // Only a BRK is ours to look at; a `raise`/`kill` or a hardware breakpoint goes to the
    // program.
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    if unsafe { (*info).si_code } != TRAP_BRKPT {
        chain(&live.previous, sig, info, uc);
        return;
    }
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    let mc = unsafe { &mut (*uc.cast::<libc::ucontext_t>()).uc_mcontext };
    let pc = mc.pc;
    // The way back from an XOL copy out of `B`'s reach: its second word is `BRK #XOL_BRK_IMM`,
    // in a block of an area whose resume address is known.
    if let Some((_, resume)) = live.opt.space().areas.resume_of(pc)
        && resume != 0
    {
        // SAFETY: `pc` is in our area's executable view (mapped, readable).
        let word = unsafe { core::ptr::read_volatile(pc as *const u32) };
        if word == brk(XOL_BRK_IMM) {
            mc.pc = resume;
            return;
        }
    }
    // BRK traps with PC at itself.
    let answer = live.breakpoint_hit(pc, || regs_of(mc));
    match answer {
        Next::Xol(ctx) => {
            // Relaxed: ordered by `on_breakpoint`'s Acquire of the probe, which the optimizer
            // published after `prepare_ctx` stored these.
            let word = ctx.simulated.load(Ordering::Relaxed);
            if word != 0
                && let Ok(Class::Simulate(p)) = classify_word(word)
            {
                let next = p.simulate(pc, &mut FrameCpu { mc });
                mc.pc = next.unwrap_or(pc);
            } else {
                // Relaxed: as above.
                mc.pc = ctx.xol.load(Ordering::Relaxed);
            }
        }
        Next::Pc(next) => mc.pc = next,
        Next::NotOurs => chain(&live.previous, sig, info, uc),
    }
}

/// Whether this process runs under an emulator that does not see `/proc/self/mem` writes to
/// code it has translated (qemu-user, which shows the host's `/proc/cpuinfo`: no Arm CPU
/// there). Read once.
pub(super) fn emulated() -> bool {
    static E: OnceLock<bool> = OnceLock::new();
    *E.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| !c.contains("CPU implementer") && !c.contains("AArch64"))
            .unwrap_or(false)
    })
}

/// For the emulator only ([`emulated`]): makes qemu drop its translations of the page holding
/// `addr` by making it writable and back (its protection is read+execute, as every text page
/// we write).
fn emulator_flush(addr: u64, len: usize) {
    let page = addr & !0xFFF;
    let end = (addr + len as u64).next_multiple_of(0x1000);
    let n = (end - page) as usize;
    // SAFETY: the page is a text page of a mapped object (read+execute); the protection is
    // put back at once, and nothing is written through the brief writable one.
    unsafe {
        libc::mprotect(
            page as *mut libc::c_void,
            n,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
        );
        libc::mprotect(
            page as *mut libc::c_void,
            n,
            libc::PROT_READ | libc::PROT_EXEC,
        );
    }
}

/// Why a word write failed, for the optimizer.
fn patch_error(e: PatchError) -> probe_core::Error {
    match e {
        PatchError::Misaligned => probe_core::Error::InsideInstruction,
        _ => probe_core::Error::Embedder(libc::EAGAIN),
    }
}

impl WordWriter for ProcMem {
    fn read_word(&self, addr: u64) -> u32 {
        let mut w = [0u8; 4];
        // An unreadable word reads as 0, which no plan's `old` is: the patch reports `Changed`.
        if self.0.read_exact_at(&mut w, addr).is_err() {
            return 0;
        }
        u32::from_le_bytes(w)
    }
    fn write_word(&self, addr: u64, word: u32) {
        // A failed write leaves the old word, which `read_word` then shows the patch.
        let _ = self.0.write_all_at(&word.to_le_bytes(), addr);
        if emulated() {
            emulator_flush(addr, 4);
        }
    }
    fn flush(&self, addr: u64, len: usize) {
        CacheGeometry::current().sync_icache(addr, len);
    }
    fn sync_cores(&self) {
        // Every thread context-synchronizes before this returns (or, where the kernel lacks it,
        // at its next exception return — a signal or a system call — which is as good for the
        // threads the optimizer waits for next).
        let _ = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE);
    }
}

/// Parks every other thread of the process in a signal handler while a stopped change is made.
pub(super) struct StopThreads;

/// The signal that parks a thread for [`StopThreads`].
pub(super) fn stop_signal() -> libc::c_int {
    libc::SIGRTMIN() + 8
}

/// Threads parked now, and the generation they wait to see change.
static PARKED: AtomicU64 = AtomicU64::new(0);
static RELEASE: AtomicU64 = AtomicU64::new(0);
/// Which threads parked in the current stop (for the emulator's bookkeeping).
static PARKED_IDS: Answers = Answers::new();

/// Runs on each thread [`StopThreads`] signals: wait until the change is made.
pub(super) extern "C" fn on_stop(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _uc: *mut libc::c_void,
) {
    // SAFETY: the value was sent by `stop_machine` with rt_tgsigqueueinfo.
    let generation = unsafe { (*info).si_value().sival_ptr as u64 };
    note_answer(&PARKED_IDS);
    PARKED.fetch_add(1, Ordering::SeqCst);
    while RELEASE.load(Ordering::SeqCst) < generation {
        // SAFETY: sched_yield has no preconditions (and is async-signal-safe).
        unsafe { libc::sched_yield() };
    }
    PARKED.fetch_sub(1, Ordering::SeqCst);
    // Returning is an exception return: context synchronizing, so this thread fetches the new
    // code.
}

// SAFETY: `stop_machine` runs `f` only once every other thread of the process is parked in
// `on_stop` (or has exited), and lets them go after it.
unsafe impl StopMachine for StopThreads {
    fn stop_machine(&self, f: &mut dyn FnMut(&Stopped<'_>)) {
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let generation = GENERATION.fetch_add(1, Ordering::SeqCst) + 1;
        // SAFETY: no preconditions.
        let pid = unsafe { libc::getpid() };
        PARKED_IDS.reset();
        let sent: Vec<libc::pid_t> = other_threads()
            .into_iter()
            .filter(|&tid| signal_thread(pid, tid, stop_signal(), generation))
            .collect();
        // Wait for every thread signalled to park (a thread that exited meanwhile never will).
        // For the emulator only: qemu-user's own threads (its RCU thread) are in
        // /proc/self/task too and never run a guest handler, so under emulation the wait ends
        // once no thread has parked for 100 ms (and those threads are left out from then on:
        // `note_silent`) — sound there, because qemu makes any code change safe for the
        // threads it runs (it retranslates); the stop is what hardware needs.
        let mut last = (0usize, std::time::Instant::now());
        loop {
            let parked = PARKED.load(Ordering::SeqCst) as usize;
            if parked >= sent.len() {
                break;
            }
            let alive = sent
                .iter()
                .filter(|t| std::path::Path::new(&format!("/proc/self/task/{t}")).exists())
                .count();
            if parked >= alive {
                break;
            }
            if parked != last.0 {
                last = (parked, std::time::Instant::now());
            } else if emulated() && last.1.elapsed() > std::time::Duration::from_millis(100) {
                note_silent(&sent, &PARKED_IDS);
                break;
            }
            std::thread::yield_now();
        }
        // SAFETY: every other thread is parked (above).
        f(&unsafe { Stopped::new() });
        RELEASE.store(generation, Ordering::SeqCst);
        while PARKED.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
    }
}

impl CodeSpace for ProcessCode {
    type Arch = Aarch64;

    shared_code_space_methods!();

    fn prepare_detour(&self, addr: u64) -> Result<Detour, NotOptimizable> {
        // The trampoline hands its hit this probe's context directly (attach made it).
        let ctx = self.xol_map.get(addr).ok_or(NotOptimizable::Unsupported)?;
        let mut w = [0u8; INSN_LEN];
        self.original_at(addr, &mut w)
            .map_err(|_| NotOptimizable::TooShort)?;
        let word = u32::from_le_bytes(w);
        let (at, reused) = self
            .areas
            .alloc_trampoline(addr, TRAMPOLINE)
            .ok_or(NotOptimizable::NoMemory)?;
        let built = tramp::build(
            at,
            trampoline_entry as *const () as u64,
            ctx as *const ProbeCtx as u64,
            addr,
            word,
        );
        let (t, jump) = match built.map(|t| (b(addr, at), t)) {
            Ok((Some(jump), t)) => (t, jump),
            Ok((None, _)) | Err(BuildError::OutOfReach) => {
                self.areas.free_trampoline(at);
                return Err(NotOptimizable::OutOfReach);
            }
            Err(BuildError::PcRelative) => {
                self.areas.free_trampoline(at);
                return Err(NotOptimizable::Unrelocatable { addr });
            }
            Err(BuildError::Refused(r)) => {
                self.areas.free_trampoline(at);
                return Err(r.at(addr));
            }
        };
        if !self.ranges.insert(at, addr, addr + INSN_LEN as u64) {
            self.areas.free_trampoline(at);
            return Err(NotOptimizable::NoMemory);
        }
        // Relaxed: statistics.
        self.trampolines_made.fetch_add(1, Ordering::Relaxed);
        if reused {
            // Relaxed: statistics.
            self.trampolines_reused.fetch_add(1, Ordering::Relaxed);
        }
        let mut code = [0u8; TRAMPOLINE];
        let n = t.write_bytes(&mut code);
        self.areas.write(at, &code[..n]);
        let mut bytes = [0u8; probe_core::arch::MAX_DETOUR];
        bytes[..INSN_LEN].copy_from_slice(&jump.to_le_bytes());
        Ok(Detour {
            len: INSN_LEN as u8,
            jump: bytes,
            trampoline: at,
            displaced: t.displaced,
        })
    }

    fn free_detour(&self, detour: &Detour) {
        self.release_trampoline(detour.trampoline);
    }

    fn patch(&self, batch: &[Patch]) -> probe_core::Result<()> {
        // One word per site, each changed as `patch::plan` allows; all or nothing: a site that
        // fails undoes the ones before it (in reverse, each by its own plan).
        let sites = self.sites_still_mapped(batch);
        let word =
            |b: &[u8]| probe_arch_aarch64::word(b).ok_or(probe_core::Error::InsideInstruction);
        for (i, p) in sites.iter().enumerate() {
            let step = (|| {
                let new = word(p.new_bytes())?;
                // Already what it must hold (a mapping replaced by fresh pages of the file
                // holds the original word where the optimizer believes its BRK is).
                if self.mem.read_word(p.addr) == new {
                    return Ok(());
                }
                let plan = patch::plan(p.addr, word(p.old())?, new).map_err(patch_error)?;
                patch::apply(plan, &self.mem, &StopThreads).map_err(patch_error)
            })();
            if let Err(e) = step {
                for q in sites[..i].iter().rev() {
                    if let (Ok(new), Ok(old)) = (word(q.new_bytes()), word(q.old()))
                        && let Ok(plan) = patch::plan(q.addr, new, old)
                    {
                        let _ = patch::apply(plan, &self.mem, &StopThreads);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Called by every trampoline (AAPCS64: the frame in X0, the probe's context in X1, the
/// trampoline's own address in X2), on the probed thread's stack with X0–X30, NZCV, FPSR, FPCR
/// and V0–V31 saved: any consumer may run (on an SVE CPU, see [`after_publish`]).
///
/// Per hit: one thread-local read, the pool claim, one registry read section, one load of the
/// probe's list — no tree lookup, no address-space resolve.
#[inline(never)]
extern "C" fn trampoline_entry(frame: *mut Regs, ctx: &'static ProbeCtx, tramp: u64) {
    let Some(live) = LIVE.get().copied() else {
        return;
    };
    let outer = IN_TRAMPOLINE.with(|t| t.replace((tramp, t.get().1 + 1)));
    // SAFETY: the trampoline passes the frame it just stored, laid out as `Regs`; its PC slot is
    // filled here, once, before anyone reads the frame.
    let regs = unsafe {
        (*frame).pc = ctx.addr;
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
            for h in unsafe { &*list }.hooks.iter() {
                h.call(regs);
            }
        }
    }
    Live::release(pooled);
    IN_TRAMPOLINE.with(|t| t.set(outer));
}

/// Whether the CPU has SVE (`HWCAP_SVE`): the trampoline's frame does not hold the Z
/// registers' upper bits or the predicates, which a closure consumer calling into the C library
/// could change.
fn has_sve() -> bool {
    const HWCAP_SVE: u64 = 1 << 22;
    // SAFETY: getauxval has no preconditions.
    unsafe { libc::getauxval(libc::AT_HWCAP) & HWCAP_SVE != 0 }
}

/// After a probe's hit list changed: on an SVE CPU a probe with a closure consumer is pinned
/// to the breakpoint path (the kernel saves the whole SVE state for a signal), and unpinned
/// when only register-only consumers are left. Elsewhere the jump path serves every consumer.
pub(super) fn after_publish(opt: &Opt, addr: u64, full: bool) {
    if has_sve() {
        let _ = opt.set_single_step(addr, full);
    }
}

/// After code was written into a near-code area at `rx` (its executable view): the cache
/// maintenance that makes it fetchable, and for the emulator its flush.
pub(super) fn code_written(rx: u64, len: usize) {
    CacheGeometry::current().sync_icache(rx, len);
    if emulated() {
        emulator_flush(rx, len);
    }
}

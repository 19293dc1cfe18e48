//! probe-core as this kernel's kprobes: the kernel text as a `CodeSpace`, the `#BP` handler, the
//! trampolines, and the kernel API over `probe_core::kprobes::Kprobes`.
//!
//! * **Text.** The functions probes may go in are listed in [`FUNCTIONS`] (start, end); a copy of
//!   their bytes taken at boot is the original. Code is written in place (the identity map is
//!   writable) through the x86 crate's int3-first live patch; its sync is [`smp::sync_others`].
//! * **Out-of-line copies** are made at registration, one per probed address, in [`XOL`] (the
//!   x86 crate relocates the instruction and appends the jump back).
//! * **Trampolines** live in [`TRAMPOLINES`]: skip the red zone, save flags, general registers
//!   and the SSE state, call [`trampoline_entry`] with the probe's address, restore, run the
//!   displaced instructions, jump back.
//! * **Quiescence:** a sync IPI; every other CPU reports where it was interrupted, and the wait
//!   ends once none is strictly inside a prepared jump range or inside a trampoline.

use crate::cpu::TrapFrame;
use crate::percpu::{PERCPU, this_cpu_index};
use crate::rcu::{CpuReader, KernelRcu};
use crate::smp::{self, ONLINE};
use crate::sync::{AtomicU64, IrqSpinLock, Ordering};
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use probe_arch_x86_64::X86_64;
use probe_arch_x86_64::insn::{self, Insn, Refusal};
use probe_arch_x86_64::live_patch::{CodeWriter, patch_batch};
use probe_core::arch::{CodeSpace, Detour, NotOptimizable, Patch};
use probe_core::kprobes::{Kprobe, KprobeTrap, Kprobes};
use probe_core::optimizer::Then;

/// A consumer: a function and its datum. It gets the probe's address, the probed code's first
/// argument (RDI) and the datum.
#[derive(Clone, Copy, Debug)]
pub struct Handler {
    /// Called on every hit (interrupt context or a trampoline: no locks, no allocation).
    pub f: fn(addr: u64, rdi: u64, data: u64),
    /// Passed to `f`.
    pub data: u64,
}

/// The kernel's kprobes: one domain (`&'static KernelRcu`), interrupt-safe spinlocks.
pub type KernelKprobes = Kprobes<Handler, KernelText, &'static KernelRcu, IrqSpinLock, IrqSpinLock>;

/// The kernel's RCU domain.
pub static RCU: KernelRcu = KernelRcu::new();

struct Global(UnsafeCell<Option<&'static KernelKprobes>>);
// SAFETY: set once by the bootstrap CPU before any other CPU starts; read-only after.
unsafe impl Sync for Global {}
static KPROBES: Global = Global(UnsafeCell::new(None));

/// The kprobes (after [`init`]).
pub fn kprobes() -> &'static KernelKprobes {
    // SAFETY: written once in `init`, before any reader runs.
    unsafe { (*KPROBES.0.get()).expect("kprobes::init ran") }
}

/// A kernel API error: probe-core's, or this kernel's own refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KError {
    /// From probe-core.
    Core(probe_core::Error),
    /// The instruction there cannot run out of line (the x86 crate says why).
    Unsteppable(Refusal),
}

const XOL_SLOT: usize = 32;
const XOL_SLOTS: usize = 64;
const TRAMPOLINE: usize = 512;
const TRAMPOLINE_SLOTS: usize = 64;

#[repr(C, align(4096))]
struct Area<const N: usize>(UnsafeCell<[u8; N]>);
// SAFETY: written only under the optimizer's lock (registration), read by instruction fetch.
unsafe impl<const N: usize> Sync for Area<N> {}

static XOL: Area<{ XOL_SLOT * XOL_SLOTS }> = Area(UnsafeCell::new([0xCC; XOL_SLOT * XOL_SLOTS]));
static TRAMPOLINES: Area<{ TRAMPOLINE * TRAMPOLINE_SLOTS }> =
    Area(UnsafeCell::new([0xCC; TRAMPOLINE * TRAMPOLINE_SLOTS]));

/// Probed address → its out-of-line copy (0: free entry). Written under the optimizer's lock,
/// read by the `#BP` handler.
static XOL_ADDR: [AtomicU64; XOL_SLOTS] = [const { AtomicU64::new(0) }; XOL_SLOTS];

/// Counts for the log.
pub static TRAMPOLINES_MADE: AtomicU64 = AtomicU64::new(0);
pub static TRAMPOLINES_REUSED: AtomicU64 = AtomicU64::new(0);
pub static TRAMPOLINES_FREED: AtomicU64 = AtomicU64::new(0);
pub static QUIESCE_RETRIES: AtomicU64 = AtomicU64::new(0);
pub static PATCH_SYNCS: AtomicU64 = AtomicU64::new(0);
pub static FOREIGN_INT3: AtomicU64 = AtomicU64::new(0);
pub static RESTARTS: AtomicU64 = AtomicU64::new(0);

/// The kernel text as probe-core's optimizer sees it.
pub struct KernelText {
    /// `(start, original bytes)` per probe-able function.
    functions: Vec<(u64, Vec<u8>)>,
    /// Trampoline slots: 0 never used, 1 in use, 2 freed (reusable), 3 retired (nothing can
    /// enter it any more; freed after the next quiescence wait). Under the optimizer's lock.
    slots: UnsafeCell<[u8; TRAMPOLINE_SLOTS]>,
    /// Prepared jump ranges `(start, end)` (0, 0 when free): a CPU strictly inside one keeps
    /// the quiescence wait waiting.
    ranges: [(AtomicU64, AtomicU64); TRAMPOLINE_SLOTS],
}

// SAFETY: `slots` is touched only under the optimizer's lock; everything else is immutable or
// atomic.
unsafe impl Sync for KernelText {}

impl KernelText {
    fn function(&self, addr: u64) -> Option<(u64, &[u8])> {
        self.functions
            .iter()
            .find(|(s, b)| addr >= *s && addr < *s + b.len() as u64)
            .map(|(s, b)| (*s, &b[..]))
    }
}

/// Where the first GiB is mapped a second time (`boot`): code is written through this alias, as
/// Linux's `text_poke` writes through a mapping of its own, not the address code executes at.
pub const TEXT_ALIAS: u64 = 1 << 32;

struct Writer;

impl CodeWriter for Writer {
    fn write(&self, addr: u64, bytes: &[u8]) -> probe_core::Result<()> {
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: a probe-able function's bytes (the optimizer writes only probe sites),
            // identity-mapped and writable; the live patch makes the stores safe to execute.
            unsafe {
                ((TEXT_ALIAS + addr) as usize as *mut u8)
                    .add(i)
                    .write_volatile(*b)
            };
            smp::touched(addr + i as u64);
        }
        Ok(())
    }
    fn sync_cores(&self) {
        PATCH_SYNCS.fetch_add(1, Ordering::Relaxed);
        smp::sync_others();
    }
}

impl CodeSpace for KernelText {
    type Arch = X86_64;

    fn read_original(&self, addr: u64, buf: &mut [u8]) -> probe_core::Result<()> {
        let (start, bytes) = self
            .function(addr)
            .ok_or(probe_core::Error::OffsetOutOfRange)?;
        let off = (addr - start) as usize;
        let src = bytes
            .get(off..off + buf.len())
            .ok_or(probe_core::Error::OffsetOutOfRange)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn check_boundary(&self, addr: u64) -> probe_core::Result<()> {
        let (start, bytes) = self
            .function(addr)
            .ok_or(probe_core::Error::OffsetOutOfRange)?;
        insn::check_boundary(bytes, start, addr)
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> probe_core::Result<()> {
        if self.function(addr).is_none() {
            return Err(probe_core::Error::OffsetOutOfRange);
        }
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: inside a probe-able function (checked), identity-mapped.
            *b = unsafe { ((addr as usize + i) as *const u8).read_volatile() };
        }
        Ok(())
    }

    fn prepare_detour(&self, addr: u64) -> Result<Detour, NotOptimizable> {
        make_xol(self, addr);
        let (start, bytes) = self.function(addr).ok_or(NotOptimizable::TooShort)?;
        let range = probe_arch_x86_64::detour::analyze(bytes, start, addr)?;
        // SAFETY: under the optimizer's lock.
        let slots = unsafe { &mut *self.slots.get() };
        let i = slots
            .iter()
            .position(|&s| s == 2)
            .or_else(|| slots.iter().position(|&s| s == 0))
            .ok_or(NotOptimizable::NoMemory)?;
        if slots[i] == 2 {
            TRAMPOLINES_REUSED.fetch_add(1, Ordering::Relaxed);
        }
        let at = TRAMPOLINES.0.get() as u64 + (i * TRAMPOLINE) as u64;
        let (code, displaced) =
            trampoline_code(at, addr, &range).map_err(|_| NotOptimizable::OutOfReach)?;
        let jump = range.jump_bytes(at).ok_or(NotOptimizable::OutOfReach)?;
        // SAFETY: our slot, not reachable by any jump yet.
        unsafe {
            core::ptr::copy_nonoverlapping(code.as_ptr(), at as *mut u8, code.len());
        }
        slots[i] = 1;
        // Relaxed: read by the quiescence scan after a sync IPI (whose Release/Acquire orders it).
        self.ranges[i].0.store(addr, Ordering::Relaxed);
        self.ranges[i]
            .1
            .store(addr + range.len() as u64, Ordering::Relaxed);
        TRAMPOLINES_MADE.fetch_add(1, Ordering::Relaxed);
        Ok(Detour {
            len: range.len() as u8,
            jump,
            trampoline: at,
            displaced,
        })
    }

    fn free_detour(&self, d: &Detour) {
        let i = ((d.trampoline - TRAMPOLINES.0.get() as u64) as usize) / TRAMPOLINE;
        // SAFETY: under the optimizer's lock.
        unsafe { (*self.slots.get())[i] = 2 };
        // Relaxed: as in `prepare_detour`.
        self.ranges[i].0.store(0, Ordering::Relaxed);
        self.ranges[i].1.store(0, Ordering::Relaxed);
        TRAMPOLINES_FREED.fetch_add(1, Ordering::Relaxed);
    }

    fn retire_detour(&self, d: &Detour) {
        let i = ((d.trampoline - TRAMPOLINES.0.get() as u64) as usize) / TRAMPOLINE;
        // SAFETY: under the optimizer's lock.
        unsafe { (*self.slots.get())[i] = 3 };
    }

    fn patch(&self, batch: &[Patch]) -> probe_core::Result<()> {
        patch_batch(&Writer, batch).map(|_| ())
    }

    fn quiesce(&self) {
        let tramp = TRAMPOLINES.0.get() as u64;
        let tramp_end = tramp + (TRAMPOLINE * TRAMPOLINE_SLOTS) as u64;
        // SAFETY: under the optimizer's lock (the only writer of `slots`).
        let slots = unsafe { &*self.slots.get() };
        // Only retired trampolines: a CPU is always inside a hot probe's live one.
        let retired = |rip: u64| {
            rip >= tramp && rip < tramp_end && slots[(rip - tramp) as usize / TRAMPOLINE] == 3
        };
        let me = this_cpu_index();
        loop {
            smp::sync_others();
            let online = ONLINE.load(Ordering::Acquire);
            let inside = (0..online).filter(|&c| c != me).any(|c| {
                // Relaxed: ordered by the sync's Acquire of this CPU's ack.
                let rip = PERCPU[c].rip.load(Ordering::Relaxed);
                retired(rip)
                    || self.ranges.iter().any(|(s, e)| {
                        let (s, e) = (s.load(Ordering::Relaxed), e.load(Ordering::Relaxed));
                        rip > s && rip < e
                    })
            });
            if !inside {
                return;
            }
            QUIESCE_RETRIES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Makes (once) the out-of-line copy of the instruction at `addr`.
fn make_xol(text: &KernelText, addr: u64) {
    if XOL_ADDR.iter().any(|a| a.load(Ordering::Acquire) == addr) {
        return;
    }
    let Some(i) = XOL_ADDR.iter().position(|a| a.load(Ordering::Relaxed) == 0) else {
        return;
    };
    let Some((start, bytes)) = text.function(addr) else {
        return;
    };
    let b = &bytes[(addr - start) as usize..];
    let slot = XOL.0.get() as u64 + (i * XOL_SLOT) as u64;
    let Ok(c) = Insn::decode(b, addr).and_then(|i| probe_arch_x86_64::xol::prepare(&i, slot))
    else {
        return;
    };
    // SAFETY: a free slot nobody executes yet.
    unsafe { core::ptr::copy_nonoverlapping(c.bytes().as_ptr(), slot as *mut u8, c.bytes().len()) };
    // Release pairs with the Acquire load in `xol_for`: the copy is written before it is found.
    XOL_ADDR[i].store(addr, Ordering::Release);
}

/// The out-of-line copy for `addr`.
fn xol_for(addr: u64) -> Option<u64> {
    XOL_ADDR
        .iter()
        // Acquire pairs with the Release store in `make_xol`.
        .position(|a| a.load(Ordering::Acquire) == addr)
        .map(|i| XOL.0.get() as u64 + (i * XOL_SLOT) as u64)
}

/// Builds the kernel's trampoline at `at` for the probe at `addr`.
fn trampoline_code(
    at: u64,
    addr: u64,
    range: &probe_arch_x86_64::detour::JumpRange,
) -> Result<(Vec<u8>, u64), Refusal> {
    let mut c: Vec<u8> = Vec::with_capacity(TRAMPOLINE);
    c.extend_from_slice(&[0x48, 0x8D, 0x64, 0x24, 0x80]); // lea rsp, [rsp-128]: the red zone
    c.push(0x9C); // pushfq
    c.extend_from_slice(&[0x50, 0x53, 0x51, 0x52, 0x56, 0x57, 0x55]); // rax rbx rcx rdx rsi rdi rbp
    for r in 0..8u8 {
        c.extend_from_slice(&[0x41, 0x50 + r]); // push r8 … r15
    }
    c.push(0xFC); // cld
    c.extend_from_slice(&[0x48, 0x89, 0xE3]); // mov rbx, rsp
    c.extend_from_slice(&[0x48, 0x81, 0xEC, 0x00, 0x02, 0x00, 0x00]); // sub rsp, 512
    c.extend_from_slice(&[0x48, 0x83, 0xE4, 0xF0]); // and rsp, -16
    c.extend_from_slice(&[0x48, 0x0F, 0xAE, 0x04, 0x24]); // fxsave64 [rsp]
    c.extend_from_slice(&[0x48, 0xBF]); // movabs rdi, addr
    c.extend_from_slice(&addr.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x89, 0xDE]); // mov rsi, rbx (the saved registers)
    c.extend_from_slice(&[0x48, 0xB8]); // movabs rax, trampoline_entry
    c.extend_from_slice(&(trampoline_entry as *const () as u64).to_le_bytes());
    c.extend_from_slice(&[0xFF, 0xD0]); // call rax
    c.extend_from_slice(&[0x48, 0x0F, 0xAE, 0x0C, 0x24]); // fxrstor64 [rsp]
    c.extend_from_slice(&[0x48, 0x89, 0xDC]); // mov rsp, rbx
    for r in (0..8u8).rev() {
        c.extend_from_slice(&[0x41, 0x58 + r]); // pop r15 … r8
    }
    c.extend_from_slice(&[0x5D, 0x5F, 0x5E, 0x5A, 0x59, 0x5B, 0x58]); // rbp rdi rsi rdx rcx rbx rax
    c.push(0x9D); // popfq
    c.extend_from_slice(&[0x48, 0x8D, 0xA4, 0x24, 0x80, 0, 0, 0]); // lea rsp, [rsp+128]
    let displaced = at + c.len() as u64;
    c.extend_from_slice(range.displaced(displaced)?.bytes());
    if c.len() > TRAMPOLINE {
        return Err(Refusal::TooLong);
    }
    Ok((c, displaced))
}

/// The pushed registers, as `trampoline_code` pushes them (r15 lowest).
#[repr(C)]
struct Pushed {
    r: [u64; 8], // r15 … r8
    rbp: u64,
    rdi: u64,
}

/// Called by every trampoline (sysv64: the probe's address, the saved registers).
extern "C" fn trampoline_entry(addr: u64, regs: *const Pushed) {
    // SAFETY: the trampoline passes the frame it pushed.
    let rdi = unsafe { (*regs).rdi };
    let cpu = this_cpu_index();
    let reader = CpuReader(cpu);
    let k = kprobes();
    let g = k.read(&reader);
    g.on_trampoline(addr).run(&PERCPU[cpu].reentry, |kp| {
        (kp.handler().f)(addr, rdi, kp.handler().data)
    });
}

/// The `#BP` handler (interrupts off, on IST 1).
pub fn on_int3(f: &mut TrapFrame) {
    let addr = f.rip - 1;
    let cpu = this_cpu_index();
    let reader = CpuReader(cpu);
    let k = kprobes();
    let g = k.read(&reader);
    match g.on_breakpoint(addr) {
        KprobeTrap::Probe { consumers, then } => {
            let rdi = f.rdi;
            consumers.run(&PERCPU[cpu].reentry, |kp| {
                (kp.handler().f)(addr, rdi, kp.handler().data)
            });
            f.rip = match then {
                Then::Step => match xol_for(addr) {
                    Some(x) => x,
                    None => {
                        crate::kprintln!("KERNEL BUG: no out-of-line copy for {addr:#x}");
                        crate::port::exit_qemu(0x7C);
                    }
                },
                Then::Detour(d) => d.displaced,
            };
        }
        // The kernel's own int3 (not a probe): count it and go on after it, as a debugger
        // trap would.
        KprobeTrap::NotOurs => {
            FOREIGN_INT3.fetch_add(1, Ordering::Relaxed);
        }
        // The probe went while this CPU trapped on it: run the original instruction — out of
        // line when its copy exists (copies live for ever), so a CPU whose view of the code still
        // held our int3 goes on either way.
        KprobeTrap::Restart => {
            RESTARTS.fetch_add(1, Ordering::Relaxed);
            f.rip = xol_for(addr).unwrap_or(addr);
        }
    }
}

/// Sets up kprobes over `functions` (bootstrap CPU, before the others start).
pub fn init(functions: &[(u64, u64)]) {
    let functions = functions
        .iter()
        .map(|&(s, e)| {
            // SAFETY: the functions' bytes, in our image.
            let b = unsafe { core::slice::from_raw_parts(s as *const u8, (e - s) as usize) };
            (s, b.to_vec())
        })
        .collect();
    let text = KernelText {
        functions,
        slots: UnsafeCell::new([0; TRAMPOLINE_SLOTS]),
        ranges: [const { (AtomicU64::new(0), AtomicU64::new(0)) }; TRAMPOLINE_SLOTS],
    };
    let k: &'static KernelKprobes =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(Kprobes::new(text, &RCU)));
    // SAFETY: before any other CPU runs and before any reader.
    unsafe { *KPROBES.0.get() = Some(k) };
}

/// `register_kprobe`: refuses what cannot be stepped out of line, then registers.
pub fn register(
    kp: alloc::sync::Arc<Kprobe<Handler>>,
) -> Result<probe_core::optimizer::Armed, KError> {
    let k = kprobes();
    let addr = kp.addr();
    let text = k.space();
    let (start, bytes) = text
        .function(addr)
        .ok_or(KError::Core(probe_core::Error::OffsetOutOfRange))?;
    insn::check_boundary(bytes, start, addr).map_err(KError::Core)?;
    let off = (addr - start) as usize;
    let i = Insn::decode(&bytes[off..], addr).map_err(KError::Unsteppable)?;
    probe_arch_x86_64::xol::prepare(&i, XOL.0.get() as u64).map_err(KError::Unsteppable)?;
    k.register(kp).map_err(KError::Core)
}

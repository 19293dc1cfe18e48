//! Application processors: counted through QEMU's fw_cfg, started with INIT-SIPI-SIPI through a
//! real-mode trampoline copied below 1 MiB, and the cross-CPU sync: an IPI every other CPU
//! answers, after which its `iretq` (a serializing instruction) runs before it executes code
//! again — what Linux's `text_poke_bp` asks of `on_each_cpu`.

use crate::apic;
use crate::percpu::{MAX_CPUS, PERCPU, this_cpu_index};
use crate::port::{inb, outb};
use crate::sync::{AtomicU64, AtomicUsize, Ordering};

/// CPUs started (the bootstrap one included).
pub static ONLINE: AtomicUsize = AtomicUsize::new(1);
/// The sync IPI generation (the bootstrap CPU, under the optimizer's lock, is the only sender).
static SYNC_GEN: AtomicU64 = AtomicU64::new(0);
/// Sync IPIs sent (statistics).
pub static SYNCS: AtomicU64 = AtomicU64::new(0);

/// Where the trampoline runs (SIPI vector 0x08).
const TRAMPOLINE: usize = 0x8000;

/// How many CPUs QEMU gave us (fw_cfg key 0x05, `FW_CFG_NB_CPUS`), at most [`MAX_CPUS`].
pub fn cpu_count() -> usize {
    // SAFETY: QEMU's fw_cfg I/O ports: selector 0x510 (16-bit), data 0x511.
    let n = unsafe {
        core::arch::asm!("out dx, ax", in("dx") 0x510u16, in("ax") 0x05u16, options(nomem, nostack));
        let lo = inb(0x511);
        let hi = inb(0x511);
        u16::from(lo) | u16::from(hi) << 8
    };
    let _ = outb; // (fw_cfg needs only reads after the selector)
    usize::from(n).clamp(1, MAX_CPUS)
}

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static mut AP_STACK: u64;
}

core::arch::global_asm!(
    ".section .text",
    ".code16",
    ".global ap_trampoline_start",
    "ap_trampoline_start:",
    "cli",
    "xor ax, ax",
    "mov ds, ax",
    // lgdt [disp16] (0F 01 /2, ModRM 0x16): the copy's own GDT pointer.
    ".byte 0x0F, 0x01, 0x16",
    ".word 0x8000 + ap_gdt_ptr - ap_trampoline_start",
    "mov eax, cr0",
    "or eax, 1",
    "mov cr0, eax",
    // ljmp 0x18:(0x8000 + ap32 - start), 32-bit offset with the operand-size prefix.
    ".byte 0x66, 0xEA",
    ".long 0x8000 + ap_trampoline_32 - ap_trampoline_start",
    ".word 0x18",
    ".code32",
    "ap_trampoline_32:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "mov esp, [AP_STACK]",
    // Absolute: this code runs from its copy at 0x8000, so no relative call.
    "mov eax, offset enter_long_mode32",
    "call eax",
    ".byte 0xEA",
    ".long ap_start64",
    ".word 0x08",
    ".p2align 3",
    "ap_gdt:",
    ".quad 0",
    ".quad 0x00AF9A000000FFFF",
    ".quad 0x00CF92000000FFFF",
    ".quad 0x00CF9A000000FFFF", // 0x18: 32-bit code
    "ap_gdt_ptr:",
    ".word 4 * 8 - 1",
    ".long 0x8000 + ap_gdt - ap_trampoline_start",
    ".global ap_trampoline_end",
    "ap_trampoline_end:",
    ".code64",
    "ap_start64:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "mov rsp, [AP_STACK]",
    "call enable_sse",
    "call ap_main",
    "5:",
    "hlt",
    "jmp 5b",
    ".section .data",
    ".p2align 3",
    ".global AP_STACK",
    "AP_STACK: .quad 0",
    ".text",
);

const AP_STACK_SIZE: usize = 64 * 1024;
#[repr(C, align(16))]
struct ApStacks([[u8; AP_STACK_SIZE]; MAX_CPUS]);
static mut AP_STACKS: ApStacks = ApStacks([[0; AP_STACK_SIZE]; MAX_CPUS]);

fn spin(n: u64) {
    for _ in 0..n {
        core::hint::spin_loop();
    }
}

/// Starts CPUs 1..n one at a time; returns how many are online.
pub fn start_aps(n: usize) -> usize {
    // SAFETY: the trampoline's bytes are in our image; 0x8000.. is free conventional memory
    // (identity-mapped), and no AP runs yet.
    unsafe {
        let start = &raw const ap_trampoline_start;
        let len = (&raw const ap_trampoline_end).offset_from(start) as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
    for cpu in 1..n {
        let before = ONLINE.load(Ordering::Acquire);
        // SAFETY: one AP starts at a time; it reads AP_STACK before it signals ONLINE.
        unsafe {
            AP_STACK = (&raw mut AP_STACKS.0[cpu]) as u64 + AP_STACK_SIZE as u64;
        }
        apic::send(cpu as u32, 0x4500); // INIT
        spin(200_000);
        for _ in 0..2 {
            apic::send(cpu as u32, 0x4600 | (TRAMPOLINE >> 12) as u32); // SIPI
            spin(20_000);
        }
        // Acquire pairs with the AP's Release increment in `ap_main`.
        let mut waited = 0u64;
        while ONLINE.load(Ordering::Acquire) == before && waited < 200_000_000 {
            core::hint::spin_loop();
            waited += 1;
        }
    }
    ONLINE.load(Ordering::Acquire)
}

/// An application processor, in long mode on its own stack.
#[unsafe(no_mangle)]
extern "C" fn ap_main() -> ! {
    crate::cpu::init_this_cpu();
    apic::enable();
    // Release pairs with the bootstrap CPU's Acquire load in `start_aps`.
    ONLINE.fetch_add(1, Ordering::Release);
    // SAFETY: the IDT is loaded; handlers run on IST stacks.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    crate::selftest::worker()
}

/// Makes every other online CPU take an interrupt and return from it (a serializing `iretq`)
/// before this returns; each reports where it was interrupted (`PerCpu::rip`). The caller keeps
/// its own interrupts as they are (it does not wait for IPIs itself).
pub fn sync_others() {
    flush_tlb();
    let online = ONLINE.load(Ordering::Acquire);
    if online <= 1 {
        return;
    }
    // Relaxed: only this CPU (holding the optimizer's lock) sends syncs.
    let g = SYNC_GEN.load(Ordering::Relaxed) + 1;
    // Release pairs with the Acquire load in `on_sync_ipi`: what we wrote before is seen by
    // every CPU that answers this generation.
    SYNC_GEN.store(g, Ordering::Release);
    SYNCS.fetch_add(1, Ordering::Relaxed);
    apic::send_all_others(crate::cpu::IPI_SYNC);
    let me = this_cpu_index();
    for (cpu, p) in PERCPU.iter().enumerate().take(online) {
        if cpu == me {
            continue;
        }
        // Acquire pairs with the Release store in `on_sync_ipi`.
        let mut n = 0u64;
        while p.sync_ack.load(Ordering::Acquire) < g {
            core::hint::spin_loop();
            n += 1;
            if n == 500_000_000 {
                crate::kprintln!("sync: cpu {cpu} has not answered generation {g}");
            }
        }
    }
    // Relaxed: every CPU has answered (and read the list) by now.
    TOUCHED_N.store(0, Ordering::Relaxed);
}

/// Flushes this CPU's TLB (reloads CR3). On real hardware the sync's serializing `iretq` is
/// enough; QEMU's TCG additionally keeps a per-CPU cache of translated code by virtual address
/// that another CPU's code write does not always clear, and a TLB flush clears it.
pub fn flush_tlb() {
    // SAFETY: reloading CR3 with its own value only flushes non-global TLB entries.
    unsafe { core::arch::asm!("mov rax, cr3", "mov cr3, rax", out("rax") _, options(nostack)) };
}

/// Code addresses written since the last sync (at most [`TOUCHED`] remembered; more set
/// `TOUCHED_ALL`, and every CPU then rewrites all of them it can: see `on_sync_ipi`).
const TOUCHED: usize = 64;
static TOUCHED_ADDR: [AtomicU64; TOUCHED] = [const { AtomicU64::new(0) }; TOUCHED];
static TOUCHED_N: AtomicUsize = AtomicUsize::new(0);

/// Records a code store at `addr` for the next sync (the writer, under the optimizer's lock).
pub fn touched(addr: u64) {
    // Relaxed: published to the other CPUs by the sync's Release store of the generation.
    let n = TOUCHED_N.load(Ordering::Relaxed);
    if n < TOUCHED {
        TOUCHED_ADDR[n].store(addr, Ordering::Relaxed);
        TOUCHED_N.store(n + 1, Ordering::Relaxed);
    }
}

/// Rewrites every code byte stored since the last sync with the value it holds, through the
/// alias — on this CPU. QEMU 7.2's multi-threaded TCG does not reliably invalidate other CPUs'
/// translations of code one CPU stores to (measured at boot: `smc cross`), but a CPU's own
/// store does invalidate them; so each CPU makes the store its own before it returns to code.
fn retouch() {
    // Relaxed: ordered after the Acquire load of the generation in `on_sync_ipi`.
    let n = TOUCHED_N.load(Ordering::Relaxed).min(TOUCHED);
    for a in TOUCHED_ADDR.iter().take(n) {
        let p = (crate::kprobes::TEXT_ALIAS + a.load(Ordering::Relaxed)) as usize as *mut u8;
        // SAFETY: a code byte the writer just stored (the writer waits for this CPU's answer, so
        // the value cannot change under us); storing it back changes nothing.
        unsafe { p.write_volatile(p.read_volatile()) };
    }
}

/// The sync IPI on this CPU, interrupted at `rip`.
pub fn on_sync_ipi(rip: u64) {
    flush_tlb();
    let p = &PERCPU[this_cpu_index()];
    // Acquire pairs with the Release store in `sync_others`.
    let g = SYNC_GEN.load(Ordering::Acquire);
    retouch();
    // Relaxed: published by the Release store below.
    p.rip.store(rip, Ordering::Relaxed);
    // Release pairs with the Acquire load in `sync_others`: the RIP is seen with the ack.
    p.sync_ack.store(g, Ordering::Release);
}

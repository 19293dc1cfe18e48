//! Per-CPU descriptor tables and the trap entry.
//!
//! Every CPU gets its own GDT and TSS (the TSS holds its IST stacks) and shares one IDT. Every
//! vector runs on an IST stack: the host target's `core` uses the red zone, so an interrupt frame
//! must never be pushed below an interrupted function's RSP. IST 1 serves breakpoints and
//! interrupts, IST 2 the faults that end the run (so a fault inside a breakpoint handler does not
//! overwrite the frame it interrupted).
//!
//! The entry stub saves the general registers and the FP/SSE state (`fxsave64`: handlers are Rust
//! and may use SSE) and calls [`trap`] with the frame; the handler may change the saved RIP.

use crate::percpu::{MAX_CPUS, this_cpu_index};
use core::cell::UnsafeCell;

/// The saved state of an interrupted context, lowest address first (the stub's push order).
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Vectors.
pub const BREAKPOINT: u8 = 3;
/// The IPI every other CPU answers after a serializing return (the live patch's sync, the
/// quiescence report).
pub const IPI_SYNC: u8 = 0xF0;
/// Spurious LAPIC interrupts.
pub const SPURIOUS: u8 = 0xFF;

const IST_SIZE: usize = 32 * 1024;

#[repr(C, packed(4))]
struct Tss {
    _r0: u32,
    rsp: [u64; 3],
    _r1: u64,
    ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap: u16,
}

#[repr(C, align(16))]
struct Stacks([[u8; IST_SIZE]; 2]);

/// Per CPU: GDT (null, code, data, TSS low, TSS high), TSS, IST stacks.
struct CpuTables {
    gdt: [u64; 5],
    tss: Tss,
    stacks: Stacks,
}

struct Tables(UnsafeCell<[CpuTables; MAX_CPUS]>);
// SAFETY: each CPU touches only its own entry, once, in `init_this_cpu` before it loads them.
unsafe impl Sync for Tables {}

static TABLES: Tables = Tables(UnsafeCell::new(
    [const {
        CpuTables {
            gdt: [0; 5],
            tss: Tss {
                _r0: 0,
                rsp: [0; 3],
                _r1: 0,
                ist: [0; 7],
                _r2: 0,
                _r3: 0,
                iomap: 104,
            },
            stacks: Stacks([[0; IST_SIZE]; 2]),
        }
    }; MAX_CPUS],
));

#[repr(C, align(16))]
struct Idt(UnsafeCell<[[u64; 2]; 256]>);
// SAFETY: written once by the bootstrap CPU before any other CPU starts; read-only after.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([[0; 2]; 256]));

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

unsafe extern "C" {
    /// The entry stubs, 16 bytes per vector.
    static trap_stubs: u8;
}

/// Fills the IDT (bootstrap CPU, once, before any other CPU starts).
pub fn init_idt() {
    // SAFETY: before any other CPU runs; nobody reads the IDT yet.
    let idt = unsafe { &mut *IDT.0.get() };
    for (v, e) in idt.iter_mut().enumerate() {
        let handler = (&raw const trap_stubs) as u64 + 16 * v as u64;
        let ist: u64 = if matches!(v, 6 | 8 | 13 | 14) { 2 } else { 1 };
        // Interrupt gate, present, DPL 0; selector 0x08.
        e[0] = (handler & 0xFFFF)
            | (0x08 << 16)
            | (ist << 32)
            | (0x8E << 40)
            | ((handler >> 16) & 0xFFFF) << 48;
        e[1] = handler >> 32;
    }
}

/// Loads this CPU's GDT (with its TSS), its task register and the IDT.
pub fn init_this_cpu() {
    let i = this_cpu_index();
    // SAFETY: entry `i` is this CPU's alone, and it is not loaded yet.
    let t = unsafe { &mut (*TABLES.0.get())[i] };
    for (k, s) in t.stacks.0.iter().enumerate() {
        t.tss.ist[k] = s.as_ptr() as u64 + IST_SIZE as u64;
    }
    let tss = &t.tss as *const Tss as u64;
    let limit = (core::mem::size_of::<Tss>() - 1) as u64;
    t.gdt = [
        0,
        0x00AF_9A00_0000_FFFF,
        0x00CF_9200_0000_FFFF,
        (limit & 0xFFFF) | ((tss & 0xFF_FFFF) << 16) | (0x89 << 40) | (((tss >> 24) & 0xFF) << 56),
        tss >> 32,
    ];
    let gdt = Pointer {
        limit: (5 * 8 - 1) as u16,
        base: t.gdt.as_ptr() as u64,
    };
    let idt = Pointer {
        limit: (256 * 16 - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the tables are filled and live for ever; the selectors match them (code 0x08,
    // data 0x10, TSS 0x18).
    unsafe {
        core::arch::asm!(
            "lgdt [{g}]",
            "push 0x08",
            "lea rax, [rip + 2f]",
            "push rax",
            "retfq",
            "2:",
            "mov ax, 0x10",
            "mov ds, ax",
            "mov es, ax",
            "mov ss, ax",
            "mov ax, 0x18",
            "ltr ax",
            "lidt [{i}]",
            g = in(reg) &gdt,
            i = in(reg) &idt,
            out("rax") _,
        );
    }
}

core::arch::global_asm!(
    ".section .text",
    // One 16-byte stub per vector: push a zero error code where the CPU pushes none, push the
    // vector, jump to the common entry. Stub `v` is at `trap_stubs + 16 * v`.
    ".p2align 4",
    ".global trap_stubs",
    "trap_stubs:",
    ".set vec, 0",
    ".rept 256",
    ".if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21)",
    ".else",
    ".byte 0x6A, 0x00", // push 0
    ".endif",
    ".byte 0x68", // push imm32
    ".long vec",
    ".byte 0xE9", // jmp rel32
    ".long trap_common - . - 4",
    ".p2align 4, 0xCC",
    ".set vec, vec + 1",
    ".endr",
    "trap_common:",
    "push rax",
    "push rbx",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push rbp",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov rbx, rsp",
    "sub rsp, 512",
    "and rsp, -16",
    "fxsave64 [rsp]",
    "cld",
    "mov rdi, rbx",
    "call trap",
    "fxrstor64 [rsp]",
    "mov rsp, rbx",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rbp",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rbx",
    "pop rax",
    "add rsp, 16",
    "iretq",
);

/// Every trap and interrupt, with its saved frame.
#[unsafe(no_mangle)]
extern "C" fn trap(f: &mut TrapFrame) {
    match f.vector as u8 {
        BREAKPOINT => crate::kprobes::on_int3(f),
        IPI_SYNC => {
            crate::smp::on_sync_ipi(f.rip);
            crate::apic::eoi();
        }
        SPURIOUS => {}
        v => {
            crate::kprintln!(
                "KERNEL FAULT: vector {v} error {:#x} at rip {:#x} (cpu {})",
                f.error,
                f.rip,
                this_cpu_index()
            );
            crate::port::exit_qemu(0x7D);
        }
    }
}

//! Relocated XOL copies run for real on this CPU: for each instruction form, run the original at
//! its own address and the copy in a slot, from the same registers and memory, and compare every
//! general-purpose register, the flags, the data the instruction addresses, the stack, and which
//! way control left (fall-through or branch target). Branches are also checked against
//! [`Insn::emulate`].
//!
//! The harness is a little assembly (below): it loads a register file, jumps to the code under
//! test, and the landing stubs after it (at the original next instruction and at the branch
//! target) record which one was reached and jump back into the harness, which saves the register
//! file. Linux x86_64 only.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use probe_arch_x86_64::insn::{Insn, Kind, Refusal, Regs};
use probe_arch_x86_64::xol;
use std::sync::Mutex;

/// The register file the harness loads and saves. Field offsets are used by the assembly.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Ctx {
    /// rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15 (hardware numbering).
    gpr: [u64; 16],
    rflags: u64,
    entry: u64,
    host_rsp: u64,
}

core::arch::global_asm!(
    ".data",
    ".balign 8",
    "xol_harness_ctx: .quad 0",
    "xol_harness_entry: .quad 0",
    "xol_harness_tmp: .quad 0",
    ".text",
    ".globl xol_harness_run",
    "xol_harness_run:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi + 144], rsp",
    "mov [rip + xol_harness_ctx], rdi",
    "mov rax, [rdi + 136]",
    "mov [rip + xol_harness_entry], rax",
    "push qword ptr [rdi + 128]",
    "popfq",
    "mov rax, [rdi + 0]",
    "mov rcx, [rdi + 8]",
    "mov rdx, [rdi + 16]",
    "mov rbx, [rdi + 24]",
    "mov rsp, [rdi + 32]",
    "mov rbp, [rdi + 40]",
    "mov rsi, [rdi + 48]",
    "mov r8, [rdi + 64]",
    "mov r9, [rdi + 72]",
    "mov r10, [rdi + 80]",
    "mov r11, [rdi + 88]",
    "mov r12, [rdi + 96]",
    "mov r13, [rdi + 104]",
    "mov r14, [rdi + 112]",
    "mov r15, [rdi + 120]",
    "mov rdi, [rdi + 56]",
    "jmp qword ptr [rip + xol_harness_entry]",
    ".globl xol_harness_exit",
    "xol_harness_exit:",
    // No instruction here may change the flags before pushfq.
    "mov [rip + xol_harness_tmp], rdi",
    "mov rdi, [rip + xol_harness_ctx]",
    "mov [rdi + 0], rax",
    "mov [rdi + 8], rcx",
    "mov [rdi + 16], rdx",
    "mov [rdi + 24], rbx",
    "mov [rdi + 32], rsp",
    "mov [rdi + 40], rbp",
    "mov [rdi + 48], rsi",
    "mov [rdi + 64], r8",
    "mov [rdi + 72], r9",
    "mov [rdi + 80], r10",
    "mov [rdi + 88], r11",
    "mov [rdi + 96], r12",
    "mov [rdi + 104], r13",
    "mov [rdi + 112], r14",
    "mov [rdi + 120], r15",
    "mov rax, [rip + xol_harness_tmp]",
    "mov [rdi + 56], rax",
    "mov rsp, [rdi + 144]",
    "pushfq",
    "pop qword ptr [rdi + 128]",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
);

unsafe extern "sysv64" {
    fn xol_harness_run(ctx: *mut Ctx);
    fn xol_harness_exit();
}

/// One run at a time: the harness keeps its context in globals.
static HARNESS: Mutex<()> = Mutex::new(());

const PAGE: usize = 4096;
/// Where the instruction under test sits in the code page.
const INSN_AT: usize = 0x100;
/// Branch targets used by the corpus land here (a stub marks 2); within rel8 reach of INSN_AT.
const TARGET_AT: usize = 0x160;
/// Which stub was reached.
const MARKER_AT: usize = 0x7F0;
/// Data the RIP-relative forms address.
const DATA_AT: usize = 0x800;
const DATA_LEN: usize = 64;
/// The XOL slot, in the second page.
const SLOT_AT: usize = PAGE + 0x40;

/// An executable mapping (a test may map W+X; the live embedding never keeps it).
struct Code {
    base: *mut u8,
    len: usize,
}

impl Code {
    fn map(len: usize, hint: usize) -> Option<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched (FIXED_NOREPLACE
        // fails instead of replacing).
        let p = unsafe {
            libc::mmap(
                hint as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | if hint != 0 {
                        libc::MAP_FIXED_NOREPLACE
                    } else {
                        0
                    },
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(Self {
            base: p.cast(),
            len,
        })
    }
    fn addr(&self, off: usize) -> u64 {
        self.base as u64 + off as u64
    }
    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len);
        // SAFETY: in bounds of our mapping, which nothing executes while we write (one run at a
        // time under HARNESS).
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(off), bytes.len()) }
    }
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        // SAFETY: in bounds of our mapping.
        unsafe { core::slice::from_raw_parts(self.base.add(off), len) }.to_vec()
    }
}

impl Drop for Code {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// `mov byte [rip + marker], k ; jmp qword [rip + 0] ; dq xol_harness_exit`, placed at `at`.
fn stub(code: &Code, at: usize, k: u8) {
    let disp = (code.addr(MARKER_AT) as i64 - code.addr(at + 7) as i64) as i32;
    let mut b = vec![0xC6, 0x05];
    b.extend_from_slice(&disp.to_le_bytes());
    b.push(k);
    b.extend_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
    b.extend_from_slice(&(xol_harness_exit as *const () as u64).to_le_bytes());
    code.write(at, &b);
}

/// What a run leaves behind.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    ctx: Ctx,
    marker: u8,
    data: Vec<u8>,
    stack: Vec<u64>,
}

const STACK_WORDS: usize = 64;

/// Runs from `entry` with registers `init`, after resetting data, marker and stack.
fn run(code: &Code, entry: u64, init: Ctx) -> Outcome {
    let data: Vec<u8> = (0..DATA_LEN as u8)
        .map(|i| i.wrapping_mul(37) ^ 0x5A)
        .collect();
    code.write(DATA_AT, &data);
    // The data's first qword is a code pointer for `call/jmp [rip+d]`.
    code.write(DATA_AT, &code.addr(TARGET_AT).to_le_bytes());
    code.write(MARKER_AT, &[0]);
    let mut stack = vec![0xDEAD_BEEF_u64; STACK_WORDS];
    // What `ret` and `pop` find on top of the stack: the target stub.
    stack[STACK_WORDS / 2] = code.addr(TARGET_AT);
    let mut ctx = init;
    ctx.gpr[4] = stack.as_mut_ptr() as u64 + (STACK_WORDS as u64 / 2) * 8;
    ctx.entry = entry;
    let rsp0 = ctx.gpr[4];
    {
        let _g = HARNESS.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the harness returns to us with callee-saved registers and RSP restored; the
        // code under test only touches its own registers, the page's data and `stack`.
        unsafe { xol_harness_run(&mut ctx) };
    }
    // Report RSP relative to the stack, so the two runs compare equal.
    ctx.gpr[4] = ctx.gpr[4].wrapping_sub(rsp0);
    ctx.entry = 0;
    ctx.host_rsp = 0;
    // Bits that the harness' popfq/pushfq round trip may not preserve: keep the arithmetic
    // flags and DF.
    ctx.rflags &= 0xCD5;
    let stack = stack
        .iter()
        .map(|&w| if w == 0xDEAD_BEEF { 0 } else { w })
        .collect();
    Outcome {
        ctx,
        marker: code.read(MARKER_AT, 1)[0],
        data: code.read(DATA_AT, DATA_LEN),
        stack,
    }
}

/// The corpus: instruction bytes builders, given the instruction's address, the data address and
/// the branch target address.
fn corpus(insn: u64, data: u64, target: u64) -> Vec<(&'static str, Vec<u8>)> {
    let rel = |len: u64, to: u64| (to as i64 - (insn + len) as i64) as i32;
    let d32 = |prefix: &[u8], len: u64, to: u64, suffix: &[u8]| {
        let mut v = prefix.to_vec();
        v.extend_from_slice(&rel(len, to).to_le_bytes());
        v.extend_from_slice(suffix);
        v
    };
    let r8 = |op: &[u8], len: u64| {
        let mut v = op.to_vec();
        v.push(rel(len, target) as i8 as u8);
        v
    };
    vec![
        (
            "mov rax, [rip+d]",
            d32(&[0x48, 0x8B, 0x05], 7, data + 8, &[]),
        ),
        (
            "mov [rip+d], rbx",
            d32(&[0x48, 0x89, 0x1D], 7, data + 16, &[]),
        ),
        ("lea rsi, [rip+d]", d32(&[0x48, 0x8D, 0x35], 7, data, &[])),
        (
            "add dword [rip+d], imm32",
            d32(&[0x81, 0x05], 10, data + 24, &[0x44, 0x33, 0x22, 0x11]),
        ),
        (
            "cmp qword [rip+d], 5",
            d32(&[0x48, 0x83, 0x3D], 8, data + 8, &[0x05]),
        ),
        (
            "inc word [rip+d]",
            d32(&[0x66, 0xFF, 0x05], 7, data + 32, &[]),
        ),
        (
            "movzx ecx, byte [rip+d]",
            d32(&[0x0F, 0xB6, 0x0D], 7, data + 40, &[]),
        ),
        (
            "xchg [rip+d], rdx",
            d32(&[0x48, 0x87, 0x15], 7, data + 48, &[]),
        ),
        ("push qword [rip+d]", d32(&[0xFF, 0x35], 6, data + 8, &[])),
        (
            "r12 = [rip+d] (REX.R)",
            d32(&[0x4C, 0x8B, 0x25], 7, data + 8, &[]),
        ),
        (
            "andn rax, rbx, [rip+d] (VEX)",
            d32(&[0xC4, 0xE2, 0xE0, 0xF2, 0x05], 9, data + 16, &[]),
        ),
        ("jmp [rip+d]", d32(&[0xFF, 0x25], 6, data, &[])),
        ("call [rip+d]", d32(&[0xFF, 0x15], 6, data, &[])),
        ("call rel32", d32(&[0xE8], 5, target, &[])),
        ("jmp rel32", d32(&[0xE9], 5, target, &[])),
        ("jmp rel8", r8(&[0xEB], 2)),
        ("je rel32", d32(&[0x0F, 0x84], 6, target, &[])),
        ("jne rel8", r8(&[0x75], 2)),
        ("jl rel8", r8(&[0x7C], 2)),
        ("jbe rel32", d32(&[0x0F, 0x86], 6, target, &[])),
        ("jp rel8", r8(&[0x7A], 2)),
        ("jo rel8", r8(&[0x70], 2)),
        ("loop rel8", r8(&[0xE2], 2)),
        ("loope rel8", r8(&[0xE1], 2)),
        ("loopne rel8", r8(&[0xE0], 2)),
        ("jrcxz rel8", r8(&[0xE3], 2)),
        ("jecxz rel8", r8(&[0x67, 0xE3], 3)),
        ("loop ecx rel8", r8(&[0x67, 0xE2], 3)),
        ("call rax", vec![0xFF, 0xD0]),
        ("call r11", vec![0x41, 0xFF, 0xD3]),
        ("add rax, rbx", vec![0x48, 0x01, 0xD8]),
        ("push rax", vec![0x50]),
        ("pop rcx", vec![0x59]),
        ("imul rdx, rsi, 7", vec![0x48, 0x6B, 0xD6, 0x07]),
        ("ret", vec![0xC3]),
    ]
}

fn initial(flags: u64, rcx: u64, code: &Code) -> Ctx {
    let mut c = Ctx::default();
    for (i, r) in c.gpr.iter_mut().enumerate() {
        *r = 0x1111_0000_0000_0000u64.wrapping_mul(i as u64 + 1) ^ (i as u64 * 0x77);
    }
    c.gpr[0] = code.addr(TARGET_AT); // rax: for `call rax`
    c.gpr[11] = code.addr(TARGET_AT); // r11: for `call r11`
    c.gpr[1] = rcx;
    c.rflags = flags | 0x2;
    c
}

/// A wrong copy could loop forever; die loudly instead of stalling CI.
fn watchdog() {
    // SAFETY: alarm has no memory-safety preconditions; SIGALRM's default action ends the
    // process, which fails the test run.
    unsafe { libc::alarm(120) };
}

#[test]
fn relocated_copies_behave_like_the_original() {
    watchdog();
    let Some(code) = Code::map(2 * PAGE, 0) else {
        panic!(
            "mmap of an executable page failed: {}",
            std::io::Error::last_os_error()
        );
    };
    let a = code.addr(INSN_AT);
    let flag_sets = [
        0u64,
        0x40,        /* ZF */
        0x1 | 0x80,  /* CF SF */
        0x800 | 0x4, /* OF PF */
    ];
    let rcx_values = [0u64, 1, 5, 1 << 32];
    let mut runs = 0;
    let mut kinds = std::collections::BTreeSet::new();
    for (name, bytes) in corpus(a, code.addr(DATA_AT), code.addr(TARGET_AT)) {
        let insn = Insn::decode(&bytes, a).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(insn.len(), bytes.len(), "{name}: length");
        kinds.insert(
            format!("{:?}", insn.kind())
                .split([' ', '{'])
                .next()
                .unwrap()
                .to_string(),
        );
        let copy =
            xol::prepare(&insn, code.addr(SLOT_AT)).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Lay out: the instruction, the fall-through stub, the target stub.
        code.write(INSN_AT, &[0xCC; 64]);
        code.write(INSN_AT, &bytes);
        stub(&code, INSN_AT + bytes.len(), 1);
        stub(&code, TARGET_AT, 2);
        code.write(SLOT_AT, &[0xCC; 64]);
        code.write(SLOT_AT, copy.bytes());
        for &flags in &flag_sets {
            for &rcx in &rcx_values {
                let init = initial(flags, rcx, &code);
                let original = run(&code, a, init);
                let relocated = run(&code, copy.slot(), init);
                assert_ne!(
                    original.marker, 0,
                    "{name}: the original never reached a stub"
                );
                assert_eq!(original, relocated, "{name} flags {flags:#x} rcx {rcx:#x}");
                if insn.is_branch() {
                    let mut r = Regs {
                        rip: a,
                        rsp: 0x8000,
                        rflags: init.rflags,
                        rcx: init.gpr[1],
                    };
                    let mut pushed = None;
                    let emulated = insn.emulate(&mut r, |at, v| {
                        pushed = Some((at, v));
                        Ok::<(), ()>(())
                    });
                    assert_eq!(emulated, Ok(true));
                    let want = if original.marker == 2 {
                        code.addr(TARGET_AT)
                    } else {
                        insn.next()
                    };
                    assert_eq!(r.rip, want, "{name}: emulated rip");
                    assert_eq!(r.rcx, original.ctx.gpr[1], "{name}: emulated rcx");
                    if let Kind::Call { .. } = insn.kind() {
                        assert_eq!(pushed, Some((0x7FF8, insn.next())), "{name}: pushed");
                        assert_eq!(r.rsp, 0x7FF8);
                    }
                }
                runs += 1;
            }
        }
    }
    // The corpus covers every kind.
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "AsIs",
            "Call",
            "CondJump",
            "CountJump",
            "IndirectCall",
            "Jump",
            "RipRelative"
        ]
    );
    println!("{runs} runs, original and relocated copy agreed on every one");
}

#[test]
fn a_far_slot_uses_absolute_jumps_or_refuses() {
    watchdog();
    let Some(code) = Code::map(2 * PAGE, 0) else {
        panic!("mmap failed: {}", std::io::Error::last_os_error());
    };
    // A slot 8 GiB away: out of every rel32's reach.
    let far = code.base as usize + (8 << 30);
    let Some(slot) = Code::map(PAGE, far) else {
        println!("skipped: could not map a page 8 GiB away from the code");
        return;
    };
    let a = code.addr(INSN_AT);
    let mut runs = 0;
    for (name, bytes) in corpus(a, code.addr(DATA_AT), code.addr(TARGET_AT)) {
        let insn = Insn::decode(&bytes, a).unwrap();
        let prepared = xol::prepare(&insn, slot.addr(0));
        let rip_relative = matches!(
            insn.kind(),
            Kind::RipRelative { .. }
                | Kind::IndirectCall {
                    rip_operand: Some(_),
                    ..
                }
        );
        if rip_relative {
            assert_eq!(prepared, Err(Refusal::OutOfReach), "{name}");
            continue;
        }
        let copy = prepared.unwrap_or_else(|e| panic!("{name}: {e}"));
        code.write(INSN_AT, &[0xCC; 64]);
        code.write(INSN_AT, &bytes);
        stub(&code, INSN_AT + bytes.len(), 1);
        stub(&code, TARGET_AT, 2);
        slot.write(0, &[0xCC; 64]);
        slot.write(0, copy.bytes());
        for flags in [0u64, 0x40, 0x881] {
            for rcx in [0u64, 1, 1 << 32] {
                let init = initial(flags, rcx, &code);
                let original = run(&code, a, init);
                let relocated = run(&code, copy.slot(), init);
                assert_eq!(original, relocated, "{name} (far slot)");
                runs += 1;
            }
        }
    }
    println!(
        "{runs} runs from a slot 8 GiB away agreed; RIP-relative forms refused as out of reach"
    );
}

/// Builds a byte sequence at `base`, each piece knowing its own address (for rel8/rel32/disp32).
struct Seq {
    base: u64,
    bytes: Vec<u8>,
}

impl Seq {
    fn here(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }
    /// `prefix`, then a 32-bit displacement to `to` measured from the end of the instruction
    /// (`suffix` bytes after the displacement included).
    fn d32(mut self, prefix: &[u8], to: u64, suffix: &[u8]) -> Self {
        let end = self.here() + (prefix.len() + 4 + suffix.len()) as u64;
        self.bytes.extend_from_slice(prefix);
        self.bytes
            .extend_from_slice(&((to as i64 - end as i64) as i32).to_le_bytes());
        self.bytes.extend_from_slice(suffix);
        self
    }
    fn r8(mut self, op: &[u8], to: u64) -> Self {
        let end = self.here() + op.len() as u64 + 1;
        self.bytes.extend_from_slice(op);
        self.bytes.push((to as i64 - end as i64) as i8 as u8);
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.bytes.extend_from_slice(b);
        self
    }
}

#[test]
fn trampoline_displaced_code_behaves_like_the_range() {
    use probe_arch_x86_64::detour::analyze;
    watchdog();
    let Some(code) = Code::map(2 * PAGE, 0) else {
        panic!("mmap failed: {}", std::io::Error::last_os_error());
    };
    let a = code.addr(INSN_AT);
    let (data, tgt) = (code.addr(DATA_AT), code.addr(TARGET_AT));
    let s = || Seq {
        base: a,
        bytes: Vec::new(),
    };
    let ranges: Vec<(&str, Seq)> = vec![
        (
            "mov rax, [rip+d]",
            s().d32(&[0x48, 0x8B, 0x05], data + 8, &[]),
        ),
        (
            "push rbx; jne; add rax, rbx",
            s().raw(&[0x53]).r8(&[0x75], tgt).raw(&[0x48, 0x01, 0xD8]),
        ),
        (
            "loop; lea rsi, [rip+d]",
            s().r8(&[0xE2], tgt).d32(&[0x48, 0x8D, 0x35], data, &[]),
        ),
        (
            "xor eax, eax; inc dword [rip+d]",
            s().raw(&[0x31, 0xC0]).d32(&[0xFF, 0x05], data + 4, &[]),
        ),
        (
            "nop; nop; call rel32",
            s().raw(&[0x90, 0x90]).d32(&[0xE8], tgt, &[]),
        ),
        (
            "jrcxz; jmp rel8; nop",
            s().r8(&[0xE3], tgt).r8(&[0xEB], tgt).raw(&[0x90]),
        ),
        (
            "jecxz; loop ecx",
            s().r8(&[0x67, 0xE3], tgt).r8(&[0x67, 0xE2], tgt),
        ),
        (
            "je rel32; cmp [rip+d], 5",
            s().d32(&[0x0F, 0x84], tgt, &[])
                .d32(&[0x48, 0x83, 0x3D], data + 8, &[5]),
        ),
    ];
    let mut runs = 0;
    for (name, seq) in ranges {
        // The function: the sequence, then `ret`.
        let mut func = seq.bytes.clone();
        func.push(0xC3);
        let range = analyze(&func, a, a).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            range.len() <= seq.bytes.len(),
            "{name}: range {}",
            range.len()
        );
        let displaced = range.displaced(code.addr(SLOT_AT)).unwrap();
        // Lay out only the covered bytes, then the fall-through stub where the range ends.
        code.write(INSN_AT, &[0xCC; 64]);
        code.write(INSN_AT, &seq.bytes[..range.len()]);
        stub(&code, INSN_AT + range.len(), 1);
        stub(&code, TARGET_AT, 2);
        code.write(SLOT_AT, &[0xCC; 200]);
        code.write(SLOT_AT, displaced.bytes());
        for flags in [0u64, 0x40, 0x881, 0x4] {
            for rcx in [0u64, 1, 2, 1 << 32] {
                let init = initial(flags, rcx, &code);
                let original = run(&code, a, init);
                let relocated = run(&code, code.addr(SLOT_AT), init);
                assert_ne!(original.marker, 0, "{name}");
                assert_eq!(original, relocated, "{name} flags {flags:#x} rcx {rcx:#x}");
                runs += 1;
            }
        }
    }
    println!("{runs} runs of jump ranges: displaced code agreed with the original every time");
}

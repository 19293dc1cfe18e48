//! Jump-path trampolines: the machine code a probe's jump leads to (no_std, no allocation).
//!
//! A trampoline saves what every hit needs — the general registers and the flags, pushed *as*
//! a [`Regs`] — reserves an extended-state area, calls the embedder's `entry`, restores, runs
//! the probe's displaced instructions (relocated by [`crate::detour`]) and jumps back.
//!
//! # The calling convention
//!
//! `entry` is called `extern "sysv64"` on the probed thread's stack with
//!
//! | register | holds |
//! |---|---|
//! | RDI | the pushed frame, laid out as [`Regs`] (its `rsp` and `rip` slots are left for the entry to fill) |
//! | RSI | `arg` (the probe's context, say) |
//! | RDX | an `area_size`-byte area, 64-byte aligned, below the frame (for `XSAVE`; untouched unless used) |
//! | RCX | the trampoline's own address |
//!
//! DF is clear. The interrupted code's extended state (x87, SSE, AVX…) is still in the
//! registers: an entry that may change it saves it first (the process embedding's
//! `trampoline_entry` does, with [`crate::xstate`]). The 128-byte red zone below the interrupted
//! RSP is stepped over before anything is pushed.

use crate::detour::JumpRange;
use crate::insn::Refusal;

/// Bytes reserved per trampoline (the most [`build`] writes).
pub const TRAMPOLINE: usize = 512;

/// The red zone below RSP that leaf code may use at any instruction boundary (SysV x86-64).
pub const RED_ZONE: u64 = 128;

/// The registers as a trampoline pushes them (and as consumers see them): the interrupted
/// thread's general registers, the probed instruction's address and the flags.
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

/// A built trampoline: its bytes and its displaced-instructions entry.
#[derive(Clone, Copy, Debug)]
pub struct Trampoline {
    bytes: [u8; TRAMPOLINE],
    len: u16,
    /// Where a breakpoint hit that already ran the consumers continues (`Detour::displaced`).
    pub displaced: u64,
}

impl Trampoline {
    /// The code, to be written at the `at` it was built for.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// A fixed buffer the builder appends to (no allocation); remembers an overflow.
struct Code {
    bytes: [u8; TRAMPOLINE],
    len: usize,
    overflow: bool,
}

impl Code {
    fn new() -> Self {
        Self {
            bytes: [0xCC; TRAMPOLINE],
            len: 0,
            overflow: false,
        }
    }
    fn push(&mut self, b: u8) {
        self.extend_from_slice(&[b]);
    }
    fn extend_from_slice(&mut self, s: &[u8]) {
        match self.bytes.get_mut(self.len..self.len + s.len()) {
            Some(d) => {
                d.copy_from_slice(s);
                self.len += s.len();
            }
            None => self.overflow = true,
        }
    }
}

/// The code of a trampoline at `at` for a probe whose jump range is `range`: it calls `entry`
/// with `arg` (see the [module docs](self) for the calling convention) and returns its code and
/// the address of its displaced-instructions entry.
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
/// consumers' [`Regs`]); the entry saves the extended state when, and only when, it needs to
/// (into the area the trampoline reserved for it).
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
pub fn build(
    at: u64,
    entry: u64,
    arg: u64,
    area_size: u32,
    range: &JumpRange,
) -> Result<Trampoline, Refusal> {
    let mut c = Code::new();
    let lea_rsp = |c: &mut Code, d: i8| c.extend_from_slice(&[0x48, 0x8D, 0x64, 0x24, d as u8]);
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
    c.extend_from_slice(&area_size.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x83, 0xE4, 0xC0]); // and rsp, -64
    c.extend_from_slice(&[0x48, 0x89, 0xDF]); // mov rdi, rbx
    c.extend_from_slice(&[0x48, 0xBE]); // movabs rsi, arg
    c.extend_from_slice(&arg.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x89, 0xE2]); // mov rdx, rsp
    c.extend_from_slice(&[0x48, 0xB9]); // movabs rcx, at
    c.extend_from_slice(&at.to_le_bytes());
    c.extend_from_slice(&[0x48, 0xB8]); // movabs rax, entry
    c.extend_from_slice(&entry.to_le_bytes());
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
    // A trampoline that would run past the top of the address space: refused, never a panic.
    let displaced = at.checked_add(c.len as u64).ok_or(Refusal::OutOfReach)?;
    c.extend_from_slice(range.displaced(displaced)?.bytes());
    if c.overflow {
        return Err(Refusal::TooLong);
    }
    Ok(Trampoline {
        bytes: c.bytes,
        len: c.len as u16,
        displaced,
    })
}

/// Whether `lahf`/`sahf` work in 64-bit mode (CPUID 8000_0001h ECX bit 0).
pub fn sahf_in_long_mode() -> bool {
    // SAFETY: CPUID is unprivileged and present on every x86-64 CPU; leaf 8000_0001h exists on
    // all of them (the extended maximum is checked first anyway).
    {
        core::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0001
            && core::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `x86_pipeline` fuzz target: a trampoline placed in the last bytes of the
    /// address space overflowed computing where its displaced code goes (a panic in debug
    /// builds). It is refused as out of reach.
    #[test]
    fn a_trampoline_at_the_top_of_the_address_space_is_refused_not_a_panic() {
        // push rbp; mov rbp, rsp; mov eax, 1 (9 bytes), probed at its start.
        let f = [0x55, 0x48, 0x89, 0xE5, 0xB8, 1, 0, 0, 0];
        let range = crate::detour::analyze(&f, 0x1000, 0x1000).unwrap();
        assert_eq!(
            build(u64::MAX - 0x40, 0x7000, 0x1234, 1024, &range).unwrap_err(),
            Refusal::OutOfReach
        );
    }
    use crate::detour::analyze;
    use crate::insn::Insn;

    /// The built code decodes as instructions up to the displaced entry, carries the entry and
    /// argument it was given, steps over the red zone first, and ends with the range's own
    /// displaced code.
    #[test]
    fn a_trampoline_is_whole_instructions_then_the_displaced_code() {
        // lea rax, [rdi + rsi]; nop dword [rax + rax + 0]; ret — at 0x40_1000.
        let f = [0x48, 0x8D, 0x04, 0x37, 0x0F, 0x1F, 0x44, 0x00, 0x00, 0xC3];
        let range = analyze(&f, 0x40_1000, 0x40_1000).unwrap();
        let at = 0x40_8000;
        let t = build(
            at,
            0x1122_3344_5566_7788,
            0x99AA_BBCC_DDEE_FF00,
            10688,
            &range,
        )
        .unwrap();
        let b = t.bytes();
        assert_eq!(
            &b[..5],
            &[0x48, 0x8D, 0x64, 0x24, 0x80],
            "lea rsp, [rsp-128] first"
        );
        let has = |v: u64| b.windows(8).any(|w| w == v.to_le_bytes());
        assert!(has(0x1122_3344_5566_7788) && has(0x99AA_BBCC_DDEE_FF00));
        let mut pc = 0usize;
        while (at + pc as u64) < t.displaced {
            let i = Insn::decode(&b[pc..], at + pc as u64).expect("decodes");
            pc += i.len();
        }
        assert_eq!(
            at + pc as u64,
            t.displaced,
            "the displaced entry is an instruction boundary"
        );
        assert_eq!(&b[pc..], range.displaced(t.displaced).unwrap().bytes());
        assert!(b.len() <= TRAMPOLINE);
    }
}

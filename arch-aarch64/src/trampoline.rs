//! The jump path's trampoline: the code a probe's `B` lands on.
//!
//! A jump-optimized probe replaces one instruction with `B trampoline` (a `BRK` ↔ `B` change,
//! which the Arm ARM allows while other threads run: [`crate::patch`]). The trampoline saves
//! what the interrupted code may hold live — X0–X30, NZCV, FPSR, FPCR and the 128-bit V0–V31 —
//! as one frame on the thread's stack ([`Regs`] first), calls the embedder's entry with the
//! frame, the probe's context and its own address, restores all of it, runs the displaced
//! instruction and branches back to the one after it:
//!
//! ```text
//!  sub  sp, sp, #FRAME              ; AAPCS64 keeps SP 16-byte aligned and has no red zone
//!  stp  x0, x1, [sp] … str x30      ; Regs::x
//!  add  x0, sp, #FRAME; str x0      ; Regs::sp (the interrupted SP)
//!  mrs  x0, nzcv / fpsr / fpcr; str ; Regs::pstate, then FPSR, FPCR
//!  stp  q0, q1 … q30, q31           ; V0–V31
//!  mov  x0, sp; ldr x1, ctx; ldr x2, self; ldr x16, entry; blr x16
//!  ldp  q0, q1 … ; msr fpcr / fpsr / nzcv ; ldp x0, x1 … ; add sp, sp, #FRAME
//!  <displaced instruction>          ; at `Trampoline::displaced`
//!  b    probed + 4
//!  .quad ctx, self, entry           ; literals, 8-byte aligned
//! ```
//!
//! X16 is the one register the call borrows, after it was saved; it is restored with the rest.
//! Only instructions that run anywhere (`Class::Step`) can be displaced: a PC-relative one would
//! compute from the trampoline's address, so its probe stays a breakpoint (where it is
//! simulated from the original PC).
//!
//! What the frame does not hold: SVE's Z-register bits above 128, its predicates and FFR, and
//! SME's state. An embedder on an SVE CPU must not run code that may use them (C library calls)
//! from the entry — or keep such probes on the breakpoint path, where the kernel saves
//! everything for the signal.

use crate::insn::{Class, Refusal, classify_word};
use crate::{INSN_LEN, b};

/// The registers a consumer sees, the start of the trampoline's frame (and, in a trap
/// handler, read from the signal frame).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// X0–X30 (X29 the frame pointer, X30 the link register).
    pub x: [u64; 31],
    /// SP at the probe.
    pub sp: u64,
    /// The probed address (the entry fills it in on the jump path).
    pub pc: u64,
    /// PSTATE's NZCV (bits 31..28).
    pub pstate: u64,
}

/// The trampoline's stack frame: [`Regs`], FPSR, FPCR, V0–V31.
pub const FRAME: u32 = 800;
/// Where FPSR and FPCR are in the frame.
pub const FPSR_OFFSET: u32 = 272;
/// Where V0 is in the frame (V*n* at `V_OFFSET + 16 * n`).
pub const V_OFFSET: u32 = 288;
/// The room one trampoline takes (its code is shorter).
pub const TRAMPOLINE: usize = 512;
const WORDS: usize = TRAMPOLINE / INSN_LEN;

const _: () = assert!(core::mem::size_of::<Regs>() == FPSR_OFFSET as usize);
const _: () = assert!(V_OFFSET + 32 * 16 == FRAME && FRAME.is_multiple_of(16));

/// Why a trampoline cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// The instruction is refused outright.
    Refused(Refusal),
    /// The instruction is PC-relative (simulated on the breakpoint path): it cannot run displaced.
    PcRelative,
    /// The probe and the trampoline are not within `B`'s ±128 MiB, or an address is unaligned.
    OutOfReach,
}

/// A built trampoline: its words, and where the displaced instruction is.
#[derive(Clone, Debug)]
pub struct Trampoline {
    words: [u32; WORDS],
    len: usize,
    /// The address of the displaced instruction (a thread that trapped on the probe's
    /// breakpoint while the jump goes in continues here).
    pub displaced: u64,
}

impl Trampoline {
    /// The code, as little-endian bytes would be written.
    pub fn words(&self) -> &[u32] {
        &self.words[..self.len]
    }
    /// The code's length in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len * INSN_LEN
    }
    /// The code as bytes (little-endian words), into `out` (at least [`TRAMPOLINE`] bytes);
    /// returns the length.
    pub fn write_bytes(&self, out: &mut [u8]) -> usize {
        for (i, w) in self.words().iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        self.len_bytes()
    }
}

/// The code being built.
struct Code {
    w: [u32; WORDS],
    n: usize,
}

impl Code {
    fn push(&mut self, x: u32) {
        self.w[self.n] = x;
        self.n += 1;
    }
}

fn stp_x(t: u32, t2: u32, off: u32) -> u32 {
    0xA900_0000 | ((off / 8) << 15) | (t2 << 10) | (31 << 5) | t
}
fn ldp_x(t: u32, t2: u32, off: u32) -> u32 {
    0xA940_0000 | ((off / 8) << 15) | (t2 << 10) | (31 << 5) | t
}
fn stp_q(t: u32, t2: u32, off: u32) -> u32 {
    0xAD00_0000 | ((off / 16) << 15) | (t2 << 10) | (31 << 5) | t
}
fn ldp_q(t: u32, t2: u32, off: u32) -> u32 {
    0xAD40_0000 | ((off / 16) << 15) | (t2 << 10) | (31 << 5) | t
}
fn str_x(t: u32, off: u32) -> u32 {
    0xF900_0000 | ((off / 8) << 10) | (31 << 5) | t
}
fn ldr_x(t: u32, off: u32) -> u32 {
    0xF940_0000 | ((off / 8) << 10) | (31 << 5) | t
}
const SUB_SP_FRAME: u32 = 0xD100_0000 | (FRAME << 10) | (31 << 5) | 31;
const ADD_SP_FRAME: u32 = 0x9100_0000 | (FRAME << 10) | (31 << 5) | 31;
/// `add x0, sp, #FRAME`.
const ADD_X0_SP_FRAME: u32 = 0x9100_0000 | (FRAME << 10) | (31 << 5);
/// `mov x0, sp` (`add x0, sp, #0`).
const MOV_X0_SP: u32 = 0x9100_0000 | (31 << 5);
const MRS_X0_NZCV: u32 = 0xD53B_4200;
const MRS_X0_FPSR: u32 = 0xD53B_4420;
const MRS_X0_FPCR: u32 = 0xD53B_4400;
const MSR_NZCV_X0: u32 = 0xD51B_4200;
const MSR_FPSR_X0: u32 = 0xD51B_4420;
const MSR_FPCR_X0: u32 = 0xD51B_4400;
const BLR_X16: u32 = 0xD63F_0200;

/// Builds the trampoline at `at` (4-byte aligned; 8-byte aligned literals follow the code) for
/// the probe at `probed`, whose original instruction is `word`: it calls
/// `entry(frame: *mut Regs, ctx, at)` (AAPCS64), then runs `word` displaced and branches to
/// `probed + 4`.
///
/// ```
/// use probe_arch_aarch64::trampoline::{build, BuildError};
/// let t = build(0x10_0000, 0x20_0000, 0xC0FFEE, 0x10_8000, 0x8B02_0020).unwrap(); // add x0, x1, x2
/// assert_eq!(t.words()[0], 0xD10C_83FF); // sub sp, sp, #800
/// assert_eq!(build(0x10_0000, 0, 0, 0x10_8000, 0x1000_0001).unwrap_err(), BuildError::PcRelative); // adr
/// assert_eq!(build(0, 0, 0, 1 << 40, 0x8B02_0020).unwrap_err(), BuildError::OutOfReach);
/// ```
pub fn build(
    at: u64,
    entry: u64,
    ctx: u64,
    probed: u64,
    word: u32,
) -> Result<Trampoline, BuildError> {
    match classify_word(word).map_err(BuildError::Refused)? {
        Class::Step => {}
        Class::Simulate(_) => return Err(BuildError::PcRelative),
    }
    if !at.is_multiple_of(8) {
        return Err(BuildError::OutOfReach);
    }
    let mut c = Code {
        w: [0; WORDS],
        n: 0,
    };
    c.push(SUB_SP_FRAME);
    for r in (0..30).step_by(2) {
        c.push(stp_x(r, r + 1, r * 8));
    }
    c.push(str_x(30, 240));
    c.push(ADD_X0_SP_FRAME);
    c.push(str_x(0, 248));
    c.push(MRS_X0_NZCV);
    c.push(str_x(0, 264));
    c.push(MRS_X0_FPSR);
    c.push(str_x(0, FPSR_OFFSET));
    c.push(MRS_X0_FPCR);
    c.push(str_x(0, FPSR_OFFSET + 8));
    for q in (0..32).step_by(2) {
        c.push(stp_q(q, q + 1, V_OFFSET + q * 16));
    }
    c.push(MOV_X0_SP);
    // The three literal loads; their offsets are patched once the code's length is known.
    let lit_loads = c.n;
    c.push(0x5800_0001); // ldr x1, ctx
    c.push(0x5800_0002); // ldr x2, at
    c.push(0x5800_0010); // ldr x16, entry
    c.push(BLR_X16);
    for q in (0..32).step_by(2) {
        c.push(ldp_q(q, q + 1, V_OFFSET + q * 16));
    }
    c.push(ldr_x(0, FPSR_OFFSET + 8));
    c.push(MSR_FPCR_X0);
    c.push(ldr_x(0, FPSR_OFFSET));
    c.push(MSR_FPSR_X0);
    c.push(ldr_x(0, 264));
    c.push(MSR_NZCV_X0);
    for r in (0..30).step_by(2) {
        c.push(ldp_x(r, r + 1, r * 8));
    }
    c.push(ldr_x(30, 240));
    c.push(ADD_SP_FRAME);
    let displaced_at = c.n;
    c.push(word);
    let back_at = c.n;
    c.push(0); // b probed + 4, below
    if c.n % 2 == 1 {
        c.push(crate::NOP); // literals 8-byte aligned
    }
    let lits = c.n;
    for v in [ctx, at, entry] {
        c.push(v as u32);
        c.push((v >> 32) as u32);
    }
    // Wrapping: `at` may be anywhere (the reach checks below refuse what does not reach).
    let addr_of = |i: usize| at.wrapping_add((i * INSN_LEN) as u64);
    for (k, i) in (lit_loads..lit_loads + 3).enumerate() {
        let imm19 = ((lits + 2 * k - i) as u32) & 0x7_FFFF;
        c.w[i] |= imm19 << 5;
    }
    c.w[back_at] =
        b(addr_of(back_at), probed.wrapping_add(INSN_LEN as u64)).ok_or(BuildError::OutOfReach)?;
    // The probe's own jump must reach too.
    b(probed, at).ok_or(BuildError::OutOfReach)?;
    Ok(Trampoline {
        words: c.w,
        len: c.n,
        displaced: addr_of(displaced_at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `a64_pipeline` fuzz target: a trampoline placed at the top of the address
    /// space overflowed computing its own addresses (a panic in debug builds). It is refused
    /// as out of reach, or built with wrapped addresses, and never panics.
    #[test]
    fn a_trampoline_at_the_top_of_the_address_space_does_not_panic() {
        let add = 0x8B02_0020; // add x0, x1, x2
        let top = !7u64;
        assert_eq!(
            build(top, 1, 2, 0x1000, add).unwrap_err(),
            BuildError::OutOfReach
        );
        // Code that would cross 2^64: refused, not wrapped into a branch to nowhere.
        assert_eq!(
            build(top - 0x100, 1, 2, top - 0x8000, add).unwrap_err(),
            BuildError::OutOfReach
        );
        // Just below the top, within reach of its probe: built.
        let at = top - 0x1000;
        let t = build(at, 1, 2, top - 0x8000, add).unwrap();
        assert_eq!(t.words()[((t.displaced - at) / 4) as usize], add);
    }
}

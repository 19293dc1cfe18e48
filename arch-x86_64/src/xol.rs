//! Execute-out-of-line copies: a probed instruction, relocated to a slot, ending in a jump back.
//!
//! After a breakpoint's consumers run, the embedder sets RIP to the slot and resumes: the copy
//! does exactly what the instruction would have done at its own address and then continues at the
//! instruction after it (or at the branch target). There is nothing to fix up afterwards — no
//! single-step trap, no return-address patching — so a slot is free to reuse as soon as no thread
//! can still be inside it (the embedder's quiescence; probe-core's [`XolArea`] hands slots from
//! thread to thread).
//!
//! How each [`Kind`] is relocated (`S` = the slot, `N` = the original next instruction, `T` = a
//! branch target; "jump to X" is `jmp rel32` if X is within reach of it, else `jmp [rip+0]`
//! followed by the 8-byte address):
//!
//! ```text
//! AsIs           insn ; jump to N
//! RipRelative    insn with disp32 = target − (S + len) ; jump to N     (OutOfReach if it does not fit)
//! Jump           jump to T
//! CondJump       j!cc over the next jump ; jump to T ; jump to N
//! CountJump      loop/jrcxz +2 ; jmp short over the next jump ; jump to T ; jump to N
//! Call           push qword [rip→N] ; jmp qword [rip→T] ; dq N ; dq T
//! IndirectCall   push qword [rip→N] ; the insn as jmp (FF /4, disp32 re-based) ; dq N
//! ```
//!
//! The relocated `call` pushes the *original* return address, so the callee returns into the
//! original code (not into a slot that may belong to another thread by then), and a stack
//! unwinder sees the same frames as without the probe. Pushes touch exactly the stack the
//! original would: nothing below RSP is used, so the red zone of leaf code is left alone.
//!
//! [`XolArea`]: probe_core::xol::XolArea

use crate::insn::{Insn, Kind, Refusal};
use crate::{JMP_LEN, JMP_REL32};

/// The most bytes a copy takes: a relocated `jecxz` whose target and way back are both out of
/// `rel32` reach (`67 E3 02 EB 0E`, two 14-byte absolute jumps). A 15-byte RIP-relative
/// instruction and its jump back take 29.
pub const MAX_XOL: usize = 33;

/// A relocated copy of one instruction, to be written at one slot address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XolCopy {
    bytes: [u8; MAX_XOL],
    len: u8,
    slot: u64,
    resume: u64,
}

impl XolCopy {
    /// The bytes to write at the slot.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
    /// The slot address the copy was made for (it is only right there).
    pub fn slot(&self) -> u64 {
        self.slot
    }
    /// Where the copy continues when the instruction falls through: the original next
    /// instruction. A trap handler that finds RIP here knows the copy has completed.
    pub fn resume(&self) -> u64 {
        self.resume
    }
}

/// A byte buffer the relocations append to.
struct Buf<const N: usize> {
    bytes: [u8; N],
    len: usize,
    base: u64,
}

impl<const N: usize> Buf<N> {
    fn new(base: u64) -> Self {
        Self {
            bytes: [0; N],
            len: 0,
            base,
        }
    }
    /// The address of the next byte.
    fn here(&self) -> u64 {
        self.base.wrapping_add(self.len as u64)
    }
    fn put(&mut self, b: &[u8]) -> Result<(), Refusal> {
        let end = self.len + b.len();
        // Callers size N for their worst case; running out is a bug, refused rather than panic.
        let dst = self
            .bytes
            .get_mut(self.len..end)
            .ok_or(Refusal::OutOfReach)?;
        dst.copy_from_slice(b);
        self.len = end;
        Ok(())
    }
    fn patch_u32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// `jmp rel32` to `to` if it reaches from here, else `jmp [rip+0]; dq to`.
    fn jump_to(&mut self, to: u64) -> Result<(), Refusal> {
        match rel32(self.here().wrapping_add(JMP_LEN as u64), to) {
            Some(r) => {
                self.put(&[JMP_REL32])?;
                self.put(&r.to_le_bytes())
            }
            None => {
                self.put(&[0xFF, 0x25, 0, 0, 0, 0])?;
                self.put(&to.to_le_bytes())
            }
        }
    }
}

/// `to − from` as a `rel32`, if it fits.
fn rel32(from: u64, to: u64) -> Option<i32> {
    i32::try_from(to.wrapping_sub(from) as i64).ok()
}

/// Appends `insn` relocated to the buffer's current address. If it can fall through, control
/// continues right after what was appended: the caller appends the jump back (an XOL copy) or
/// the next displaced instruction (a trampoline).
fn relocate<const N: usize>(insn: &Insn, out: &mut Buf<N>) -> Result<(), Refusal> {
    let next = insn.next();
    let len = insn.len();
    match insn.kind() {
        Kind::AsIs => out.put(insn.bytes()),
        Kind::RipRelative {
            target,
            disp_offset,
        } => {
            let start = out.len;
            out.put(insn.bytes())?;
            let d = rel32(out.here(), target).ok_or(Refusal::OutOfReach)?;
            out.patch_u32(start + usize::from(disp_offset), d as u32);
            Ok(())
        }
        Kind::Jump { target } => out.jump_to(target),
        Kind::CondJump { cond, target } => {
            // j!cc rel8 over the jump to T; falling through continues after it.
            out.put(&[0x70 | cond.inverse().nibble(), 0])?;
            let at = out.len - 1;
            let before = out.len;
            out.jump_to(target)?;
            out.bytes[at] = (out.len - before) as u8;
            Ok(())
        }
        Kind::CountJump { ecx, target, .. } => {
            // loop/jrcxz +2 (to the jump to T) ; jmp short over it ; jump to T ; fall through.
            // The opcode byte is the one before the rel8.
            let opcode = insn.bytes()[len - 2];
            if ecx {
                out.put(&[0x67])?;
            }
            out.put(&[opcode, 2, 0xEB, 0])?;
            let at = out.len - 1;
            let before = out.len;
            out.jump_to(target)?;
            out.bytes[at] = (out.len - before) as u8;
            Ok(())
        }
        Kind::Call { target } => {
            // push qword [rip + d1] ; jmp qword [rip + d2] ; dq next ; dq target
            out.put(&[0xFF, 0x35, 0, 0, 0, 0])?;
            let d1 = out.len - 4;
            out.put(&[0xFF, 0x25, 0, 0, 0, 0])?;
            let d2 = out.len - 4;
            let end_of_jmp = out.len;
            out.put(&next.to_le_bytes())?;
            out.put(&target.to_le_bytes())?;
            // push's disp is from its own end (6 bytes before the jmp's end).
            out.patch_u32(d1, (end_of_jmp - (d1 + 4)) as u32);
            out.patch_u32(d2, 8);
            Ok(())
        }
        Kind::IndirectCall {
            modrm_offset,
            rip_operand,
        } => {
            // push qword [rip + d] ; the call rewritten as jmp (FF /2 → FF /4) ; dq next
            out.put(&[0xFF, 0x35, 0, 0, 0, 0])?;
            let d = out.len - 4;
            let start = out.len;
            out.put(insn.bytes())?;
            let m = start + usize::from(modrm_offset);
            out.bytes[m] = (out.bytes[m] & !0x38) | (4 << 3);
            if let Some((target, disp_offset)) = rip_operand {
                let r = rel32(out.here(), target).ok_or(Refusal::OutOfReach)?;
                out.patch_u32(start + usize::from(disp_offset), r as u32);
            }
            let data = out.len;
            out.put(&next.to_le_bytes())?;
            out.patch_u32(d, (data - (d + 4)) as u32);
            Ok(())
        }
    }
}

/// Whether control can fall through past the relocated instruction (and so needs a jump back).
fn falls_through(kind: Kind) -> bool {
    !matches!(
        kind,
        Kind::Jump { .. } | Kind::Call { .. } | Kind::IndirectCall { .. }
    )
}

/// Relocates `insn` to run at `slot`, followed by the jump back to the original next instruction.
///
/// Fails with [`Refusal::OutOfReach`] if a RIP-relative operand is more than ±2 GiB from the
/// slot (place slots near the code: within the same 2 GiB as the data the code addresses).
/// Branch targets and the jump back always reach (an absolute jump is used when `rel32` does not).
///
/// ```
/// use probe_arch_x86_64::{insn::Insn, xol::prepare};
/// // mov eax, [rip + 0x100] at 0x40_0000, copied to a slot at 0x40_1000.
/// let i = Insn::decode(&[0x8B, 0x05, 0x00, 0x01, 0, 0], 0x40_0000).unwrap();
/// let c = prepare(&i, 0x40_1000).unwrap();
/// // Same operand address: 0x40_1000 + 6 + disp = 0x40_0000 + 6 + 0x100.
/// assert_eq!(&c.bytes()[..6], &[0x8B, 0x05, 0x00, 0xF1, 0xFF, 0xFF]);
/// // Then jmp rel32 back to 0x40_0006.
/// assert_eq!(c.bytes()[6], 0xE9);
/// assert_eq!(c.resume(), 0x40_0006);
/// ```
pub fn prepare(insn: &Insn, slot: u64) -> Result<XolCopy, Refusal> {
    let mut out = Buf::<MAX_XOL>::new(slot);
    relocate(insn, &mut out)?;
    if falls_through(insn.kind()) {
        out.jump_to(insn.next())?;
    }
    Ok(XolCopy {
        bytes: out.bytes,
        len: out.len as u8,
        slot,
        resume: insn.next(),
    })
}

/// The most bytes the displaced code of a jump range takes ([`crate::detour::JumpRange::displaced`]).
pub const MAX_DISPLACED: usize = 160;

/// The displaced instructions of a jump-optimized probe, relocated to run at one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Displaced {
    bytes: [u8; MAX_DISPLACED],
    len: u8,
}

impl Displaced {
    /// The bytes to place in the trampoline.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Relocates `insns` (consecutive, as a jump range covers them) to run at `at`, then jumps to the
/// end of the range. Used for a trampoline's displaced-instructions entry.
pub(crate) fn displaced<'a>(
    insns: impl IntoIterator<Item = &'a Insn>,
    at: u64,
) -> Result<Displaced, Refusal> {
    let mut out = Buf::<MAX_DISPLACED>::new(at);
    let mut last = None;
    for i in insns {
        relocate(i, &mut out)?;
        last = Some(i);
    }
    if let Some(i) = last.filter(|i| falls_through(i.kind())) {
        out.jump_to(i.next())?;
    }
    Ok(Displaced {
        bytes: out.bytes,
        len: out.len as u8,
    })
}

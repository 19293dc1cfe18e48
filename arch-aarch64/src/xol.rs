//! What a probed aarch64 instruction becomes after its consumers ran: a simulation, or an
//! out-of-line copy that continues at the original next instruction.
//!
//! A stepped instruction is copied to a slot and followed by a way back to `pc + 4`:
//!
//! * `B pc + 4` when the slot is within ±128 MiB of the code — nothing more to do; or
//! * `BRK #`[`XOL_BRK_IMM`] otherwise — the trap handler sets PC to [`XolCopy::resume`]. No
//!   register is borrowed: at an arbitrary instruction boundary even X16/X17 (the linker's
//!   scratch registers) may be live, so an absolute `LDR`+`BR` would corrupt the program.
//!
//! The copy then needs the cache maintenance of [`crate::cache`] for its 8 bytes before it runs.

use crate::insn::{Class, PcRelative, Refusal, classify_word};
use crate::{b, brk};

/// The `BRK` immediate that ends a copy whose slot is out of `B` reach: a trap with it means
/// "the copy ran; continue at [`XolCopy::resume`]". Distinct from [`crate::PROBE_BRK_IMM`].
pub const XOL_BRK_IMM: u16 = 0x5053;

/// How the copy gets back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Return {
    /// A `B` to the next instruction.
    Branch,
    /// `BRK #XOL_BRK_IMM`: the embedder's trap handler continues at [`XolCopy::resume`].
    Trap,
}

/// An out-of-line copy: the instruction, then the way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XolCopy {
    words: [u32; 2],
    slot: u64,
    resume: u64,
    ret: Return,
}

impl XolCopy {
    /// The two instruction words for the slot.
    pub fn words(&self) -> [u32; 2] {
        self.words
    }
    /// The same as little-endian bytes.
    pub fn bytes(&self) -> [u8; 8] {
        let mut out = [0; 8];
        out[..4].copy_from_slice(&self.words[0].to_le_bytes());
        out[4..].copy_from_slice(&self.words[1].to_le_bytes());
        out
    }
    /// The slot it was made for.
    pub fn slot(&self) -> u64 {
        self.slot
    }
    /// Where execution continues: the original `pc + 4`.
    pub fn resume(&self) -> u64 {
        self.resume
    }
    /// How the copy gets there.
    pub fn returns_by(&self) -> Return {
        self.ret
    }
}

/// What to do after the consumers of a probe on `word` at `pc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Simulate it ([`PcRelative::simulate`]); no slot.
    Simulate(PcRelative),
    /// Run this copy in the slot.
    Step(XolCopy),
}

/// Plans the instruction `word`, probed at `pc`, for a slot at `slot`.
///
/// ```
/// use probe_arch_aarch64::xol::{prepare, Plan, Return};
/// // add x0, x1, x2 at 0x40_0000, slot 1 MiB away: the copy branches back.
/// let Ok(Plan::Step(c)) = prepare(0x8B02_0020, 0x40_0000, 0x50_0000) else { panic!() };
/// assert_eq!(c.words()[0], 0x8B02_0020);
/// assert_eq!(c.returns_by(), Return::Branch);
/// assert_eq!(c.resume(), 0x40_0004);
/// ```
pub fn prepare(word: u32, pc: u64, slot: u64) -> Result<Plan, Refusal> {
    match classify_word(word)? {
        Class::Simulate(p) => Ok(Plan::Simulate(p)),
        Class::Step => {
            let resume = pc.wrapping_add(4);
            let (back, ret) = match b(slot.wrapping_add(4), resume) {
                Some(w) => (w, Return::Branch),
                None => (brk(XOL_BRK_IMM), Return::Trap),
            };
            Ok(Plan::Step(XolCopy {
                words: [word, back],
                slot,
                resume,
                ret,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        // b.eq is simulated, never copied.
        assert!(matches!(
            prepare(0x5400_0040, 0x1000, 0x2000),
            Ok(Plan::Simulate(_))
        ));
        assert_eq!(
            prepare(0xC85F_7C20, 0x1000, 0x2000),
            Err(Refusal::Exclusive)
        );
        // A slot 1 GiB away: the copy ends in BRK #XOL_BRK_IMM.
        let Ok(Plan::Step(c)) = prepare(crate::NOP, 0x1000, 0x4000_0000) else {
            panic!()
        };
        assert_eq!(c.words(), [crate::NOP, brk(XOL_BRK_IMM)]);
        assert_eq!(c.returns_by(), Return::Trap);
        assert_eq!(c.bytes()[..4], crate::NOP.to_le_bytes());
        // Near: B from slot + 4 back to pc + 4.
        let Ok(Plan::Step(c)) = prepare(crate::NOP, 0x1000, 0x2000) else {
            panic!()
        };
        assert_eq!(Some(c.words()[1]), b(0x2004, 0x1004));
        assert_eq!(c.slot(), 0x2000);
    }
}

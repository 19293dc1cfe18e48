//! # probe-arch-aarch64
//!
//! The aarch64 half of probe-core's arch boundary:
//!
//! * [`Aarch64`] — the breakpoint, `BRK #`[`PROBE_BRK_IMM`], and trap recognition; encoders for
//!   [`b`], [`bl`] (±128 MiB, checked) and [`NOP`];
//! * [`insn`] — what a probed instruction needs: PC-relative ones (ADR, ADRP, LDR literal, B, BL,
//!   B.cond, CBZ/CBNZ, TBZ/TBNZ, and BR/BLR/RET) are *simulated* from the original PC; exclusive
//!   loads/stores and system instructions that cannot be stepped are refused with the reason; the
//!   rest run out of line;
//! * [`xol`] — the out-of-line copy of a stepped instruction, returning by `B` when the slot is
//!   in reach and by a second `BRK` (no borrowed register) when it is not;
//! * [`patch`] — the Arm ARM's rule for changing code other CPUs execute, as a type: a single
//!   aligned 32-bit store only when old and new are both B, BL, NOP, BRK, SVC, HVC or SMC, and
//!   otherwise only with every other CPU stopped;
//! * [`trampoline`] — the jump path's trampoline: what a probe's `B` lands on (saves the
//!   registers and V0–V31, calls the embedder, restores them, runs the displaced instruction);
//! * [`cache`] — `DC CVAU` / `DSB ISH` / `IC IVAU` / `DSB ISH` / `ISB` over the lines `CTR_EL0`
//!   describes, shortened when `IDC` / `DIC` say the hardware keeps them coherent.
//!
//! Everything builds and is tested on any host; the inline assembly exists only under
//! `cfg(target_arch = "aarch64")`, and its text is assembled by `aarch64-linux-gnu-as` in this
//! crate's tests so it is known to assemble where it runs. Encodings and classes are checked
//! against GNU binutils (`tests/binutils.rs`).
//!
//! ## The breakpoint immediate
//!
//! A `BRK` carries a 16-bit immediate that the kernel reports with the trap (in ESR_ELx.ISS), so
//! the immediate says *whose* breakpoint it is. Linux claims `#0x004` (kprobes), `#0x005`
//! (uprobes), `#0x006` (kprobes single-step), `#0x100` (KGDB), `#0x400`/`#0x800`+ (faults, BUG);
//! GDB uses `#0x000`. probe-core uses **`BRK #0x5052`** ("PR"), which none of them claims: a trap
//! handler can tell ours from a debugger's, and the kernel's own uprobe hook never mistakes ours
//! for its own.

#![no_std]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod cache;
pub mod insn;
pub mod patch;
pub mod trampoline;
pub mod xol;

use probe_core::arch::Arch;

/// The immediate of probe-core's `BRK` (see the crate docs for why this one).
pub const PROBE_BRK_IMM: u16 = 0x5052;
/// `NOP`.
pub const NOP: u32 = 0xD503_201F;
/// Every instruction is 4 bytes.
pub const INSN_LEN: usize = 4;

/// `BRK #imm`.
///
/// ```
/// assert_eq!(probe_arch_aarch64::brk(0), 0xD420_0000);
/// ```
pub const fn brk(imm: u16) -> u32 {
    0xD420_0000 | ((imm as u32) << 5)
}

/// probe-core's breakpoint word.
pub const BREAKPOINT: u32 = brk(PROBE_BRK_IMM);
const BREAKPOINT_BYTES: [u8; 4] = BREAKPOINT.to_le_bytes();

/// The aarch64 instruction set, as far as breakpoints go.
#[derive(Clone, Copy, Debug, Default)]
pub struct Aarch64;

impl Arch for Aarch64 {
    const BREAKPOINT: &'static [u8] = &BREAKPOINT_BYTES;
    /// Any `BRK` (ours or the program's), read as a little-endian word.
    fn is_trap(bytes: &[u8]) -> bool {
        word(bytes).is_some_and(insn::is_brk)
    }
}

/// The little-endian word at the start of `bytes`, if there are 4.
pub fn word(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// The `imm26` branch offset from `from` to `to`, if both are 4-byte aligned and within
/// ±128 MiB (−2²⁷ … 2²⁷ − 4).
fn imm26(from: u64, to: u64) -> Option<u32> {
    if !from.is_multiple_of(4) || !to.is_multiple_of(4) {
        return None;
    }
    let off = i64::try_from(i128::from(to) - i128::from(from)).ok()?;
    if !(-(1 << 27)..(1 << 27)).contains(&off) {
        return None;
    }
    Some(((off >> 2) as u32) & 0x03FF_FFFF)
}

/// `B to`, placed at `from`; `None` if out of ±128 MiB reach or unaligned.
///
/// ```
/// use probe_arch_aarch64::b;
/// assert_eq!(b(0x1000, 0x1000), Some(0x1400_0000));
/// assert_eq!(b(0x1000, 0x0FFC), Some(0x17FF_FFFF));
/// assert_eq!(b(0, 1 << 27), None);
/// assert_eq!(b(0, 2), None);
/// ```
pub fn b(from: u64, to: u64) -> Option<u32> {
    imm26(from, to).map(|i| 0x1400_0000 | i)
}

/// `BL to`, placed at `from`; `None` if out of ±128 MiB reach or unaligned.
pub fn bl(from: u64, to: u64) -> Option<u32> {
    imm26(from, to).map(|i| 0x9400_0000 | i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_and_reach() {
        assert_eq!(BREAKPOINT, 0xD42A_0A40);
        assert!(Aarch64::is_trap(&BREAKPOINT_BYTES));
        assert!(Aarch64::is_trap(&brk(0).to_le_bytes()));
        assert!(!Aarch64::is_trap(&NOP.to_le_bytes()));
        assert!(!Aarch64::is_trap(&[0x00, 0x00, 0x20]));
        let max = (1u64 << 27) - 4;
        assert!(b(0, max).is_some() && b(0, max + 4).is_none());
        assert!(b(1 << 27, 0).is_some() && b((1 << 27) + 4, 0).is_none());
        assert_eq!(bl(0x2000, 0x2004), Some(0x9400_0001));
        assert_eq!(b(u64::MAX - 3, 0), None);
        assert_eq!(word(&[1, 2, 3]), None);
    }
}

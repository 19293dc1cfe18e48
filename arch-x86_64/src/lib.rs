//! # probe-arch-x86_64
//!
//! The x86_64 half of probe-core's arch boundary. probe-core's protocols are arch-free; this crate
//! supplies what differs between instruction sets:
//!
//! * [`X86_64`] — the breakpoint (`INT3`, `0xCC`) and trap recognition, and [`jmp_rel32`], the
//!   optimized jump (`E9` + 4 bytes) with its range check;
//! * [`insn`] — instruction analysis with a real decoder (iced-x86, no_std, no allocation):
//!   length, instruction boundaries, and whether an instruction runs elsewhere as is, needs its
//!   RIP-relative operand re-based, is a branch to emulate or relocate, or is refused (and why);
//! * [`xol`] — the relocated out-of-line copy that ends in a jump back, so a slot needs no
//!   single-step and no fix-up;
//! * [`detour`] — the jump-optimization analysis (which instructions a 5-byte jump covers, whether
//!   they relocate, whether any branch lands inside) and the trampoline's displaced code;
//! * [`live_patch`] — the int3-first protocol for changing multi-byte code that other CPUs are
//!   executing, batched, with the cross-core serialization supplied by the embedder;
//! * [`xstate`] — which instruction saves the interrupted code's extended state (XSAVEC, XSAVE,
//!   FXSAVE) over which components, into how many bytes, with AMX/XFD handled;
//! * cache maintenance, which on x86 is that serialization only: the instruction cache is
//!   coherent with stores (see [`live_patch`]).
//!
//! Checked against GNU binutils (`tests/binutils.rs`: 355 instructions, lengths, classes,
//! targets, and relocated copies disassembled by objdump), run for real on this CPU
//! (`tests/xol_exec.rs`: each copy against its original; `tests/live_jump.rs`: a jump patched into
//! a running loop with membarrier), and fuzzed (`tests/never_panic.rs`).

#![no_std]
#![deny(rustdoc::broken_intra_doc_links)]

#[cfg(test)]
extern crate std;

pub mod detour;
pub mod insn;
pub mod live_patch;
pub mod trampoline;
pub mod xol;
#[cfg(target_arch = "x86_64")]
pub mod xstate;

use probe_core::arch::Arch;

/// The x86_64 instruction set, as far as breakpoints go.
#[derive(Clone, Copy, Debug, Default)]
pub struct X86_64;

/// `INT3`.
pub const INT3: u8 = 0xCC;
/// `JMP rel32`'s opcode.
pub const JMP_REL32: u8 = 0xE9;
/// `JMP rel32`'s length.
pub const JMP_LEN: usize = 5;

impl Arch for X86_64 {
    const BREAKPOINT: &'static [u8] = &[INT3];
    /// `INT3` (`CC`) or its two-byte form `INT 3` (`CD 03`).
    fn is_trap(bytes: &[u8]) -> bool {
        matches!(bytes, [INT3, ..] | [0xCD, 0x03, ..])
    }
}

/// `JMP rel32` at `from` to `to`, or `None` if `to` is out of the jump's ±2 GiB reach (measured
/// from the end of the jump).
///
/// ```
/// use probe_arch_x86_64::jmp_rel32;
/// assert_eq!(jmp_rel32(0x1000, 0x1005), Some([0xE9, 0, 0, 0, 0]));
/// assert_eq!(jmp_rel32(0x1000, 0x1000), Some([0xE9, 0xFB, 0xFF, 0xFF, 0xFF]));
/// assert_eq!(jmp_rel32(0, 1 << 32), None);
/// ```
pub fn jmp_rel32(from: u64, to: u64) -> Option<[u8; JMP_LEN]> {
    let next = from.checked_add(JMP_LEN as u64)?;
    let rel = i64::try_from(i128::from(to) - i128::from(next)).ok()?;
    let rel = i32::try_from(rel).ok()?;
    let r = rel.to_le_bytes();
    Some([JMP_REL32, r[0], r[1], r[2], r[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traps_and_jumps() {
        assert!(X86_64::is_trap(&[0xCC]));
        assert!(X86_64::is_trap(&[0xCD, 0x03]));
        assert!(!X86_64::is_trap(&[0xCD, 0x80]));
        assert!(!X86_64::is_trap(&[]));
        assert!(!X86_64::is_trap(&[0x90]));
        let lim = 0x7FFF_FFFFu64;
        assert!(jmp_rel32(0, JMP_LEN as u64 + lim).is_some());
        assert!(jmp_rel32(0, JMP_LEN as u64 + lim + 1).is_none());
        assert!(jmp_rel32(1 << 40, (1 << 40) + 5 - (1 << 31)).is_some());
        assert!(jmp_rel32(1 << 40, (1 << 40) + 5 - (1 << 31) - 1).is_none());
        assert!(jmp_rel32(u64::MAX - 2, 0).is_none());
    }
}

//! Jump-optimization analysis: may a 5-byte `jmp rel32` replace the code at a probe?
//!
//! A jump covers the probed instruction and as many following ones as it takes to reach 5 bytes
//! (whole instructions: a jump may not end inside one). Those *displaced* instructions then run in
//! the trampoline instead. The range is safe only if:
//!
//! 1. the function goes on for 5 bytes past the probe ([`NotOptimizable::TooShort`]);
//! 2. every covered instruction can be relocated ([`NotOptimizable::Unrelocatable`]): not a
//!    refused kind, and a `call` only as the last one (a call in the middle would return into
//!    the middle of the jump);
//! 3. no branch anywhere in the function lands strictly inside the range
//!    ([`NotOptimizable::BranchTarget`]) — it would execute the jump's tail as code;
//! 4. the function has no indirect jump ([`NotOptimizable::IndirectJump`]): a jump table might
//!    lead into the range and cannot be followed statically (kprobes refuses these too);
//! 5. the whole function decodes ([`NotOptimizable::Undecodable`]): otherwise 3 and 4 cannot be
//!    proved.
//!
//! A thread *stopped* inside the range (preempted between two covered instructions, or with a
//! return address into it from an interrupt) is the other danger; it is not visible in the code
//! and is the embedder's quiescence wait (`probe_core::arch::CodeSpace::quiesce`) before the jump
//! goes in.
//!
//! The analysis needs the function's bounds (from a symbol table, or DWARF); it decodes linearly,
//! which is right for compiler output without data in text.

use crate::insn::{self, Insn, Kind, Refusal};
use crate::xol::{self, Displaced};
use crate::{INT3, JMP_LEN, jmp_rel32};
use probe_core::arch::{MAX_DETOUR, NotOptimizable};

/// The most instructions a jump range covers (five 1-byte ones).
pub const MAX_COVERED: usize = JMP_LEN;

/// A jump range that passed the analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JumpRange {
    addr: u64,
    insns: [Option<Insn>; MAX_COVERED],
    count: u8,
    len: u8,
}

impl JumpRange {
    /// The probe's address (the first covered byte).
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Bytes covered: whole instructions, at least 5, at most [`MAX_DETOUR`].
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
    /// Always `false` (a range covers at least 5 bytes).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The covered instructions, in order.
    pub fn insns(&self) -> impl Iterator<Item = &Insn> {
        self.insns[..usize::from(self.count)].iter().flatten()
    }

    /// The bytes to write over the range: `jmp rel32` to `trampoline`, then `INT3` padding (no CPU
    /// should reach it; one that did would trap rather than run the old tail). `None` if the
    /// trampoline is out of the jump's reach.
    pub fn jump_bytes(&self, trampoline: u64) -> Option<[u8; MAX_DETOUR]> {
        let j = jmp_rel32(self.addr, trampoline)?;
        let mut out = [INT3; MAX_DETOUR];
        out[..JMP_LEN].copy_from_slice(&j);
        Some(out)
    }

    /// The covered instructions relocated to run at `at` (the trampoline's displaced entry),
    /// followed by a jump to the end of the range. Fails with
    /// [`insn::Refusal::OutOfReach`] if a RIP-relative operand does not reach from `at`.
    pub fn displaced(&self, at: u64) -> Result<Displaced, insn::Refusal> {
        xol::displaced(self.insns(), at)
    }
}

/// Analyses a 5-byte jump at `addr` inside the function whose code `func` starts at
/// `func_start`.
///
/// ```
/// use probe_arch_x86_64::detour::analyze;
/// use probe_core::arch::NotOptimizable;
/// // 0: push rbp ; 1: mov rbp, rsp ; 4: mov eax, 1 ; 9: pop rbp ; 10: ret
/// let f = [0x55, 0x48, 0x89, 0xE5, 0xB8, 1, 0, 0, 0, 0x5D, 0xC3];
/// let r = analyze(&f, 0x1000, 0x1000).unwrap();
/// assert_eq!(r.len(), 9); // push, mov, mov: 1 + 3 + 5 ≥ 5
/// assert_eq!(analyze(&f, 0x1000, 0x1009), Err(NotOptimizable::TooShort));
/// ```
pub fn analyze(func: &[u8], func_start: u64, addr: u64) -> Result<JumpRange, NotOptimizable> {
    // A function that would run past the top of the address space is no function here (nor
    // for `insn::check_boundary`, which this agrees with).
    if func_start.checked_add(func.len() as u64).is_none() {
        return Err(NotOptimizable::OutOfReach);
    }
    let off = addr
        .checked_sub(func_start)
        .and_then(|o| usize::try_from(o).ok())
        .filter(|&o| o < func.len())
        .ok_or(NotOptimizable::TooShort)?;
    // Two passes: the first finds the range (decoding up to its end), the second walks the
    // whole function and checks every branch against it (a branch may come before the probe).
    // Each instruction is decoded once per pass.
    let mut range = JumpRange {
        addr,
        insns: [None; MAX_COVERED],
        count: 0,
        len: 0,
    };
    let undecodable = |pc| move |_| NotOptimizable::Undecodable { addr: pc };
    let mut at = 0usize;
    let mut covered = 0usize;
    while at < func.len() && covered < JMP_LEN {
        let pc = func_start.wrapping_add(at as u64);
        if at < off {
            let n = insn::length(&func[at..], pc).map_err(undecodable(pc))?;
            if at + n > off {
                // The probe is inside this instruction.
                return Err(NotOptimizable::Undecodable { addr });
            }
            at += n;
            continue;
        }
        let count = usize::from(range.count);
        if let Some(prev) = count.checked_sub(1).and_then(|c| range.insns[c])
            && matches!(prev.kind(), Kind::Call { .. } | Kind::IndirectCall { .. })
        {
            // A call before the end of the range returns into the jump.
            return Err(NotOptimizable::Unrelocatable { addr: prev.addr() });
        }
        let i = match Insn::decode(&func[at..], pc) {
            Ok(i) => i,
            Err(Refusal::Truncated | Refusal::Invalid) => {
                return Err(NotOptimizable::Undecodable { addr: pc });
            }
            Err(_) => return Err(NotOptimizable::Unrelocatable { addr: pc }),
        };
        range.insns[count] = Some(i);
        range.count += 1;
        covered += i.len();
        at += i.len();
    }
    if covered < JMP_LEN {
        return Err(NotOptimizable::TooShort);
    }
    // The last covered instruction starts before byte 5 and is at most 15 long.
    debug_assert!(covered <= MAX_DETOUR);
    range.len = covered as u8;
    // A range that would run past the top of the address space cannot be jumped over (and its
    // branch checks below would wrap): refused, never a panic.
    let end = addr
        .checked_add(covered as u64)
        .ok_or(NotOptimizable::OutOfReach)?;
    let mut target_in_range = None;
    let mut at = 0usize;
    while at < func.len() {
        let pc = func_start.wrapping_add(at as u64);
        let f = insn::flow(&func[at..], pc).map_err(undecodable(pc))?;
        if f.indirect_jump {
            return Err(NotOptimizable::IndirectJump { addr: pc });
        }
        if let Some(t) = f.target.filter(|&t| t > addr && t < end) {
            target_in_range.get_or_insert(t);
        }
        at += f.len;
    }
    match target_in_range {
        Some(t) => Err(NotOptimizable::BranchTarget { addr: t }),
        None => Ok(range),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u64 = 0x1000;

    /// Found by the `x86_pipeline` fuzz target: a probe in the last bytes of the address space
    /// overflowed computing the range's end (a panic in debug builds). It is refused.
    #[test]
    fn a_range_at_the_top_of_the_address_space_is_refused_not_a_panic() {
        // mov eax, imm32 at u64::MAX - 4: its 5 bytes end exactly at 2^64.
        let f = [0xB8, 1, 0, 0, 0];
        assert_eq!(
            analyze(&f, u64::MAX - 4, u64::MAX - 4),
            Err(NotOptimizable::OutOfReach)
        );
        // A function that wraps past 2^64 (found by the same target: `analyze` accepted a
        // probe `check_boundary` calls out of range): refused by both.
        let g = [0x90; 20];
        let start = u64::MAX - 14;
        assert_eq!(analyze(&g, start, start), Err(NotOptimizable::OutOfReach));
        assert!(crate::insn::check_boundary(&g, start, start).is_err());
    }

    #[test]
    fn refusals() {
        // 0: jmp +1 (to 3, inside a range at 0..) ; 2: nop ; 3: nop ; 4: mov eax, 1 ; 9: ret
        let f = [0xEB, 0x01, 0x90, 0x90, 0xB8, 1, 0, 0, 0, 0xC3];
        assert_eq!(
            analyze(&f, F, F + 2),
            Err(NotOptimizable::BranchTarget { addr: F + 3 })
        );
        // A jump to the probe itself is fine.
        let f = [0xEB, 0x00, 0xB8, 1, 0, 0, 0, 0xC3];
        assert_eq!(analyze(&f, F, F + 2).map(|r| r.len()), Ok(5));
        // A call last in the range returns past it: fine.
        let f = [0x90, 0xE8, 0, 0, 0, 0, 0x90, 0xC3];
        assert_eq!(analyze(&f, F, F).map(|r| r.len()), Ok(6));
        // call rax ; mov eax, 1: the call would return into the jump.
        let f = [0xFF, 0xD0, 0xB8, 1, 0, 0, 0, 0xC3];
        assert_eq!(
            analyze(&f, F, F),
            Err(NotOptimizable::Unrelocatable { addr: F })
        );
        // syscall inside the range.
        let f = [0x90, 0x0F, 0x05, 0x90, 0x90, 0x90, 0xC3];
        assert_eq!(
            analyze(&f, F, F),
            Err(NotOptimizable::Unrelocatable { addr: F + 1 })
        );
        // An indirect jump anywhere in the function.
        let f = [0xB8, 1, 0, 0, 0, 0xFF, 0xE0];
        assert_eq!(
            analyze(&f, F, F),
            Err(NotOptimizable::IndirectJump { addr: F + 5 })
        );
        // Undecodable code after the range still blocks it.
        let f = [0xB8, 1, 0, 0, 0, 0x06];
        assert_eq!(
            analyze(&f, F, F),
            Err(NotOptimizable::Undecodable { addr: F + 5 })
        );
        // The probe inside an instruction.
        let f = [0xB8, 1, 0, 0, 0, 0xB8, 1, 0, 0, 0, 0xC3];
        assert_eq!(
            analyze(&f, F, F + 1),
            Err(NotOptimizable::Undecodable { addr: F + 1 })
        );
        assert_eq!(analyze(&f, F, F + 11), Err(NotOptimizable::TooShort));
        assert_eq!(analyze(&f, F, F - 1), Err(NotOptimizable::TooShort));
    }

    #[test]
    fn jump_and_displaced() {
        // mov eax, [rip+0x10] (6) ; ret
        let f = [0x8B, 0x05, 0x10, 0, 0, 0, 0xC3];
        let r = analyze(&f, F, F).unwrap();
        assert_eq!(r.len(), 6);
        let j = r.jump_bytes(F + 0x100).unwrap();
        assert_eq!(&j[..6], &[0xE9, 0xFB, 0, 0, 0, INT3]);
        assert!(r.jump_bytes(F + (1 << 40)).is_none());
        let d = r.displaced(F + 0x200).unwrap();
        // disp re-based: target F+6+0x10, from F+0x206.
        assert_eq!(&d.bytes()[..6], &[0x8B, 0x05, 0x10, 0xFE, 0xFF, 0xFF]);
        // then jmp back to F+6.
        assert_eq!(d.bytes()[6], 0xE9);
        assert_eq!(d.bytes().len(), 11);
        assert_eq!(r.displaced(F + (1 << 40)), Err(insn::Refusal::OutOfReach));
    }
}

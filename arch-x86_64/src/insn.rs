//! Instruction analysis: what a probed instruction is, and what it takes to run it elsewhere.
//!
//! A probe replaces the first byte of an instruction with `INT3`. After the consumers run, the
//! displaced instruction must still execute — but not at its own address, where the breakpoint
//! sits. It runs *out of line* (in an XOL slot, [`crate::xol`]) or in a trampoline
//! ([`crate::detour`]), and every way an instruction depends on where it is must be dealt with:
//!
//! | what it does with RIP | [`Kind`] | how a copy elsewhere stays exact |
//! |---|---|---|
//! | nothing | [`Kind::AsIs`] | byte-for-byte copy |
//! | memory operand `[rip + disp32]` | [`Kind::RipRelative`] | new `disp32` from the copy's address; refused if it no longer fits |
//! | `jmp rel8/rel32` | [`Kind::Jump`] | a jump to the same target |
//! | `jcc rel8/rel32` | [`Kind::CondJump`] | inverted `jcc` over a jump to the target |
//! | `loop*`, `jrcxz`, `jecxz` | [`Kind::CountJump`] | the same instruction with a short displacement to a jump to the target |
//! | `call rel32` | [`Kind::Call`] | push the *original* return address, jump to the target |
//! | `call r/m64` | [`Kind::IndirectCall`] | push the original return address, `jmp r/m64` |
//!
//! Branches can also be [emulated](Insn::emulate) in software from the saved registers (what
//! Linux's uprobes does for them), so an embedder need not take a slot for them at all.
//!
//! The rest is refused, each with its [`Refusal`]: breakpoints and software interrupts (`int3`,
//! `int n`, `int1`, `into`), system calls (`syscall` and `sysenter` save RIP in a register: the
//! copy's), returns from privileged state (`iret`, `sysret`, …), far calls and jumps (a far call
//! pushes the copy's RIP), `xbegin` (its abort target is RIP-relative and a transaction cannot be
//! resumed elsewhere), instructions that always fault (`ud2`), relative branches with an
//! operand-size prefix (AMD truncates RIP to 16 bits, Intel ignores the prefix: no copy can be
//! right on both), and indirect calls through RSP (the push would move the operand).
//!
//! Decoding uses [iced-x86](https://docs.rs/iced-x86) (no_std, no allocation), so analysis may run
//! anywhere, including a trap handler.

use iced_x86::{
    ConditionCode, Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, Mnemonic,
    OpKind, Register,
};

/// The longest x86 instruction.
pub const MAX_INSN: usize = 15;

/// Why an instruction cannot be probed (or relocated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The bytes end before the instruction does.
    Truncated,
    /// Not a valid x86-64 instruction.
    Invalid,
    /// `int3`, `int n`, `int1`, `into`: a trap of the program's own (or a debugger's).
    Trap,
    /// `syscall`, `sysenter`: the CPU saves RIP (the copy's) for the return.
    SystemCall,
    /// `iret`, `sysret`, `sysexit`, `uiret`, `eretu`, `erets`: a return from privileged or
    /// interrupt state, which an out-of-line copy cannot follow.
    ExceptionReturn,
    /// A far call or jump: it changes CS, and a far call pushes the copy's RIP.
    FarBranch,
    /// `xbegin`: its abort target is RIP-relative and a transaction cannot move.
    Transaction,
    /// `ud0`, `ud1`, `ud2` and the like: always faults.
    Faulting,
    /// A relative branch with an operand-size (`66`) prefix: AMD takes a 16-bit displacement
    /// and truncates RIP to 16 bits, Intel ignores the prefix — not even the length is agreed
    /// (GNU objdump decodes `66 E9` as 4 bytes, iced as 6), so no copy is right on both.
    OperandSizeBranch,
    /// `call` through a memory operand or register that involves RSP: the relocated push would
    /// change what the operand reads.
    StackRelativeCall,
    /// A RIP-relative operand or branch target is out of a `rel32`'s reach from the copy.
    OutOfReach,
    /// The relocated instructions do not fit the room for them (a trampoline's displaced
    /// instructions, [`crate::xol::MAX_DISPLACED`]).
    TooLong,
}

impl Refusal {
    /// What this refusal of the instruction at `addr` means for jump optimization: the
    /// optimizer's reason ([`probe_core::arch::NotOptimizable`]) for an embedder's
    /// `CodeSpace::prepare_detour`. Decoding failures are `Undecodable`, a reach failure is
    /// `OutOfReach`, every other refusal makes the instruction `Unrelocatable`.
    ///
    /// ```
    /// use probe_arch_x86_64::insn::Refusal;
    /// use probe_core::arch::NotOptimizable;
    /// assert_eq!(Refusal::Invalid.at(0x40), NotOptimizable::Undecodable { addr: 0x40 });
    /// assert_eq!(Refusal::Trap.at(0x40), NotOptimizable::Unrelocatable { addr: 0x40 });
    /// ```
    pub fn at(self, addr: u64) -> probe_core::arch::NotOptimizable {
        use probe_core::arch::NotOptimizable as N;
        match self {
            Refusal::Truncated | Refusal::Invalid => N::Undecodable { addr },
            Refusal::OutOfReach => N::OutOfReach,
            Refusal::Trap
            | Refusal::SystemCall
            | Refusal::ExceptionReturn
            | Refusal::FarBranch
            | Refusal::Transaction
            | Refusal::Faulting
            | Refusal::OperandSizeBranch
            | Refusal::StackRelativeCall
            | Refusal::TooLong => N::Unrelocatable { addr },
        }
    }
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Truncated => "the bytes end inside the instruction",
            Self::Invalid => "not a valid x86-64 instruction",
            Self::Trap => "a trap instruction (int3, int n, int1, into)",
            Self::SystemCall => "a system call saves RIP, which a copy changes",
            Self::ExceptionReturn => "a return from interrupt or privileged state",
            Self::FarBranch => "a far call or jump",
            Self::Transaction => "xbegin cannot run elsewhere",
            Self::Faulting => "the instruction always faults",
            Self::OperandSizeBranch => "a relative branch with an operand-size prefix",
            Self::StackRelativeCall => "an indirect call whose operand depends on RSP",
            Self::OutOfReach => "a RIP-relative target is out of rel32 reach of the copy",
            Self::TooLong => "the relocated code does not fit",
        })
    }
}

/// A condition of `jcc` (the low 4 bits of its opcode: `70+cc`, `0F 80+cc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cond(u8);

impl Cond {
    /// The condition with opcode nibble `cc` (`0` = `o`, … `15` = `g`); `None` above 15.
    pub fn new(cc: u8) -> Option<Self> {
        (cc < 16).then_some(Self(cc))
    }
    /// The opcode nibble.
    pub fn nibble(self) -> u8 {
        self.0
    }
    /// The opposite condition (x86 pairs them by the low bit).
    pub fn inverse(self) -> Self {
        Self(self.0 ^ 1)
    }
    /// Whether the condition holds for `rflags` (Intel SDM vol. 2, "Jcc").
    pub fn holds(self, rflags: u64) -> bool {
        let f = |bit: u32| rflags & (1 << bit) != 0;
        let (cf, pf, zf, sf, of) = (f(0), f(2), f(6), f(7), f(11));
        let base = match self.0 >> 1 {
            0 => of,
            1 => cf,
            2 => zf,
            3 => cf || zf,
            4 => sf,
            5 => pf,
            6 => sf != of,
            _ => zf || sf != of,
        };
        base != (self.0 & 1 == 1)
    }
    fn from_iced(c: ConditionCode) -> Option<Self> {
        // iced numbers conditions from 1 in opcode order.
        (c as u8).checked_sub(1).and_then(Self::new)
    }
}

/// `loop`, `loope`, `loopne`, `jrcxz` / `jecxz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CountOp {
    /// `loopne` (`E0`): decrement the count; taken if it is not zero and ZF is clear.
    LoopNe,
    /// `loope` (`E1`): decrement the count; taken if it is not zero and ZF is set.
    LoopE,
    /// `loop` (`E2`): decrement the count; taken if it is not zero.
    Loop,
    /// `jrcxz` / `jecxz` (`E3`): taken if the count is zero.
    JCxz,
}

/// What an instruction does with RIP, which decides how a copy of it runs elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Independent of where it runs.
    AsIs,
    /// A `[rip + disp32]` memory operand (also `jmp [rip+d]`, `lea r, [rip+d]`, VEX/EVEX forms).
    RipRelative {
        /// The operand's address.
        target: u64,
        /// Where the `disp32` sits in the instruction's bytes.
        disp_offset: u8,
    },
    /// `jmp rel8` / `jmp rel32`.
    Jump {
        /// The branch target.
        target: u64,
    },
    /// `jcc rel8` / `jcc rel32`.
    CondJump {
        /// The condition.
        cond: Cond,
        /// The target when taken.
        target: u64,
    },
    /// `loop*`, `jrcxz`, `jecxz`.
    CountJump {
        /// Which.
        op: CountOp,
        /// `true` if it counts in ECX (`67` prefix), `false` for RCX.
        ecx: bool,
        /// The target when taken.
        target: u64,
    },
    /// `call rel32`.
    Call {
        /// The callee.
        target: u64,
    },
    /// `call r/m64`: the target comes from a register or memory.
    IndirectCall {
        /// Where the ModRM byte sits (its reg field, `/2`, becomes `/4` for the relocated jump).
        modrm_offset: u8,
        /// The `[rip + disp32]` operand, if the call goes through one: (its address, where the
        /// `disp32` sits).
        rip_operand: Option<(u64, u8)>,
    },
}

/// One decoded instruction at its original address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    addr: u64,
    len: u8,
    bytes: [u8; MAX_INSN],
    kind: Kind,
}

impl Insn {
    /// Decodes the instruction at the start of `code`, which sits at address `addr`, and says
    /// whether and how it can run elsewhere.
    ///
    /// ```
    /// use probe_arch_x86_64::insn::{Insn, Kind, Refusal};
    /// // mov rax, [rip + 0x10] at 0x1000: the operand is at 0x1000 + 7 + 0x10.
    /// let i = Insn::decode(&[0x48, 0x8B, 0x05, 0x10, 0, 0, 0], 0x1000).unwrap();
    /// assert_eq!(i.len(), 7);
    /// assert_eq!(i.kind(), Kind::RipRelative { target: 0x1017, disp_offset: 3 });
    /// // syscall saves RIP in RCX: a copy would return to the copy.
    /// assert_eq!(Insn::decode(&[0x0F, 0x05], 0x1000), Err(Refusal::SystemCall));
    /// // Half an instruction.
    /// assert_eq!(Insn::decode(&[0x48, 0x8B], 0x1000), Err(Refusal::Truncated));
    /// ```
    pub fn decode(code: &[u8], addr: u64) -> Result<Self, Refusal> {
        let raw = decode_raw(code, addr)?;
        let len = raw.insn.len();
        let mut bytes = [0; MAX_INSN];
        bytes[..len].copy_from_slice(&code[..len]);
        let kind = classify(&raw, &bytes[..len])?;
        Ok(Self {
            addr,
            len: len as u8,
            bytes,
            kind,
        })
    }

    /// Where it was decoded.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Its length in bytes (1..=15).
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
    /// Always `false`: an instruction has at least one byte (for clippy's `len` convention).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The address of the next instruction (where a copy continues).
    pub fn next(&self) -> u64 {
        self.addr.wrapping_add(u64::from(self.len))
    }
    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len()]
    }
    /// What it does with RIP.
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// `true` for the relative branches and calls, which [`Insn::emulate`] can run.
    pub fn is_branch(&self) -> bool {
        matches!(
            self.kind,
            Kind::Jump { .. } | Kind::CondJump { .. } | Kind::CountJump { .. } | Kind::Call { .. }
        )
    }

    /// Runs a relative branch or call on saved registers instead of out of line: sets `rip`
    /// (and `rcx` for the counting branches), and for `call` pushes the original return address
    /// through `push`. Returns `false` (touching nothing) for other kinds.
    ///
    /// `push(addr, value)` stores the 8-byte return address at `addr` (the new RSP); if it fails
    /// the registers are left unchanged and its error is returned.
    ///
    /// ```
    /// use probe_arch_x86_64::insn::{Insn, Regs};
    /// // jne +0x10 at 0x1000 (2 bytes), with ZF clear: taken.
    /// let i = Insn::decode(&[0x75, 0x10], 0x1000).unwrap();
    /// let mut r = Regs { rip: 0x1000, rsp: 0x8000, rflags: 0x202, rcx: 0 };
    /// assert_eq!(i.emulate(&mut r, |_, _| Ok::<(), ()>(())), Ok(true));
    /// assert_eq!(r.rip, 0x1012);
    /// ```
    pub fn emulate<E>(
        &self,
        regs: &mut Regs,
        push: impl FnOnce(u64, u64) -> Result<(), E>,
    ) -> Result<bool, E> {
        let next = self.next();
        match self.kind {
            Kind::Jump { target } => regs.rip = target,
            Kind::CondJump { cond, target } => {
                regs.rip = if cond.holds(regs.rflags) {
                    target
                } else {
                    next
                };
            }
            Kind::CountJump { op, ecx, target } => {
                let zf = regs.rflags & (1 << 6) != 0;
                let mask = if ecx { u64::from(u32::MAX) } else { u64::MAX };
                let count = regs.rcx & mask;
                let taken = if op == CountOp::JCxz {
                    count == 0
                } else {
                    let dec = count.wrapping_sub(1) & mask;
                    // `loop` with a 67 prefix writes ECX, which zero-extends into RCX.
                    regs.rcx = dec;
                    dec != 0
                        && match op {
                            CountOp::LoopNe => !zf,
                            CountOp::LoopE => zf,
                            _ => true,
                        }
                };
                regs.rip = if taken { target } else { next };
            }
            Kind::Call { target } => {
                let sp = regs.rsp.wrapping_sub(8);
                push(sp, next)?;
                regs.rsp = sp;
                regs.rip = target;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// The registers [`Insn::emulate`] reads and writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// The instruction pointer: the probed instruction's address on entry.
    pub rip: u64,
    /// The stack pointer.
    pub rsp: u64,
    /// The flags.
    pub rflags: u64,
    /// The count register of `loop` and `jrcxz`.
    pub rcx: u64,
}

/// One decoded instruction with where its RIP-relative displacement sits, if it has one.
struct Raw {
    insn: Instruction,
    rip_operand: Option<(u64, u8)>,
}

/// Decodes one instruction; `Err` says why not.
fn decode_raw(code: &[u8], addr: u64) -> Result<Raw, Refusal> {
    let window = &code[..code.len().min(MAX_INSN)];
    let mut d = Decoder::with_ip(64, window, addr, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        return Err(match d.last_error() {
            DecoderError::NoMoreBytes => Refusal::Truncated,
            _ => Refusal::Invalid,
        });
    }
    // The constant offsets describe the decoder's last instruction: ask before decoding again.
    let offsets = d.get_constant_offsets(&insn);
    // A RIP-relative operand always has a 4-byte displacement (ModRM mod=00, r/m=101).
    let rip_operand = (insn.is_ip_rel_memory_operand()
        && offsets.has_displacement()
        && offsets.displacement_size() == 4)
        .then(|| {
            (
                insn.ip_rel_memory_address(),
                offsets.displacement_offset() as u8,
            )
        });
    Ok(Raw { insn, rip_operand })
}

/// The length of the instruction at the start of `code`, if it decodes — whether or not it could
/// be probed. Used to walk a function.
pub fn length(code: &[u8], addr: u64) -> Result<usize, Refusal> {
    decode_raw(code, addr).map(|r| r.insn.len())
}

/// What a walk over a function needs of one instruction, from a single decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Its length.
    pub len: usize,
    /// The target of a relative branch, call, loop or `xbegin`.
    pub target: Option<u64>,
    /// `jmp r/m64` — the shape of a jump-table dispatch.
    pub indirect_jump: bool,
}

/// Decodes the instruction at the start of `code` for a function walk: length, relative target,
/// indirect jump. Fails only if it does not decode ([`Refusal::Truncated`], [`Refusal::Invalid`]),
/// whether or not it could be probed.
pub fn flow(code: &[u8], addr: u64) -> Result<Flow, Refusal> {
    let raw = decode_raw(code, addr)?;
    let i = &raw.insn;
    let relative = matches!(
        i.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    );
    Ok(Flow {
        len: i.len(),
        target: relative.then(|| i.near_branch_target()),
        indirect_jump: i.is_jmp_near_indirect(),
    })
}

/// Index of the first opcode byte: past legacy prefixes and REX (not VEX/EVEX, which our
/// callers never see here: only `call r/m` asks).
fn opcode_index(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|b| {
            !matches!(
                b,
                0xF0 | 0xF2 | 0xF3 | 0x2E | 0x36 | 0x3E | 0x26 | 0x64 | 0x65 | 0x66 | 0x67
            ) && !(0x40..=0x4F).contains(b)
        })
        .unwrap_or(bytes.len())
}

fn has_prefix(bytes: &[u8], prefix: u8) -> bool {
    bytes[..opcode_index(bytes)].contains(&prefix)
}

fn classify(raw: &Raw, bytes: &[u8]) -> Result<Kind, Refusal> {
    use Mnemonic as M;
    let insn = &raw.insn;
    match insn.mnemonic() {
        M::Int3 | M::Int | M::Int1 | M::Into => return Err(Refusal::Trap),
        M::Syscall | M::Sysenter => return Err(Refusal::SystemCall),
        M::Iret
        | M::Iretd
        | M::Iretq
        | M::Sysret
        | M::Sysretq
        | M::Sysexit
        | M::Sysexitq
        | M::Uiret
        | M::Eretu
        | M::Erets => return Err(Refusal::ExceptionReturn),
        M::Xbegin => return Err(Refusal::Transaction),
        _ => {}
    }
    if insn.is_call_far()
        || insn.is_jmp_far()
        || insn.is_call_far_indirect()
        || insn.is_jmp_far_indirect()
    {
        return Err(Refusal::FarBranch);
    }
    let near = |k: OpKind| matches!(k, OpKind::NearBranch16 | OpKind::NearBranch32);
    match insn.flow_control() {
        FlowControl::Exception => return Err(Refusal::Faulting),
        FlowControl::Interrupt => return Err(Refusal::Trap),
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
            if near(insn.op0_kind()) || has_prefix(bytes, 0x66) =>
        {
            return Err(Refusal::OperandSizeBranch);
        }
        _ => {}
    }
    let target = insn.near_branch_target();
    if insn.is_jmp_short_or_near() {
        return Ok(Kind::Jump { target });
    }
    if insn.is_jcc_short_or_near() {
        let cond = Cond::from_iced(insn.condition_code()).ok_or(Refusal::Invalid)?;
        return Ok(Kind::CondJump { cond, target });
    }
    if insn.is_loopcc() || insn.is_loop() || insn.is_jcx_short() {
        let op = match bytes[opcode_index(bytes)] {
            0xE0 => CountOp::LoopNe,
            0xE1 => CountOp::LoopE,
            0xE2 => CountOp::Loop,
            _ => CountOp::JCxz,
        };
        // Only RCX (no prefix) and ECX (67) exist in 64-bit mode.
        let ecx = has_prefix(bytes, 0x67);
        return Ok(Kind::CountJump { op, ecx, target });
    }
    if insn.is_call_near() {
        return Ok(Kind::Call { target });
    }
    if insn.is_call_near_indirect() {
        if has_prefix(bytes, 0x66) {
            return Err(Refusal::OperandSizeBranch);
        }
        let uses_rsp = |r: Register| matches!(r, Register::RSP | Register::ESP);
        let stack = if insn.op0_kind() == OpKind::Memory {
            uses_rsp(insn.memory_base()) || uses_rsp(insn.memory_index())
        } else {
            uses_rsp(insn.op0_register())
        };
        if stack {
            return Err(Refusal::StackRelativeCall);
        }
        let modrm_offset = opcode_index(bytes) + 1;
        if bytes.get(modrm_offset - 1) != Some(&0xFF) {
            // `call r/m64` is always FF /2 without VEX; anything else is not understood.
            return Err(Refusal::Invalid);
        }
        return Ok(Kind::IndirectCall {
            modrm_offset: modrm_offset as u8,
            rip_operand: raw.rip_operand,
        });
    }
    if let Some((target, disp_offset)) = raw.rip_operand {
        return Ok(Kind::RipRelative {
            target,
            disp_offset,
        });
    }
    Ok(Kind::AsIs)
}

/// Checks that `addr` starts an instruction of the function whose code `func` begins at
/// `func_start`, by decoding it from the start.
///
/// Errors: [`probe_core::Error::OffsetOutOfRange`] if `addr` is outside `func`;
/// [`probe_core::Error::InsideInstruction`] if it falls inside an instruction, or if the function
/// stops decoding before `addr` (then no boundary there can be proved).
///
/// ```
/// use probe_arch_x86_64::insn::check_boundary;
/// use probe_core::Error;
/// // push rbp; mov rbp, rsp; ret
/// let f = [0x55, 0x48, 0x89, 0xE5, 0xC3];
/// assert_eq!(check_boundary(&f, 0x400, 0x401), Ok(()));
/// assert_eq!(check_boundary(&f, 0x400, 0x402), Err(Error::InsideInstruction));
/// assert_eq!(check_boundary(&f, 0x400, 0x405), Err(Error::OffsetOutOfRange));
/// ```
pub fn check_boundary(func: &[u8], func_start: u64, addr: u64) -> probe_core::Result<()> {
    let end = func_start.checked_add(func.len() as u64);
    if addr < func_start || end.is_none_or(|e| addr >= e) {
        return Err(probe_core::Error::OffsetOutOfRange);
    }
    let mut at = 0usize;
    loop {
        let pc = func_start + at as u64;
        if pc == addr {
            return Ok(());
        }
        if pc > addr {
            return Err(probe_core::Error::InsideInstruction);
        }
        match length(&func[at..], pc) {
            Ok(n) => at += n,
            Err(_) => return Err(probe_core::Error::InsideInstruction),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(bytes: &[u8]) -> Result<Kind, Refusal> {
        Insn::decode(bytes, 0x1000).map(|i| i.kind())
    }

    #[test]
    fn every_refusal_has_its_reason() {
        assert_eq!(kind(&[0xCC]), Err(Refusal::Trap));
        assert_eq!(kind(&[0xCD, 0x80]), Err(Refusal::Trap));
        assert_eq!(kind(&[0xCD, 0x03]), Err(Refusal::Trap));
        assert_eq!(kind(&[0xF1]), Err(Refusal::Trap));
        assert_eq!(kind(&[0x0F, 0x05]), Err(Refusal::SystemCall));
        assert_eq!(kind(&[0x0F, 0x34]), Err(Refusal::SystemCall));
        assert_eq!(kind(&[0x48, 0xCF]), Err(Refusal::ExceptionReturn));
        assert_eq!(kind(&[0x48, 0x0F, 0x07]), Err(Refusal::ExceptionReturn));
        assert_eq!(
            kind(&[0xFF, 0x1C, 0x25, 0, 0, 0, 0]),
            Err(Refusal::FarBranch)
        );
        assert_eq!(
            kind(&[0xFF, 0x2C, 0x25, 0, 0, 0, 0]),
            Err(Refusal::FarBranch)
        );
        assert_eq!(kind(&[0xC7, 0xF8, 0, 0, 0, 0]), Err(Refusal::Transaction));
        assert_eq!(kind(&[0x0F, 0x0B]), Err(Refusal::Faulting));
        assert_eq!(
            kind(&[0x66, 0xE9, 0x10, 0, 0, 0]),
            Err(Refusal::OperandSizeBranch)
        );
        assert_eq!(
            kind(&[0x66, 0xE8, 0x10, 0, 0, 0]),
            Err(Refusal::OperandSizeBranch)
        );
        assert_eq!(kind(&[0x66, 0x74, 0x10]), Err(Refusal::OperandSizeBranch));
        assert_eq!(kind(&[0xFF, 0x14, 0x24]), Err(Refusal::StackRelativeCall));
        assert_eq!(kind(&[0xFF, 0xD4]), Err(Refusal::StackRelativeCall));
        assert_eq!(kind(&[0x06, 0x90]), Err(Refusal::Invalid)); // push es: not in 64-bit mode
        assert_eq!(kind(&[0x0F, 0x8F, 1, 2]), Err(Refusal::Truncated));
        assert_eq!(kind(&[]), Err(Refusal::Truncated));
    }

    #[test]
    fn kinds() {
        assert_eq!(kind(&[0x90]), Ok(Kind::AsIs));
        assert_eq!(kind(&[0xC3]), Ok(Kind::AsIs));
        assert_eq!(kind(&[0xEB, 0xFE]), Ok(Kind::Jump { target: 0x1000 }));
        assert_eq!(
            kind(&[0x0F, 0x84, 0, 1, 0, 0]),
            Ok(Kind::CondJump {
                cond: Cond(4),
                target: 0x1106
            })
        );
        assert_eq!(
            kind(&[0x67, 0xE3, 0x00]),
            Ok(Kind::CountJump {
                op: CountOp::JCxz,
                ecx: true,
                target: 0x1003
            })
        );
        assert_eq!(kind(&[0xE8, 0, 0, 0, 0]), Ok(Kind::Call { target: 0x1005 }));
        assert_eq!(
            kind(&[0xFF, 0x15, 0x10, 0, 0, 0]),
            Ok(Kind::IndirectCall {
                modrm_offset: 1,
                rip_operand: Some((0x1016, 2))
            })
        );
        assert_eq!(
            kind(&[0x41, 0xFF, 0xD3]),
            Ok(Kind::IndirectCall {
                modrm_offset: 2,
                rip_operand: None
            })
        );
        // cmp dword [rip+0x10], 0x12345678: displacement before the immediate.
        assert_eq!(
            kind(&[0x81, 0x3D, 0x10, 0, 0, 0, 0x78, 0x56, 0x34, 0x12]),
            Ok(Kind::RipRelative {
                target: 0x101A,
                disp_offset: 2
            })
        );
    }

    #[test]
    fn conditions_follow_the_sdm() {
        let (cf, zf, sf, of) = (1u64, 1 << 6, 1 << 7, 1 << 11);
        let c = |n| Cond::new(n).unwrap();
        assert!(c(0x4).holds(zf) && !c(0x4).holds(0)); // e
        assert!(c(0x2).holds(cf)); // b
        assert!(c(0x6).holds(zf) && c(0x6).holds(cf) && !c(0x6).holds(0)); // be
        assert!(c(0xC).holds(sf) && !c(0xC).holds(sf | of)); // l
        assert!(c(0xF).holds(0) && !c(0xF).holds(zf)); // g
        for n in 0..16 {
            for flags in [0, cf, zf, sf, of, sf | of, zf | cf, 1 << 2] {
                assert_ne!(c(n).holds(flags), c(n).inverse().holds(flags));
            }
        }
        assert_eq!(Cond::new(16), None);
    }

    #[test]
    fn boundaries() {
        let f = [0x55, 0x48, 0x89, 0xE5, 0xC3];
        assert_eq!(check_boundary(&f, 0x400, 0x400), Ok(()));
        assert_eq!(check_boundary(&f, 0x400, 0x404), Ok(()));
        assert_eq!(
            check_boundary(&f, 0x400, 0x3FF),
            Err(probe_core::Error::OffsetOutOfRange)
        );
        let bad = [0x06, 0x90];
        assert_eq!(
            check_boundary(&bad, 0x400, 0x401),
            Err(probe_core::Error::InsideInstruction)
        );
        assert_eq!(
            check_boundary(&f, u64::MAX - 2, u64::MAX),
            Err(probe_core::Error::OffsetOutOfRange)
        );
    }
}

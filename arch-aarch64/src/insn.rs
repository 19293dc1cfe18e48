//! What a probed aarch64 instruction needs: simulate, step out of line, or refuse.
//!
//! A copy of an instruction in an XOL slot runs at the slot's PC. Instructions that read PC —
//! the literal loads, `ADR`/`ADRP`, and every branch — would compute from the wrong address, so
//! they are **simulated**: [`PcRelative::simulate`] computes their effect from the *original* PC
//! on the saved registers, and no slot is used at all. Instructions that cannot be single-stepped
//! are **refused** ([`Refusal`]):
//!
//! * exclusive loads/stores (`LDXR`, `STXR`, `LDAXP`, …): the trap taken to step them clears
//!   the exclusive monitor, so the store-exclusive fails forever — a livelock;
//! * exception-generating instructions (`SVC`, `HVC`, `SMC`, `BRK`, `HLT`, `DCPS`) and
//!   exception returns (`ERET`, `ERETAA`, `DRPS`);
//! * `MSR` (register or immediate): it may change PSTATE (DAIF, SSBS, PAN, SP selection) under the
//!   single-step machinery;
//! * `MRS` of DAIF: stepping runs with interrupts masked, so it reads the wrong value;
//! * pointer-authenticated branches (`BRAA`, `BLRAA`, `RETAA`, …): simulating them would have to
//!   authenticate in software;
//! * `UDF`: always undefined.
//!
//! Everything else — loads and stores (including acquire/release and LSE atomics), arithmetic,
//! SIMD, barriers, hints, cache maintenance — is **stepped** out of line unchanged.

/// Why an instruction cannot be probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// Fewer than 4 bytes.
    Truncated,
    /// A load/store exclusive: stepping it clears the monitor and the loop never succeeds.
    Exclusive,
    /// `SVC`, `HVC`, `SMC`, `BRK`, `HLT`, `DCPS*`, `TCANCEL`: generates an exception.
    Exception,
    /// `ERET`, `ERETAA`, `ERETAB`, `DRPS`: returns from an exception.
    ExceptionReturn,
    /// `MSR` (register or immediate): may change PSTATE under the stepping machinery.
    SystemRegisterWrite,
    /// `MRS` of DAIF: stepping masks interrupts, so the copy reads a different value.
    ReadsDaif,
    /// A pointer-authenticated branch (`BRAA`, `BLRAA`, `RETAA`, …).
    PointerAuthBranch,
    /// `UDF`: permanently undefined.
    Undefined,
}

impl Refusal {
    /// What this refusal of the instruction at `addr` means for jump optimization (the
    /// optimizer's [`probe_core::arch::NotOptimizable`]): `Truncated` is `Undecodable`, every
    /// other refusal makes the instruction `Unrelocatable`.
    ///
    /// ```
    /// use probe_arch_aarch64::insn::Refusal;
    /// use probe_core::arch::NotOptimizable;
    /// assert_eq!(Refusal::Exclusive.at(0x40), NotOptimizable::Unrelocatable { addr: 0x40 });
    /// ```
    pub fn at(self, addr: u64) -> probe_core::arch::NotOptimizable {
        use probe_core::arch::NotOptimizable as N;
        match self {
            Refusal::Truncated => N::Undecodable { addr },
            _ => N::Unrelocatable { addr },
        }
    }
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Truncated => "fewer than 4 bytes",
            Self::Exclusive => "an exclusive load/store cannot be stepped (the monitor clears)",
            Self::Exception => "an exception-generating instruction",
            Self::ExceptionReturn => "an exception return",
            Self::SystemRegisterWrite => "MSR may change PSTATE while stepping",
            Self::ReadsDaif => "MRS DAIF reads a different value while stepping",
            Self::PointerAuthBranch => "a pointer-authenticated branch",
            Self::Undefined => "UDF is permanently undefined",
        })
    }
}

/// A condition of `B.cond` (`EQ` = 0 … `NV` = 15).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cond(u8);

impl Cond {
    /// The condition with encoding `c` (0..=15).
    pub fn new(c: u8) -> Option<Self> {
        (c < 16).then_some(Self(c))
    }
    /// Whether it holds for `nzcv` (PSTATE layout: N bit 31, Z 30, C 29, V 28).
    pub fn holds(self, nzcv: u32) -> bool {
        let (n, z, c, v) = (
            nzcv >> 31 & 1 == 1,
            nzcv >> 30 & 1 == 1,
            nzcv >> 29 & 1 == 1,
            nzcv >> 28 & 1 == 1,
        );
        let base = match self.0 >> 1 {
            0 => z,
            1 => c,
            2 => n,
            3 => v,
            4 => c && !z,
            5 => n == v,
            6 => n == v && !z,
            _ => true,
        };
        // Odd conditions negate, except 0b1111 (NV), which is "always" like AL.
        if self.0 & 1 == 1 && self.0 != 15 {
            !base
        } else {
            base
        }
    }
}

/// A PC-relative instruction, to simulate from the original PC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PcRelative {
    /// `ADR Xd, pc + offset`.
    Adr {
        /// Destination (31 = XZR: discarded).
        rd: u8,
        /// Byte offset from PC.
        offset: i64,
    },
    /// `ADRP Xd, (pc & !0xFFF) + offset`.
    Adrp {
        /// Destination.
        rd: u8,
        /// Byte offset from PC's 4 KiB page (a multiple of 4096).
        offset: i64,
    },
    /// `LDR` (literal) into a general register: `LDR Wt`, `LDR Xt`, `LDRSW Xt`.
    LdrLiteral {
        /// Destination.
        rt: u8,
        /// Bytes loaded: 4 or 8.
        size: u8,
        /// Sign-extend a 4-byte load to 64 bits (`LDRSW`).
        signed: bool,
        /// Byte offset from PC.
        offset: i64,
    },
    /// `LDR` (literal) into a SIMD&FP register: `LDR St`, `Dt`, `Qt`.
    LdrLiteralSimd {
        /// Destination vector register.
        rt: u8,
        /// Bytes loaded: 4, 8 or 16.
        size: u8,
        /// Byte offset from PC.
        offset: i64,
    },
    /// `PRFM` (literal): a hint; simulated as nothing.
    PrfmLiteral,
    /// `B` / `BL`.
    Branch {
        /// `BL`: write the return address to X30.
        link: bool,
        /// Byte offset from PC.
        offset: i64,
    },
    /// `B.cond` / `BC.cond`.
    BranchCond {
        /// The condition.
        cond: Cond,
        /// Byte offset from PC.
        offset: i64,
    },
    /// `CBZ` / `CBNZ`.
    CompareBranch {
        /// Taken if the register is nonzero (`CBNZ`).
        nonzero: bool,
        /// 64-bit register (`Xt`) or 32-bit (`Wt`).
        wide: bool,
        /// The register tested.
        rt: u8,
        /// Byte offset from PC.
        offset: i64,
    },
    /// `TBZ` / `TBNZ`.
    TestBranch {
        /// Taken if the bit is set (`TBNZ`).
        nonzero: bool,
        /// The bit tested (0..=63).
        bit: u8,
        /// The register tested.
        rt: u8,
        /// Byte offset from PC.
        offset: i64,
    },
    /// `BR Xn`, `BLR Xn`, `RET Xn`: register branches (`BLR` writes PC + 4 to X30, which a copy
    /// would get wrong).
    BranchRegister {
        /// `BLR`.
        link: bool,
        /// The register holding the target.
        rn: u8,
    },
}

/// What to do with a probed instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Runs out of line unchanged (a copy in a slot, then continue at PC + 4).
    Step,
    /// Simulated from the original PC.
    Simulate(PcRelative),
}

/// A signed field of `bits` bits starting at bit `lo`, scaled by `scale`.
fn sfield(insn: u32, lo: u32, bits: u32, scale: u32) -> i64 {
    let v = (insn >> lo) & ((1 << bits) - 1);
    let shift = 64 - bits;
    ((i64::from(v) << shift) >> shift) << scale
}

fn reg(insn: u32, lo: u32) -> u8 {
    ((insn >> lo) & 31) as u8
}

/// Is `insn` any `BRK`?
pub fn is_brk(insn: u32) -> bool {
    insn & 0xFFE0_001F == 0xD420_0000
}

/// Classifies the little-endian instruction at the start of `bytes`.
///
/// ```
/// use probe_arch_aarch64::insn::{classify, Class, PcRelative, Refusal};
/// // adrp x0, . + 0x3000
/// let c = classify(&0xF000_0000u32.to_le_bytes()).unwrap();
/// assert_eq!(c, Class::Simulate(PcRelative::Adrp { rd: 0, offset: 0x3000 }));
/// // ldxr x0, [x1]
/// assert_eq!(classify(&0xC85F_7C20u32.to_le_bytes()), Err(Refusal::Exclusive));
/// // add x0, x1, x2
/// assert_eq!(classify(&0x8B02_0020u32.to_le_bytes()), Ok(Class::Step));
/// ```
pub fn classify(bytes: &[u8]) -> Result<Class, Refusal> {
    let insn = crate::word(bytes).ok_or(Refusal::Truncated)?;
    classify_word(insn)
}

/// [`classify`] for an instruction word.
pub fn classify_word(insn: u32) -> Result<Class, Refusal> {
    use PcRelative as P;
    let sim = |p| Ok(Class::Simulate(p));
    // UDF (and the rest of the all-zero-top reserved space).
    if insn & 0xFFFF_0000 == 0 {
        return Err(Refusal::Undefined);
    }
    // PC-relative addressing: op(31) immlo(30:29) 10000 immhi(23:5) Rd.
    if insn & 0x1F00_0000 == 0x1000_0000 {
        let imm = (sfield(insn, 5, 19, 0) << 2) | i64::from((insn >> 29) & 3);
        let rd = reg(insn, 0);
        return if insn >> 31 == 0 {
            sim(P::Adr { rd, offset: imm })
        } else {
            sim(P::Adrp {
                rd,
                offset: imm << 12,
            })
        };
    }
    // Load register (literal): opc(31:30) 011 V 00 imm19 Rt.
    if insn & 0x3B00_0000 == 0x1800_0000 {
        let (opc, simd) = (insn >> 30, insn >> 26 & 1 == 1);
        let (rt, offset) = (reg(insn, 0), sfield(insn, 5, 19, 2));
        return match (simd, opc) {
            (false, 0) => sim(P::LdrLiteral {
                rt,
                size: 4,
                signed: false,
                offset,
            }),
            (false, 1) => sim(P::LdrLiteral {
                rt,
                size: 8,
                signed: false,
                offset,
            }),
            (false, 2) => sim(P::LdrLiteral {
                rt,
                size: 4,
                signed: true,
                offset,
            }),
            (false, _) => sim(P::PrfmLiteral),
            (true, 3) => Err(Refusal::Undefined),
            (true, o) => sim(P::LdrLiteralSimd {
                rt,
                size: 4 << o,
                offset,
            }),
        };
    }
    // Unconditional branch (immediate): op 00101 imm26.
    if insn & 0x7C00_0000 == 0x1400_0000 {
        return sim(P::Branch {
            link: insn >> 31 == 1,
            offset: sfield(insn, 0, 26, 2),
        });
    }
    // Conditional branch (immediate): 0101010 0 imm19 o0 cond (o0 = 1: BC.cond, FEAT_HBC).
    if insn & 0xFF00_0000 == 0x5400_0000 {
        return sim(P::BranchCond {
            cond: Cond((insn & 15) as u8),
            offset: sfield(insn, 5, 19, 2),
        });
    }
    // Compare and branch: sf 011010 op imm19 Rt.
    if insn & 0x7E00_0000 == 0x3400_0000 {
        return sim(P::CompareBranch {
            nonzero: insn >> 24 & 1 == 1,
            wide: insn >> 31 == 1,
            rt: reg(insn, 0),
            offset: sfield(insn, 5, 19, 2),
        });
    }
    // Test and branch: b5 011011 op b40 imm14 Rt.
    if insn & 0x7E00_0000 == 0x3600_0000 {
        return sim(P::TestBranch {
            nonzero: insn >> 24 & 1 == 1,
            bit: (((insn >> 31) << 5) | ((insn >> 19) & 31)) as u8,
            rt: reg(insn, 0),
            offset: sfield(insn, 5, 14, 2),
        });
    }
    // Unconditional branch (register): 1101011 opc op2 op3 Rn op4.
    if insn & 0xFE00_0000 == 0xD600_0000 {
        let rn = reg(insn, 5);
        return match insn & 0xFFFF_FC1F {
            0xD61F_0000 => sim(P::BranchRegister { link: false, rn }),
            0xD63F_0000 => sim(P::BranchRegister { link: true, rn }),
            0xD65F_0000 => sim(P::BranchRegister { link: false, rn }),
            _ if matches!(insn, 0xD69F_03E0 | 0xD69F_0BFF | 0xD69F_0FFF | 0xD6BF_03E0) => {
                Err(Refusal::ExceptionReturn)
            }
            _ => Err(Refusal::PointerAuthBranch),
        };
    }
    // Exception generation: 11010100 opc imm16 op2 LL.
    if insn & 0xFF00_0000 == 0xD400_0000 {
        return Err(Refusal::Exception);
    }
    // System: 1101010100 L op0 op1 CRn CRm op2 Rt.
    if insn & 0xFFC0_0000 == 0xD500_0000 {
        let l = insn >> 21 & 1 == 1;
        let op0 = insn >> 19 & 3;
        let crn = insn >> 12 & 15;
        if !l && op0 >= 2 {
            return Err(Refusal::SystemRegisterWrite); // MSR (register)
        }
        if !l && op0 == 0 && crn == 4 {
            return Err(Refusal::SystemRegisterWrite); // MSR (immediate): PSTATE fields
        }
        if insn & 0xFFFF_FFE0 == 0xD53B_4220 {
            return Err(Refusal::ReadsDaif); // MRS Xt, DAIF
        }
        return Ok(Class::Step);
    }
    // Load/store exclusive: size 001000 o2 L o1 Rs o0 Rt2 Rn Rt. o2 = 0 is exclusive except
    // the CASP pairs (size 0x, o1 = 1); o2 = 1 is LDAR/STLR and CAS (not exclusive).
    if insn & 0x3F00_0000 == 0x0800_0000 {
        let (o2, o1, pair_size) = (insn >> 23 & 1, insn >> 21 & 1, insn >> 31);
        if o2 == 0 && (o1 == 0 || pair_size == 1) {
            return Err(Refusal::Exclusive);
        }
    }
    Ok(Class::Step)
}

/// The CPU state a simulation reads and writes: the saved registers of the trapped thread.
pub trait Cpu {
    /// The error a memory read can fail with.
    type Fault;
    /// `X<n>` (`n` in 0..=30); 31 reads as zero (XZR).
    fn x(&self, n: u8) -> u64;
    /// Writes `X<n>` (31 is XZR: the write is dropped by the simulation, never passed here).
    fn set_x(&mut self, n: u8, value: u64);
    /// NZCV in PSTATE layout (bits 31..28).
    fn nzcv(&self) -> u32;
    /// Writes vector register `V<n>` (the whole 128 bits; the upper bits of a narrower load are
    /// zero, as the architecture writes them).
    fn set_v(&mut self, n: u8, value: u128);
    /// Reads `buf.len()` bytes of memory at `addr` (the literal pool).
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Self::Fault>;
}

impl PcRelative {
    /// Applies the instruction, which sat at `pc`, to `cpu` and returns the next PC.
    ///
    /// ```
    /// use probe_arch_aarch64::insn::{classify_word, Class, Cpu};
    /// # struct R { x: [u64; 31] }
    /// # impl Cpu for R {
    /// #     type Fault = ();
    /// #     fn x(&self, n: u8) -> u64 { if n == 31 { 0 } else { self.x[n as usize] } }
    /// #     fn set_x(&mut self, n: u8, v: u64) { self.x[n as usize] = v }
    /// #     fn nzcv(&self) -> u32 { 0 }
    /// #     fn set_v(&mut self, _: u8, _: u128) {}
    /// #     fn read(&mut self, _: u64, _: &mut [u8]) -> Result<(), ()> { Err(()) }
    /// # }
    /// let mut r = R { x: [0; 31] };
    /// // bl . + 8 at 0x40_0000: X30 = 0x40_0004, PC = 0x40_0008.
    /// let Ok(Class::Simulate(p)) = classify_word(0x9400_0002) else { panic!() };
    /// assert_eq!(p.simulate(0x40_0000, &mut r), Ok(0x40_0008));
    /// assert_eq!(r.x[30], 0x40_0004);
    /// ```
    pub fn simulate<C: Cpu + ?Sized>(&self, pc: u64, cpu: &mut C) -> Result<u64, C::Fault> {
        let next = pc.wrapping_add(4);
        let at = |off: i64| pc.wrapping_add(off as u64);
        let read_x = |cpu: &C, n: u8| if n == 31 { 0 } else { cpu.x(n) };
        let write_x = |cpu: &mut C, n: u8, v: u64| {
            if n != 31 {
                cpu.set_x(n, v);
            }
        };
        Ok(match *self {
            Self::Adr { rd, offset } => {
                write_x(cpu, rd, at(offset));
                next
            }
            Self::Adrp { rd, offset } => {
                write_x(cpu, rd, (pc & !0xFFF).wrapping_add(offset as u64));
                next
            }
            Self::LdrLiteral {
                rt,
                size,
                signed,
                offset,
            } => {
                let mut b = [0u8; 8];
                cpu.read(at(offset), &mut b[..usize::from(size)])?;
                let v = u64::from_le_bytes(b);
                let v = if signed {
                    v as u32 as i32 as i64 as u64
                } else {
                    v
                };
                write_x(cpu, rt, v);
                next
            }
            Self::LdrLiteralSimd { rt, size, offset } => {
                let mut b = [0u8; 16];
                cpu.read(at(offset), &mut b[..usize::from(size).min(16)])?;
                cpu.set_v(rt, u128::from_le_bytes(b));
                next
            }
            Self::PrfmLiteral => next,
            Self::Branch { link, offset } => {
                if link {
                    cpu.set_x(30, next);
                }
                at(offset)
            }
            Self::BranchCond { cond, offset } => {
                if cond.holds(cpu.nzcv()) {
                    at(offset)
                } else {
                    next
                }
            }
            Self::CompareBranch {
                nonzero,
                wide,
                rt,
                offset,
            } => {
                let v = read_x(cpu, rt);
                let v = if wide { v } else { v & 0xFFFF_FFFF };
                if (v != 0) == nonzero {
                    at(offset)
                } else {
                    next
                }
            }
            Self::TestBranch {
                nonzero,
                bit,
                rt,
                offset,
            } => {
                let set = read_x(cpu, rt) >> (bit & 63) & 1 == 1;
                if set == nonzero { at(offset) } else { next }
            }
            Self::BranchRegister { link, rn } => {
                // Read the target before writing X30: `blr x30` branches to the old X30.
                let target = read_x(cpu, rn);
                if link {
                    cpu.set_x(30, next);
                }
                target
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Regs {
        x: [u64; 31],
        nzcv: u32,
        v: [u128; 32],
        mem: (u64, [u8; 32]),
    }

    impl Regs {
        fn new() -> Self {
            let mut x = [0; 31];
            for (i, r) in x.iter_mut().enumerate() {
                *r = 0x1000 * i as u64 + 7;
            }
            let mut mem = [0u8; 32];
            for (i, b) in mem.iter_mut().enumerate() {
                *b = 0xF0u8.wrapping_add(i as u8);
            }
            Self {
                x,
                nzcv: 0,
                v: [0; 32],
                mem: (0x40_1000, mem),
            }
        }
    }

    impl Cpu for Regs {
        type Fault = u64;
        fn x(&self, n: u8) -> u64 {
            self.x[usize::from(n)]
        }
        fn set_x(&mut self, n: u8, value: u64) {
            self.x[usize::from(n)] = value;
        }
        fn nzcv(&self) -> u32 {
            self.nzcv
        }
        fn set_v(&mut self, n: u8, value: u128) {
            self.v[usize::from(n)] = value;
        }
        fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), u64> {
            let off = addr.checked_sub(self.mem.0).ok_or(addr)? as usize;
            let src = self.mem.1.get(off..off + buf.len()).ok_or(addr)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    const PC: u64 = 0x40_0F00;

    fn sim(insn: u32, r: &mut Regs) -> Result<u64, u64> {
        match classify_word(insn) {
            Ok(Class::Simulate(p)) => p.simulate(PC, r),
            other => panic!("{insn:#010x}: {other:?}"),
        }
    }

    /// Hand-computed results; encodings from the Arm ARM field layouts (and cross-checked
    /// against GNU as in tests/binutils.rs).
    #[test]
    fn simulations_match_hand_computed_results() {
        let mut r = Regs::new();
        // adr x3, . + 0x104: immlo = 0, immhi = 0x41.
        assert_eq!(sim(0x1000_0823, &mut r), Ok(PC + 4));
        assert_eq!(r.x[3], PC + 0x104);
        // adr x4, . - 1: immlo = 3, immhi = all ones.
        assert_eq!(sim(0x70FF_FFE4, &mut r), Ok(PC + 4));
        assert_eq!(r.x[4], PC - 1);
        // adrp x5, . + 0x2000 (page of PC = 0x40_0000).
        assert_eq!(
            sim(0x9000_0005 | (2 << 29) & 0x6000_0000, &mut r),
            Ok(PC + 4)
        );
        assert_eq!(r.x[5], 0x40_2000);
        // adrp x6, . - 4 GiB: imm = -0x100000 pages.
        assert_eq!(sim(0x9080_0006, &mut r), Ok(PC + 4));
        assert_eq!(r.x[6], 0x40_0000u64.wrapping_sub(1 << 32));
        // ldr x7, . + 0x100 (literal at 0x40_1000): imm19 = 0x40.
        assert_eq!(sim(0x5800_0807, &mut r), Ok(PC + 4));
        assert_eq!(
            r.x[7],
            u64::from_le_bytes([0xF0, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7])
        );
        // ldr w8, . + 0x104.
        assert_eq!(sim(0x1800_0828, &mut r), Ok(PC + 4));
        assert_eq!(r.x[8], 0xF7F6_F5F4);
        // ldrsw x9, . + 0x100: 0xF3F2F1F0 is negative.
        assert_eq!(sim(0x9800_0809, &mut r), Ok(PC + 4));
        assert_eq!(r.x[9], 0xFFFF_FFFF_F3F2_F1F0);
        // ldr q1, . + 0x100.
        assert_eq!(sim(0x9C00_0801, &mut r), Ok(PC + 4));
        assert_eq!(
            r.v[1],
            u128::from_le_bytes(core::array::from_fn(|i| 0xF0 + i as u8))
        );
        // ldr d2, . + 0x108: upper 64 bits zero.
        assert_eq!(sim(0x5C00_0842, &mut r), Ok(PC + 4));
        assert_eq!(
            r.v[2],
            u128::from(u64::from_le_bytes(core::array::from_fn(|i| 0xF8 + i as u8)))
        );
        // ldr x0, . + 0x400: outside the pool → the fault is returned, nothing written.
        let before = r.x[0];
        assert_eq!(sim(0x5800_2000, &mut r), Err(PC + 0x400));
        assert_eq!(r.x[0], before);
        // ldr xzr? (rt = 31 is XZR for a literal load): discarded.
        assert_eq!(sim(0x5800_081F, &mut r), Ok(PC + 4));
        // prfm pldl1keep, . + 0x100.
        assert_eq!(sim(0xD800_0800, &mut r), Ok(PC + 4));
        // b . - 0x100.
        assert_eq!(sim(0x17FF_FFC0, &mut r), Ok(PC - 0x100));
        // bl . + 0x7FF_FFFC (the far end of the range).
        assert_eq!(sim(0x95FF_FFFF, &mut r), Ok(PC + 0x7FF_FFFC));
        assert_eq!(r.x[30], PC + 4);
        // b.eq . + 8 with Z clear / set.
        r.nzcv = 0;
        assert_eq!(sim(0x5400_0040, &mut r), Ok(PC + 4));
        r.nzcv = 1 << 30;
        assert_eq!(sim(0x5400_0040, &mut r), Ok(PC + 8));
        // b.lt . - 4 with N != V.
        r.nzcv = 1 << 31;
        assert_eq!(sim(0x54FF_FFEB, &mut r), Ok(PC - 4));
        r.nzcv = (1 << 31) | (1 << 28);
        assert_eq!(sim(0x54FF_FFEB, &mut r), Ok(PC + 4));
        // cbz w10, . + 0x20 with x10 = 0x1_0000_0000 (low word zero): taken.
        r.x[10] = 1 << 32;
        assert_eq!(sim(0x3400_010A, &mut r), Ok(PC + 0x20));
        // cbz x10, . + 0x20: not taken.
        assert_eq!(sim(0xB400_010A, &mut r), Ok(PC + 4));
        // cbnz xzr, . + 0x20: xzr is zero, not taken.
        assert_eq!(sim(0xB500_011F, &mut r), Ok(PC + 4));
        // tbnz x11, #40, . + 0x10 with bit 40 set.
        r.x[11] = 1 << 40;
        assert_eq!(sim(0xB740_008B, &mut r), Ok(PC + 0x10));
        // tbz w11, #3, . - 0x8000 (far end of imm14).
        assert_eq!(sim(0x361C_000B, &mut r), Ok(PC - 0x8000));
        // blr x30: branches to the old x30, then links.
        r.x[30] = 0x1234_5678;
        assert_eq!(sim(0xD63F_03C0, &mut r), Ok(0x1234_5678));
        assert_eq!(r.x[30], PC + 4);
        // ret (x30); br x12.
        assert_eq!(sim(0xD65F_03C0, &mut r), Ok(PC + 4));
        r.x[12] = 0xABC0;
        assert_eq!(sim(0xD61F_0180, &mut r), Ok(0xABC0));
    }

    #[test]
    fn conditions() {
        let c = |n| Cond::new(n).unwrap();
        let (n, z, cf, v) = (1u32 << 31, 1 << 30, 1 << 29, 1 << 28);
        assert!(c(0).holds(z) && !c(1).holds(z)); // eq / ne
        assert!(c(8).holds(cf) && !c(8).holds(cf | z)); // hi
        assert!(c(10).holds(n | v) && c(11).holds(n)); // ge / lt
        assert!(c(12).holds(0) && !c(12).holds(z)); // gt
        assert!(c(14).holds(0) && c(15).holds(0)); // al / nv
        for k in 0..14 {
            for f in [0, n, z, cf, v, n | v, z | cf] {
                assert_ne!(c(k).holds(f), c(k ^ 1).holds(f), "{k} {f:#x}");
            }
        }
        assert_eq!(Cond::new(16), None);
    }

    #[test]
    fn refusals_with_reasons() {
        let r = |w: u32| classify_word(w);
        assert_eq!(r(0xC85F_7C20), Err(Refusal::Exclusive)); // ldxr x0, [x1]
        assert_eq!(r(0xC802_7C20), Err(Refusal::Exclusive)); // stxr w2, x0, [x1]
        assert_eq!(r(0xC87F_0C20), Err(Refusal::Exclusive)); // ldxp x0, x3, [x1]
        assert_eq!(r(0x885F_FC20), Err(Refusal::Exclusive)); // ldaxr w0, [x1]
        assert_eq!(r(0xC8DF_FC20), Ok(Class::Step)); // ldar x0, [x1]
        assert_eq!(r(0xC8A0_7C41), Ok(Class::Step)); // cas x0, x1, [x2]
        assert_eq!(r(0x4820_7C82), Ok(Class::Step)); // casp x0, x1, x2, x3, [x4]
        assert_eq!(r(0xD400_0001), Err(Refusal::Exception)); // svc #0
        assert_eq!(r(crate::BREAKPOINT), Err(Refusal::Exception));
        assert_eq!(r(0xD440_0000), Err(Refusal::Exception)); // hlt #0
        assert_eq!(r(0xD69F_03E0), Err(Refusal::ExceptionReturn)); // eret
        assert_eq!(r(0xD51B_4220), Err(Refusal::SystemRegisterWrite)); // msr daif, x0
        assert_eq!(r(0xD503_43DF), Err(Refusal::SystemRegisterWrite)); // msr daifset, #3
        assert_eq!(r(0xD53B_4220), Err(Refusal::ReadsDaif)); // mrs x0, daif
        assert_eq!(r(0xD53B_D040), Ok(Class::Step)); // mrs x0, tpidr_el0
        assert_eq!(r(0xD65F_0BFF), Err(Refusal::PointerAuthBranch)); // retaa
        assert_eq!(r(0x0000_0000), Err(Refusal::Undefined)); // udf #0
        assert_eq!(classify(&[0x1F, 0x20, 0x03]), Err(Refusal::Truncated));
        assert_eq!(r(crate::NOP), Ok(Class::Step));
        assert_eq!(r(0xD503_3BBF), Ok(Class::Step)); // dmb ish
        assert_eq!(r(0xD50B_7B20), Ok(Class::Step)); // dc cvau, x0
    }
}

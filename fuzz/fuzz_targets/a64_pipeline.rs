//! aarch64: classify → simulate → XOL copy → trampoline, on an arbitrary word at an arbitrary
//! PC. Properties:
//! * a simulated branch lands where an independent decode of its encoding says (B, BL: imm26;
//!   B.cond, CBZ/CBNZ: imm19; TBZ/TBNZ: imm14), or falls through to PC + 4;
//! * ADR/ADRP write the address the encoding names;
//! * a stepped instruction's copy is the word itself, then `B` back to PC + 4 (decoded) or the
//!   XOL breakpoint exactly when `B` cannot reach;
//! * a trampoline is built exactly for stepped instructions, starts `sub sp, sp, #800`, holds
//!   the word at `displaced`, branches back to PC + 4, and ends with the three literals.
#![no_main]

use libfuzzer_sys::fuzz_target;
use probe_arch_aarch64::insn::{Class, Cpu, classify_word};
use probe_arch_aarch64::trampoline::{BuildError, build};
use probe_arch_aarch64::xol::{self, Plan, XOL_BRK_IMM};
use probe_arch_aarch64::{b, brk};

struct Mock {
    x: [u64; 31],
    nzcv: u32,
}

impl Cpu for Mock {
    type Fault = ();
    fn x(&self, n: u8) -> u64 {
        self.x[usize::from(n)]
    }
    fn set_x(&mut self, n: u8, v: u64) {
        self.x[usize::from(n)] = v;
    }
    fn nzcv(&self) -> u32 {
        self.nzcv
    }
    fn set_v(&mut self, _: u8, _: u128) {}
    fn read(&mut self, _: u64, buf: &mut [u8]) -> Result<(), ()> {
        buf.fill(0xA5);
        Ok(())
    }
}

fn sext(v: u32, bits: u32) -> i64 {
    ((v as i64) << (64 - bits)) >> (64 - bits)
}

/// The B target a word encodes (for the copy's and the trampoline's way back).
fn b_target(word: u32, at: u64) -> Option<u64> {
    (word & 0xFC00_0000 == 0x1400_0000)
        .then(|| at.wrapping_add((sext(word & 0x03FF_FFFF, 26) * 4) as u64))
}

fuzz_target!(|input: [u64; 4]| {
    let word = input[0] as u32;
    let pc = input[1] & !3;
    let slot = (pc.wrapping_add(((input[2] as i32) as i64 * 4) as u64)) & !7;
    let mut cpu = Mock {
        x: core::array::from_fn(|i| input[3].rotate_left(i as u32 * 7) ^ i as u64),
        nzcv: ((input[0] >> 32) as u32) & 0xF000_0000,
    };
    let before = cpu.x;
    let class = classify_word(word);
    if let Ok(Class::Simulate(p)) = class {
        let next = p.simulate(pc, &mut cpu).expect("the mock never faults");
        let fall = pc.wrapping_add(4);
        let top = word >> 24;
        if word & 0x7C00_0000 == 0x1400_0000 {
            // B / BL.
            assert_eq!(next, pc.wrapping_add((sext(word & 0x03FF_FFFF, 26) * 4) as u64));
            if word >> 31 == 1 {
                assert_eq!(cpu.x[30], fall, "BL links");
            }
        } else if top == 0x54 || word & 0x7E00_0000 == 0x3400_0000 {
            // B.cond, CBZ/CBNZ.
            let t = pc.wrapping_add((sext((word >> 5) & 0x7_FFFF, 19) * 4) as u64);
            assert!(next == t || next == fall, "{word:#010x}: {next:#x}");
        } else if word & 0x7E00_0000 == 0x3600_0000 {
            // TBZ/TBNZ.
            let t = pc.wrapping_add((sext((word >> 5) & 0x3FFF, 14) * 4) as u64);
            assert!(next == t || next == fall, "{word:#010x}: {next:#x}");
        } else if word & 0x9F00_0000 == 0x1000_0000 {
            // ADR: Xd = PC + imm.
            let imm = sext(((word >> 5) & 0x7_FFFF) << 2 | ((word >> 29) & 3), 21);
            let rd = (word & 31) as usize;
            assert_eq!(next, fall);
            if rd != 31 {
                assert_eq!(cpu.x[rd], pc.wrapping_add(imm as u64));
            }
        } else if word & 0x9F00_0000 == 0x9000_0000 {
            // ADRP: Xd = (PC & !0xFFF) + imm << 12.
            let imm = sext(((word >> 5) & 0x7_FFFF) << 2 | ((word >> 29) & 3), 21);
            let rd = (word & 31) as usize;
            assert_eq!(next, fall);
            if rd != 31 {
                assert_eq!(cpu.x[rd], (pc & !0xFFF).wrapping_add((imm << 12) as u64));
            }
        }
    }
    let _ = before;
    // The copy.
    match xol::prepare(word, pc, slot) {
        Ok(Plan::Step(c)) => {
            assert!(matches!(class, Ok(Class::Step)));
            assert_eq!(c.words()[0], word);
            assert_eq!(c.resume(), pc.wrapping_add(4));
            match b_target(c.words()[1], slot.wrapping_add(4)) {
                Some(t) => assert_eq!(t, pc.wrapping_add(4)),
                None => {
                    assert_eq!(c.words()[1], brk(XOL_BRK_IMM));
                    assert!(b(slot.wrapping_add(4), pc.wrapping_add(4)).is_none());
                }
            }
        }
        Ok(Plan::Simulate(_)) => assert!(matches!(class, Ok(Class::Simulate(_)))),
        Err(e) => assert_eq!(class.err(), Some(e)),
    }
    // The trampoline.
    match build(slot, input[3], input[2], pc, word) {
        Ok(t) => {
            assert!(matches!(class, Ok(Class::Step)));
            let w = t.words();
            assert_eq!(w[0], 0xD10C_83FF);
            let d = (t.displaced.wrapping_sub(slot) / 4) as usize;
            assert_eq!(w[d], word);
            assert_eq!(
                b_target(w[d + 1], t.displaced.wrapping_add(4)),
                Some(pc.wrapping_add(4))
            );
            let n = w.len();
            let lit = |i: usize| u64::from(w[i]) | u64::from(w[i + 1]) << 32;
            assert_eq!([lit(n - 6), lit(n - 4), lit(n - 2)], [input[2], slot, input[3]]);
        }
        Err(BuildError::PcRelative) => assert!(matches!(class, Ok(Class::Simulate(_)))),
        Err(BuildError::Refused(r)) => assert_eq!(class.err(), Some(r)),
        Err(BuildError::OutOfReach) => {
            // The probe's jump to the trampoline, or the way back from near its end.
            let back_missing =
                (60..100u64).any(|k| b(slot.wrapping_add(k * 4), pc.wrapping_add(4)).is_none());
            assert!(b(pc, slot).is_none() || back_missing);
        }
    }
});

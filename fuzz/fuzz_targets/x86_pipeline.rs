//! x86_64: decode → classify → XOL copy → jump-range analysis → trampoline code, on arbitrary
//! bytes at arbitrary addresses. Properties, not only "no panic":
//! * a decoded instruction's length is 1..=15, equals `length`, and its bytes are the input's;
//! * a branch's emulation lands on the decoder's target (or falls through);
//! * an XOL copy fits `MAX_XOL`, resumes at the next instruction, and its first instruction is
//!   the same operation at its slot: the same bytes for a position-independent one, the same
//!   operand address for a RIP-relative one — whose copies also re-decode to their end (a
//!   relocated call or branch may carry an address inline as data);
//! * an accepted jump range is 5..=MAX_DETOUR bytes of whole instructions starting at a
//!   boundary, its jump bytes decode to `jmp rel32` to the trampoline, and the trampoline built
//!   for it re-decodes whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use probe_arch_x86_64::detour::analyze;
use probe_arch_x86_64::insn::{Insn, Kind, Regs, check_boundary, length};
use probe_arch_x86_64::xol::{self, MAX_XOL};
use probe_core::arch::MAX_DETOUR;

/// Every instruction of `code` decodes, end to end (an absolute jump back, `jmp [rip+0]`, is
/// followed by its 8-byte target, data rather than code).
fn decodes_whole(code: &[u8], at: u64) -> bool {
    let mut off = 0;
    while off < code.len() {
        match length(&code[off..], at.wrapping_add(off as u64)) {
            Ok(n) => {
                // (The first instruction is the relocated one itself, which may be any
                // `jmp [rip+d]`; only the way back after it carries data.)
                let abs = off > 0 && code[off..].starts_with(&[0xFF, 0x25, 0, 0, 0, 0]);
                off += n + if abs { 8 } else { 0 };
            }
            Err(_) => return false,
        }
    }
    off == code.len()
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 18 {
        return;
    }
    let addr = u64::from_le_bytes(input[..8].try_into().unwrap());
    // Slots near the code (as the embedding places them) and anywhere.
    let near = i32::from_le_bytes(input[8..12].try_into().unwrap());
    let slot = addr.wrapping_add(near as i64 as u64);
    let flags = u16::from_le_bytes(input[12..14].try_into().unwrap());
    let at = usize::from(input[14]) % 24;
    let code = &input[16..];

    if let Ok(i) = Insn::decode(code, addr) {
        assert!((1..=15).contains(&i.len()));
        assert_eq!(length(code, addr), Ok(i.len()));
        assert_eq!(i.bytes(), &code[..i.len()]);
        // Emulation agrees with the decoder's target.
        let mut r = Regs {
            rip: addr,
            rsp: 0x8000,
            rflags: u64::from(flags) | 2,
            rcx: u64::from(flags >> 3),
        };
        let mut pushed = None;
        if let Ok(true) = i.emulate(&mut r, |sp, v| {
            pushed = Some((sp, v));
            Ok::<(), ()>(())
        }) {
            match i.kind() {
                Kind::Jump { target } => assert_eq!(r.rip, target),
                Kind::Call { target } => {
                    assert_eq!(r.rip, target);
                    assert_eq!(pushed.map(|p| p.1), Some(i.next()));
                }
                Kind::CondJump { target, .. } | Kind::CountJump { target, .. } => {
                    assert!(r.rip == target || r.rip == i.next());
                }
                _ => {}
            }
        }
        // The XOL copy, at a slot near and one far.
        for s in [slot, slot ^ (1 << 45)] {
            if let Ok(c) = xol::prepare(&i, s) {
                assert!(c.bytes().len() <= MAX_XOL);
                assert_eq!(c.resume(), i.next());
                // A position-independent or RIP-relative instruction's copy is code to its
                // end (the instruction, then the way back); a relocated branch or call may
                // carry its return address or target inline as data.
                if matches!(i.kind(), Kind::AsIs | Kind::RipRelative { .. }) {
                    assert!(
                        decodes_whole(c.bytes(), s),
                        "copy does not re-decode: {:02x?} at {s:#x} from {:02x?}",
                        c.bytes(),
                        i.bytes()
                    );
                }
                let d = Insn::decode(c.bytes(), s).expect("copy's first instruction");
                match i.kind() {
                    Kind::AsIs => assert_eq!(d.bytes(), i.bytes(), "as-is copy changed"),
                    Kind::RipRelative { target, .. } => match d.kind() {
                        Kind::RipRelative { target: t, .. } => {
                            assert_eq!(t, target, "RIP-relative operand moved")
                        }
                        k => panic!("RIP-relative became {k:?}"),
                    },
                    _ => {}
                }
            }
        }
    }

    // The jump path: the input as a function, a probe `at` bytes into it.
    let probe = addr.wrapping_add(at as u64);
    if let Ok(range) = analyze(code, addr, probe) {
        assert!(range.len() >= 5 && range.len() <= MAX_DETOUR);
        assert_eq!(check_boundary(code, addr, probe), Ok(()));
        let tramp = slot & !0xF;
        if let Some(jump) = range.jump_bytes(tramp) {
            let j = Insn::decode(&jump[..5], probe).expect("the jump decodes");
            assert_eq!(j.kind(), Kind::Jump { target: tramp });
        }
        if let Ok(t) =
            probe_arch_x86_64::trampoline::build(tramp, 0x7000_0000, 0x1234, 1024, &range)
        {
            // Its code decodes to the end when the displaced instructions carry no inline
            // data (a relocated call or branch may).
            let plain = range
                .insns()
                .all(|i| matches!(i.kind(), Kind::AsIs | Kind::RipRelative { .. }));
            if plain {
                assert!(decodes_whole(t.bytes(), tramp), "trampoline does not re-decode");
            }
            assert!(t.displaced.wrapping_sub(tramp) < t.bytes().len() as u64);
        }
    }
});

//! Random bytes never panic the analyzers, and what they accept is self-consistent.

use probe_arch_x86_64::detour::analyze;
use probe_arch_x86_64::insn::{Insn, Kind, Refusal, check_boundary, length};
use probe_arch_x86_64::xol::{self, MAX_XOL};
use probe_core::arch::MAX_DETOUR;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn decode_and_relocate_random_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..20),
        addr in any::<u64>(),
        slot in any::<u64>(),
        near in any::<i32>(),
    ) {
        let decoded = Insn::decode(&bytes, addr);
        let len = length(&bytes, addr);
        if let Ok(i) = decoded {
            prop_assert!((1..=15).contains(&i.len()));
            prop_assert_eq!(len, Ok(i.len()));
            prop_assert_eq!(i.bytes(), &bytes[..i.len()]);
            // A slot anywhere: a copy, or out of reach for a RIP-relative operand; never
            // "too long" (MAX_XOL is the true worst case).
            for s in [slot, addr.wrapping_add(near as i64 as u64)] {
                match xol::prepare(&i, s) {
                    Ok(c) => {
                        prop_assert!(c.bytes().len() <= MAX_XOL);
                        prop_assert_eq!(c.resume(), i.next());
                    }
                    Err(e) => {
                        prop_assert_eq!(e, Refusal::OutOfReach);
                        let rip = matches!(
                            i.kind(),
                            Kind::RipRelative { .. } | Kind::IndirectCall { rip_operand: Some(_), .. }
                        );
                        prop_assert!(rip, "out of reach without a RIP-relative operand");
                    }
                }
            }
        }
    }

    #[test]
    fn walk_random_functions(
        func in proptest::collection::vec(any::<u8>(), 0..64),
        start in any::<u64>(),
        at in 0u64..70,
    ) {
        let addr = start.wrapping_add(at);
        let _ = check_boundary(&func, start, addr);
        if let Ok(r) = analyze(&func, start, addr) {
            prop_assert!(r.len() >= 5 && r.len() <= MAX_DETOUR);
            prop_assert_eq!(check_boundary(&func, start, addr), Ok(()));
            let _ = r.jump_bytes(addr.wrapping_add(0x1000));
            for t in [addr.wrapping_add(0x1000), start ^ (1 << 40)] {
                match r.displaced(t) {
                    Ok(_) | Err(Refusal::OutOfReach) => {}
                    Err(e) => prop_assert!(false, "displaced: {e}"),
                }
            }
        }
    }
}

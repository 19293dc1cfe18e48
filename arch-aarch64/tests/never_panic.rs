//! Random input never panics the analyzers, and the encoders round-trip through the classifier.

use probe_arch_aarch64::cache::CacheGeometry;
use probe_arch_aarch64::insn::{Class, Cpu, PcRelative, classify, classify_word};
use probe_arch_aarch64::patch::{PatchPlan, concurrent_modification_safe, plan};
use probe_arch_aarch64::{b, bl};
use proptest::prelude::*;

struct AnyCpu {
    x: [u64; 31],
    nzcv: u32,
    fault: bool,
}

impl Cpu for AnyCpu {
    type Fault = ();
    fn x(&self, n: u8) -> u64 {
        self.x[usize::from(n)]
    }
    fn set_x(&mut self, n: u8, value: u64) {
        self.x[usize::from(n)] = value;
    }
    fn nzcv(&self) -> u32 {
        self.nzcv
    }
    fn set_v(&mut self, _: u8, _: u128) {}
    fn read(&mut self, _: u64, buf: &mut [u8]) -> Result<(), ()> {
        if self.fault {
            return Err(());
        }
        buf.fill(0xA5);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(50_000))]

    #[test]
    fn classify_and_simulate_any_word(
        word in any::<u32>(),
        pc in any::<u64>(),
        x in any::<[u64; 31]>(),
        nzcv in any::<u32>(),
        fault in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..6),
    ) {
        let _ = classify(&tail);
        if let Ok(Class::Simulate(p)) = classify_word(word) {
            let mut cpu = AnyCpu { x, nzcv, fault };
            let next = p.simulate(pc, &mut cpu);
            if let (Ok(n), false) = (next, matches!(p, PcRelative::BranchRegister { .. })) {
                prop_assert_eq!(n % 4, pc % 4, "a PC-relative branch keeps alignment");
            }
        }
        let _ = plan(pc, word, word.rotate_left(7));
        let _ = concurrent_modification_safe(word);
    }

    #[test]
    fn branches_round_trip(from in any::<u64>(), off in -(1i64 << 25)..(1i64 << 25), link in any::<bool>()) {
        let from = from & !3;
        let to = from.wrapping_add((off * 4) as u64);
        let enc = if link { bl(from, to) } else { b(from, to) };
        if let Some(w) = enc {
            prop_assert_eq!(
                classify_word(w),
                Ok(Class::Simulate(PcRelative::Branch { link, offset: off * 4 }))
            );
            prop_assert!(matches!(plan(from, w, probe_arch_aarch64::NOP), Ok(PatchPlan::Concurrent(_))));
        } else {
            // Only a wrap around the address space can refuse an in-range offset.
            prop_assert!(from.checked_add((off * 4) as u64).is_none() || (off < 0 && from < (-off * 4) as u64));
        }
    }

    #[test]
    fn cache_ops_for_any_range(ctr in any::<u64>(), start in any::<u64>(), len in 0usize..5000) {
        let g = CacheGeometry::from_ctr(ctr);
        let n = g.ops(start, len).take(10_000).count();
        prop_assert!(n <= 2 * (len / 4 + 2) + 3);
    }
}

//! Making written instructions visible to instruction fetch.
//!
//! aarch64 instruction caches are not coherent with data stores. After writing code, this CPU
//! must (Arm ARM B2.4.4, "Ordering and completion of cache maintenance"):
//!
//! 1. `DC CVAU` every data-cache line of the range — clean to the point of unification, where
//!    instruction fetch can see it;
//! 2. `DSB ISH` — wait for the cleans (inner-shareable: every CPU);
//! 3. `IC IVAU` every instruction-cache line — invalidate stale copies;
//! 4. `DSB ISH` — wait for the invalidations;
//! 5. `ISB` — discard what this CPU already fetched.
//!
//! Line sizes come from `CTR_EL0` (`DminLine`, `IminLine`: log2 of words), and two of its bits
//! shorten the sequence: `IDC` (bit 28) says data cleaning is not needed for coherence, so step 1
//! is skipped (the `DSB ISH` still orders the stores); `DIC` (bit 29) says instruction
//! invalidation is not needed, so steps 3–4 are skipped. Other CPUs then still need a context
//! synchronization event before they execute the new code — the embedder's
//! [`crate::patch::WordWriter::sync_cores`].
//!
//! [`CacheGeometry::ops`] computes the sequence on any host (it is tested here);
//! `CacheGeometry::sync_icache` executes it, with inline assembly that exists only on aarch64
//! (so it is absent from docs built elsewhere). The assembly text
//! is in [`asm_text`] macros so a test can assemble exactly the same strings with
//! `aarch64-linux-gnu-as`.

/// The assembly strings of the sequence, one per instruction, with `{addr}` for the register
/// operand. Used by the inline assembly and, verbatim, by the test that assembles them.
#[macro_use]
pub mod asm_text {
    /// `DC CVAU`: clean a data line to the point of unification.
    macro_rules! dc_cvau {
        () => {
            "dc cvau, {addr}"
        };
    }
    /// `IC IVAU`: invalidate an instruction line to the point of unification.
    macro_rules! ic_ivau {
        () => {
            "ic ivau, {addr}"
        };
    }
    /// `DSB ISH`: wait for maintenance, inner-shareable domain.
    macro_rules! dsb_ish {
        () => {
            "dsb ish"
        };
    }
    /// `ISB`: context synchronization of this CPU.
    macro_rules! isb {
        () => {
            "isb"
        };
    }
    /// `MRS Xt, CTR_EL0`: the cache type register.
    macro_rules! mrs_ctr_el0 {
        () => {
            "mrs {addr}, ctr_el0"
        };
    }
    /// Every string above, in sequence order, for the assembler test.
    pub const ALL: [&str; 5] = [dc_cvau!(), dsb_ish!(), ic_ivau!(), isb!(), mrs_ctr_el0!()];
}

/// One step of the maintenance sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `DC CVAU` of the line containing the address.
    DcCvau(u64),
    /// `DSB ISH`.
    DsbIsh,
    /// `IC IVAU` of the line containing the address.
    IcIvau(u64),
    /// `ISB`.
    Isb,
}

/// What `CTR_EL0` says about the caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheGeometry {
    /// Smallest data-cache line, bytes.
    pub dline: u64,
    /// Smallest instruction-cache line, bytes.
    pub iline: u64,
    /// `IDC`: no data clean needed for instruction-to-data coherence.
    pub idc: bool,
    /// `DIC`: no instruction invalidation needed.
    pub dic: bool,
}

impl CacheGeometry {
    /// Decodes `CTR_EL0`.
    ///
    /// ```
    /// use probe_arch_aarch64::cache::CacheGeometry;
    /// // Cortex-A72-like: DminLine = IminLine = 4 (16 words = 64 bytes), no IDC/DIC.
    /// let g = CacheGeometry::from_ctr(0x8444_C004);
    /// assert_eq!((g.dline, g.iline, g.idc, g.dic), (64, 64, false, false));
    /// ```
    pub fn from_ctr(ctr_el0: u64) -> Self {
        Self {
            dline: 4 << ((ctr_el0 >> 16) & 15),
            iline: 4 << (ctr_el0 & 15),
            idc: ctr_el0 >> 28 & 1 == 1,
            dic: ctr_el0 >> 29 & 1 == 1,
        }
    }

    /// The maintenance sequence for `[start, start + len)`, in order. Empty for `len == 0`.
    pub fn ops(&self, start: u64, len: usize) -> impl Iterator<Item = Op> + use<> {
        let end = start.saturating_add(len as u64);
        let lines = |line: u64| {
            let first = start & !(line - 1);
            (0u64..)
                .map_while(move |k| k.checked_mul(line).and_then(|o| first.checked_add(o)))
                .take_while(move |&a| a < end)
        };
        let some = len > 0;
        let d = (!self.idc && some).then(|| lines(self.dline).map(Op::DcCvau));
        let i = (!self.dic && some).then(|| lines(self.iline).map(Op::IcIvau));
        let dsb_after_i = (!self.dic && some).then_some(Op::DsbIsh);
        d.into_iter()
            .flatten()
            .chain(some.then_some(Op::DsbIsh))
            .chain(i.into_iter().flatten())
            .chain(dsb_after_i)
            .chain(some.then_some(Op::Isb))
    }

    /// This CPU's geometry, read from `CTR_EL0` (aarch64 only).
    #[cfg(target_arch = "aarch64")]
    pub fn current() -> Self {
        let ctr: u64;
        // SAFETY: reading CTR_EL0 has no side effects; EL0 access is enabled by Linux
        // (SCTLR_EL1.UCT) and by every kernel that runs this crate at EL1.
        unsafe { core::arch::asm!(mrs_ctr_el0!(), addr = out(reg) ctr, options(nomem, nostack)) };
        Self::from_ctr(ctr)
    }

    /// Runs [`CacheGeometry::ops`] on this CPU (aarch64 only). The range must be mapped.
    #[cfg(target_arch = "aarch64")]
    pub fn sync_icache(&self, start: u64, len: usize) {
        for op in self.ops(start, len) {
            // SAFETY: cache maintenance by VA of mapped memory (the caller's code) and barriers;
            // none of these change architectural register or memory state.
            unsafe {
                match op {
                    Op::DcCvau(a) => {
                        core::arch::asm!(dc_cvau!(), addr = in(reg) a, options(nostack))
                    }
                    Op::IcIvau(a) => {
                        core::arch::asm!(ic_ivau!(), addr = in(reg) a, options(nostack))
                    }
                    Op::DsbIsh => core::arch::asm!(dsb_ish!(), options(nostack)),
                    Op::Isb => core::arch::asm!(isb!(), options(nostack)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    fn g(ctr: u64) -> CacheGeometry {
        CacheGeometry::from_ctr(ctr)
    }

    #[test]
    fn full_sequence_covers_every_line() {
        // 64-byte D lines, 32-byte I lines; a 100-byte range straddling lines.
        let geo = CacheGeometry {
            dline: 64,
            iline: 32,
            idc: false,
            dic: false,
        };
        let ops: Vec<Op> = geo.ops(0x1030, 100).collect();
        use Op::*;
        assert_eq!(
            ops,
            [
                DcCvau(0x1000),
                DcCvau(0x1040),
                DcCvau(0x1080),
                DsbIsh,
                IcIvau(0x1020),
                IcIvau(0x1040),
                IcIvau(0x1060),
                IcIvau(0x1080),
                DsbIsh,
                Isb
            ]
        );
    }

    #[test]
    fn idc_and_dic_shorten_it() {
        use Op::*;
        let idc = g(0x8444_C004 | 1 << 28);
        assert_eq!(
            idc.ops(0x1000, 4).collect::<Vec<_>>(),
            [DsbIsh, IcIvau(0x1000), DsbIsh, Isb]
        );
        let both = g(0x8444_C004 | 3 << 28);
        assert_eq!(both.ops(0x1000, 4).collect::<Vec<_>>(), [DsbIsh, Isb]);
        let dic = g(0x8444_C004 | 1 << 29);
        assert_eq!(
            dic.ops(0x1000, 4).collect::<Vec<_>>(),
            [DcCvau(0x1000), DsbIsh, Isb]
        );
        assert_eq!(dic.ops(0x1000, 0).count(), 0);
        // The top of the address space does not wrap.
        assert!(g(0x8444_C004).ops(u64::MAX - 3, 4).count() < 8);
    }
}

//! The interrupted code's extended register state (x87, SSE, AVX, AVX-512, AMX…): which
//! instruction saves it most cheaply *and correctly* on the running CPU, over which components,
//! into how many bytes.
//!
//! # Why this matters
//!
//! A probe that runs a consumer in the middle of someone else's code must give that code back
//! every register it had. The general registers are cheap; the extended state is not (11 008
//! bytes with AMX enabled). Peers got this wrong in the cheap direction: an interceptor that
//! saves only `FXSAVE` state (x87, MXCSR, XMM0–15) corrupts glibc's EVEX string functions,
//! which keep data in YMM16–31, and anything holding AVX upper halves or opmask registers.
//!
//! # The choice
//!
//! * **`XSAVEC`** (compacted, with the *init optimization*) when the CPU has it: components in
//!   their initial state are not written and are marked so in the header, and `XRSTOR` puts them
//!   back in their initial state — so a component that was unused before the hit is unused after
//!   it, whatever the consumer did, and an idle 8 KiB tile register file costs nothing.
//! * **`XSAVE`** (standard format) where there is XSAVE but no `XSAVEC`: correct, slower.
//! * **`FXSAVE`** where the OS has not enabled XSAVE at all (then x87 + SSE is all there is).
//!
//! Never `XSAVEOPT` into a stack area, although it measures faster in a loop: its *modified
//! optimization* skips components not changed since the last `XRSTOR` *from the same linear
//! address*, trusting that memory to still hold them — a stack area is overwritten by other
//! code between hits, and a per-thread area is shared by nested hits (a consumer that hits
//! another probe, a signal handler interrupting a trampoline). `XSAVEC` has no such trust.
//!
//! The mask is XCR0: every user component the OS enabled, so every component a consumer could
//! change. AMX with XFD (Linux arms XFD for tile data until a thread asks for it): for a
//! component whose XFD bit is set, `XSAVE*` does not fault but saves it as if in its initial
//! state, and `XRSTOR` then initializes it, which does not fault either — so a consumer that
//! never touches tiles never faults, and a thread whose tiles are live (XFD clear) has them
//! saved and restored like any other component.
//!
//! The area must be 64-byte aligned; the 64-byte XSAVE header must be zero before `XSAVE` /
//! `XSAVEC` (bytes the instructions do not write must not hold garbage when `XRSTOR` reads them).

/// Zeroes the 64-byte XSAVE header at `$area + 512`, then runs `$insn` (an XSAVE-family save of
/// `[{a}]`) with EDX:EAX = `$hi:$lo`.
macro_rules! xsave_with {
    ($insn:literal, $area:expr, $lo:expr, $hi:expr) => {
        core::arch::asm!(
            "mov qword ptr [{a} + 512], 0", "mov qword ptr [{a} + 520], 0",
            "mov qword ptr [{a} + 528], 0", "mov qword ptr [{a} + 536], 0",
            "mov qword ptr [{a} + 544], 0", "mov qword ptr [{a} + 552], 0",
            "mov qword ptr [{a} + 560], 0", "mov qword ptr [{a} + 568], 0",
            $insn,
            a = in(reg) $area, in("eax") $lo, in("edx") $hi,
            options(nostack, preserves_flags),
        )
    };
}

/// The instruction pair that saves and restores the extended state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveInsn {
    /// `XSAVEC` / `XRSTOR` (compacted format, init optimization).
    Xsavec,
    /// `XSAVE` / `XRSTOR` (standard format).
    Xsave,
    /// `FXSAVE` / `FXRSTOR` (x87, MXCSR, XMM0–15 only): correct only where the OS enabled no
    /// more than that. Chosen by [`XState::detect`] only on such a CPU; forcing it elsewhere
    /// ([`XState::with`]) is for showing that a test catches a trampoline that saves too little.
    Fxsave,
}

/// How to save the extended state on this CPU: the instruction, the component mask, the size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XState {
    /// The instruction pair.
    pub insn: SaveInsn,
    /// The requested-feature mask (EDX:EAX of the instruction): XCR0, or x87|SSE for `FXSAVE`.
    pub mask: u64,
    /// Bytes the save area needs, a multiple of 64.
    pub size: u32,
    /// XCR0 as read at detection (0 without OSXSAVE).
    pub xcr0: u64,
}

/// XCR0 bits, by state component.
pub mod component {
    /// x87 FPU state.
    pub const X87: u64 = 1 << 0;
    /// SSE: XMM0–15 and MXCSR.
    pub const SSE: u64 = 1 << 1;
    /// AVX: the upper halves of YMM0–15.
    pub const AVX: u64 = 1 << 2;
    /// AVX-512 opmask registers k0–7.
    pub const OPMASK: u64 = 1 << 5;
    /// AVX-512: the upper 256 bits of ZMM0–15.
    pub const ZMM_HI256: u64 = 1 << 6;
    /// AVX-512: ZMM16–31.
    pub const HI16_ZMM: u64 = 1 << 7;
    /// Protection keys (PKRU).
    pub const PKRU: u64 = 1 << 9;
    /// AMX tile configuration.
    pub const TILECFG: u64 = 1 << 17;
    /// AMX tile data (TMM0–7).
    pub const TILEDATA: u64 = 1 << 18;
}

/// `FXSAVE` area size.
pub const FXSAVE_SIZE: u32 = 512;

impl XState {
    /// Reads CPUID and XCR0 and picks the cheapest correct instruction (module docs).
    pub fn detect() -> XState {
        Self::from_cpu(Cpu::read())
    }

    /// The same choice from given CPUID/XCR0 facts (for tests).
    pub fn from_cpu(cpu: Cpu) -> XState {
        if !cpu.osxsave {
            return XState {
                insn: SaveInsn::Fxsave,
                mask: component::X87 | component::SSE,
                size: FXSAVE_SIZE,
                xcr0: 0,
            };
        }
        let (insn, size) = if cpu.xsavec {
            (SaveInsn::Xsavec, cpu.compacted_size(cpu.xcr0))
        } else {
            (SaveInsn::Xsave, cpu.standard_size)
        };
        XState {
            insn,
            mask: cpu.xcr0,
            size: size.div_ceil(64) * 64,
            xcr0: cpu.xcr0,
        }
    }

    /// This CPU's facts with `insn` forced instead of the choice (sized for it).
    pub fn with(insn: SaveInsn) -> XState {
        let cpu = Cpu::read();
        let mut s = Self::from_cpu(cpu);
        match insn {
            SaveInsn::Fxsave => {
                s.insn = SaveInsn::Fxsave;
                s.mask = component::X87 | component::SSE;
                s.size = FXSAVE_SIZE;
            }
            SaveInsn::Xsave if cpu.osxsave => {
                s.insn = SaveInsn::Xsave;
                s.size = cpu.standard_size.div_ceil(64) * 64;
            }
            _ => {}
        }
        s
    }

    /// Saves the extended state into `area` with the chosen instruction (zeroing the XSAVE
    /// header first).
    ///
    /// # Safety
    ///
    /// `area` is 64-byte aligned, [`XState::size`] bytes long, writable, and this `XState` was
    /// detected on this CPU (or forced with [`XState::with`]).
    #[inline(always)]
    pub unsafe fn save(&self, area: *mut u8) {
        let lo = self.mask as u32;
        let hi = (self.mask >> 32) as u32;
        match self.insn {
            // SAFETY: the caller's contract; the header is zeroed with integer stores before
            // the save (no vector register is touched before the state is saved; plain stores,
            // not `rep stosq`, which measured 9 ns more per hit).
            SaveInsn::Xsavec => unsafe { xsave_with!("xsavec64 [{a}]", area, lo, hi) },
            // SAFETY: as above.
            SaveInsn::Xsave => unsafe { xsave_with!("xsave64 [{a}]", area, lo, hi) },
            // SAFETY: as above (16-byte alignment suffices).
            SaveInsn::Fxsave => unsafe {
                core::arch::asm!("fxsave64 [{a}]", a = in(reg) area, options(nostack, preserves_flags))
            },
        }
    }

    /// Gives code that follows the C ABI the state it may assume at a call, after a save of
    /// `area`: an empty x87 stack with the default control word, MXCSR's default controls (round
    /// to nearest, all exceptions masked, no flush-to-zero), and — with AVX — clean upper halves
    /// (`VZEROUPPER`, which also spares SSE code the transition penalty). The interrupted code
    /// may have changed any of these; the restore brings its values back. Each is reset only if
    /// the saved state shows it is not already so (`FNINIT` costs ~18 ns and `LDMXCSR` ~49 ns
    /// per hit on the Xeon measured, even when nothing changes): x87 when its control word or tag
    /// word is not the default, MXCSR when a control bit differs (its sticky exception flags,
    /// bits 0–5, are status the consumer may see as they are).
    ///
    /// # Safety
    ///
    /// Called right after [`XState::save`] into `area`, before the matching restore.
    #[inline(always)]
    pub unsafe fn reset_for_abi(&self, area: *const u8) {
        const MXCSR_DEFAULT: u32 = 0x1F80;
        const MXCSR_FLAGS: u32 = 0x3F;
        // SAFETY: the save just wrote the legacy region (FCW at byte 0, the abridged tag word at
        // byte 4, MXCSR at byte 24) for every component it marked in use, and (XSAVE*) the
        // header's XSTATE_BV at byte 512.
        let (mxcsr, x87_dirty) = unsafe {
            let mxcsr = core::ptr::read_volatile(area.add(24).cast::<u32>());
            let x87_saved = match self.insn {
                SaveInsn::Fxsave => true,
                _ => core::ptr::read_volatile(area.add(512).cast::<u64>()) & component::X87 != 0,
            };
            // Not in its initial state: dirty unless the control word is the default and every
            // register is empty (abridged tag 0).
            let x87_dirty = x87_saved
                && (core::ptr::read_volatile(area.cast::<u16>()) != 0x037F
                    || core::ptr::read_volatile(area.add(4)) != 0);
            (mxcsr, x87_dirty)
        };
        if x87_dirty {
            // SAFETY: defined on every x86_64 CPU; the caller saved the state it changes.
            unsafe { core::arch::asm!("fninit", options(nomem, nostack, preserves_flags)) };
        }
        if mxcsr & !MXCSR_FLAGS != MXCSR_DEFAULT {
            let m = MXCSR_DEFAULT;
            // SAFETY: a valid MXCSR value; the caller saved the state it changes.
            unsafe {
                core::arch::asm!("ldmxcsr [{m}]", m = in(reg) &m,
                    options(nostack, preserves_flags, readonly))
            };
        }
        if self.xcr0 & component::AVX != 0 {
            // SAFETY: AVX is enabled in XCR0 (checked).
            unsafe { core::arch::asm!("vzeroupper", options(nomem, nostack, preserves_flags)) };
        }
    }

    /// Restores what [`XState::save`] saved in `area`: every component of the mask comes back,
    /// a component saved in its initial state comes back in its initial state.
    ///
    /// # Safety
    ///
    /// `area` holds what `save` of this same `XState` wrote on this thread. Every vector, x87
    /// and mask register the compiler could hold is overwritten: the caller keeps no value in
    /// them across this call (it is written for code that uses none).
    #[inline(always)]
    pub unsafe fn restore(&self, area: *const u8) {
        let lo = self.mask as u32;
        let hi = (self.mask >> 32) as u32;
        match self.insn {
            // SAFETY: the caller's contract.
            SaveInsn::Xsavec | SaveInsn::Xsave => unsafe {
                core::arch::asm!(
                    "xrstor64 [{a}]",
                    a = in(reg) area, in("eax") lo, in("edx") hi,
                    options(nostack, preserves_flags),
                )
            },
            // SAFETY: the caller's contract.
            SaveInsn::Fxsave => unsafe {
                core::arch::asm!("fxrstor64 [{a}]", a = in(reg) area, options(nostack, preserves_flags))
            },
        }
    }
}

/// The CPUID and XCR0 facts the choice depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// CPUID.1:ECX.OSXSAVE (the OS enabled XSAVE; XCR0 readable).
    pub osxsave: bool,
    /// `CPUID.(0DH,1):EAX[1]`.
    pub xsavec: bool,
    /// XCR0.
    pub xcr0: u64,
    /// CPUID.(0DH,0):EBX: the standard-format size for the components XCR0 enables.
    pub standard_size: u32,
    /// Per component 2..=62: (size, 64-byte aligned in the compacted format), from CPUID.(0DH,i)
    /// for the components XCR0 enables (zero otherwise). All 63, not only today's: a component
    /// the sizing skipped (APX's is 19) would make the save write past its area.
    pub components: [(u32, bool); 63],
}

impl Cpu {
    /// Reads this CPU.
    pub fn read() -> Cpu {
        use core::arch::x86_64::{__cpuid, __cpuid_count};
        let l1 = __cpuid(1);
        let xsave = l1.ecx & (1 << 26) != 0;
        let osxsave = xsave && l1.ecx & (1 << 27) != 0;
        let mut cpu = Cpu {
            osxsave,
            xsavec: false,
            xcr0: 0,
            standard_size: 0,
            components: [(0, false); 63],
        };
        if !osxsave {
            return cpu;
        }
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV(0) is defined when CPUID.1:ECX.OSXSAVE is set (checked).
        unsafe {
            core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        cpu.xcr0 = (u64::from(hi) << 32) | u64::from(lo);
        cpu.standard_size = __cpuid_count(0xD, 0).ebx;
        cpu.xsavec = __cpuid_count(0xD, 1).eax & 0b10 != 0;
        for (i, c) in cpu.components.iter_mut().enumerate().skip(2) {
            if cpu.xcr0 & (1 << i) != 0 {
                let l = __cpuid_count(0xD, i as u32);
                *c = (l.eax, l.ecx & 0b10 != 0);
            }
        }
        cpu
    }

    /// The compacted-format size for `mask` (SDM vol. 1 §13.4.3: the legacy region and header,
    /// then each component of the mask in order, 64-byte aligned where CPUID says so).
    pub fn compacted_size(&self, mask: u64) -> u32 {
        let mut size = 576u32;
        for (i, &(len, aligned)) in self.components.iter().enumerate().skip(2) {
            if mask & (1 << i) != 0 {
                if aligned {
                    size = size.div_ceil(64) * 64;
                }
                size += len;
            }
        }
        size
    }
}

/// XINUSE (XGETBV with ECX = 1): which components are not in their initial state now, where the
/// CPU reports it (`CPUID.(0DH,1):EAX[2]`); `None` otherwise.
pub fn in_use() -> Option<u64> {
    let cpu = Cpu::read();
    if !cpu.osxsave || core::arch::x86_64::__cpuid_count(0xD, 1).eax & 0b100 == 0 {
        return None;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV(1) is defined when CPUID.(0DH,1):EAX[2] is set (checked).
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 1, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    Some((u64::from(hi) << 32) | u64::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Xeon this project measured on (XCR0 0x600e7, CPUID.0DH sub-leaves as read there).
    fn xeon() -> Cpu {
        let mut components = [(0, false); 63];
        components[2] = (256, false);
        components[5] = (64, false);
        components[6] = (512, false);
        components[7] = (1024, false);
        components[17] = (64, true);
        components[18] = (8192, true);
        Cpu {
            osxsave: true,
            xsavec: true,
            xcr0: 0x600e7,
            standard_size: 11008,
            components,
        }
    }

    #[test]
    fn xsavec_preferred_and_sized_compacted() {
        let s = XState::from_cpu(xeon());
        assert_eq!(s.insn, SaveInsn::Xsavec);
        assert_eq!(s.mask, 0x600e7);
        // 576 + 256 + 64 + 512 + 1024 = 2432; tilecfg aligned to 64 (2432) + 64 = 2496;
        // tiledata aligned (2496) + 8192 = 10688 (CPUID.(0DH,1):EBX on that CPU said 10688).
        assert_eq!(s.size, 10688);
    }

    #[test]
    fn components_past_amx_are_sized_too() {
        // APX's extended GPRs are component 19 (128 bytes): a mask with it needs the room.
        let mut c = xeon();
        c.xcr0 |= 1 << 19;
        c.components[19] = (128, false);
        assert_eq!(XState::from_cpu(c).size, 10688 + 128);
    }

    #[test]
    fn xsave_without_xsavec_and_fxsave_without_osxsave() {
        let mut c = xeon();
        c.xsavec = false;
        let s = XState::from_cpu(c);
        assert_eq!((s.insn, s.size), (SaveInsn::Xsave, 11008));
        c.osxsave = false;
        let s = XState::from_cpu(c);
        assert_eq!((s.insn, s.size, s.mask), (SaveInsn::Fxsave, 512, 3));
    }

    #[test]
    fn save_restore_round_trip_on_this_cpu() {
        let s = XState::detect();
        let mut area = std::vec![0u8; s.size as usize + 64];
        let at = area
            .as_mut_ptr()
            .wrapping_add(area.as_ptr().align_offset(64));
        // SAFETY: aligned, `size` bytes, this CPU's XState.
        unsafe {
            s.save(at);
            s.restore(at);
        }
        // An all-zero header after XSAVEC would mean XCOMP_BV's compacted bit was not set.
        if s.insn == SaveInsn::Xsavec {
            // SAFETY: inside `area`.
            let xcomp = unsafe { core::ptr::read(at.add(520).cast::<u64>()) };
            assert_ne!(xcomp & (1 << 63), 0);
        }
    }
}

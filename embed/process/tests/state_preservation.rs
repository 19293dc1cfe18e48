//! Every register class the CPU has survives a probe hit, in both paths, while the consumer
//! clobbers every class — and the same oracle catches a trampoline that saves only FXSAVE state.
//!
//! The interrupted code (`state_target`, assembly) loads distinct values into the general
//! registers, the flags (DF included), the red zone, the x87 stack and control word, MXCSR,
//! XMM0–15, the upper halves of YMM0–15, ZMM0–31 and k0–7, then runs the probed instruction,
//! then stores everything back out. A full-state consumer checks the registers it is given and
//! then clobbers every class with vector code of its own and a 64 KiB `memcpy`/`memset` (glibc's
//! EVEX string functions use YMM16–31). A register-only consumer (assembly) clobbers every
//! caller-saved general register and the flags. Afterwards every value must be intact. A second
//! target checks that components in their initial state before a hit (AVX, ZMM_Hi256 after
//! `VZEROUPPER`) are in it after. A class the CPU lacks is skipped with the reason printed.
//!
//! Then the test runs itself again as a child with the state save forced to `FXSAVE`, and
//! requires the child to report corruption: the oracle can fail.
//!
//! Finally it disassembles `trampoline_entry` (and what it calls directly, and `run_full` up to
//! its save and after its restore) and requires that no vector, mask, x87 or MXCSR instruction
//! appears there: the code that runs before the state is saved must not touch it.
//!
//! `harness = false`: one process, one `Live` (it is once per process), and a child process.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn main() {
    imp::main();
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    println!("state_preservation: x86_64 Linux only");
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use probe_arch_x86_64::xstate::{self, SaveInsn, XState, component};
    use probe_process::live::{Consumer, Live, Regs};
    use std::process::Command;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The state the interrupted code loads (`IN`) and what it finds after the probe (`OUT`).
    #[repr(C, align(64))]
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct State {
        z: [[u64; 8]; 32], // 0: ZMM0–31 (YMM/XMM are their low parts)
        k: [u64; 8],       // 2048
        g: [u64; 16],      // 2112: rax rbx rcx rdx rsi rdi rbp r8 … r15, pad
        flags: u64,        // 2240
        red: [u64; 16],    // 2248: the red zone, [rsp-8] first
        f: [u64; 8],       // 2376: x87 st0..st7 as f64 bits
        fcw: u32,          // 2440
        mxcsr: u32,        // 2444
        level: u64,        // 2448: 0 SSE, 1 AVX, 2 AVX-512
        rsp: u64,          // 2456
    }

    #[unsafe(no_mangle)]
    static mut STATE_IN: State = ZERO;
    #[unsafe(no_mangle)]
    static mut STATE_OUT: State = ZERO;
    #[unsafe(no_mangle)]
    static mut XINUSE_BEFORE: u64 = 0;
    #[unsafe(no_mangle)]
    static mut XINUSE_AFTER: u64 = 0;

    const ZERO: State = State {
        z: [[0; 8]; 32],
        k: [0; 8],
        g: [0; 16],
        flags: 0,
        red: [0; 16],
        f: [0; 8],
        fcw: 0,
        mxcsr: 0,
        level: 0,
        rsp: 0,
    };

    core::arch::global_asm!(
        ".text",
        ".globl state_target",
        ".type state_target, @function",
        "state_target:",
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "mov [rip + STATE_IN + 2456], rsp",
        // x87: default CW with 53-bit precision (0x027F), then eight values (st0 = f[0]).
        "fninit",
        "fldcw word ptr [rip + STATE_IN + 2440]",
        "fld qword ptr [rip + STATE_IN + 2376 + 56]",
        "fld qword ptr [rip + STATE_IN + 2376 + 48]",
        "fld qword ptr [rip + STATE_IN + 2376 + 40]",
        "fld qword ptr [rip + STATE_IN + 2376 + 32]",
        "fld qword ptr [rip + STATE_IN + 2376 + 24]",
        "fld qword ptr [rip + STATE_IN + 2376 + 16]",
        "fld qword ptr [rip + STATE_IN + 2376 + 8]",
        "fld qword ptr [rip + STATE_IN + 2376]",
        "ldmxcsr [rip + STATE_IN + 2444]",
        "cmp qword ptr [rip + STATE_IN + 2448], 1",
        "jb 10f",
        "je 11f",
        ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
        "vmovdqu64 zmm\\i, [rip + STATE_IN + \\i * 64]",
        ".endr",
        ".irp i, 0,1,2,3,4,5,6,7",
        "kmovq k\\i, [rip + STATE_IN + 2048 + \\i * 8]",
        ".endr",
        "jmp 12f",
        "11:",
        ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        "vmovdqu ymm\\i, [rip + STATE_IN + \\i * 64]",
        ".endr",
        "jmp 12f",
        "10:",
        ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        "movdqu xmm\\i, [rip + STATE_IN + \\i * 64]",
        ".endr",
        "12:",
        // Flags (DF included) before the red zone: the push writes [rsp-8].
        "push qword ptr [rip + STATE_IN + 2240]",
        "popfq",
        ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        "mov rax, [rip + STATE_IN + 2248 + \\i * 8]",
        "mov [rsp - 8 - \\i * 8], rax",
        ".endr",
        "mov rax, [rip + STATE_IN + 2112]",
        "mov rbx, [rip + STATE_IN + 2112 + 8]",
        "mov rcx, [rip + STATE_IN + 2112 + 16]",
        "mov rdx, [rip + STATE_IN + 2112 + 24]",
        "mov rsi, [rip + STATE_IN + 2112 + 32]",
        "mov rdi, [rip + STATE_IN + 2112 + 40]",
        "mov rbp, [rip + STATE_IN + 2112 + 48]",
        "mov r8, [rip + STATE_IN + 2112 + 56]",
        "mov r9, [rip + STATE_IN + 2112 + 64]",
        "mov r10, [rip + STATE_IN + 2112 + 72]",
        "mov r11, [rip + STATE_IN + 2112 + 80]",
        "mov r12, [rip + STATE_IN + 2112 + 88]",
        "mov r13, [rip + STATE_IN + 2112 + 96]",
        "mov r14, [rip + STATE_IN + 2112 + 104]",
        "mov r15, [rip + STATE_IN + 2112 + 112]",
        ".globl state_probe_site",
        "state_probe_site:",
        "nop dword ptr [rax + rax + 0]",
        "nop dword ptr [rax + rax + 0]",
        "mov [rip + STATE_OUT + 2112], rax",
        "mov [rip + STATE_OUT + 2112 + 8], rbx",
        "mov [rip + STATE_OUT + 2112 + 16], rcx",
        "mov [rip + STATE_OUT + 2112 + 24], rdx",
        "mov [rip + STATE_OUT + 2112 + 32], rsi",
        "mov [rip + STATE_OUT + 2112 + 40], rdi",
        "mov [rip + STATE_OUT + 2112 + 48], rbp",
        "mov [rip + STATE_OUT + 2112 + 56], r8",
        "mov [rip + STATE_OUT + 2112 + 64], r9",
        "mov [rip + STATE_OUT + 2112 + 72], r10",
        "mov [rip + STATE_OUT + 2112 + 80], r11",
        "mov [rip + STATE_OUT + 2112 + 88], r12",
        "mov [rip + STATE_OUT + 2112 + 96], r13",
        "mov [rip + STATE_OUT + 2112 + 104], r14",
        "mov [rip + STATE_OUT + 2112 + 112], r15",
        ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        "mov rax, [rsp - 8 - \\i * 8]",
        "mov [rip + STATE_OUT + 2248 + \\i * 8], rax",
        ".endr",
        "pushfq",
        "pop qword ptr [rip + STATE_OUT + 2240]",
        "mov [rip + STATE_OUT + 2456], rsp",
        "stmxcsr [rip + STATE_OUT + 2444]",
        "fnstcw word ptr [rip + STATE_OUT + 2440]",
        ".irp i, 0,1,2,3,4,5,6,7",
        "fstp qword ptr [rip + STATE_OUT + 2376 + \\i * 8]",
        ".endr",
        "cmp qword ptr [rip + STATE_IN + 2448], 1",
        "jb 20f",
        "je 21f",
        ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
        "vmovdqu64 [rip + STATE_OUT + \\i * 64], zmm\\i",
        ".endr",
        ".irp i, 0,1,2,3,4,5,6,7",
        "kmovq [rip + STATE_OUT + 2048 + \\i * 8], k\\i",
        ".endr",
        "jmp 22f",
        "21:",
        ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        "vmovdqu [rip + STATE_OUT + \\i * 64], ymm\\i",
        ".endr",
        "jmp 22f",
        "20:",
        ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        "movdqu [rip + STATE_OUT + \\i * 64], xmm\\i",
        ".endr",
        "22:",
        // Back to what the Rust caller may assume.
        "cld",
        "fninit",
        "push 0x1F80",
        "ldmxcsr [rsp]",
        "add rsp, 8",
        "cmp qword ptr [rip + STATE_IN + 2448], 1",
        "jb 23f",
        "vzeroupper",
        "23:",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        ".size state_target, . - state_target",
        // Init-state target: AVX and ZMM_Hi256 initial before the probe; XINUSE after.
        ".globl init_target",
        ".type init_target, @function",
        "init_target:",
        "vzeroupper",
        "mov ecx, 1",
        "xgetbv",
        "mov [rip + XINUSE_BEFORE], eax",
        "mov [rip + XINUSE_BEFORE + 4], edx",
        ".globl init_probe_site",
        "init_probe_site:",
        "nop dword ptr [rax + rax + 0]",
        "nop dword ptr [rax + rax + 0]",
        "mov ecx, 1",
        "xgetbv",
        "mov [rip + XINUSE_AFTER], eax",
        "mov [rip + XINUSE_AFTER + 4], edx",
        "ret",
        ".size init_target, . - init_target",
        // A register-only consumer: counts, then clobbers every caller-saved register and flags.
        ".globl raw_consumer",
        ".type raw_consumer, @function",
        "raw_consumer:",
        "inc qword ptr [rsi]",
        "mov rax, -1",
        "mov rcx, -1",
        "mov rdx, -1",
        "mov rsi, -1",
        "mov rdi, -1",
        "mov r8, -1",
        "mov r9, -1",
        "mov r10, -1",
        "xor r11, r11",
        "ret",
        ".size raw_consumer, . - raw_consumer",
    );

    unsafe extern "C" {
        fn state_target();
        fn init_target();
        static state_probe_site: u8;
        static init_probe_site: u8;
        fn raw_consumer(regs: &Regs, ctx: *mut core::ffi::c_void);
    }

    /// Which classes this CPU has.
    #[derive(Clone, Copy, Debug)]
    struct Classes {
        avx: bool,
        avx512: bool,
    }

    fn classes() -> Classes {
        let x = XState::detect();
        let avx = x.xcr0 & component::AVX != 0;
        let l7 = core::arch::x86_64::__cpuid_count(7, 0);
        let avx512_mask = component::OPMASK | component::ZMM_HI256 | component::HI16_ZMM;
        let avx512 = avx && l7.ebx & (1 << 16) != 0 && x.xcr0 & avx512_mask == avx512_mask;
        Classes { avx, avx512 }
    }

    /// Distinct values everywhere (a different pattern per `seed`).
    fn input(c: Classes, seed: u64) -> State {
        let mut s = ZERO;
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for r in s.z.iter_mut() {
            for w in r.iter_mut() {
                *w = next();
            }
        }
        for k in s.k.iter_mut() {
            *k = next();
        }
        for g in s.g.iter_mut().take(15) {
            *g = next();
        }
        for r in s.red.iter_mut() {
            *r = next();
        }
        for (i, f) in s.f.iter_mut().enumerate() {
            *f = (1.5 + i as f64 + (seed % 1000) as f64 / 1024.0).to_bits();
        }
        // CF PF AF ZF SF DF OF, a different subset per round (the seed's low 7 bits, and all
        // seven in rounds 7, 17, …: so in any ten rounds every flag is both set and clear), and
        // the always-one bit 1. A trampoline that left any flag at a fixed value, or at the value its
        // own code computed last, fails some round.
        const FLAGS: [u64; 7] = [0x1, 0x4, 0x10, 0x40, 0x80, 0x400, 0x800];
        s.flags = 0x2;
        for (i, f) in FLAGS.iter().enumerate() {
            if (seed >> i) & 1 != 0 || seed % 10 == 7 {
                s.flags |= f;
            }
        }
        s.fcw = 0x027F; // 53-bit precision: not the default 0x037F
        s.mxcsr = 0xDFC0; // FTZ, DAZ, round up: not the default 0x1F80
        s.level = if c.avx512 {
            2
        } else if c.avx {
            1
        } else {
            0
        };
        s
    }

    const FLAGS_CHECKED: u64 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800;

    /// The classes that differ between `want` and `got`, as names.
    fn diff(c: Classes, want: &State, got: &State) -> Vec<String> {
        let mut bad = Vec::new();
        let (regs, lanes) = if c.avx512 {
            (32, 8)
        } else if c.avx {
            (16, 4)
        } else {
            (16, 2)
        };
        for r in 0..regs {
            for l in 0..lanes {
                if want.z[r][l] != got.z[r][l] {
                    let class = match (r, l) {
                        (16.., _) => "zmm16-31",
                        (_, 0..=1) => "xmm0-15",
                        (_, 2..=3) => "ymm0-15 upper halves",
                        _ => "zmm0-15 upper 256",
                    };
                    bad.push(class.to_string());
                }
            }
        }
        if c.avx512 && want.k != got.k {
            bad.push("k0-7".into());
        }
        const NAMES: [&str; 15] = [
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
            "r13", "r14", "r15",
        ];
        for (i, n) in NAMES.iter().enumerate() {
            if want.g[i] != got.g[i] {
                bad.push((*n).into());
            }
        }
        if want.flags & FLAGS_CHECKED != got.flags & FLAGS_CHECKED {
            // The bits that differ (not the values: one line per wrong flag over all rounds).
            let diff = (want.flags ^ got.flags) & FLAGS_CHECKED;
            for bit in (0..64).filter(|b| diff >> b & 1 != 0) {
                bad.push(format!("rflags bit {bit}"));
            }
        }
        if want.red != got.red {
            bad.push("red zone".into());
        }
        if want.f != got.f {
            bad.push("x87 stack".into());
        }
        if want.fcw & 0xFFFF != got.fcw & 0xFFFF {
            bad.push(format!(
                "x87 control word {:#x} -> {:#x}",
                want.fcw,
                got.fcw & 0xFFFF
            ));
        }
        // The exception flags (bits 0-5) are sticky status; the controls must come back.
        if want.mxcsr & !0x3F != got.mxcsr & !0x3F {
            bad.push(format!("MXCSR {:#x} -> {:#x}", want.mxcsr, got.mxcsr));
        }
        if want.rsp != got.rsp {
            bad.push("rsp".into());
        }
        bad.sort();
        bad.dedup();
        bad
    }

    /// One call of the interrupted code with `input`; the classes that came back wrong.
    fn run_once(c: Classes, inp: &State) -> Vec<String> {
        // SAFETY: single-threaded use of the test's statics; the target follows the C ABI.
        unsafe {
            core::ptr::write(&raw mut STATE_IN, *inp);
            state_target();
            // rsp is stored by the target itself, at entry (IN) and after the probe (OUT).
            let got = core::ptr::read(&raw const STATE_OUT);
            let want = core::ptr::read(&raw const STATE_IN);
            diff(c, &want, &got)
        }
    }

    static BUF_A: [u8; 1 << 16] = [0x5A; 1 << 16];
    static mut BUF_B: [u8; 1 << 16] = [0; 1 << 16];
    /// Register mismatches the full consumer saw in its `Regs`.
    static REGS_WRONG: AtomicU64 = AtomicU64::new(0);

    /// Clobbers every class: vector registers (zmm/ymm/xmm, k), x87, MXCSR, and a large
    /// memcpy/memset through glibc.
    fn clobber(c: Classes) {
        // SAFETY: the asm declares every register it writes as clobbered (the C ABI's caller-
        // saved set, which covers all vector, mask and x87 registers); the buffers are ours.
        unsafe {
            if c.avx512 {
                core::arch::asm!(
                    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
                    "vpternlogd zmm\\i, zmm\\i, zmm\\i, 0xff",
                    ".endr",
                    ".irp i, 0,1,2,3,4,5,6,7",
                    "kxnorq k\\i, k\\i, k\\i",
                    ".endr",
                    clobber_abi("C"),
                );
            } else if c.avx {
                core::arch::asm!(
                    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
                    "vpcmpeqd ymm\\i, ymm\\i, ymm\\i",
                    ".endr",
                    clobber_abi("C"),
                );
            } else {
                core::arch::asm!(
                    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
                    "pcmpeqd xmm\\i, xmm\\i",
                    ".endr",
                    clobber_abi("C"),
                );
            }
            core::arch::asm!(
                "fninit",
                "fld1",
                "fldz",
                "fld1",
                "fldpi",
                "push 0x7F80",
                "ldmxcsr [rsp]",
                "add rsp, 8",
                clobber_abi("C"),
            );
            let b = &raw mut BUF_B;
            core::ptr::copy_nonoverlapping(BUF_A.as_ptr(), b.cast::<u8>(), 1 << 16);
            core::ptr::write_bytes(b.cast::<u8>(), std::hint::black_box(0xA5), 1 << 16);
            std::hint::black_box(&*b);
        }
    }

    fn full_consumer(c: Classes) -> Arc<Consumer> {
        Arc::new(move |r: &Regs| {
            // SAFETY: the test writes STATE_IN only between calls of the target.
            let g = unsafe { core::ptr::read(&raw const STATE_IN).g };
            let seen = [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
                r.r13, r.r14, r.r15,
            ];
            // SAFETY: the static's address.
            let site = unsafe { &state_probe_site as *const u8 as u64 };
            if seen[..] != g[..15] || r.rip != site {
                REGS_WRONG.fetch_add(1, Ordering::Relaxed);
            }
            clobber(c);
        })
    }

    /// Runs `rounds` calls with fresh values and collects every class that came back wrong.
    fn check(c: Classes, what: &str, rounds: u64) -> Vec<String> {
        let mut bad = Vec::new();
        for i in 0..rounds {
            for b in run_once(c, &input(c, i + 1)) {
                if !bad.contains(&b) {
                    bad.push(b);
                }
            }
        }
        println!(
            "  {what}: {rounds} hits, {}",
            if bad.is_empty() {
                "every value intact".to_string()
            } else {
                format!("WRONG: {}", bad.join(", "))
            }
        );
        bad
    }

    /// A probe at `site` through both paths: `rounds` hits as a breakpoint, then as a jump.
    fn both_paths(
        live: &Live,
        c: Classes,
        what: &str,
        attach: impl Fn() -> Vec<probe_process::live::Attached>,
    ) -> Vec<String> {
        let probes = attach();
        let mut bad = check(c, &format!("{what}, breakpoint path"), 50);
        live.run_optimizer();
        // SAFETY: the static's address.
        let site = unsafe { &state_probe_site as *const u8 as u64 };
        assert!(live.is_optimized(site), "the probe should be a jump now");
        bad.extend(check(c, &format!("{what}, jump path"), 200));
        for p in probes {
            live.detach(p).expect("detach");
        }
        bad
    }

    pub fn main() {
        let c = classes();
        let child = std::env::var_os("PROBE_STATE_CHILD").is_some();
        let save = if child {
            SaveInsn::Fxsave
        } else {
            XState::detect().insn
        };
        let xs = XState::with(save);
        println!(
            "state preservation ({}): save {:?}, mask {:#x}, {} bytes; classes: gprs, flags, red zone, x87, MXCSR, xmm0-15{}{}",
            if child {
                "child, FXSAVE forced"
            } else {
                "detected"
            },
            xs.insn,
            xs.mask,
            xs.size,
            if c.avx { ", ymm upper halves" } else { "" },
            if c.avx512 { ", zmm0-31, k0-7" } else { "" },
        );
        if !c.avx {
            println!("  skipped: ymm upper halves (no AVX in XCR0)");
        }
        if !c.avx512 {
            println!("  skipped: zmm0-31, k0-7 (no AVX-512F, or its components not in XCR0)");
        }
        let live = Live::install_with(save).expect("install");
        // SAFETY: the static's address.
        let site = unsafe { &state_probe_site as *const u8 as u64 };

        // The oracle itself: no probe, every value comes back.
        assert!(check(c, "no probe", 10).is_empty(), "the oracle is broken");

        if child {
            // Only the full-state jump path differs with FXSAVE; report and exit 3 if caught.
            let a = live.attach(site, full_consumer(c)).expect("attach");
            live.run_optimizer();
            let bad = check(c, "full-state consumer, jump path", 50);
            live.detach(a).expect("detach");
            std::process::exit(if bad.is_empty() { 0 } else { 3 });
        }

        let mut failures = Vec::new();
        let mut note = |what: &str, bad: Vec<String>| {
            if !bad.is_empty() {
                failures.push(format!("{what}: {}", bad.join(", ")));
            }
        };
        note(
            "full-state consumer",
            both_paths(live, c, "full-state consumer", || {
                vec![live.attach(site, full_consumer(c)).expect("attach")]
            }),
        );
        let raw_hits = Box::leak(Box::new(0u64));
        let ctx = (raw_hits as *mut u64).cast::<core::ffi::c_void>();
        note(
            "register-only consumer",
            both_paths(live, c, "register-only consumer", || {
                // SAFETY: raw_consumer is integer code (it only counts and clobbers general
                // registers), async-signal-safe, and its counter outlives the probe.
                vec![unsafe { live.attach_raw(site, Some(raw_consumer), ctx) }.expect("attach")]
            }),
        );
        // SAFETY: read after detach returned; no hit runs the consumer any more.
        let counted = unsafe { core::ptr::read_volatile(raw_hits) };
        assert_eq!(counted, 250, "the register-only consumer ran once per hit");
        note(
            "both kinds on one probe",
            both_paths(live, c, "both kinds on one probe (full-state path)", || {
                vec![
                    // SAFETY: as above.
                    unsafe { live.attach_raw(site, Some(raw_consumer), ctx) }.expect("attach"),
                    live.attach(site, full_consumer(c)).expect("attach"),
                ]
            }),
        );
        assert_eq!(
            REGS_WRONG.load(Ordering::Relaxed),
            0,
            "a full-state consumer saw wrong registers"
        );
        // SAFETY: as above.
        let null = unsafe { live.attach_raw(site, None, ctx) };
        assert!(
            matches!(null, Err(probe_process::live::LiveError::NullConsumer)),
            "a null register-only consumer is an error"
        );

        init_state(live, c, &mut failures);
        fxsave_child_is_caught();
        entry_touches_no_vector_state();

        if !failures.is_empty() {
            panic!("state not preserved:\n  {}", failures.join("\n  "));
        }
        println!("state preservation: ok");
    }

    /// Components in their initial state before a hit are in it after (AVX upper halves and
    /// ZMM_Hi256 after VZEROUPPER), in both paths, while the consumer dirties them.
    fn init_state(live: &Live, c: Classes, failures: &mut Vec<String>) {
        if !c.avx || xstate::in_use().is_none() {
            println!("  init state: skipped (no AVX, or no XINUSE via XGETBV(1))");
            return;
        }
        // SAFETY: the static's address.
        let site = unsafe { &init_probe_site as *const u8 as u64 };
        let watched = component::AVX | if c.avx512 { component::ZMM_HI256 } else { 0 };
        let a = live
            .attach(site, full_consumer_no_check(c))
            .expect("attach");
        for path in ["breakpoint", "jump"] {
            if path == "jump" {
                live.run_optimizer();
                assert!(live.is_optimized(site));
            }
            // SAFETY: init_target follows the C ABI; the statics are the test's.
            let (before, after) = unsafe {
                init_target();
                (
                    core::ptr::read(&raw const XINUSE_BEFORE),
                    core::ptr::read(&raw const XINUSE_AFTER),
                )
            };
            let ok = before & watched == 0 && after & watched == 0;
            println!(
                "  init state, {path} path: XINUSE before {before:#x}, after {after:#x}: {}",
                if ok {
                    "initial components stayed initial"
                } else {
                    "WRONG"
                }
            );
            if before & watched != 0 {
                println!(
                    "  (VZEROUPPER left {:#x} in use: check skipped)",
                    before & watched
                );
            } else if after & watched != 0 {
                failures.push(format!(
                    "init state, {path} path: components {:#x} in use after the hit",
                    after & watched
                ));
            }
        }
        live.detach(a).expect("detach");
    }

    fn full_consumer_no_check(c: Classes) -> Arc<Consumer> {
        Arc::new(move |_: &Regs| clobber(c))
    }

    /// The same oracle in a child whose trampolines save only FXSAVE state must see corruption
    /// (where the CPU has more than x87/SSE state to lose).
    fn fxsave_child_is_caught() {
        if !classes().avx {
            println!("  FXSAVE child: skipped (no AVX: FXSAVE is then the whole state)");
            return;
        }
        let exe = std::env::current_exe().expect("current exe");
        let out = Command::new(exe)
            .env("PROBE_STATE_CHILD", "1")
            .output()
            .expect("run the child");
        let text = String::from_utf8_lossy(&out.stdout);
        for l in text.lines() {
            println!("  | {l}");
        }
        assert_eq!(
            out.status.code(),
            Some(3),
            "a trampoline saving only FXSAVE state must be caught by the oracle (child: {:?}, stderr: {})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        println!("  FXSAVE child: corruption caught, as it must be");
    }

    /// The code that runs before the extended state is saved (and after it is restored) uses no
    /// vector, mask, x87 or MXCSR instruction: checked on this very binary's machine code.
    fn entry_touches_no_vector_state() {
        let exe = std::env::current_exe().expect("current exe");
        let Ok(nm) = Command::new("nm").arg(&exe).output() else {
            println!("  disassembly check: skipped (no nm)");
            return;
        };
        let syms = String::from_utf8_lossy(&nm.stdout).to_string();
        let find = |needle: &str| -> Option<(u64, String)> {
            syms.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                let (a, _t, name) = (it.next()?, it.next()?, it.next()?);
                name.contains(needle).then(|| {
                    (
                        u64::from_str_radix(a, 16).ok().unwrap_or(0),
                        name.to_string(),
                    )
                })
            })
        };
        let Some((_, entry)) = find("4live10trampoline16trampoline_entry") else {
            panic!("trampoline_entry not found in the test binary's symbols");
        };
        let disasm = |name: &str| -> Vec<String> {
            let out = Command::new("objdump")
                .args(["-d", "--no-show-raw-insn", "-M", "intel"])
                .arg(format!("--disassemble={name}"))
                .arg(&exe)
                .output()
                .expect("objdump");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with(' ') && l.contains(':'))
                .map(|l| l.split_once(':').map_or("", |x| x.1).trim().to_string())
                .collect()
        };
        let vector = |i: &str| {
            let m = i.split_whitespace().next().unwrap_or("");
            i.contains("xmm")
                || i.contains("ymm")
                || i.contains("zmm")
                || m.starts_with('k')
                || m.starts_with('f')
                || m.starts_with('v')
                || m.contains("mxcsr")
                || m.starts_with("xsave")
                || m.starts_with("xrstor")
                || m == "emms"
        };
        let mut checked = vec![entry.clone()];
        let mut queue = vec![entry];
        let mut offending = Vec::new();
        let mut lines = 0;
        while let Some(f) = queue.pop() {
            let body = disasm(&f);
            lines += body.len();
            let is_run_full = f.contains("4live10trampoline8run_full");
            // In run_full, only the code before the save and after the restore runs with the
            // interrupted code's state in the registers.
            let (mut live_state, mut after) = (true, false);
            for ins in &body {
                if is_run_full {
                    if ins.starts_with("xsave") {
                        live_state = false;
                        continue;
                    }
                    if ins.starts_with("xrstor") || ins.starts_with("fxrstor") {
                        live_state = true;
                        after = true;
                        continue;
                    }
                    if ins.starts_with("fxsave") {
                        live_state = false;
                        continue;
                    }
                }
                if live_state && vector(ins) {
                    offending.push(format!(
                        "{f}: {ins}{}",
                        if after { " (after restore)" } else { "" }
                    ));
                }
                // Direct calls into our own code: check them too (indirect calls are the
                // consumers, whose contract is theirs).
                if let Some(target) = ins.strip_prefix("call").map(str::trim)
                    && let Some(name) = target.split('<').nth(1).map(|s| s.trim_end_matches('>'))
                {
                    let name = name.split('+').next().unwrap_or(name).to_string();
                    if name.contains('@') || checked.contains(&name) {
                        continue;
                    }
                    checked.push(name.clone());
                    queue.push(name);
                }
            }
        }
        assert!(
            lines > 10,
            "disassembly of trampoline_entry came back empty ({lines} lines)"
        );
        println!(
            "  disassembly: {} functions, {lines} instructions before the save / after the restore: {}",
            checked.len(),
            if offending.is_empty() {
                "no vector, x87 or MXCSR instruction".to_string()
            } else {
                format!("{offending:?}")
            }
        );
        assert!(
            offending.is_empty(),
            "vector state touched before the save: {offending:?}"
        );
    }
}

//! AMX and XFD: live tiles survive a probe hit, and tiles nobody asked for never fault.
//!
//! Linux arms XFD (extended feature disable) for AMX tile data in every thread until the process
//! asks for it (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`) and the thread first uses
//! it. The full-state save covers every XCR0 component, tile data included (8 KiB of the area).
//! What must hold:
//!
//! 1. **No permission, no fault.** A process that never asked for tiles hits full-state probes
//!    through both paths and exits normally: `XSAVEC`/`XRSTOR` of an XFD-armed component saves
//!    and restores it as initial and does not fault. The control: in the same kind of process a
//!    tile instruction *is* killed by SIGILL, so XFD really was armed.
//! 2. **Live tiles are kept.** In a process with permission, a thread loads a tile configuration
//!    and eight tiles of distinct data, hits the probe, and stores the tiles and the
//!    configuration back out: all equal what it loaded, for a full-state consumer that never
//!    touches tiles, one that loads its own configuration and zeroes every tile, a
//!    register-only consumer, and both paths.
//! 3. **Initial stays initial.** A fresh thread of that process that never used tiles hits the
//!    probe, and XINUSE's tile-data bit is clear before and after.
//!
//! 4. **The oracle can fail.** A child with permission and the save forced to `FXSAVE` runs the
//!    tile-clobbering consumer through the jump path and must report the loss (exit 3).
//!
//! A CPU without AMX (CPUID.(7,0):EDX[24], or XCR0 bits 17–18 clear) skips with the reason.
//!
//! `harness = false`: one `Live` per process, and child processes.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn main() {
    imp::main();
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    println!("amx_tiles: x86_64 Linux only");
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use probe_arch_x86_64::xstate::{SaveInsn, XState, component};
    use probe_process::live::{Consumer, Live, Regs};
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const ARCH_REQ_XCOMP_PERM: libc::c_int = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;
    const CHILD: &str = "PROBE_AMX_CHILD";

    /// Eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct Tiles([[u8; 1024]; 8]);

    /// A `ldtilecfg` operand: palette, start row, 14 reserved bytes, 16 × colsb (u16), 16
    /// reserved bytes, 16 × rows (u8).
    #[repr(C, align(64))]
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct TileCfg([u8; 64]);

    const fn cfg(rows: u8, colsb: u16) -> TileCfg {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = colsb as u8;
            c[17 + 2 * t] = (colsb >> 8) as u8;
            c[48 + t] = rows;
            t += 1;
        }
        TileCfg(c)
    }

    #[unsafe(no_mangle)]
    static mut AMX_CFG_IN: TileCfg = cfg(16, 64);
    #[unsafe(no_mangle)]
    static mut AMX_CFG_OUT: TileCfg = TileCfg([0; 64]);
    /// What the tile-clobbering consumer loads: a different shape, so a lost configuration shows.
    #[unsafe(no_mangle)]
    static mut AMX_CFG_CLOBBER: TileCfg = cfg(8, 32);
    #[unsafe(no_mangle)]
    static mut AMX_TILES_IN: Tiles = Tiles([[0; 1024]; 8]);
    #[unsafe(no_mangle)]
    static mut AMX_TILES_OUT: Tiles = Tiles([[0; 1024]; 8]);

    core::arch::global_asm!(
        // Load the configuration and eight tiles, run the probed instruction, store them out.
        ".globl amx_target",
        ".type amx_target, @function",
        "amx_target:",
        "ldtilecfg [rip + AMX_CFG_IN]",
        "lea rax, [rip + AMX_TILES_IN]",
        "mov rcx, 64",
        ".irp i, 0,1,2,3,4,5,6,7",
        "tileloadd tmm\\i, [rax + rcx]",
        "add rax, 1024",
        ".endr",
        ".globl amx_probe_site",
        "amx_probe_site:",
        "nop dword ptr [rax + rax + 0]",
        "nop dword ptr [rax + rax + 0]",
        "lea rax, [rip + AMX_TILES_OUT]",
        "mov rcx, 64",
        ".irp i, 0,1,2,3,4,5,6,7",
        "tilestored [rax + rcx], tmm\\i",
        "add rax, 1024",
        ".endr",
        "sttilecfg [rip + AMX_CFG_OUT]",
        "tilerelease",
        "ret",
        ".size amx_target, . - amx_target",
        // The probed instruction without any tile use around it.
        ".globl amx_idle_target",
        ".type amx_idle_target, @function",
        "amx_idle_target:",
        ".globl amx_idle_site",
        "amx_idle_site:",
        "nop dword ptr [rax + rax + 0]",
        "nop dword ptr [rax + rax + 0]",
        "ret",
        ".size amx_idle_target, . - amx_idle_target",
        // A consumer's tile use: another configuration, every tile zeroed, left loaded.
        ".globl amx_clobber",
        ".type amx_clobber, @function",
        "amx_clobber:",
        "ldtilecfg [rip + AMX_CFG_CLOBBER]",
        ".irp i, 0,1,2,3,4,5,6,7",
        "tilezero tmm\\i",
        ".endr",
        "ret",
        ".size amx_clobber, . - amx_clobber",
        // The control: any tile instruction, which must fault without permission.
        ".globl amx_touch",
        ".type amx_touch, @function",
        "amx_touch:",
        "ldtilecfg [rip + AMX_CFG_IN]",
        "tilezero tmm0",
        "tilerelease",
        "ret",
        ".size amx_touch, . - amx_touch",
        // A register-only consumer: counts, clobbers caller-saved general registers.
        ".globl amx_raw_consumer",
        ".type amx_raw_consumer, @function",
        "amx_raw_consumer:",
        "inc qword ptr [rsi]",
        "mov rax, -1",
        "mov rcx, -1",
        "mov rdx, -1",
        "xor r11, r11",
        "ret",
        ".size amx_raw_consumer, . - amx_raw_consumer",
    );

    unsafe extern "C" {
        fn amx_target();
        fn amx_idle_target();
        fn amx_clobber();
        fn amx_touch();
        static amx_probe_site: u8;
        static amx_idle_site: u8;
        fn amx_raw_consumer(regs: &Regs, ctx: *mut core::ffi::c_void);
    }

    fn site() -> u64 {
        // SAFETY: the static's address.
        unsafe { &amx_probe_site as *const u8 as u64 }
    }

    fn idle_site() -> u64 {
        // SAFETY: the static's address.
        unsafe { &amx_idle_site as *const u8 as u64 }
    }

    /// XINUSE (XGETBV with ECX = 1): which components are not in their initial state.
    fn xinuse() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV(1) is unprivileged where CPUID.(0DH,1):EAX[2] is set (checked by the
        // caller through `amx()`, which requires XSAVE with XCR0's AMX bits).
        unsafe {
            core::arch::asm!("xgetbv", in("ecx") 1, out("eax") lo, out("edx") hi, options(nomem, nostack));
        }
        (hi as u64) << 32 | lo as u64
    }

    /// Why AMX cannot be tested here, or `None`.
    fn no_amx() -> Option<&'static str> {
        let l7 = core::arch::x86_64::__cpuid_count(7, 0);
        if l7.edx & (1 << 24) == 0 {
            return Some("the CPU has no AMX-TILE (CPUID.(7,0):EDX[24])");
        }
        let x = XState::detect();
        if x.xcr0 & (component::TILECFG | component::TILEDATA)
            != component::TILECFG | component::TILEDATA
        {
            return Some("XCR0 does not enable the tile components (17, 18)");
        }
        if core::arch::x86_64::__cpuid_count(0xD, 1).eax & (1 << 2) == 0 {
            return Some("no XGETBV(1) (XINUSE) to check initial state with");
        }
        None
    }

    static FULL_HITS: AtomicU64 = AtomicU64::new(0);
    static RAW_HITS: AtomicU64 = AtomicU64::new(0);

    /// A full-state consumer that never touches tiles (but does vector and string work).
    fn quiet_consumer() -> Arc<Consumer> {
        Arc::new(|_r: &Regs| {
            FULL_HITS.fetch_add(1, Ordering::Relaxed);
            let mut b = vec![0u8; 1 << 14];
            // SAFETY: writing the vector's own bytes.
            unsafe { core::ptr::write_bytes(b.as_mut_ptr(), std::hint::black_box(0x5A), b.len()) };
            std::hint::black_box(&b);
        })
    }

    /// A full-state consumer that loads its own tile configuration and zeroes every tile.
    fn tile_consumer() -> Arc<Consumer> {
        Arc::new(|_r: &Regs| {
            FULL_HITS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the process has tile permission (this consumer is attached only after
            // `ARCH_REQ_XCOMP_PERM` succeeded); the function touches only tile state.
            unsafe { amx_clobber() };
        })
    }

    /// Rounds of fresh tile data through the probe; the names of what came back wrong.
    fn check(what: &str, rounds: u32) -> Vec<String> {
        let mut bad = Vec::new();
        for round in 0..rounds {
            let mut t = Tiles([[0; 1024]; 8]);
            for (i, tile) in t.0.iter_mut().enumerate() {
                for (j, b) in tile.iter_mut().enumerate() {
                    *b = (round as usize * 31 + i * 17 + j * 7 + 1) as u8;
                }
            }
            // SAFETY: only this thread touches the statics while it runs the target.
            unsafe {
                AMX_TILES_IN = t;
                AMX_TILES_OUT = Tiles([[0; 1024]; 8]);
                AMX_CFG_OUT = TileCfg([0; 64]);
                amx_target();
                let out = core::ptr::read(&raw const AMX_TILES_OUT);
                for i in 0..8 {
                    if out.0[i] != t.0[i] {
                        let n = format!("tmm{i}");
                        if !bad.contains(&n) {
                            bad.push(n);
                        }
                    }
                }
                if core::ptr::read(&raw const AMX_CFG_OUT) != core::ptr::read(&raw const AMX_CFG_IN)
                    && !bad.contains(&"tile configuration".to_string())
                {
                    bad.push("tile configuration".into());
                }
            }
        }
        println!(
            "  {what}: {rounds} hits, {}",
            if bad.is_empty() {
                "every tile and the configuration intact".to_string()
            } else {
                format!("WRONG: {}", bad.join(", "))
            }
        );
        bad
    }

    fn both_paths(
        live: &Live,
        what: &str,
        attach: impl Fn() -> Vec<probe_process::live::Attached>,
    ) -> Vec<String> {
        let probes = attach();
        let mut bad = check(&format!("{what}, breakpoint path"), 20);
        live.run_optimizer();
        assert!(live.is_optimized(site()), "the probe should be a jump now");
        bad.extend(check(&format!("{what}, jump path"), 50));
        for p in probes {
            live.detach(p).expect("detach");
        }
        bad
    }

    /// Child processes: no tile permission.
    fn child(mode: &str) -> ! {
        match mode {
            "touch" => {
                // SAFETY: a tile instruction; without permission the kernel kills us (SIGILL),
                // which the parent expects.
                unsafe { amx_touch() };
                std::process::exit(0);
            }
            "hit" => {
                let live = Live::install().expect("install");
                let a = live.attach(idle_site(), quiet_consumer()).expect("attach");
                for _ in 0..20 {
                    // SAFETY: the target only runs its probed instruction.
                    unsafe { amx_idle_target() };
                }
                live.run_optimizer();
                assert!(live.is_optimized(idle_site()));
                for _ in 0..50 {
                    // SAFETY: as above.
                    unsafe { amx_idle_target() };
                }
                live.detach(a).expect("detach");
                assert_eq!(FULL_HITS.load(Ordering::Relaxed), 70);
                std::process::exit(0);
            }
            "fxsave" => {
                // With permission, the save forced to FXSAVE: the tile-clobbering consumer's
                // damage must show (exit 3), or this test could not fail.
                // SAFETY: arch_prctl with an integer argument.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_arch_prctl,
                        ARCH_REQ_XCOMP_PERM,
                        XFEATURE_XTILEDATA,
                    )
                };
                assert_eq!(r, 0, "ARCH_REQ_XCOMP_PERM in the child");
                let live = Live::install_with(SaveInsn::Fxsave).expect("install");
                let a = live.attach(site(), tile_consumer()).expect("attach");
                live.run_optimizer();
                assert!(live.is_optimized(site()));
                let bad = check("| FXSAVE forced, tile-clobbering consumer, jump path", 10);
                live.detach(a).expect("detach");
                std::process::exit(if bad.is_empty() { 0 } else { 3 });
            }
            _ => unreachable!("unknown child mode {mode}"),
        }
    }

    fn run_child(mode: &str) -> std::process::ExitStatus {
        let exe = std::env::current_exe().expect("current exe");
        Command::new(exe)
            .env(CHILD, mode)
            .status()
            .expect("spawn the child")
    }

    pub fn main() {
        if let Ok(mode) = std::env::var(CHILD) {
            child(&mode);
        }
        if let Some(why) = no_amx() {
            println!("amx_tiles: skipped: {why}");
            return;
        }
        let xs = XState::detect();
        println!(
            "amx_tiles: save {:?}, mask {:#x}, {} bytes (tile data 8 KiB of it)",
            xs.insn, xs.mask, xs.size
        );

        // 1. Without permission: the control faults, the probe hits do not.
        let touch = run_child("touch");
        assert_eq!(
            touch.signal(),
            Some(libc::SIGILL),
            "a tile instruction without permission should be killed by SIGILL (XFD armed): {touch:?}"
        );
        println!("  no permission: a tile instruction is killed by SIGILL (XFD is armed)");
        let hit = run_child("hit");
        assert!(
            hit.success(),
            "full-state hits without tile permission must not fault: {hit:?}"
        );
        println!("  no permission: 70 full-state hits (both paths) exit normally, no fault");

        // 2. With permission: live tiles are kept.
        // SAFETY: arch_prctl with an integer argument.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if r != 0 {
            println!(
                "amx_tiles: live-tile checks skipped: ARCH_REQ_XCOMP_PERM failed ({})",
                std::io::Error::last_os_error()
            );
            return;
        }
        let live = Live::install().expect("install");
        assert!(check("no probe", 5).is_empty(), "the oracle is broken");
        let mut failures = Vec::new();
        let mut note = |what: &str, bad: Vec<String>| {
            if !bad.is_empty() {
                failures.push(format!("{what}: {}", bad.join(", ")));
            }
        };
        note(
            "full-state consumer that never touches tiles",
            both_paths(live, "full-state consumer that never touches tiles", || {
                vec![live.attach(site(), quiet_consumer()).expect("attach")]
            }),
        );
        note(
            "full-state consumer that clobbers every tile",
            both_paths(live, "full-state consumer that clobbers every tile", || {
                vec![live.attach(site(), tile_consumer()).expect("attach")]
            }),
        );
        let raw = || {
            // SAFETY: `amx_raw_consumer` touches only general registers and the counter its
            // context points at, which is a static.
            unsafe {
                live.attach_raw(
                    site(),
                    Some(amx_raw_consumer),
                    &RAW_HITS as *const AtomicU64 as *mut core::ffi::c_void,
                )
            }
            .expect("attach_raw")
        };
        note(
            "register-only consumer",
            both_paths(live, "register-only consumer", || vec![raw()]),
        );
        assert_eq!(
            FULL_HITS.load(Ordering::Relaxed),
            140,
            "the full-state consumers ran on every hit"
        );
        let raw_hits = RAW_HITS.load(Ordering::Relaxed);
        assert_eq!(raw_hits, 70, "the register-only consumer ran on every hit");

        // 3. A fresh thread that never used tiles: XINUSE's tile-data bit stays clear.
        let a = live.attach(idle_site(), quiet_consumer()).expect("attach");
        live.run_optimizer();
        assert!(live.is_optimized(idle_site()));
        let (before, after) = std::thread::spawn(|| {
            let before = xinuse();
            for _ in 0..50 {
                // SAFETY: the target only runs its probed instruction.
                unsafe { amx_idle_target() };
            }
            (before, xinuse())
        })
        .join()
        .expect("thread");
        live.detach(a).expect("detach");
        println!(
            "  fresh thread, jump path: XINUSE before {before:#x}, after {after:#x}: tile data {}",
            if after & component::TILEDATA == 0 {
                "stayed initial"
            } else {
                "WRONG: no longer initial"
            }
        );
        assert_eq!(
            before & component::TILEDATA,
            0,
            "a fresh thread's tiles start initial"
        );
        if after & component::TILEDATA != 0 {
            failures.push("fresh thread: tile data left non-initial".into());
        }

        // The oracle can fail: the same check against a trampoline that saves only FXSAVE state.
        let fx = run_child("fxsave");
        assert_eq!(
            fx.code(),
            Some(3),
            "with FXSAVE forced, the tile-clobbering consumer's damage must be caught: {fx:?}"
        );
        println!("  FXSAVE child: tile loss caught, as it must be");

        assert!(
            failures.is_empty(),
            "tile state lost:\n{}",
            failures.join("\n")
        );
        println!("amx_tiles: ok");
    }
}

//! The live embedding's breakpoint path in this very process: probes on functions of the test
//! binary (found by symbol in its own ELF symbol table), hit by threads running them in loops,
//! attached and detached while they run.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use probe_process::live::{Consumer, EXE, Live, Regs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

// The probed functions, in this binary's .text, with symbol sizes so they have bounds.
core::arch::global_asm!(
    ".text",
    ".globl live_t_add",
    ".type live_t_add, @function",
    "live_t_add:",
    "lea rax, [rdi + rsi]",
    "nop dword ptr [rax]",
    "ret",
    ".size live_t_add, . - live_t_add",
    // A second name at the same address (as folded identical code has).
    ".globl live_t_add_alias",
    ".type live_t_add_alias, @function",
    ".set live_t_add_alias, live_t_add",
    ".size live_t_add_alias, . - live_t_add",
    ".globl live_t_riprel",
    ".type live_t_riprel, @function",
    "live_t_riprel:",
    "mov eax, dword ptr [rip + live_t_data]",
    "add rax, rdi",
    "ret",
    ".size live_t_riprel, . - live_t_riprel",
    ".globl live_t_call",
    ".type live_t_call, @function",
    "live_t_call:",
    "push rbx",
    "mov rsi, 100",
    "call live_t_add",
    "pop rbx",
    "ret",
    ".size live_t_call, . - live_t_call",
    ".globl live_t_foreign",
    ".type live_t_foreign, @function",
    "live_t_foreign:",
    "int3",
    "mov eax, 7",
    "ret",
    ".size live_t_foreign, . - live_t_foreign",
    ".globl live_t_foreign_cd03",
    ".type live_t_foreign_cd03, @function",
    "live_t_foreign_cd03:",
    ".byte 0xcd, 0x03",
    "mov eax, 9",
    "ret",
    ".size live_t_foreign_cd03, . - live_t_foreign_cd03",
    ".data",
    ".balign 8",
    "live_t_data: .quad 40",
    ".text",
);

unsafe extern "sysv64" {
    fn live_t_add(a: u64, b: u64) -> u64;
    fn live_t_riprel(a: u64) -> u64;
    fn live_t_call(a: u64) -> u64;
    fn live_t_foreign() -> u64;
    fn live_t_foreign_cd03() -> u64;
}

fn add(a: u64, b: u64) -> u64 {
    // SAFETY: lea/nop/ret: a plain sysv64 function.
    unsafe { live_t_add(a, b) }
}

/// The program's own SIGTRAP handler, installed before the live embedding (it must keep
/// getting the traps that are not ours).
static FOREIGN_TRAPS: AtomicU64 = AtomicU64::new(0);
extern "C" fn program_sigtrap(_: libc::c_int) {
    FOREIGN_TRAPS.fetch_add(1, Ordering::Relaxed);
}

/// One process-wide setup for every test here.
fn live() -> &'static Live {
    static LIVE: OnceLock<&'static Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        // SAFETY: a plain handler that only bumps an atomic.
        unsafe { libc::signal(libc::SIGTRAP, program_sigtrap as *const () as usize) };
        Live::install().expect("install")
    })
}

/// Tests here share the process's probes: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn counter() -> (Arc<AtomicU64>, Arc<Consumer>) {
    let n = Arc::new(AtomicU64::new(0));
    let m = n.clone();
    (
        n,
        Arc::new(move |_: &Regs| {
            m.fetch_add(1, Ordering::Relaxed);
        }),
    )
}

/// (inode, file offset) of `addr`, read independently from /proc/self/maps.
fn maps_key(addr: u64) -> (u64, u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (lo, hi) = f[0].split_once('-')?;
            let (lo, hi) = (
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            );
            (addr >= lo && addr < hi).then(|| {
                (
                    f[4].parse().unwrap(),
                    addr - lo + u64::from_str_radix(f[2], 16).unwrap(),
                )
            })
        })
        .expect("mapped")
}

fn code(addr: u64, len: usize) -> Vec<u8> {
    // SAFETY: reading mapped text of this binary.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
}

#[test]
fn a_foreign_int3_reaches_the_programs_handler() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The live embedding is installed (after the program's handler).
    let _live = live();
    let before = FOREIGN_TRAPS.load(Ordering::Relaxed);
    // SAFETY: int3 (handled by the program's handler, which returns), then mov/ret.
    assert_eq!(unsafe { live_t_foreign() }, 7);
    assert_eq!(FOREIGN_TRAPS.load(Ordering::Relaxed), before + 1);
    // The two-byte form `INT 3` (CD 03) too.
    // SAFETY: int 3 (handled by the program's handler, which returns), then mov/ret.
    assert_eq!(unsafe { live_t_foreign_cd03() }, 9);
    assert_eq!(FOREIGN_TRAPS.load(Ordering::Relaxed), before + 2);
    // And a raise() is not mistaken for a breakpoint either.
    // SAFETY: raising a signal whose handler returns.
    unsafe { libc::raise(libc::SIGTRAP) };
    assert_eq!(FOREIGN_TRAPS.load(Ordering::Relaxed), before + 3);
}

#[test]
fn every_bad_attach_is_an_error_and_changes_nothing() {
    use probe_arch_x86_64::insn::Refusal;
    use probe_process::live::LiveError;
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let (n, c) = counter();
    assert!(matches!(Live::install(), Err(LiveError::AlreadyInstalled)));
    assert!(matches!(
        live.attach_symbol(EXE, "no_such_function", 0, c.clone()),
        Err(LiveError::NoSymbol { ref name, .. }) if name == "no_such_function"
    ));
    assert!(matches!(
        live.attach_symbol("libno_such_object.so", "f", 0, c.clone()),
        Err(LiveError::NoObject(ref o)) if o == "libno_such_object.so"
    ));
    // Inside `lea rax, [rdi + rsi]` (4 bytes).
    assert!(matches!(
        live.attach_symbol(EXE, "live_t_add", 2, c.clone()),
        Err(LiveError::Core(probe_core::Error::InsideInstruction))
    ));
    // Past the function's end (the bytes there belong to the next function).
    assert!(matches!(
        live.attach_symbol(EXE, "live_t_add", 8, c.clone()),
        Err(LiveError::Core(probe_core::Error::OffsetOutOfRange))
    ));
    // The program's own int3: refused, with the reason.
    assert!(matches!(
        live.attach_symbol(EXE, "live_t_foreign", 0, c.clone()),
        Err(LiveError::Refused(Refusal::Trap))
    ));
    // Not in any function of the executable: each case its own error, naming the address.
    assert!(matches!(
        live.attach(0x10, c.clone()),
        Err(LiveError::NotMapped(0x10))
    ));
    // SAFETY: getauxval has no preconditions.
    let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    if vdso != 0 {
        assert!(matches!(
            live.attach(vdso + 0x100, c.clone()),
            Err(LiveError::Vdso(_))
        ));
    }
    let heap = Box::new([0u8; 64]);
    let at = heap.as_ptr() as u64;
    assert!(matches!(live.attach(at, c.clone()), Err(LiveError::Anonymous(a)) if a == at));
    // Read-only data of the executable (file-backed, not executable). (A `.bss` static may sit
    // in the anonymous tail of the data mapping — under AddressSanitizer's larger `.bss` it does
    // — and is `Anonymous` then.)
    static RODATA: [u8; 32] = *b"read-only data, not executable.\0";
    let data = core::hint::black_box(&RODATA).as_ptr() as u64;
    assert!(matches!(
        live.attach(data, c.clone()),
        Err(LiveError::NotExecutable(_))
    ));
    // Inside a function of a shared library, but not at an instruction boundary.
    let strlen = live.symbol("libc.so.6", "strlen").expect("libc's strlen");
    assert!(
        matches!(
            live.attach_symbol("libc.so.6", "strlen", 1, c.clone()),
            Err(LiveError::Core(probe_core::Error::InsideInstruction))
        ),
        "strlen at {strlen:#x}"
    );
    // Every error is a sentence that names what was wrong.
    let e = live
        .attach_symbol(EXE, "no_such_function", 0, c.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("`no_such_function`"), "{e}");
    let e = live
        .attach_symbol(EXE, "live_t_add", 2, c.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("inside an instruction"), "{e}");
    // Detaching twice.
    let start = live.symbol(EXE, "live_t_add").unwrap();
    let original = code(start, 8);
    let a = live.attach(start, c).unwrap();
    live.detach(a.clone()).unwrap();
    assert!(matches!(live.detach(a), Err(LiveError::Core(_))));
    assert_eq!(code(start, 8), original);
    assert_eq!(add(2, 3), 5);
    assert_eq!(n.load(Ordering::Relaxed), 0);
}

#[test]
fn hits_write_only_their_own_threads_pool_entry() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let start = live.symbol(EXE, "live_t_add").unwrap();
    let (n, c) = counter();
    // Offset 4: a breakpoint that stays one (too short for a jump), so every hit is a SIGTRAP.
    let a = live.attach(start + 4, c).unwrap();
    let threads: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(|| (0..2000).map(|i| add(i, 1)).sum::<u64>()))
        .collect();
    // A first pair of threads (their hits are not counted below).
    for t in threads {
        t.join().unwrap();
    }
    let before = live.pool_moves();
    let threads: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(|| (0..20_000).map(|i| add(i, 1)).sum::<u64>()))
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let moves = live.pool_moves() - before;
    live.detach(a).unwrap();
    assert_eq!(n.load(Ordering::Relaxed), 44_000);
    // New threads start from their thread id's entry; two threads can at worst meet once each.
    assert!(moves <= 2, "{moves} hits left their thread's entry");
    println!("40 000 hits on two concurrent threads: {moves} left their thread's pool entry");
}

#[test]
fn the_delayed_optimizer_turns_a_probe_into_a_jump_by_itself() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    live.start_optimizer(std::time::Duration::from_millis(10));
    let start = live.symbol(EXE, "live_t_add").unwrap();
    let (n, c) = counter();
    let a = live.attach(start, c).unwrap();
    // No run_optimizer call: the optimizer thread does it after its delay.
    let t = std::time::Instant::now();
    while !live.is_optimized(start) {
        assert!(t.elapsed().as_secs() < 20, "never optimized");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(code(start, 1), [0xE9]);
    assert_eq!(add(1, 2), 3);
    assert_eq!(n.load(Ordering::Relaxed), 1);
    live.detach(a).unwrap();
    assert_eq!(code(start, 1), [0x48]);
}

#[test]
fn every_instruction_of_riprel_and_call_probed_behaves_as_unprobed() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let mut optimized = 0;
    for (name, f, insns) in [
        // mov eax, [rip+d] (6) ; add rax, rdi (3) ; ret
        (
            "live_t_riprel",
            live_t_riprel as unsafe extern "sysv64" fn(u64) -> u64,
            &[0u64, 6, 9][..],
        ),
        // push rbx (1) ; mov rsi, 100 (7) ; call (5) ; pop rbx (1) ; ret
        ("live_t_call", live_t_call, &[0, 1, 8, 13, 14]),
    ] {
        let start = live.symbol(EXE, name).expect("symbol");
        let original = code(start, 15);
        // SAFETY: the test functions are plain sysv64 functions.
        let want: Vec<u64> = (0..4).map(|i| unsafe { f(i) }).collect();
        for &off in insns {
            let (n, c) = counter();
            let a = live
                .attach_symbol(EXE, name, off, c)
                .unwrap_or_else(|e| panic!("{name}+{off}: {e}"));
            // A breakpoint — or already a jump, if the delayed optimizer another test started
            // (it lives as long as the process) ran in between.
            let first = code(start + off, 1)[0];
            assert!(
                first == 0xCC || (first == 0xE9 && live.is_optimized(start + off)),
                "{name}+{off}: probe in place ({first:#x})"
            );
            // The key is the real (inode, file offset) pair, as /proc/self/maps tells it.
            let (inode, offset) = maps_key(start + off);
            assert_eq!(a.key().offset, offset, "{name}+{off}: file offset");
            assert_eq!(
                a.key().object.0 & ((1 << 40) - 1),
                inode,
                "{name}+{off}: inode"
            );
            // SAFETY: as above.
            let got: Vec<u64> = (0..4).map(|i| unsafe { f(i) }).collect();
            assert_eq!(got, want, "{name}+{off}: breakpoint path");
            assert_eq!(
                n.load(Ordering::Relaxed),
                4,
                "{name}+{off}: one hit per call"
            );
            // The jump path, where the arch analysis allows one.
            live.run_optimizer();
            let jumped = live.is_optimized(start + off);
            if jumped {
                assert_eq!(code(start + off, 1), [0xE9], "{name}+{off}: jump in place");
                optimized += 1;
            }
            // SAFETY: as above.
            let got: Vec<u64> = (0..4).map(|i| unsafe { f(i) }).collect();
            assert_eq!(got, want, "{name}+{off}: jump path ({jumped})");
            assert_eq!(
                n.load(Ordering::Relaxed),
                8,
                "{name}+{off}: one hit per call"
            );
            live.detach(a).unwrap();
            assert_eq!(code(start, 15), original, "{name}: bytes restored");
        }
    }
    // riprel+0 (a RIP-relative load), call+0, call+1, call+8 (a relative call, last in its
    // range) become jumps; the rest end their function too soon for 5 bytes.
    assert_eq!(optimized, 4);
    // Not an instruction boundary.
    let (_, c) = counter();
    assert!(live.attach_symbol(EXE, "live_t_riprel", 1, c).is_err());
}

#[test]
fn consumers_see_exactly_the_hits_while_attached() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let start = live.symbol(EXE, "live_t_add").unwrap();
    let original = code(start, 8);
    // A global clock orders calls against attach/detach.
    static CLOCK: AtomicU64 = AtomicU64::new(0);
    // Odd while a round (attach … detach) is on: workers keep the calls that overlap one.
    static ROUND: AtomicU64 = AtomicU64::new(0);
    let stop = Arc::new(AtomicBool::new(false));
    const THREADS: u64 = 2;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // (argument, clock before, clock after)
                let mut calls = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let arg = (t << 48) | i;
                    let r0 = ROUND.load(Ordering::SeqCst);
                    let before = CLOCK.fetch_add(1, Ordering::SeqCst);
                    let r = add(arg, 1);
                    let after = CLOCK.fetch_add(1, Ordering::SeqCst);
                    let r1 = ROUND.load(Ordering::SeqCst);
                    assert_eq!(r, arg + 1, "a probed call returned a wrong value");
                    // A call that overlaps a round saw it odd, or saw it change.
                    if r0 % 2 == 1 || r0 != r1 {
                        calls.push((arg, before, after));
                    }
                    i += 1;
                    for _ in 0..20 {
                        std::hint::spin_loop();
                    }
                }
                calls
            })
        })
        .collect();
    // Address-space churn: map and unmap a file, and refresh the model, while hits resolve by
    // speculating on it.
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let path =
                std::env::temp_dir().join(format!("probe-live-churn-{}", std::process::id()));
            std::fs::write(&path, vec![0u8; 8192]).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            let mut refreshes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                use std::os::fd::AsRawFd;
                // SAFETY: a fresh read-only mapping of our own file, unmapped below.
                let p = unsafe {
                    libc::mmap(
                        core::ptr::null_mut(),
                        8192,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE,
                        file.as_raw_fd(),
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                self::live().refresh_mappings().unwrap();
                // SAFETY: our mapping.
                unsafe { libc::munmap(p, 8192) };
                self::live().refresh_mappings().unwrap();
                refreshes += 2;
            }
            let _ = std::fs::remove_file(&path);
            refreshes
        })
    };
    // Rounds: attach a recording consumer at one of the two instruction boundaries, let the
    // threads run, detach.
    const CAP: usize = 1 << 20;
    struct Record {
        seen: Box<[AtomicU64]>,
        n: AtomicUsize,
    }
    let mut rounds = Vec::new();
    const ROUNDS: u64 = 30;
    for round in 0..ROUNDS {
        let rec = Arc::new(Record {
            seen: (0..CAP).map(|_| AtomicU64::new(u64::MAX)).collect(),
            n: AtomicUsize::new(0),
        });
        let r2 = rec.clone();
        // Signal-safe: one fetch_add and one store.
        let c: Arc<Consumer> = Arc::new(move |regs: &Regs| {
            let i = r2.n.fetch_add(1, Ordering::Relaxed);
            if let Some(s) = r2.seen.get(i) {
                s.store(regs.rdi, Ordering::Relaxed);
            }
        });
        let off = if round % 2 == 0 { 0 } else { 4 };
        ROUND.fetch_add(1, Ordering::SeqCst);
        let t0 = CLOCK.fetch_add(1, Ordering::SeqCst);
        let a = live.attach(start + off, c).unwrap();
        if round % 4 == 0 {
            // The jump path for part of the window (offset 0 is optimizable).
            live.run_optimizer();
            assert!(live.is_optimized(start));
        }
        let t1 = CLOCK.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(3));
        let t2 = CLOCK.fetch_add(1, Ordering::SeqCst);
        live.detach(a).unwrap();
        let t3 = CLOCK.fetch_add(1, Ordering::SeqCst);
        ROUND.fetch_add(1, Ordering::SeqCst);
        rounds.push((rec, t0, t1, t2, t3));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let refreshes = churn.join().unwrap();
    let mut calls: Vec<(u64, u64, u64)> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    calls.sort_unstable_by_key(|c| c.1);
    let by_arg: std::collections::HashMap<u64, (u64, u64)> =
        calls.iter().map(|&(a, b, e)| (a, (b, e))).collect();
    let mut hits_total = 0;
    let mut inside_total = 0;
    for (k, (rec, t0, t1, t2, t3)) in rounds.iter().enumerate() {
        let n = rec.n.load(Ordering::Relaxed);
        assert!(n <= CAP);
        let mut seen: Vec<u64> = rec.seen[..n]
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        seen.sort_unstable();
        let len = seen.len();
        seen.dedup();
        assert_eq!(seen.len(), len, "round {k}: a call was seen twice");
        // Every observation is a recorded call (so it overlapped a round) that overlapped
        // [attach start, detach end].
        for s in &seen {
            let (before, after) = by_arg
                .get(s)
                .unwrap_or_else(|| panic!("round {k}: phantom hit {s:#x}"));
            assert!(
                !(*after < *t0 || *before > *t3),
                "round {k}: call {s:#x} outside the window was seen"
            );
        }
        // Every call that ran entirely between attach returning and detach starting was seen.
        let from = calls.partition_point(|c| c.1 <= *t1);
        for &(arg, _, after) in calls[from..].iter().take_while(|c| c.1 < *t2) {
            if after < *t2 {
                inside_total += 1;
                assert!(
                    seen.binary_search(&arg).is_ok(),
                    "round {k}: call {arg:#x} inside the window was missed"
                );
            }
        }
        hits_total += n;
    }
    assert_eq!(code(start, 8), original, "bytes restored");
    assert!(inside_total > 0);
    // Detached jump probes' trampolines were freed after a quiescence scan and reused.
    let (made, reused, freed) = live.trampoline_stats();
    assert!(
        reused > 0 && freed > 0,
        "trampolines made {made}, reused {reused}, freed {freed}"
    );
    println!(
        "trampolines made/reused/freed so far {made}/{reused}/{freed}; \
         {refreshes} address-space model refreshes meanwhile; \
         {} calls recorded around the rounds on {THREADS} threads, {ROUNDS} attach/detach rounds, {hits_total} hits recorded; \
         all {inside_total} calls inside a window seen exactly once, none outside",
        calls.len()
    );
}

/// What a tracing user needs to find a place to probe: functions with sizes (aliases as their
/// own entries), instruction boundaries, and why a probe stays a breakpoint.
#[test]
fn a_user_can_find_functions_boundaries_and_why_a_probe_is_a_breakpoint() {
    use probe_process::live::{Optimization, WhyBreakpoint};
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let fs = live.functions(EXE).unwrap();
    let add = fs.iter().find(|f| f.name == "live_t_add").expect("listed");
    assert_eq!(add.addr, live.symbol(EXE, "live_t_add"));
    assert!(add.size >= 8, "{add:?}");
    // An alias at the same address is its own entry and resolves by its own name.
    let alias = fs
        .iter()
        .find(|f| f.name == "live_t_add_alias")
        .expect("alias listed");
    assert_eq!(alias.addr, add.addr);
    assert_eq!(live.symbol(EXE, "live_t_add_alias"), add.addr);
    let add_addr = add.addr.expect("mapped");
    // `lea rax, [rdi + rsi]` (4 bytes), `nop dword ptr [rax]` (3), `ret`.
    assert_eq!(
        live.instruction_boundaries(EXE, "live_t_add").unwrap(),
        [0, 4, 7]
    );
    assert!(
        live.instruction_boundaries(EXE, "no_such_function")
            .is_err()
    );
    // Why a probe stays a breakpoint: `ret` at offset 7 leaves too few bytes for a jump.
    let (_, c) = counter();
    let a = live.attach_symbol(EXE, "live_t_add", 7, c).unwrap();
    live.run_optimizer();
    assert!(
        matches!(
            live.optimization(add_addr + 7),
            Optimization::Breakpoint(WhyBreakpoint::NotOptimizable(_))
        ),
        "{:?}",
        live.optimization(add_addr + 7)
    );
    live.detach(a).unwrap();
    live.run_optimizer();
    assert_eq!(live.optimization(add_addr + 7), Optimization::NotProbed);
}

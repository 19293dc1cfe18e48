//! `Live::uninstall`: every probe out, the program's own signal handlers back. Its own test
//! binary (one `Live` per process, and uninstall is for good).

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use probe_process::live::{Consumer, EXE, Live, LiveError, Regs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

core::arch::global_asm!(
    ".text",
    ".globl un_t_add",
    ".type un_t_add, @function",
    "un_t_add:",
    "lea rax, [rdi + rsi]",
    "nop dword ptr [rax + rax + 0]",
    "add rax, 0",
    "ret",
    ".size un_t_add, . - un_t_add",
);

unsafe extern "C" {
    fn un_t_add(a: u64, b: u64) -> u64;
}

static PROGRAM_TRAPS: AtomicU64 = AtomicU64::new(0);

extern "C" fn program_handler(_: libc::c_int) {
    PROGRAM_TRAPS.fetch_add(1, Ordering::Relaxed);
}

fn code(at: u64, n: usize) -> Vec<u8> {
    // SAFETY: our own code's bytes.
    unsafe { std::slice::from_raw_parts(at as *const u8, n) }.to_vec()
}

#[test]
fn uninstall_takes_every_probe_out_and_gives_the_handlers_back() {
    // The program's own SIGTRAP handler, before the probes come.
    // SAFETY: installing a handler that only counts.
    unsafe {
        libc::signal(
            libc::SIGTRAP,
            program_handler as *const () as libc::sighandler_t,
        )
    };
    let live = Live::install().expect("install");
    let at = live.symbol(EXE, "un_t_add").expect("symbol");
    let size = live.function(EXE, "un_t_add").expect("function").size as usize;
    let original = code(at, size);
    let ret = *live
        .instruction_boundaries(EXE, "un_t_add")
        .unwrap()
        .last()
        .unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let c: Arc<Consumer> = Arc::new(move |_: &Regs| {
        h.fetch_add(1, Ordering::Relaxed);
    });
    // One probe that becomes a jump, one that stays a breakpoint (the `ret`).
    live.attach(at, c.clone()).expect("attach");
    live.attach(at + ret, c.clone()).expect("attach");
    live.run_optimizer();
    assert!(live.is_optimized(at));
    // SAFETY: a plain function.
    assert_eq!(unsafe { un_t_add(2, 3) }, 5);
    assert_eq!(hits.load(Ordering::Relaxed), 2);
    // A raise goes to the program's handler even while we are installed (chained).
    // SAFETY: raising a signal whose handler returns.
    unsafe { libc::raise(libc::SIGTRAP) };
    assert_eq!(PROGRAM_TRAPS.load(Ordering::Relaxed), 1);

    assert_eq!(live.uninstall().expect("uninstall"), 2);
    assert_eq!(code(at, size), original, "bytes not restored");
    // SAFETY: a plain function.
    assert_eq!(unsafe { un_t_add(4, 5) }, 9);
    assert_eq!(
        hits.load(Ordering::Relaxed),
        2,
        "a consumer ran after uninstall"
    );
    // The program's handler is installed directly again.
    // SAFETY: querying a disposition.
    let mut now: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: a null `act` only queries.
    let r = unsafe { libc::sigaction(libc::SIGTRAP, core::ptr::null(), &mut now) };
    assert_eq!(r, 0);
    assert_eq!(now.sa_sigaction, program_handler as *const () as usize);
    // SAFETY: as above.
    unsafe { libc::raise(libc::SIGTRAP) };
    assert_eq!(PROGRAM_TRAPS.load(Ordering::Relaxed), 2);
    // No more probes, and no second install.
    assert!(matches!(live.attach(at, c), Err(LiveError::Uninstalled)));
    assert!(matches!(Live::install(), Err(LiveError::AlreadyInstalled)));
}

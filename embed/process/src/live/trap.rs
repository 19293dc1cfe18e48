//! The SIGTRAP handler: registers from the signal frame, our hits, and chaining what is not ours
//! to the program's own handler.

use super::*;

pub(super) fn regs_of(g: &[libc::greg_t; 23], rip: u64) -> Regs {
    use libc::*;
    let r = |i: i32| g[i as usize] as u64;
    Regs {
        rax: r(REG_RAX),
        rbx: r(REG_RBX),
        rcx: r(REG_RCX),
        rdx: r(REG_RDX),
        rsi: r(REG_RSI),
        rdi: r(REG_RDI),
        rbp: r(REG_RBP),
        rsp: r(REG_RSP),
        r8: r(REG_R8),
        r9: r(REG_R9),
        r10: r(REG_R10),
        r11: r(REG_R11),
        r12: r(REG_R12),
        r13: r(REG_R13),
        r14: r(REG_R14),
        r15: r(REG_R15),
        rip,
        rflags: r(REG_EFL),
    }
}

/// The SIGTRAP handler. See the module docs for what it may and may not do.
pub(super) extern "C" fn on_sigtrap(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    let Some(live) = LIVE.get().copied() else {
        return;
    };
    // Only a trap instruction (INT3, `INT 3`) is ours to look at: the kernel reports those with
    // SI_KERNEL. A `raise`/`kill`, a single-step or a hardware breakpoint goes to the program.
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    if unsafe { (*info).si_code } != libc::SI_KERNEL {
        chain(&live.previous, sig, info, uc);
        return;
    }
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    let gregs = unsafe { &mut (*uc.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as u64;
    // INT3 traps with RIP after itself.
    let addr = rip.wrapping_sub(1);
    let answer = live.breakpoint_hit(addr, || regs_of(gregs, addr));
    match answer {
        Some(next) => {
            gregs[libc::REG_RIP as usize] = next as i64;
        }
        None => chain(&live.previous, sig, info, uc),
    }
}

/// Passes a trap that is not ours to the program's previous SIGTRAP disposition.
pub(super) fn chain(
    prev: &libc::sigaction,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    let h = prev.sa_sigaction;
    if h == libc::SIG_IGN {
        return;
    }
    if h == libc::SIG_DFL {
        // Default action (terminate with a core): restore it and re-raise; it is delivered when
        // this handler returns.
        // SAFETY: async-signal-safe calls.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the program installed this function as an SA_SIGINFO handler.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { core::mem::transmute(h) };
        f(sig, info, uc);
    } else {
        // SAFETY: the program installed this function as a plain handler.
        let f: extern "C" fn(libc::c_int) = unsafe { core::mem::transmute(h) };
        f(sig);
    }
}

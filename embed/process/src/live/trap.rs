//! Chaining a trap that is not ours to the program's own SIGTRAP handler (the handler itself,
//! which reads the arch's signal frame, is the instruction set's: `isa`).

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

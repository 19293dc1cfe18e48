//! Quiescence: a round of signals to every other thread, each answering from its handler
//! whether it stopped inside code that is being replaced or freed (`probe_core::scan`).

use super::*;

/// The signal the quiescence scan sends to every other thread.
pub(super) fn quiesce_signal() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

/// The scan's rounds ([`probe_core::scan`]: why the round number travels with the signal).
pub(super) static SCAN: OnceLock<probe_core::scan::ScanRounds> = OnceLock::new();

pub(super) fn rounds() -> &'static probe_core::scan::ScanRounds {
    SCAN.get_or_init(probe_core::scan::ScanRounds::new)
}

/// Runs on each thread the scan signals: is this thread inside code that is being replaced or
/// freed? Answers the round named in the signal's value.
pub(super) extern "C" fn on_quiesce(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    let (Some(live), Some(rounds)) = (LIVE.get().copied(), SCAN.get()) else {
        return;
    };
    // SAFETY: the kernel passes valid siginfo/ucontext to an SA_SIGINFO handler; the value was
    // sent by `scan` with rt_tgsigqueueinfo.
    let round = unsafe { (*info).si_value().sival_ptr as u64 as u32 };
    let rip = isa::pc_of(uc);
    let inside = live
        .opt
        .space()
        .inside(rip, IN_TRAMPOLINE.with(|t| t.get()));
    rounds.answer(round, inside);
}

/// One scan: signals every other thread of the process and waits for their answers. Returns
/// `true` if all answered and none was inside.
pub(super) fn scan() -> bool {
    // SAFETY: getpid/gettid have no preconditions.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let rounds = rounds();
    let round = rounds.begin();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    let mut sent = 0u64;
    for t in tasks.flatten() {
        let Some(tid) = t
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if tid == me {
            continue;
        }
        let r = if signal_thread(pid, tid, quiesce_signal(), u64::from(round)) {
            0
        } else {
            -1
        };
        if r == 0 {
            sent += 1;
        }
    }
    // Threads answer from their handler; a thread that exits meanwhile never does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    while rounds.answered(round) < sent {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::yield_now();
    }
    !rounds.busy()
}

/// The quiescence wait: membarrier (every thread serializes), then scans until a round in which
/// every other thread answered from outside the XOL area, outside every prepared jump range's
/// interior, and not inside consumers called from a trampoline. The calling thread is outside by
/// construction (it is running the optimizer).
pub(super) fn quiesce(space: &ProcessCode) {
    let _ = space;
    let _ = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE);
    static SCANNING: Mutex<()> = Mutex::new(());
    let _one = SCANNING.lock().unwrap_or_else(|e| e.into_inner());
    while !scan() {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// Sends `sig` to thread `tid` of process `pid` with `value` as its `si_value` (what the
/// handler reads back with `si_value().sival_ptr`). Whether it was sent.
pub(super) fn signal_thread(
    pid: libc::pid_t,
    tid: libc::pid_t,
    sig: libc::c_int,
    value: u64,
) -> bool {
    // SAFETY: a zeroed siginfo with the fields rt_tgsigqueueinfo reads filled in.
    unsafe {
        let mut si: libc::siginfo_t = core::mem::zeroed();
        si.si_signo = sig;
        si.si_code = libc::SI_QUEUE;
        // si_pid/si_uid/si_value sit after the three ints; write the value through the
        // sigqueue layout: { si_pid: i32, si_uid: u32, si_value: sigval }.
        let base = (&mut si as *mut libc::siginfo_t).cast::<u8>().add(16);
        base.cast::<i32>().write(pid);
        base.add(4).cast::<u32>().write(libc::getuid());
        base.add(8).cast::<u64>().write(value);
        libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, sig, &si) == 0
    }
}

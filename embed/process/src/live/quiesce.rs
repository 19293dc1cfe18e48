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
    note_answer(&SCAN_ANSWERS);
    rounds.answer(round, inside);
}

/// Which threads answered (or parked) in the current round: for the emulator's bookkeeping.
pub(super) struct Answers {
    ids: [AtomicU64; 1024],
    next: AtomicU64,
}

impl Answers {
    pub(super) const fn new() -> Self {
        Self {
            ids: [const { AtomicU64::new(0) }; 1024],
            next: AtomicU64::new(0),
        }
    }
    pub(super) fn reset(&self) {
        self.next.store(0, Ordering::SeqCst);
    }
    fn all(&self) -> Vec<u64> {
        let n = (self.next.load(Ordering::SeqCst) as usize).min(self.ids.len());
        self.ids[..n]
            .iter()
            .map(|i| i.load(Ordering::SeqCst))
            .collect()
    }
}

pub(super) static SCAN_ANSWERS: Answers = Answers::new();

/// Records the calling thread in `answers` (from a signal handler: two atomic stores).
pub(super) fn note_answer(answers: &Answers) {
    let slot = answers.next.fetch_add(1, Ordering::SeqCst) as usize;
    if let Some(id) = answers.ids.get(slot) {
        // SAFETY: gettid has no preconditions.
        id.store(unsafe { libc::gettid() } as u64, Ordering::SeqCst);
    }
}

/// For the emulator only (`isa::emulated`): threads in `/proc/self/task` that never answer a
/// signal — qemu-user's own (its RCU thread), which run no guest code — found when a round
/// times out and left out of every later round and stop. On hardware this list stays empty:
/// every task is a program thread, and one that does not answer is waited for.
static NOT_GUEST: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// The other threads to signal: every task but the caller (and, under emulation, but the
/// emulator's own).
pub(super) fn other_threads() -> Vec<libc::pid_t> {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let skip = NOT_GUEST.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|t| *t != me && !skip.contains(t))
        .collect()
}

/// Under emulation, after a round that timed out: the threads of `sent` that did not answer
/// are the emulator's (see [`NOT_GUEST`]).
pub(super) fn note_silent(sent: &[libc::pid_t], answers: &Answers) {
    if !isa::emulated() {
        return;
    }
    let answered = answers.all();
    NOT_GUEST
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(sent.iter().filter(|t| !answered.contains(&(**t as u64))));
}

/// One scan: signals every other thread of the process and waits for their answers. Returns
/// `true` if all answered and none was inside.
pub(super) fn scan() -> bool {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let rounds = rounds();
    let round = rounds.begin();
    SCAN_ANSWERS.reset();
    let threads = other_threads();
    let mut sent = 0u64;
    let mut sent_to = Vec::with_capacity(threads.len());
    for tid in threads {
        if signal_thread(pid, tid, quiesce_signal(), u64::from(round)) {
            sent += 1;
            sent_to.push(tid);
        }
    }
    // Threads answer from their handler; a thread that exits meanwhile never does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    while rounds.answered(round) < sent {
        if std::time::Instant::now() > deadline {
            note_silent(&sent_to, &SCAN_ANSWERS);
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

//! Measuring one contender at one thread count: hitters, churn writers, a timed window.
//!
//! Each hitting thread walks its own stream of targets (the same stream for every contender) in
//! chunks of [`CHUNK`] hits, publishing its running count after each chunk in its own padded
//! slot. Two writer threads pace registrations/unregistrations and maps/unmaps to the requested
//! rates (each as many as it can when it falls behind; the report shows what they achieved), and
//! for a contender whose RCU domain does not run its own callbacks a third thread runs a grace
//! period every [`GRACE_PERIOD_EVERY`], so the writers never wait for a reader. The main
//! thread lets everything run for the warm-up, snapshots the counts, sleeps the measured window,
//! snapshots again and stops everyone: hits/s is the difference over the measured time only.
//! After joining, every thread's registers are checked: one consumer call per hit, each with the
//! tag of the probe the stream named — a contender that skipped or misfound a hit fails the run.

use crate::contenders::{Contender, GRACE_PERIOD_EVERY, Probes};
use crate::workload::{Regs, Target, Workload};
use probe_core::lock::CachePadded;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Hits between two publications of a thread's count (and checks of the stop flag).
pub const CHUNK: usize = 256;

/// How long and how hard to run one point.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Run before the measured window (not counted).
    pub warmup: Duration,
    /// The measured window.
    pub measure: Duration,
    /// Probe registrations + unregistrations per second (0: none).
    pub churn: u64,
    /// Maps + unmaps per second (0: none).
    pub mm_churn: u64,
}

/// What one point measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Hits per second, all threads together.
    pub hits_per_s: f64,
    /// Registrations + unregistrations per second achieved during the window.
    pub churn_per_s: f64,
    /// Maps + unmaps per second achieved during the window.
    pub mm_churn_per_s: f64,
    /// CPU seconds the writer threads used per second of the window (1.0: one whole vCPU) —
    /// taken from the hitters on a machine with as many hitters as cores.
    pub writer_cpu: f64,
    /// CPU seconds the hitting threads got per second of the window.
    pub hitter_cpu: f64,
    /// Grace periods per second the grace-period thread completed during the window (0 for a
    /// contender whose domain runs its own callbacks, or that has none).
    pub grace_periods_per_s: f64,
}

/// CPU time a running thread has used so far, in seconds (its `pthread_getcpuclockid` clock);
/// 0 if the clock cannot be read.
fn thread_cpu(t: libc::pthread_t) -> f64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `t` is a live thread (its handle is not joined yet); `clock` is a valid out pointer.
    if unsafe { libc::pthread_getcpuclockid(t, &mut clock) } != 0 {
        return 0.0;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and out pointer.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs `c` on `threads` hitting threads for one window; checks every hit's answer.
///
/// # Panics
///
/// If a hit found no probe or the wrong one (the contender is broken, and its figure would lie).
pub fn measure<C: Contender>(
    c: &C,
    w: &Workload,
    p: &Probes,
    threads: usize,
    win: Window,
) -> Sample {
    let counts: Vec<CachePadded<AtomicU64>> = (0..threads)
        .map(|_| CachePadded::new(AtomicU64::new(0)))
        .collect();
    let churned = CachePadded::new(AtomicU64::new(0));
    let mm_churned = CachePadded::new(AtomicU64::new(0));
    let stop = AtomicBool::new(false);
    // Each thread's pthread id, for its CPU clock (hitters; the two writers and the grace-period
    // thread).
    let hitter_ids: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
    let writer_ids = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    let grace_periods = CachePadded::new(AtomicU64::new(0));
    let snapshot = |counts: &[CachePadded<AtomicU64>]| -> u64 {
        // Relaxed: a count is a statistic; exactness comes from the checks after joining.
        counts.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    };
    std::thread::scope(|s| {
        let hitters: Vec<_> = (0..threads)
            .map(|t| {
                let (count, stop, id) = (&counts[t], &stop, &hitter_ids[t]);
                let stream = w.stream(t);
                s.spawn(move || {
                    // Relaxed: see `cpu`.
                    // SAFETY: pthread_self has no preconditions.
                    id.store(unsafe { libc::pthread_self() } as u64, Ordering::Relaxed);
                    hit_loop(c, stream, count, stop)
                })
            })
            .collect();
        // One writer per kind of churn, so a contender whose registrations are slow (a whole
        // map copied per write) does not also slow its address-space churn.
        // A round is one register + one unregister, or one map + one unmap: two operations.
        let period = |rate: u64| (rate > 0).then(|| Duration::from_secs_f64(2.0 / rate as f64));
        let writers = [
            period(win.churn).map(|pr| {
                let (churned, stop, id) = (&churned, &stop, &writer_ids[0]);
                s.spawn(move || {
                    // Relaxed: see `cpu`.
                    // SAFETY: pthread_self has no preconditions.
                    id.store(unsafe { libc::pthread_self() } as u64, Ordering::Relaxed);
                    writer_loop(pr, churned, stop, |i| {
                        let k = i % w.churn.len();
                        c.register(&w.churn[k], &p.churn[k]);
                        c.unregister(&w.churn[k], &p.churn[k]);
                    })
                })
            }),
            period(win.mm_churn).map(|pm| {
                let (mm_churned, stop, id) = (&mm_churned, &stop, &writer_ids[1]);
                s.spawn(move || {
                    // Relaxed: see `cpu`.
                    // SAFETY: pthread_self has no preconditions.
                    id.store(unsafe { libc::pthread_self() } as u64, Ordering::Relaxed);
                    writer_loop(pm, mm_churned, stop, |_| {
                        c.map(&w.churn_mapping);
                        c.unmap(&w.churn_mapping);
                    })
                })
            }),
        ];
        // The grace periods of a domain that does not run its own callbacks, from a thread of
        // their own (a kernel's grace-period kthread): the writers only queue callbacks and
        // never wait for a reader, and the barrier's cost on the hitters and this thread's CPU
        // (counted with the writers') are inside the window.
        let grace = c.needs_grace_periods().then(|| {
            let (done, stop, id) = (&grace_periods, &stop, &writer_ids[2]);
            s.spawn(move || {
                // Relaxed: see `cpu`.
                // SAFETY: pthread_self has no preconditions.
                id.store(unsafe { libc::pthread_self() } as u64, Ordering::Relaxed);
                let mut next = Instant::now() + GRACE_PERIOD_EVERY;
                // Relaxed: see `measure`.
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(5)));
                        continue;
                    }
                    c.grace_period();
                    next = Instant::now() + GRACE_PERIOD_EVERY;
                    // Relaxed: a statistic for `measure`.
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        });
        // Relaxed: each thread's own id, stored at its start, long before the warm-up ends (a
        // thread not started yet reads as 0 and counts nothing).
        let cpu = |ids: &[AtomicU64]| {
            ids.iter()
                .map(|i| i.load(Ordering::Relaxed))
                .filter(|&i| i != 0)
                .map(|i| thread_cpu(i as libc::pthread_t))
                .sum::<f64>()
        };
        std::thread::sleep(win.warmup);
        let (wcpu0, hcpu0) = (cpu(&writer_ids), cpu(&hitter_ids));
        let (h0, c0, m0, g0, t0) = (
            snapshot(&counts),
            churned.load(Ordering::Relaxed),
            mm_churned.load(Ordering::Relaxed),
            grace_periods.load(Ordering::Relaxed),
            Instant::now(),
        );
        std::thread::sleep(win.measure);
        let (h1, c1, m1, g1, dt) = (
            snapshot(&counts),
            churned.load(Ordering::Relaxed),
            mm_churned.load(Ordering::Relaxed),
            grace_periods.load(Ordering::Relaxed),
            t0.elapsed().as_secs_f64(),
        );
        let (wcpu1, hcpu1) = (cpu(&writer_ids), cpu(&hitter_ids));
        // Relaxed: the flag carries no data; joins order everything after it.
        stop.store(true, Ordering::Relaxed);
        for (t, h) in hitters.into_iter().enumerate() {
            let (calls, regs) = h.join().expect("hitting thread panicked");
            let stream = w.stream(t);
            let full = Workload::expected(stream);
            let part = Workload::expected(&stream[..(calls % stream.len() as u64) as usize]);
            let rounds = calls / stream.len() as u64;
            assert_eq!(
                regs,
                Regs {
                    hits: full.hits * rounds + part.hits,
                    sum: full.sum.wrapping_mul(rounds).wrapping_add(part.sum),
                },
                "{}: thread {t} made {calls} hits but its consumers saw something else",
                c.name()
            );
        }
        for wr in writers.into_iter().flatten() {
            wr.join().expect("churn thread panicked");
        }
        if let Some(g) = grace {
            g.join().expect("grace-period thread panicked");
        }
        Sample {
            hits_per_s: (h1 - h0) as f64 / dt,
            churn_per_s: (c1 - c0) as f64 / dt,
            mm_churn_per_s: (m1 - m0) as f64 / dt,
            writer_cpu: (wcpu1 - wcpu0) / dt,
            hitter_cpu: (hcpu1 - hcpu0) / dt,
            grace_periods_per_s: (g1 - g0) as f64 / dt,
        }
    })
}

fn hit_loop<C: Contender>(
    c: &C,
    stream: &[Target],
    count: &AtomicU64,
    stop: &AtomicBool,
) -> (u64, Regs) {
    let mut local = c.local();
    let mut regs = Regs::default();
    let mut n = 0u64;
    // Relaxed: see `measure`.
    while !stop.load(Ordering::Relaxed) {
        for chunk in stream.chunks(CHUNK) {
            for t in chunk {
                c.hit(&mut local, t, &mut regs);
            }
            n += chunk.len() as u64;
            // Relaxed: read by `measure`'s snapshots, a statistic.
            count.store(n, Ordering::Relaxed);
        }
    }
    (n, regs)
}

/// A writer thread: every `period`, one round of `op` (two operations), counted in `done`.
fn writer_loop(period: Duration, done: &AtomicU64, stop: &AtomicBool, mut op: impl FnMut(usize)) {
    let mut next = Instant::now();
    let mut round = 0usize;
    // Relaxed: see `measure`.
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            op(round);
            round += 1;
            // Relaxed: a statistic for `measure`.
            done.store(2 * round as u64, Ordering::Relaxed);
            // Behind schedule: the next round is due at once (as many as it can).
            next += period;
        } else {
            std::thread::sleep((next - now).min(Duration::from_millis(5)));
        }
    }
}

/// A contender as the report drives it: measured at a point, or checked once.
pub trait Measure {
    /// Name in the report.
    fn name(&self) -> &'static str;
    /// See [`measure`].
    fn measure(&self, w: &Workload, p: &Probes, threads: usize, win: Window) -> Sample;
    /// Hits every target of thread 0's stream once, without churn; the registers after.
    fn check(&self, w: &Workload) -> Regs;
    /// Hits thread 0's stream `passes` times on this thread, inside [`counted_hits`] (what
    /// `contention --instructions` has callgrind count).
    fn counted(&self, w: &Workload, passes: usize) -> Regs;
    /// Makes this thread's state, calls `made` (where the caller waits until every traced
    /// thread has made its own, so no two share a reader slot: a reader handle dropped before
    /// another thread registers would be reused by it), makes one warm pass of thread 0's
    /// stream, then calls `start`, makes one more pass and calls `end`: the window
    /// `contention --shared-stores` traces holds hits only.
    fn traced(&self, w: &Workload, made: &dyn Fn(), start: &dyn Fn(), end: &dyn Fn()) -> Regs;
}

/// The hit loop callgrind counts (`--toggle-collect=*counted_hits*`): `passes` passes over
/// `stream` on one thread, nothing else (the thread's state, `local` — a private copy, for the
/// ceiling — is made before). Never inlined, so that it has a name to toggle on.
#[inline(never)]
pub fn counted_hits<'a, C: Contender>(
    c: &'a C,
    local: &mut C::Local<'a>,
    stream: &[Target],
    passes: usize,
) -> Regs {
    let mut regs = Regs::default();
    for _ in 0..passes {
        for t in stream {
            c.hit(local, t, &mut regs);
        }
    }
    regs
}

impl<C: Contender> Measure for C {
    fn name(&self) -> &'static str {
        Contender::name(self)
    }
    fn measure(&self, w: &Workload, p: &Probes, threads: usize, win: Window) -> Sample {
        measure(self, w, p, threads, win)
    }
    fn counted(&self, w: &Workload, passes: usize) -> Regs {
        let mut local = self.local();
        counted_hits(self, &mut local, w.stream(0), passes)
    }
    fn traced(&self, w: &Workload, made: &dyn Fn(), start: &dyn Fn(), end: &dyn Fn()) -> Regs {
        let mut local = self.local();
        made();
        let warm = counted_hits(self, &mut local, w.stream(0), 1);
        start();
        let r = counted_hits(self, &mut local, w.stream(0), 1);
        end();
        std::hint::black_box(warm);
        r
    }
    fn check(&self, w: &Workload) -> Regs {
        let mut local = self.local();
        let mut regs = Regs::default();
        for t in w.stream(0) {
            self.hit(&mut local, t, &mut regs);
        }
        regs
    }
}

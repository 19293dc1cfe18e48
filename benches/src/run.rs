//! Measuring one contender at one thread count: hitters, churn writers, a timed window.
//!
//! Each hitting thread walks its own stream of targets (the same stream for every contender) in
//! chunks of [`CHUNK`] hits, publishing its running count after each chunk in its own padded
//! slot. Two writer threads pace registrations/unregistrations and maps/unmaps to the requested
//! rates (each as many as it can when it falls behind; the report shows what they achieved). The main
//! thread lets everything run for the warm-up, snapshots the counts, sleeps the measured window,
//! snapshots again and stops everyone: hits/s is the difference over the measured time only.
//! After joining, every thread's registers are checked: one consumer call per hit, each with the
//! tag of the probe the stream named — a contender that skipped or misfound a hit fails the run.

use crate::contenders::{Contender, Probes};
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
    let snapshot = |counts: &[CachePadded<AtomicU64>]| -> u64 {
        // Relaxed: a count is a statistic; exactness comes from the checks after joining.
        counts.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    };
    std::thread::scope(|s| {
        let hitters: Vec<_> = (0..threads)
            .map(|t| {
                let (count, stop) = (&counts[t], &stop);
                let stream = w.stream(t);
                s.spawn(move || hit_loop(c, stream, count, stop))
            })
            .collect();
        // One writer per kind of churn, so a contender whose registrations are slow (a whole
        // map copied per write) does not also slow its address-space churn.
        // A round is one register + one unregister, or one map + one unmap: two operations.
        let period = |rate: u64| (rate > 0).then(|| Duration::from_secs_f64(2.0 / rate as f64));
        let writers = [
            period(win.churn).map(|pr| {
                let (churned, stop) = (&churned, &stop);
                s.spawn(move || {
                    writer_loop(pr, churned, stop, |i| {
                        let k = i % w.churn.len();
                        c.register(&w.churn[k], &p.churn[k]);
                        c.unregister(&w.churn[k], &p.churn[k]);
                    })
                })
            }),
            period(win.mm_churn).map(|pm| {
                let (mm_churned, stop) = (&mm_churned, &stop);
                s.spawn(move || {
                    writer_loop(pm, mm_churned, stop, |_| {
                        c.map(&w.churn_mapping);
                        c.unmap(&w.churn_mapping);
                    })
                })
            }),
        ];
        std::thread::sleep(win.warmup);
        let (h0, c0, m0, t0) = (
            snapshot(&counts),
            churned.load(Ordering::Relaxed),
            mm_churned.load(Ordering::Relaxed),
            Instant::now(),
        );
        std::thread::sleep(win.measure);
        let (h1, c1, m1, dt) = (
            snapshot(&counts),
            churned.load(Ordering::Relaxed),
            mm_churned.load(Ordering::Relaxed),
            t0.elapsed().as_secs_f64(),
        );
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
        Sample {
            hits_per_s: (h1 - h0) as f64 / dt,
            churn_per_s: (c1 - c0) as f64 / dt,
            mm_churn_per_s: (m1 - m0) as f64 / dt,
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
}

impl<C: Contender> Measure for C {
    fn name(&self) -> &'static str {
        Contender::name(self)
    }
    fn measure(&self, w: &Workload, p: &Probes, threads: usize, win: Window) -> Sample {
        measure(self, w, p, threads, win)
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

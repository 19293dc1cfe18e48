//! The live embedding's quiescence scan (`probe_core::scan::ScanRounds`): the optimizer
//! must never free a trampoline while a thread is inside it.
//!
//! Threads: a scanner and two workers (preemption bound 2). Signals are modelled as per-worker
//! queues (real-time signals queue, each with its round number) that the worker polls between
//! its steps (a signal is delivered at an instruction boundary); a worker answers with whether
//! it is inside the trampoline at that moment, as the real handler reads the interrupted RIP.
//! The scanner waits a bounded time for a round's answers and abandons it after (the real scan's
//! timeout), and gives up after a few rounds without freeing: safety is checked, not liveness. Each worker may enter the trampoline while its entry (the jump) is
//! still in the code, and leaves it later.
//!
//! The scanner runs one round it abandons at once (its signals arrive late), takes the entry
//! out, then scans until a complete round has no busy answer, and frees.
//! Checked: no worker is inside when the trampoline is freed. Seeded bug: `ScanAnswerAnyRound`
//! (a late answer to the abandoned round counts for the new one).

#![cfg(loom)]

mod common;

use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use loom::thread;
use probe_core::scan::ScanRounds;
use probe_core::seeded::Bug;
use std::sync::Arc;

/// Preemption bound: three threads.
const PREEMPTIONS: usize = 2;
/// Rounds the scanner tries before giving up (without freeing), and how long it waits for a
/// round's answers (in yields) before abandoning it — the real scan's timeout.
const ROUNDS: usize = 2;
const PATIENCE: usize = 1;
/// Signals a worker can have queued: the abandoned round's and one per round.
const QUEUE: usize = ROUNDS + 1;

struct World {
    rounds: ScanRounds,
    /// The jump into the trampoline is in the code.
    entry: AtomicBool,
    inside: [AtomicBool; 2],
    /// Per worker, the signals sent to it in order (real-time signals queue, each with its
    /// round); 0 = not sent yet.
    queue: [[AtomicU32; QUEUE]; 2],
}

/// A worker: answers each signal with whether it is inside at that moment, as the real
/// handler reads the interrupted RIP. Signals are delivered between its steps.
fn worker(w: &World, me: usize) {
    let mut next = 0;
    let mut poll = || {
        while next < QUEUE {
            let r = w.queue[me][next].load(Ordering::SeqCst);
            if r == 0 {
                break;
            }
            w.rounds.answer(r, w.inside[me].load(Ordering::SeqCst));
            next += 1;
        }
    };
    poll();
    if w.entry.load(Ordering::SeqCst) {
        w.inside[me].store(true, Ordering::SeqCst);
    }
    poll();
    w.inside[me].store(false, Ordering::SeqCst);
    // It keeps answering for a while (long enough for the scanner's patience).
    for _ in 0..PATIENCE + 1 {
        poll();
        thread::yield_now();
    }
}

/// Returns `Some(workers found inside)` if the scanner freed the trampoline, `None` if it gave
/// up (allowed: the real one retries later).
fn scanner(w: &World) -> Option<Vec<usize>> {
    // A round abandoned without waiting (it timed out): its signals arrive late.
    let old = w.rounds.begin();
    for q in &w.queue {
        q[0].store(old, Ordering::SeqCst);
    }
    // The jump goes out (and membarrier: every worker sees it from its next instruction).
    w.entry.store(false, Ordering::SeqCst);
    for i in 1..=ROUNDS {
        let r = w.rounds.begin();
        for q in &w.queue {
            q[i].store(r, Ordering::SeqCst);
        }
        let mut waited = 0;
        while w.rounds.answered(r) < 2 && waited < PATIENCE {
            thread::yield_now();
            waited += 1;
        }
        if w.rounds.answered(r) == 2 && !w.rounds.busy() {
            // Free: nobody may be inside now.
            return Some(
                (0..2)
                    .filter(|&k| w.inside[k].load(Ordering::SeqCst))
                    .collect(),
            );
        }
    }
    None
}

/// Executions explored, and those in which the scanner freed (coverage: the model must reach
/// the free, or it proves nothing).
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static FREED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn model() {
    RUNS.store(0, std::sync::atomic::Ordering::Relaxed);
    FREED.store(0, std::sync::atomic::Ordering::Relaxed);
    common::bounded(PREEMPTIONS).check(|| {
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let w = Arc::new(World {
            rounds: ScanRounds::new(),
            entry: AtomicBool::new(true),
            inside: [AtomicBool::new(false), AtomicBool::new(false)],
            queue: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU32::new(0))),
        });
        let workers: Vec<_> = (0..2)
            .map(|me| {
                let w = w.clone();
                thread::spawn(move || worker(&w, me))
            })
            .collect();
        let freed = scanner(&w);
        for t in workers {
            t.join().unwrap();
        }
        if let Some(inside) = freed {
            FREED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert!(
                inside.is_empty(),
                "use after free: trampoline freed with worker(s) {inside:?} inside"
            );
        }
    });
}

#[test]
fn trampoline_freed_only_when_no_thread_is_inside() {
    model();
    let (runs, freed) = (
        RUNS.load(std::sync::atomic::Ordering::Relaxed),
        FREED.load(std::sync::atomic::Ordering::Relaxed),
    );
    println!("scan: {runs} executions, {freed} of them freed (preemption bound {PREEMPTIONS})");
    assert!(freed > 0, "the model never reached the free");
}

#[test]
fn seeded_late_answer_counts_for_the_new_round() {
    common::must_catch(Bug::ScanAnswerAnyRound, model);
}

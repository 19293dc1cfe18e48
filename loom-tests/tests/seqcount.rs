//! `SeqCount`: a reader that validates never accepts a torn snapshot.
//!
//! Two threads (one writer, one reader); unbounded preemption.

#![cfg(loom)]

use loom::thread;
use probe_core::seeded::Bug;
use probe_core::seqcount::SeqCount;
use probe_core::sync::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

mod common;

struct Shared {
    seq: SeqCount,
    a: AtomicU64,
    b: AtomicU64,
}

/// The writer keeps `a == b` outside its section; a validated reader must see them equal.
///
/// Also checks coverage: across all executions the reader must have met the writer inside its
/// section (`try_begin` failing), and validated a snapshot both before and after the write —
/// otherwise loom did not explore the interleavings this model exists for.
fn model() {
    let must_see = &["validated old", "validated new", "retry", "writer inside"];
    common::explore("seqcount", common::unbounded(), must_see, || {
        let s = Arc::new(Shared {
            seq: SeqCount::new(),
            a: AtomicU64::new(0),
            b: AtomicU64::new(0),
        });
        let w = {
            let s = s.clone();
            thread::spawn(move || {
                // SAFETY: the only writer.
                let g = unsafe { s.seq.write_begin() };
                s.a.store(1, Relaxed);
                s.b.store(1, Relaxed);
                drop(g);
            })
        };
        let outcome = match s.seq.try_begin() {
            None => "writer inside",
            Some(t) => {
                let a = s.a.load(Relaxed);
                let b = s.b.load(Relaxed);
                if s.seq.validate(t) {
                    assert_eq!(a, b, "validated a torn snapshot");
                    if a == 0 {
                        "validated old"
                    } else {
                        "validated new"
                    }
                } else {
                    "retry"
                }
            }
        };
        w.join().unwrap();
        outcome
    });
}

#[test]
fn seqcount_readers_never_accept_torn_data() {
    model();
}

#[test]
fn seeded_writer_begin_not_ordered_before_data() {
    common::must_catch(Bug::SeqWriterBeginUnordered, model);
}

#[test]
fn seeded_reader_accepts_odd_sequence() {
    common::must_catch(Bug::SeqReaderAcceptsOdd, model);
}

#[test]
fn seeded_reader_recheck_without_acquire_fence() {
    common::must_catch(Bug::SeqReaderNoFence, model);
}

/// The retrying reader (`SeqCount::read`) also only returns consistent snapshots, and terminates.
#[test]
fn seqcount_retrying_reader() {
    loom::model(|| {
        let s = Arc::new(Shared {
            seq: SeqCount::new(),
            a: AtomicU64::new(0),
            b: AtomicU64::new(0),
        });
        let w = {
            let s = s.clone();
            thread::spawn(move || {
                for i in 1..=2 {
                    // SAFETY: the only writer.
                    let g = unsafe { s.seq.write_begin() };
                    s.a.store(i, Relaxed);
                    s.b.store(i, Relaxed);
                    drop(g);
                }
            })
        };
        let (a, b) = s.seq.read(|| (s.a.load(Relaxed), s.b.load(Relaxed)));
        assert_eq!(a, b);
        w.join().unwrap();
    });
}

//! The process embedding's aarch64 stop (`embed/process/src/live/isa_aarch64.rs`,
//! `StopThreads`): the stopper signals every other thread, waits until each has parked in its
//! handler (`PARKED`), makes a change no thread may execute halfway (two words, stored one at a
//! time), publishes the generation (`RELEASE`) and waits until they have left. A replica of that
//! handshake (the embedding is std + libc code loom cannot build), with the same SeqCst
//! orderings: the parker "executes" the code (reads both words) before its signal and after its
//! release; what must hold is that it never sees the change half made, and sees it whole after.
//!
//! Seeded: the stopper does not wait for the park (what the emulator-only timeout would be on
//! hardware) — the parker reads a torn pair.
//!
//! Two threads, unbounded.

#![cfg(loom)]

use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use loom::thread;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

const OLD: (u32, u32) = (1, 2);
const NEW: (u32, u32) = (3, 4);

fn model(wait_for_park: bool) {
    loom::model(move || {
        let code = Arc::new((AtomicU32::new(OLD.0), AtomicU32::new(OLD.1)));
        let parked = Arc::new(AtomicU64::new(0));
        let release = Arc::new(AtomicU64::new(0));
        let parker = {
            let (code, parked, release) = (code.clone(), parked.clone(), release.clone());
            thread::spawn(move || {
                // Running the code until the signal arrives. Relaxed: the code words are only
                // ever ordered by the handshake's SeqCst operations (as instruction fetch is by
                // the exception return).
                let before = (
                    code.0.load(Ordering::Relaxed),
                    code.1.load(Ordering::Relaxed),
                );
                assert!(before == OLD || before == NEW, "torn snapshot: {before:?}");
                // `on_stop`: park, wait for this generation, leave.
                parked.fetch_add(1, Ordering::SeqCst);
                while release.load(Ordering::SeqCst) < 1 {
                    thread::yield_now();
                }
                parked.fetch_sub(1, Ordering::SeqCst);
                // Relaxed: as above.
                let after = (
                    code.0.load(Ordering::Relaxed),
                    code.1.load(Ordering::Relaxed),
                );
                assert_eq!(
                    after, NEW,
                    "stale cache: the change is not whole after the release"
                );
            })
        };
        // `stop_machine`.
        if wait_for_park {
            while parked.load(Ordering::SeqCst) < 1 {
                thread::yield_now();
            }
        }
        // Relaxed: published by the SeqCst release store below.
        code.0.store(NEW.0, Ordering::Relaxed);
        code.1.store(NEW.1, Ordering::Relaxed);
        release.store(1, Ordering::SeqCst);
        while parked.load(Ordering::SeqCst) != 0 {
            thread::yield_now();
        }
        parker.join().unwrap();
    });
}

#[test]
fn stop_parks_every_thread_around_the_change() {
    model(true);
}

#[test]
fn seeded_stop_without_waiting_for_the_park() {
    let r = catch_unwind(AssertUnwindSafe(|| model(false)));
    let err = r.expect_err("the model did not catch the stopper that does not wait");
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        msg.contains("torn snapshot"),
        "caught for another reason: {msg}"
    );
}

//! The spinlock behind `Lock` and the hashed lock table: mutual exclusion with acquire/release.
//!
//! Two threads, unbounded.

#![cfg(loom)]

mod common;
use loom::thread;
use probe_core::lock::{Lock, SpinLock};
use probe_core::seeded::Bug;
use std::sync::Arc;

fn model() {
    let runs = common::Executions::new("lock");
    let count = runs.counter();
    loom::model(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let l = Arc::new(Lock::<SpinLock, u32>::new(SpinLock::new(), 0));
        let t = {
            let l = l.clone();
            thread::spawn(move || *l.lock() += 1)
        };
        *l.lock() += 1;
        t.join().unwrap();
        assert_eq!(*l.lock(), 2, "lost update");
    });
}

#[test]
fn spinlock_excludes() {
    model();
}

#[test]
fn seeded_unlock_relaxed() {
    common::must_catch(Bug::LockUnlockRelaxed, model);
}

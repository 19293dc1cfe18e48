//! `DeferredStack`: callbacks pushed from any context while the grace-period side takes them.
//!
//! A pusher writes data (a loom `UnsafeCell`) and pushes a callback that reads it; the main
//! thread pushes one of its own and takes the stack, runs what it took, joins, and takes again.
//! What must hold: every callback runs exactly once, oldest first within a take, and sees what
//! was written before its push.
//!
//! Seeded: the push's compare-exchange Relaxed instead of Release (the taker runs a callback
//! without seeing what it captured).
//!
//! Two threads, unbounded.

#![cfg(loom)]

mod common;
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use probe_core::rcu::{Deferred, DeferredStack};
use probe_core::seeded::Bug;
use std::sync::Arc;

/// Data a callback reads: written before the push, through loom's cell so an unordered read is a
/// detected race.
struct Payload(UnsafeCell<u64>);
// SAFETY: accessed as the model says (written before the push, read by the callback); loom checks
// the claim.
unsafe impl Sync for Payload {}
// SAFETY: as above.
unsafe impl Send for Payload {}

fn model() {
    common::explore(
        "deferred stack: push vs take",
        common::unbounded(),
        &[0, 1],
        || {
            let stack = Arc::new(DeferredStack::new());
            let ran = Arc::new(AtomicUsize::new(0));
            let pusher = {
                let (stack, ran) = (stack.clone(), ran.clone());
                thread::spawn(move || {
                    let data = Arc::new(Payload(UnsafeCell::new(0)));
                    // SAFETY: nobody else can reach `data` before the push below.
                    data.0.with_mut(|p| unsafe { *p = 42 });
                    let d = Deferred::new(move || {
                        // SAFETY: written before the push; the take's Acquire orders it before us.
                        assert_eq!(data.0.with(|p| unsafe { *p }), 42);
                        ran.fetch_add(1, Ordering::Relaxed);
                    })
                    .unwrap();
                    stack.push(d);
                })
            };
            let r2 = ran.clone();
            stack.push(
                Deferred::new(move || {
                    r2.fetch_add(10, Ordering::Relaxed);
                })
                .unwrap(),
            );
            let first = stack.take_all();
            let took = first.len();
            first.run_all();
            pusher.join().unwrap();
            let rest = stack.take_all();
            assert_eq!(took + rest.len(), 2, "a callback lost or taken twice");
            rest.run_all();
            assert_eq!(
                ran.load(Ordering::Relaxed),
                11,
                "a callback lost update: ran != 11"
            );
            assert!(stack.take_all().is_empty());
            // Whether the pusher's callback made the first take.
            took - 1
        },
    );
}

#[test]
fn push_vs_take() {
    model();
}

#[test]
fn seeded_push_relaxed() {
    common::must_catch(Bug::DeferredPushRelaxed, model);
}

//! Installing and removing breakpoints racing with hits (Invariant 4 as the hit path sees it):
//! after registration returns, a hit at the address finds the probe; a hit on our breakpoint is
//! never "not ours"; after unregistration's `sync`, no hit calls the consumer.
//!
//! Two threads each, unbounded.

#![cfg(loom)]

mod common;
use common::{Seen, Tracked, X, hit, key, world};
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;
use probe_core::seeded::Bug;
use std::sync::Arc;

const A: u64 = 0x40;

/// A registration racing a hit: before it, the hit restarts (no trap there); once `register`
/// returned, the hit runs the probe. Never "not ours".
fn register_vs_hit() {
    common::explore(
        "register vs hit",
        common::unbounded(),
        &[Seen::Restart, Seen::Run(X, A)],
        move || {
            let (u, mm) = world();
            let done = Arc::new(AtomicBool::new(false));
            let w = {
                let (u, done) = (u.clone(), done.clone());
                thread::spawn(move || {
                    u.register(key(X, A), Tracked::new()).unwrap();
                    done.store(true, Ordering::Release);
                })
            };
            let registered = done.load(Ordering::Acquire);
            let got = hit(&u, &mm, A);
            // Join first: a loom thread must not outlive a failing execution.
            w.join().unwrap();
            assert_ne!(
                got,
                Seen::NotOurs,
                "a trap with no program trap there answered not ours"
            );
            if registered {
                assert_eq!(
                    got,
                    Seen::Run(X, A),
                    "registration returned, yet the hit missed"
                );
            }
            got
        },
    );
}

#[test]
fn register_races_hit() {
    register_vs_hit();
}

#[test]
fn seeded_miss_is_not_ours_without_trap_check() {
    common::must_catch(Bug::ResolveMissIsNotOurs, register_vs_hit);
}

/// An unregistration (+ sync) racing a hit: the hit runs the probe or restarts, never "not ours";
/// after `sync` returned, the consumer is never called (it is marked freed then).
fn unregister_vs_hit() {
    common::explore(
        "unregister vs hit",
        common::unbounded(),
        &[Seen::Restart, Seen::Run(X, A)],
        move || {
            let (u, mm) = world();
            let c = Tracked::new();
            u.register(key(X, A), c.clone()).unwrap();
            let w = {
                let (u, c) = (u.clone(), c.clone());
                thread::spawn(move || {
                    u.unregister(&key(X, A), &c).unwrap();
                    u.sync();
                    c.check.mark_freed();
                })
            };
            let got = hit(&u, &mm, A);
            // Join first: a loom thread must not outlive a failing execution.
            w.join().unwrap();
            assert_ne!(got, Seen::NotOurs, "our own breakpoint answered not ours");
            got
        },
    );
}

#[test]
fn unregister_races_hit() {
    unregister_vs_hit();
}

#[test]
fn seeded_probe_leaves_before_its_breakpoints() {
    common::must_catch(Bug::UnregisterDropsProbeFirst, unregister_vs_hit);
}

#[test]
fn seeded_sync_does_not_wait_so_consumer_runs_after_unregister() {
    common::must_catch(Bug::RcuNoGracePeriod, unregister_vs_hit);
}

/// A registration racing a fork: the child ends up with the breakpoint, whichever goes first —
/// it inherits the parent's code if the walk came first, or the walk finds it in the reverse map
/// if the fork came first. (And symmetrically for unregistration, by the same gate.)
fn register_vs_fork() {
    common::explore(
        "register vs fork",
        common::unbounded(),
        &[0xCC],
        move || {
            let (u, mm) = world();
            let w = {
                let u = u.clone();
                thread::spawn(move || u.register(key(X, A), Tracked::new()).unwrap())
            };
            let child = u.fork(&mm, probe_core::mm::MmId(2)).unwrap();
            w.join().unwrap();
            let vma = child.mappings()[0];
            let byte = u.text().byte(child.id(), &vma, A);
            assert_eq!(
                byte, 0xCC,
                "a fork racing a registration produced a child that misses the breakpoint (hit missed)"
            );
            byte
        },
    );
}

#[test]
fn register_races_fork() {
    register_vs_fork();
}

#[test]
fn seeded_fork_without_the_gate() {
    common::must_catch(Bug::ForkWithoutGate, register_vs_fork);
}

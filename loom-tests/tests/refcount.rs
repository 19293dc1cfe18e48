//! Probe reference counts: increment-not-zero never resurrects a dying probe, so a counted
//! reference is never used after the probe's free (Invariant 2, and the dying-node rule).
//!
//! Two threads: a hit that takes a counted reference and uses it beyond its read section, and an
//! unregistration that drops the last reference, removes the probe and waits a grace period
//! (after which the free runs). Unbounded.

#![cfg(loom)]

mod common;
use common::{Reg, Tracked, key};
use loom::thread;
use probe_core::rcu::{Rcu, SlotRcu};
use probe_core::seeded::Bug;
use std::sync::Arc;

fn model() {
    common::explore("refcount", common::unbounded(), &[false, true], move || {
        let reg = Arc::new(Reg::new(SlotRcu::new()));
        let c = Tracked::new();
        let k = key(1, 0x40);
        reg.register(k, c.clone()).unwrap();
        let hit = {
            let reg = reg.clone();
            thread::spawn(move || {
                let r = reg.rcu().register().unwrap();
                let held = {
                    let g = reg.read(&r);
                    g.lookup(&k).and_then(|p| g.hold(p))
                };
                // Beyond the read section: only the count keeps the probe alive.
                let got = held.as_ref().map(|h| h.key());
                drop(held);
                got.is_some()
            })
        };
        reg.unregister(&k, &c).unwrap();
        reg.sync();
        let got = hit.join().unwrap();
        reg.sync();
        assert!(reg.is_empty());
        got
    });
}

#[test]
fn refcount_inc_not_zero_vs_final_put() {
    model();
}

#[test]
fn seeded_plain_increment_resurrects_a_dying_probe() {
    common::must_catch(Bug::RefcountPlainInc, model);
}

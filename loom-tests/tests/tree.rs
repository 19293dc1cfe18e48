//! The probe tree: lookups racing with insertion and removal see a consistent tree, and nothing
//! they can reach is freed under them (Invariants 1 and 2 for the tree's nodes and probes).
//!
//! `tree_insert_remove_vs_lookup`: two threads (a writer that inserts one probe and removes
//! another, then waits a grace period; a reader that looks both up), unbounded.
//! `tree_two_writers_one_reader`: three threads, preemption bound 2.

#![cfg(loom)]

mod common;
use common::{Reg, Tracked, key};
use loom::thread;
use probe_core::rcu::{Rcu, SlotRcu};
use probe_core::seeded::Bug;
use std::sync::Arc;

fn model() {
    common::explore(
        "tree",
        common::unbounded(),
        &[(true, false), (true, true), (false, true)],
        move || {
            let reg = Arc::new(Reg::new(SlotRcu::new()));
            let c = Tracked::new();
            let (k1, k2) = (key(1, 0x10), key(1, 0x20));
            reg.register(k1, c.clone()).unwrap();
            let writer = {
                let (reg, c) = (reg.clone(), c.clone());
                thread::spawn(move || {
                    reg.register(k2, c.clone()).unwrap();
                    reg.unregister(&k1, &c).unwrap();
                    reg.sync();
                })
            };
            let r = reg.rcu().register().unwrap();
            let found = {
                let g = reg.read(&r);
                let mut found = (false, false);
                if let Some(p) = g.lookup(&k1) {
                    assert_eq!(p.key(), k1);
                    p.consumers().iter().for_each(|c| c.call());
                    found.0 = true;
                }
                if let Some(p) = g.lookup(&k2) {
                    assert_eq!(p.key(), k2);
                    p.consumers().iter().for_each(|c| c.call());
                    found.1 = true;
                }
                found
            };
            drop(r);
            writer.join().unwrap();
            reg.sync();
            found
        },
    );
}

#[test]
fn tree_insert_remove_vs_lookup() {
    model();
}

#[test]
fn seeded_root_published_relaxed() {
    common::must_catch(Bug::TreePublishRelaxed, model);
}

#[test]
fn seeded_replaced_nodes_freed_without_grace_period() {
    common::must_catch(Bug::TreeFreeNodesEarly, model);
}

/// Writers of different objects serialize on the tree lock; a reader sees each insert whole, and
/// (coverage) sees every combination of the two inserts.
#[test]
fn tree_two_writers_one_reader() {
    common::explore(
        "tree (3 threads, preemption bound 2)",
        common::bounded(2),
        &[[false, false], [true, false], [false, true], [true, true]],
        move || {
            let reg = Arc::new(Reg::new(SlotRcu::new()));
            let ws: Vec<_> = [1u64, 2]
                .into_iter()
                .map(|o| {
                    let reg = reg.clone();
                    thread::spawn(move || reg.register(key(o, 0x10), Tracked::new()).unwrap())
                })
                .collect();
            let mut found = [false; 2];
            {
                let r = reg.rcu().register().unwrap();
                let g = reg.read(&r);
                for (i, o) in [1u64, 2].into_iter().enumerate() {
                    if let Some(p) = g.lookup(&key(o, 0x10)) {
                        assert_eq!(p.consumers().len(), 1);
                        p.consumers().iter().for_each(|c| c.call());
                        found[i] = true;
                    }
                }
            }
            for w in ws {
                w.join().unwrap();
            }
            assert_eq!(reg.len(), 2);
            found
        },
    );
}

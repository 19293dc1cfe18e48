//! Consumers added and removed while hits traverse them: a traversal sees a whole list, and after
//! `unregister` + `sync` no hit calls the removed consumer (the two-phase unregister promise).
//! The registration reserves a spare list and the unregistration builds its shorter list in it
//! (reserve, then lock and publish: unregistration never allocates), so the model also covers a
//! spare's life: it must never be a list a hit can still reach.
//!
//! Two threads (a writer that adds one consumer, removes another, waits a grace period and then
//! retires the removed consumer; a hit that traverses), unbounded.

#![cfg(loom)]

mod common;
use common::{Reg, Tracked, key};
use loom::thread;
use probe_core::rcu::{Rcu, SlotRcu};
use probe_core::seeded::Bug;
use std::sync::Arc;

fn model() {
    common::explore("consumers", common::unbounded(), &[1, 2], move || {
        let reg = Arc::new(Reg::new(SlotRcu::new()));
        let (c1, c2) = (Tracked::new(), Tracked::new());
        let k = key(3, 0x80);
        reg.register(k, c1.clone()).unwrap();
        let writer = {
            let (reg, c1, c2) = (reg.clone(), c1.clone(), c2.clone());
            thread::spawn(move || {
                reg.register(k, c2).unwrap();
                reg.unregister(&k, &c1).unwrap();
                reg.sync();
                // The promise: from here on, nothing calls c1. Marking it freed makes any later
                // (or unordered) call a detected race.
                c1.check.mark_freed();
            })
        };
        let r = reg.rcu().register().unwrap();
        let n = {
            let g = reg.read(&r);
            let p = g.lookup(&k).expect("the probe always has a consumer");
            let cs = p.consumers();
            cs.iter().for_each(|c| c.call());
            cs.len()
        };
        drop(r);
        writer.join().unwrap();
        n
    });
}

#[test]
fn consumers_add_remove_vs_traversal() {
    model();
}

#[test]
fn seeded_old_list_freed_without_grace_period() {
    common::must_catch(Bug::ConsumerFreeEarly, model);
}

#[test]
fn seeded_replaced_list_recycled_as_spare_without_grace_period() {
    common::must_catch(Bug::SpareRecycledEarly, model);
}

#[test]
fn seeded_new_list_published_relaxed() {
    common::must_catch(Bug::ConsumerPublishRelaxed, model);
}

#[test]
fn seeded_sync_does_not_wait_so_removed_consumer_is_called() {
    common::must_catch(Bug::RcuNoGracePeriod, model);
}

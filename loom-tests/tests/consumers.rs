//! Consumers added and removed while hits traverse them: a traversal sees a whole list, and after
//! `unregister` + `sync` no hit calls the removed consumer (the two-phase unregister promise).
//! The registration reserves a spare list and the unregistration builds its shorter list in it
//! (reserve, then lock and publish: unregistration never allocates), so the model also covers a
//! spare's life: it must never be a list a hit can still reach.
//!
//! The hit reaches the list through the tree leaf's hot word (`CowTree::get_hot`), which the
//! writer changes in place under the tree lock beside the probe's own pointer; the model catches
//! a publication that forgets the leaf, or stores its word Relaxed. The hit then reads the same
//! probe again through a range query, which goes through the probe's own pointer (the path of
//! mapping-time and held-reference readers), so a Relaxed store of that one is caught too.
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
            // The same probe through a range query, which reads the probe's own list pointer
            // (what mapping-time and held-reference readers use) rather than the leaf's word.
            g.probes_in(k.object, k.offset..k.offset + 1, |p| {
                p.consumers().iter().for_each(|c| c.call());
                true
            });
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

#[test]
fn seeded_hot_word_not_updated() {
    // The leaf keeps pointing at the first list: the hit calls c1 after its retirement.
    common::must_catch(Bug::HotWordNotUpdated, model);
}

#[test]
fn seeded_hot_word_stored_relaxed() {
    common::must_catch(Bug::HotWordRelaxed, model);
}

type Reg2 = probe_core::registry::Registry<Tracked, SlotRcu, probe_core::lock::SpinLock, 2>;

/// The hot word and the tree's copies: one writer removes a consumer from probe `k` (object 0)
/// while another writer, holding another object's lock, registers a probe of object 1 — which
/// copies the one leaf both probes live in. A hit after both must find `k`'s current list in the
/// leaf, never the removed consumer. Catches publishing the list without the tree lock (the
/// copy then reads the old list, or races with the word's store).
///
/// Three threads (two writers and the model's own, which hits after joining them): preemption
/// bound 2.
fn leaf_copy_model() {
    common::explore(
        "consumers vs a leaf copy",
        common::bounded(2),
        &[1],
        move || {
            let reg = Arc::new(Reg2::new(SlotRcu::new()));
            let (c1, c2, c3) = (Tracked::new(), Tracked::new(), Tracked::new());
            let (k, k2) = (key(0, 0x80), key(1, 0x80));
            reg.register(k, c1.clone()).unwrap();
            reg.register(k, c2.clone()).unwrap();
            let a = {
                let (reg, c1) = (reg.clone(), c1.clone());
                thread::spawn(move || {
                    reg.unregister(&k, &c1).unwrap();
                    reg.sync();
                    c1.check.mark_freed();
                })
            };
            let b = {
                let reg = reg.clone();
                thread::spawn(move || reg.register(k2, c3).unwrap())
            };
            a.join().unwrap();
            b.join().unwrap();
            let r = reg.rcu().register().unwrap();
            let g = reg.read(&r);
            let cs = g.lookup(&k).expect("k has a consumer").consumers();
            cs.iter().for_each(|c| c.call());
            cs.len()
        },
    );
}

#[test]
fn consumers_vs_leaf_copy() {
    leaf_copy_model();
}

#[test]
fn seeded_hot_word_published_outside_the_tree_lock() {
    common::must_catch(Bug::HotWordOutsideTreeLock, leaf_copy_model);
}

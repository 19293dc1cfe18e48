//! The kprobes layer's one-domain trap: a trap takes one read section and asks both the
//! optimizer (is it ours, how to continue) and the registry (which consumers) under it, while a
//! writer unregisters the last kprobe, runs the optimizer to the end (which frees the probe's
//! site after its grace period) and then, after `sync`, retires the consumer.
//!
//! What must hold: the site the trap looked up and the consumer it called are alive while the
//! trap uses them — the optimizer's free and the consumer's retirement both wait for the trap's
//! one read section. That rests on the registry, the optimizer and the trap sharing one domain
//! ([`probe_core::kprobes::SharedRcu`]).
//!
//! Seeded: a domain handle whose `clone` makes a new domain (the registry and the optimizer
//! would each get their own, and the trap's guard would protect neither): the optimizer frees
//! the site under the trap. And the generic RCU bug (no grace period at all).
//!
//! Two threads (the trapping CPU, the writer), unbounded.

#![cfg(loom)]

mod common;
use common::{Tracked, Unmodeled};
use loom::thread;
use probe_core::kprobes::{Kprobe, KprobeTrap, Kprobes, Reentry, SharedRcu};
use probe_core::lock::SpinLock;
use probe_core::rcu::{Deferred, Rcu, SlotRcu};
use probe_core::seeded::{self, Bug};
use probe_core::testing::ByteCode;
use std::sync::Arc;

/// A domain handle: clones share the domain — unless the seeded bug makes `clone` create one.
struct Domain(Arc<SlotRcu>);

impl Clone for Domain {
    fn clone(&self) -> Self {
        if seeded::is(Bug::KprobesDomainPerStructure) {
            Domain(Arc::new(SlotRcu::new()))
        } else {
            Domain(self.0.clone())
        }
    }
}

// SAFETY: forwards to the `SlotRcu` (the seeded bug is the one deliberate violation).
unsafe impl Rcu for Domain {
    type Reader<'d> = <SlotRcu as Rcu>::Reader<'d>;
    type Guard<'r> = <SlotRcu as Rcu>::Guard<'r>;
    fn register(&self) -> probe_core::Result<Self::Reader<'_>> {
        self.0.register()
    }
    fn read_lock<'r>(&'r self, reader: &'r Self::Reader<'_>) -> Self::Guard<'r> {
        self.0.read_lock(reader)
    }
    fn defer(&self, f: Deferred) {
        self.0.defer(f)
    }
    fn synchronize(&self) {
        self.0.synchronize()
    }
}

// SAFETY: clones share the `Arc`'s domain (outside the seeded bug).
unsafe impl SharedRcu for Domain {}

type K = Kprobes<Tracked, ByteCode<Unmodeled>, Domain, SpinLock, SpinLock, 1>;

/// What the trap saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    /// Ours, with this many consumers run.
    Ran(usize),
    /// The probe was gone and its breakpoint too.
    Restart,
}

fn model() {
    common::explore(
        "kprobes: one-domain trap vs unregister + optimizer free",
        common::unbounded(),
        &[Seen::Ran(1), Seen::Restart],
        || {
            // 8 one-byte instructions, 2-byte jumps (ByteCode's trampolines never execute here).
            let k: Arc<K> = Arc::new(Kprobes::new(
                ByteCode::new((1..=8).collect(), 2),
                Domain(Arc::new(SlotRcu::new())),
            ));
            let kp = Arc::new(Kprobe::new(2, Tracked::default()));
            k.register(kp.clone()).unwrap();
            let writer = {
                let (k, kp) = (k.clone(), kp.clone());
                thread::spawn(move || {
                    k.unregister(&kp).unwrap();
                    // Unoptimize, wait, free the site: the free must wait for the trap.
                    k.wait_for_optimizer();
                    k.sync();
                    // The promise: nothing calls the kprobe any more.
                    kp.handler().check.mark_freed();
                })
            };
            let reader = k.rcu().register().unwrap();
            let cpu = Reentry::new();
            let seen = {
                let g = k.read(&reader);
                match g.on_breakpoint(2) {
                    KprobeTrap::Probe { consumers, .. } => {
                        Seen::Ran(match consumers.run(&cpu, |kp| kp.handler().call()) {
                            probe_core::kprobes::Ran::Ran(n) => n,
                            probe_core::kprobes::Ran::Missed(_) => unreachable!("not nested"),
                        })
                    }
                    KprobeTrap::Restart => Seen::Restart,
                    KprobeTrap::NotOurs => panic!("a trap on our breakpoint answered not ours"),
                }
            };
            drop(reader);
            writer.join().unwrap();
            seen
        },
    );
}

#[test]
fn one_domain_trap_vs_unregister_and_free() {
    model();
}

#[test]
fn seeded_a_domain_per_structure() {
    common::must_catch(Bug::KprobesDomainPerStructure, model);
}

#[test]
fn seeded_no_grace_period() {
    common::must_catch(Bug::RcuNoGracePeriod, model);
}

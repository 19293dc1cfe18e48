//! Unit and property tests of the registry.

extern crate std;

use crate::alloc_util::fail_after;
use crate::error::Error;
use crate::probe::{ObjectId, ProbeKey};
use crate::rcu::{EpochRcu, Rcu, SlotRcu};
use crate::registry::Registry;
use crate::sync::audit::stores_during;
use crate::test_support::*;
use alloc::sync::Arc;
use alloc::vec::Vec;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[test]
fn register_hit_unregister() {
    let reg: Registry<Hook, SlotRcu> = Registry::new(SlotRcu::new());
    let reader = reg.rcu().register().unwrap();
    let (c1, n1) = counting();
    let (c2, n2) = counting();
    let k = key(9, 0x100);
    reg.register(k, c1.clone()).unwrap();
    reg.register(k, c2.clone()).unwrap();
    assert_eq!(reg.len(), 1);
    {
        let g = reg.read(&reader);
        let p = g.lookup(&k).unwrap();
        assert_eq!(p.key(), k);
        for c in p.consumers() {
            c(1);
        }
    }
    assert_eq!(
        (n1.load(Ordering::Relaxed), n2.load(Ordering::Relaxed)),
        (1, 1)
    );
    reg.unregister(&k, &c1).unwrap();
    assert_eq!(consumers_at(&reg, &reader, &k), Some(1));
    reg.unregister(&k, &c2).unwrap();
    assert_eq!(consumers_at(&reg, &reader, &k), None);
    assert!(reg.is_empty());
    reg.sync();
}

#[test]
fn every_bad_input_is_an_error_and_changes_nothing() {
    let reg: Registry<Hook, SlotRcu> = Registry::new(SlotRcu::new());
    let reader = reg.rcu().register().unwrap();
    let (c1, _) = counting();
    let (c2, _) = counting();
    let k = key(1, 8);
    assert_eq!(reg.unregister(&k, &c1), Err(Error::UnknownProbe));
    reg.register(k, c1.clone()).unwrap();
    assert_eq!(reg.register(k, c1.clone()), Err(Error::DuplicateConsumer));
    assert_eq!(consumers_at(&reg, &reader, &k), Some(1));
    assert_eq!(reg.unregister(&k, &c2), Err(Error::UnknownConsumer));
    assert_eq!(consumers_at(&reg, &reader, &k), Some(1));
    assert_eq!(reg.unregister(&key(1, 9), &c1), Err(Error::UnknownProbe));
    assert_eq!(reg.unregister(&key(2, 8), &c1), Err(Error::UnknownProbe));
    // Display texts exist for every variant.
    for e in [
        Error::UnknownProbe,
        Error::UnknownConsumer,
        Error::DuplicateConsumer,
        Error::NoMemory,
        Error::Embedder(-12),
    ] {
        assert!(!std::format!("{e}").is_empty());
    }
}

#[test]
fn allocation_failure_in_register_and_unregister_changes_nothing() {
    let reg: Registry<Hook, SlotRcu> = Registry::new(SlotRcu::new());
    let reader = reg.rcu().register().unwrap();
    let others: Vec<_> = (0..40)
        .map(|i| {
            let (c, _) = counting();
            reg.register(key(3, i * 16), c.clone()).unwrap();
            c
        })
        .collect();
    let k = key(3, 0x1000);
    // A new probe: fail every allocation in turn.
    let (c1, _) = counting();
    let mut failures = 0;
    for n in 0.. {
        fail_after(Some(n));
        let r = reg.register(k, c1.clone());
        fail_after(None);
        match r {
            Err(Error::NoMemory) => {
                failures += 1;
                assert_eq!(consumers_at(&reg, &reader, &k), None);
                assert_eq!(reg.len(), 40);
            }
            Ok(()) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(failures >= 4, "register made only {failures} allocations");
    // A second consumer on the existing probe.
    let (c2, _) = counting();
    for n in 0.. {
        fail_after(Some(n));
        let r = reg.register(k, c2.clone());
        fail_after(None);
        match r {
            Err(Error::NoMemory) => assert_eq!(consumers_at(&reg, &reader, &k), Some(1)),
            Ok(()) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(consumers_at(&reg, &reader, &k), Some(2));
    // Unregistering never allocates: with any allocation failing, it succeeds.
    for n in 0..8 {
        if n > 0 {
            reg.register(k, c2.clone()).unwrap();
        }
        assert_eq!(consumers_at(&reg, &reader, &k), Some(2));
        fail_after(Some(n));
        let r = reg.unregister(&k, &c2);
        let untouched = crate::alloc_util::allocations_left() == Some(n);
        fail_after(None);
        assert_eq!(r, Ok(()), "unregister failed with allocation {n} failing");
        assert!(untouched, "unregister allocated");
        assert_eq!(consumers_at(&reg, &reader, &k), Some(1));
    }
    drop(others);
    reg.sync();
}

/// The reservation contract under churn: random registrations (with a random allocation
/// failing half the time) and unregistrations (with the failpoint armed every time) of up to 12
/// consumers on 3 probes — past the inline list size, so spares grow. Every unregistration of a
/// registered consumer succeeds without allocating; every failed registration changes nothing;
/// the lists always equal the oracle, and the registry's count equals the probes registered.
#[test]
fn unregister_never_allocates_and_failures_change_nothing() {
    let reg: Registry<Hook, SlotRcu> = Registry::new(SlotRcu::new());
    let reader = reg.rcu().register().unwrap();
    let consumers: Vec<Arc<Hook>> = (0..12).map(|_| counting().0).collect();
    let mut oracle: BTreeMap<ProbeKey, Vec<usize>> = BTreeMap::new();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut failed, mut removed) = (0, 0);
    for _ in 0..20_000 {
        let r = next();
        let k = key(9, (r % 3) * 8);
        let c = ((r >> 8) % 12) as usize;
        let on = oracle.get(&k).is_some_and(|v| v.contains(&c));
        if on {
            let n = (r >> 16) as usize % 6;
            let last = oracle[&k].len() == 1;
            fail_after(Some(n));
            let res = reg.unregister(&k, &consumers[c]);
            let untouched = crate::alloc_util::allocations_left() == Some(n);
            fail_after(None);
            assert_eq!(res, Ok(()));
            // Only the last consumer's removal touches the tree (its path copy may fail: the
            // probe is then an orphan, retried later — the count below checks that).
            assert!(untouched || last, "unregister allocated");
            let v = oracle.get_mut(&k).unwrap();
            v.retain(|&i| i != c);
            if v.is_empty() {
                oracle.remove(&k);
            }
            removed += 1;
        } else {
            let inject = (r >> 20) & 1 == 1;
            if inject {
                fail_after(Some((r >> 24) as usize % 6));
            }
            let res = reg.register(k, consumers[c].clone());
            fail_after(None);
            match res {
                Ok(()) => oracle.entry(k).or_default().push(c),
                Err(Error::NoMemory) => failed += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        for kk in (0..3).map(|o| key(9, o * 8)) {
            let g = reg.read(&reader);
            let got: Vec<usize> = g.lookup(&kk).map_or(Vec::new(), |p| {
                p.consumers()
                    .iter()
                    .map(|a| consumers.iter().position(|b| Arc::ptr_eq(a, b)).unwrap())
                    .collect()
            });
            assert_eq!(got, oracle.get(&kk).cloned().unwrap_or_default());
        }
        if r % 64 == 0 {
            reg.sync();
            assert_eq!(reg.len(), oracle.len(), "orphans outlived a sync");
        }
    }
    assert!(
        failed > 1000 && removed > 1000,
        "{failed} failures, {removed} removals"
    );
    reg.sync();
    assert_eq!(reg.len(), oracle.len());
}

/// A last unregistration whose tree removal cannot allocate leaves an orphan (counted by
/// `len` until then); the next tree-locked write or `sync` removes it, so counts return to what
/// is registered.
#[test]
fn orphans_are_retried_until_counts_are_exact() {
    let reg: Registry<Hook, SlotRcu> = Registry::new(SlotRcu::new());
    let reader = reg.rcu().register().unwrap();
    let c = counting().0;
    for i in 0..200 {
        reg.register(key(4, i * 8), c.clone()).unwrap();
    }
    // Every removal's first allocation fails: each last unregistration orphans its probe.
    for i in 0..200 {
        fail_after(Some(0));
        assert_eq!(reg.unregister(&key(4, i * 8), &c), Ok(()));
        fail_after(None);
    }
    let orphans = reg.len();
    assert!(orphans > 0, "no removal failed: the test exercised nothing");
    // Orphans are invisible to hits as probes with consumers.
    {
        let g = reg.read(&reader);
        for i in 0..200 {
            assert!(
                g.lookup(&key(4, i * 8))
                    .is_none_or(|p| p.consumers().is_empty())
            );
        }
    }
    reg.sync();
    assert_eq!(reg.len(), 0, "{orphans} orphans, not all retried");
    // And a later write retries them too (no sync needed).
    reg.register(key(4, 0), c.clone()).unwrap();
    fail_after(Some(0));
    reg.unregister(&key(4, 0), &c).unwrap();
    fail_after(None);
    reg.register(key(4, 8), c.clone()).unwrap();
    assert_eq!(reg.len(), 1);
    reg.unregister(&key(4, 8), &c).unwrap();
    reg.sync();
    assert!(reg.is_empty());
}

#[test]
fn probe_ref_outlives_unregister_and_dying_probe_is_replaced() {
    let reg: Registry<Hook, SlotRcu> = Registry::new(SlotRcu::new());
    let reader = reg.rcu().register().unwrap();
    let (c1, _) = counting();
    let k = key(5, 0x40);
    reg.register(k, c1.clone()).unwrap();
    let held = {
        let g = reg.read(&reader);
        g.hold(g.lookup(&k).unwrap()).expect("live probe")
    };
    reg.unregister(&k, &c1).unwrap();
    // Still in the tree (the reference keeps it), with no consumers, not dying.
    {
        let g = reg.read(&reader);
        let p = g.lookup(&k).unwrap();
        assert!(p.consumers().is_empty());
        assert!(!p.probe().is_dying());
    }
    assert_eq!(held.key(), k);
    // Re-register on the same probe: it is live, so the consumer joins it.
    reg.register(k, c1.clone()).unwrap();
    assert!(core::ptr::eq(
        &*held,
        reg.read(&reader).lookup(&k).unwrap().probe()
    ));
    reg.unregister(&k, &c1).unwrap();
    // The final put cannot allocate the tree path: the probe stays in the tree, dying.
    fail_after(Some(0));
    drop(held);
    fail_after(None);
    {
        let g = reg.read(&reader);
        let p = g.lookup(&k).expect("orphaned dying probe stays visible");
        assert!(p.probe().is_dying());
        assert!(p.consumers().is_empty());
        assert!(
            g.hold(p).is_none(),
            "increment-not-zero must refuse a dying probe"
        );
    }
    // Registering over it replaces it (and frees it), never resurrects it.
    let (c2, _) = counting();
    reg.register(k, c2.clone()).unwrap();
    {
        let g = reg.read(&reader);
        let p = g.lookup(&k).unwrap();
        assert!(!p.probe().is_dying());
        assert_eq!(p.consumers().len(), 1);
    }
    reg.unregister(&k, &c2).unwrap();
    assert!(reg.is_empty());
    reg.sync();
}

#[test]
fn range_query_finds_every_probe_of_an_object_in_range() {
    let reg: Registry<Hook, SlotRcu> = Registry::new(SlotRcu::new());
    let reader = reg.rcu().register().unwrap();
    let (c, _) = counting();
    for o in 1..4 {
        for off in (0..4096).step_by(64) {
            reg.register(key(o, off), c.clone()).unwrap();
        }
    }
    let g = reg.read(&reader);
    let mut seen = Vec::new();
    g.probes_in(ObjectId(2), 1000..2000, |p| {
        seen.push(p.key());
        true
    });
    let want: Vec<_> = (0..4096)
        .step_by(64)
        .filter(|o| (1000..2000).contains(o))
        .map(|o| key(2, o))
        .collect();
    assert_eq!(seen, want);
    let mut first = None;
    g.probes_in(ObjectId(3), 0..u64::MAX, |p| {
        first = Some(p.key());
        false
    });
    assert_eq!(first, Some(key(3, 0)));
}

/// Invariant 1: the hit path — lookup plus consumer traversal, and the read section around it —
/// writes no shared memory. Every store and read-modify-write through the sync facade is logged.
#[test]
fn hit_path_writes_no_shared_memory() {
    let reg: Registry<Hook, SlotRcu> = Registry::new(SlotRcu::new());
    let reader = reg.rcu().register().unwrap();
    let (c1, n1) = counting();
    let (c2, _) = counting();
    for i in 0..1000 {
        reg.register(key(7, i * 8), c1.clone()).unwrap();
        if i % 3 == 0 {
            reg.register(key(7, i * 8), c2.clone()).unwrap();
        }
    }
    reg.sync();
    // Lookup + traversal inside a held guard: no store at all.
    let g = reg.read(&reader);
    let (calls, stores) = stores_during(|| {
        let mut calls = 0;
        for i in 0..1200 {
            if let Some(p) = g.lookup(&key(7, i * 8)) {
                for c in p.consumers() {
                    c(0);
                    calls += 1;
                }
            }
        }
        calls
    });
    drop(g);
    assert_eq!(calls, 1000 + 334);
    assert!(
        stores.is_empty(),
        "hit path stored to shared memory at {stores:x?}"
    );
    // The whole hit including entering and leaving the read section: the only words written are
    // the reader's own announcement slot (private to this reader, alone on its cache line).
    let (_, stores) = stores_during(|| {
        let g = reg.read(&reader);
        g.lookup(&key(7, 80)).map(|p| p.consumers().len())
    });
    assert!(
        !stores.is_empty(),
        "the audit saw nothing: it is not wired in"
    );
    assert!(
        stores.iter().all(|&a| a == reader.slot_addr()),
        "stores outside the reader's own slot: {stores:x?}"
    );
    // (the consumer's own counter is the embedder's choice, not a shared write of probe-core's)
    assert_eq!(n1.load(Ordering::Relaxed), 0);
}

/// The two-phase unregister promise, under real threads: once `unregister` + `sync` returned,
/// no hit calls that consumer again.
fn no_call_after_sync<R: Rcu + 'static>(rcu: R) {
    struct Tracked {
        retired: AtomicBool,
        calls: AtomicU64,
    }
    type C = Tracked;
    let reg: Arc<Registry<C, R>> = Arc::new(Registry::new(rcu));
    let stop = Arc::new(AtomicBool::new(false));
    let keys: Vec<_> = (0..64).map(|i| key(11, i * 4)).collect();
    let hitters: Vec<_> = (0..2)
        .map(|_| {
            let (reg, stop, keys) = (reg.clone(), stop.clone(), keys.clone());
            std::thread::spawn(move || {
                let reader = reg.rcu().register().unwrap();
                let mut hits = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for k in &keys {
                        let g = reg.read(&reader);
                        if let Some(p) = g.lookup(k) {
                            for c in p.consumers() {
                                assert!(
                                    !c.retired.load(Ordering::SeqCst),
                                    "consumer called after unregister + sync"
                                );
                                c.calls.fetch_add(1, Ordering::Relaxed);
                                hits += 1;
                            }
                        }
                    }
                }
                hits
            })
        })
        .collect();
    for round in 0..300 {
        let cs: Vec<Arc<C>> = (0..3)
            .map(|_| {
                Arc::new(Tracked {
                    retired: AtomicBool::new(false),
                    calls: AtomicU64::new(0),
                })
            })
            .collect();
        for (i, k) in keys.iter().enumerate() {
            reg.register(*k, cs[i % 3].clone()).unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            reg.unregister(k, &cs[i % 3]).unwrap();
        }
        reg.sync();
        for c in &cs {
            c.retired.store(true, Ordering::SeqCst);
        }
        if round % 100 == 0 {
            assert!(reg.is_empty());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let hits: u64 = hitters.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(hits > 0, "the hitters never hit anything");
}

#[test]
fn no_call_after_unregister_sync_slot_rcu() {
    no_call_after_sync(SlotRcu::new());
}

#[test]
fn no_call_after_unregister_sync_epoch_rcu() {
    no_call_after_sync(EpochRcu::with_relax(std::thread::yield_now));
}

#[test]
fn foreign_reader_still_gets_a_protecting_guard() {
    let a = SlotRcu::new();
    let b = SlotRcu::new();
    let rb = b.register().unwrap();
    let freed = Arc::new(AtomicBool::new(false));
    let guard = a.read_lock(&rb); // a reader of `b` reading under `a`
    let f = freed.clone();
    a.defer(crate::rcu::Deferred::new(move || f.store(true, Ordering::SeqCst)).unwrap());
    std::thread::scope(|s| {
        let t = s.spawn(|| a.synchronize());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !freed.load(Ordering::SeqCst),
            "grace period ended under a live foreign guard"
        );
        drop(guard);
        t.join().unwrap();
    });
    assert!(freed.load(Ordering::SeqCst));
}

// ---------------------------------------------------------------- registry vs oracle

#[derive(Clone, Debug)]
enum RegOp {
    Register(u8, u8, usize),
    Unregister(u8, u8, usize),
    Hold(u8, u8),
    Release(usize),
    Sync,
}

fn reg_op() -> impl Strategy<Value = RegOp> {
    prop_oneof![
        5 => (0u8..3, 0u8..24, 0usize..5).prop_map(|(o, k, c)| RegOp::Register(o, k, c)),
        4 => (0u8..3, 0u8..24, 0usize..5).prop_map(|(o, k, c)| RegOp::Unregister(o, k, c)),
        1 => (0u8..3, 0u8..24).prop_map(|(o, k)| RegOp::Hold(o, k)),
        1 => (0usize..8).prop_map(RegOp::Release),
        1 => Just(RegOp::Sync),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The registry behaves as a map from key to an ordered set of consumers: the same results
    /// (errors included) and the same contents after every step, with counted references held
    /// and released in between (a held probe with no consumers stays visible, with none).
    #[test]
    fn registry_matches_oracle(ops in proptest::collection::vec(reg_op(), 1..300)) {
        let reg: Registry<Hook, SlotRcu> = Registry::new(SlotRcu::new());
        let reader = reg.rcu().register().unwrap();
        let consumers: Vec<Arc<Hook>> = (0..5).map(|_| counting().0).collect();
        let mut oracle: BTreeMap<ProbeKey, Vec<usize>> = BTreeMap::new();
        let mut held = Vec::new();
        for op in ops {
            match op {
                RegOp::Register(o, k, c) => {
                    let key = key(o.into(), u64::from(k) * 4);
                    let want = if oracle.get(&key).is_some_and(|v| v.contains(&c)) {
                        Err(Error::DuplicateConsumer)
                    } else {
                        oracle.entry(key).or_default().push(c);
                        Ok(())
                    };
                    prop_assert_eq!(reg.register(key, consumers[c].clone()), want);
                }
                RegOp::Unregister(o, k, c) => {
                    let key = key(o.into(), u64::from(k) * 4);
                    let got = reg.unregister(&key, &consumers[c]);
                    let live = oracle.get(&key).is_some_and(|v| !v.is_empty())
                        || held.iter().any(|h: &crate::registry::ProbeRef<'_, Hook, SlotRcu, crate::lock::SpinLock, 64>| h.key() == key);
                    let want = match oracle.get_mut(&key) {
                        Some(v) if v.contains(&c) => {
                            v.retain(|&x| x != c);
                            Ok(())
                        }
                        _ if live => Err(Error::UnknownConsumer),
                        _ => Err(Error::UnknownProbe),
                    };
                    if oracle.get(&key).is_some_and(|v| v.is_empty()) {
                        oracle.remove(&key);
                    }
                    prop_assert_eq!(got, want);
                }
                RegOp::Hold(o, k) => {
                    let key = key(o.into(), u64::from(k) * 4);
                    let g = reg.read(&reader);
                    if let Some(r) = g.lookup(&key).and_then(|p| g.hold(p)) {
                        held.push(r);
                    }
                }
                RegOp::Release(i) => {
                    if !held.is_empty() {
                        let i = i % held.len();
                        held.swap_remove(i);
                    }
                }
                RegOp::Sync => reg.sync(),
            }
            // Contents: every oracle key has exactly its consumers, in registration order.
            let g = reg.read(&reader);
            for (k, cs) in &oracle {
                let p = g.lookup(k);
                prop_assert!(p.is_some(), "{:?} missing", k);
                let got = p.unwrap().consumers();
                prop_assert_eq!(got.len(), cs.len());
                for (a, &b) in got.iter().zip(cs) {
                    prop_assert!(Arc::ptr_eq(a, &consumers[b]));
                }
            }
            // Nothing else is in the tree except held probes (with no consumers).
            let mut extra = 0;
            g.probes_in(ObjectId(0), 0..u64::MAX, |_| { extra += 1; true });
            g.probes_in(ObjectId(1), 0..u64::MAX, |_| { extra += 1; true });
            g.probes_in(ObjectId(2), 0..u64::MAX, |_| { extra += 1; true });
            let held_only = held.iter().map(|h| h.key()).filter(|k| !oracle.contains_key(k)).collect::<std::collections::BTreeSet<_>>().len();
            prop_assert_eq!(extra, oracle.len() + held_only);
            prop_assert_eq!(reg.len(), oracle.len() + held_only);
        }
        drop(held);
        reg.sync();
    }
}

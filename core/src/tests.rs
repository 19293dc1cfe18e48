//! Unit and property tests of the tree and the registry (normal builds; loom has its own suite).

extern crate std;

use crate::alloc_util::fail_after;
use crate::error::Error;
use crate::probe::{ObjectId, ProbeKey};
use crate::rcu::{EpochRcu, Rcu, SlotRcu};
use crate::registry::Registry;
use crate::sync::audit::stores_during;
use crate::tree::ProbeTree;
use alloc::sync::Arc;
use alloc::vec::Vec;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

fn key(o: u64, off: u64) -> ProbeKey {
    ProbeKey::new(ObjectId(o), off)
}

fn fake(v: u64) -> *const u64 {
    v as usize as *const u64
}

// ---------------------------------------------------------------- tree

#[derive(Clone, Debug)]
enum Op {
    Insert(u8, u16, u32),
    Remove(u8, u16),
    Get(u8, u16),
    Range(u8, u16, u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u16..300, any::<u32>()).prop_map(|(o, k, v)| Op::Insert(o, k, v)),
        3 => (0u8..4, 0u16..300).prop_map(|(o, k)| Op::Remove(o, k)),
        1 => (0u8..4, 0u16..300).prop_map(|(o, k)| Op::Get(o, k)),
        1 => (0u8..4, 0u16..300, 0u16..300).prop_map(|(o, a, b)| Op::Range(o, a, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// `ProbeKey`'s integer comparison orders as (object, offset) tuples do, operator by operator.
    #[test]
    fn probe_key_orders_as_its_tuple(a in any::<(u64, u64)>(), b in any::<(u64, u64)>(), eq in any::<bool>()) {
        let b = if eq { a } else { b };
        let (ka, kb) = (ProbeKey::new(ObjectId(a.0), a.1), ProbeKey::new(ObjectId(b.0), b.1));
        prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        prop_assert_eq!(ka.partial_cmp(&kb), Some(a.cmp(&b)));
        prop_assert_eq!((ka < kb, ka <= kb, ka > kb, ka >= kb), (a < b, a <= b, a > b, a >= b));
    }

    /// The tree behaves as a `BTreeMap`, and its structural invariants hold after every write.
    #[test]
    fn tree_matches_btreemap(ops in proptest::collection::vec(op(), 1..600)) {
        let rcu = SlotRcu::new();
        let tree: ProbeTree<u64> = ProbeTree::new();
        let mut oracle = BTreeMap::new();
        for op in ops {
            // SAFETY (all tree calls): this thread is the only writer and reader.
            match op {
                Op::Insert(o, k, v) => {
                    // SAFETY: single-threaded test: the only writer and the only reader.
                    let old = unsafe { tree.insert(&rcu, key(o.into(), k.into()), fake(v.into())) }.unwrap();
                    prop_assert_eq!(old, oracle.insert(key(o.into(), k.into()), fake(v.into())));
                }
                Op::Remove(o, k) => {
                    // SAFETY: single-threaded test: the only writer and the only reader.
                    let old = unsafe { tree.remove(&rcu, &key(o.into(), k.into())) }.unwrap();
                    prop_assert_eq!(old, oracle.remove(&key(o.into(), k.into())));
                }
                Op::Get(o, k) => {
                    // SAFETY: single-threaded test: the only writer and the only reader.
                    prop_assert_eq!(unsafe { tree.get(&key(o.into(), k.into())) }, oracle.get(&key(o.into(), k.into())).copied());
                }
                Op::Range(o, a, b) => {
                    let (lo, hi) = (key(o.into(), a.into()), key(o.into(), b.into()));
                    let mut got = Vec::new();
                    // SAFETY: single-threaded test: the only writer and the only reader.
                    unsafe { tree.range(&lo, &hi, |k, v| { got.push((*k, v)); true }) };
                    let want: Vec<_> = if lo < hi { oracle.range(lo..hi).map(|(k, v)| (*k, *v)).collect() } else { Vec::new() };
                    prop_assert_eq!(got, want);
                }
            }
            // SAFETY: single-threaded test: the only writer and the only reader.
            prop_assert_eq!(unsafe { tree.check() }, oracle.len());
            prop_assert_eq!(tree.len(), oracle.len());
            rcu.synchronize();
        }
    }
}

proptest! {
    /// `floor` is `BTreeMap::range(..=k).next_back()`, through inserts and removals that leave
    /// routing keys stale.
    #[test]
    fn tree_floor_matches_btreemap(ops in proptest::collection::vec((any::<bool>(), 0u64..2000), 1..400), probes in proptest::collection::vec(0u64..2100, 1..50)) {
        let rcu = SlotRcu::new();
        let tree: crate::tree::CowTree<u64, u64> = crate::tree::CowTree::new();
        let mut oracle = BTreeMap::new();
        for (ins, k) in ops {
            // SAFETY: single-threaded test: the only writer and the only reader.
            unsafe {
                if ins { tree.insert(&rcu, k, fake(k)).unwrap(); oracle.insert(k, fake(k)); }
                else { tree.remove(&rcu, &k).unwrap(); oracle.remove(&k); }
            }
            for p in &probes {
                let want = oracle.range(..=*p).next_back().map(|(k, v)| (*k, *v));
                // SAFETY: as above.
                prop_assert_eq!(unsafe { tree.floor(p) }, want);
                // SAFETY: as above.
                prop_assert_eq!(unsafe { tree.floor_locked(p) }, want);
            }
        }
        rcu.synchronize();
    }
}

#[test]
fn tree_height_stays_logarithmic() {
    let rcu = SlotRcu::new();
    let tree: ProbeTree<u64> = ProbeTree::new();
    for i in 0..100_000u64 {
        // SAFETY: single thread.
        unsafe { tree.insert(&rcu, key(1, i * 4), fake(i)) }.unwrap();
        if i % 1024 == 0 {
            rcu.synchronize();
        }
    }
    // SAFETY: single thread.
    let h = unsafe { tree.height() };
    // In key order, an append split keeps nodes 13 of 16 full (16 + 1 - NODE_MIN): 7 693
    // leaves, then 592, 46, 4, 1 — height 5. Halving at every split would give 6.
    assert!(h <= 5, "100k sequential inserts gave height {h}");
    // Remove 99% and check the tree shrinks back.
    for i in 0..99_000u64 {
        // SAFETY: single thread.
        assert!(
            // SAFETY: single-threaded test: the only writer and the only reader.
            unsafe { tree.remove(&rcu, &key(1, i * 4)) }
                .unwrap()
                .is_some()
        );
    }
    rcu.synchronize();
    // SAFETY: single thread.
    unsafe {
        assert_eq!(tree.check(), 1000);
        assert!(
            tree.height() <= 4,
            "height {} after shrinking to 1000",
            tree.height()
        );
    }
}

#[test]
fn tree_write_that_cannot_allocate_changes_nothing() {
    let rcu = SlotRcu::new();
    let tree: ProbeTree<u64> = ProbeTree::new();
    for i in 0..2000u64 {
        // SAFETY: single thread.
        unsafe { tree.insert(&rcu, key(0, i), fake(i)) }.unwrap();
    }
    // Fail each allocation of an insert in turn, then of a remove, until the write succeeds.
    for (n, write) in [(0usize, 0u8), (0, 1)]
        .iter()
        .copied()
        .flat_map(|(_, w)| (0..64).map(move |n| (n, w)))
    {
        fail_after(Some(n));
        // SAFETY: single thread.
        let r = unsafe {
            if write == 0 {
                tree.insert(&rcu, key(0, 5000), fake(1)).map(|_| ())
            } else {
                tree.remove(&rcu, &key(0, 1000)).map(|_| ())
            }
        };
        fail_after(None);
        match r {
            Err(Error::NoMemory) => {
                // SAFETY: single thread.
                unsafe {
                    assert_eq!(tree.check(), 2000);
                    assert_eq!(tree.get(&key(0, 5000)), None);
                    assert_eq!(tree.get(&key(0, 1000)), Some(fake(1000)));
                }
            }
            Ok(()) => {
                // Undo, so the next round starts from the same tree.
                // SAFETY: single thread.
                unsafe {
                    if write == 0 {
                        tree.remove(&rcu, &key(0, 5000)).unwrap();
                    } else {
                        tree.insert(&rcu, key(0, 1000), fake(1000)).unwrap();
                    }
                }
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
        rcu.synchronize();
    }
}

#[test]
fn tree_batch_is_all_or_nothing() {
    let rcu = SlotRcu::new();
    let tree: crate::tree::CowTree<u64, u64> = crate::tree::CowTree::new();
    for k in 0..500u64 {
        // SAFETY: single-threaded test.
        unsafe { tree.insert(&rcu, k * 2, fake(k)) }.unwrap();
    }
    let apply = |b: &mut crate::tree::Batch<u64, u64>| -> crate::Result<()> {
        b.insert(1, fake(1))?;
        b.insert(3, fake(3))?;
        b.remove(&10)?;
        assert_eq!(
            b.floor(&11),
            Some((8, fake(4))),
            "the batch sees its own changes"
        );
        b.insert(999_999, fake(9))?;
        Ok(())
    };
    let mut failures = 0;
    for n in 0.. {
        fail_after(Some(n));
        // SAFETY: single-threaded test.
        let r = unsafe { tree.batch(&rcu, apply) };
        fail_after(None);
        // SAFETY: single-threaded test.
        unsafe {
            match r {
                Err(Error::NoMemory) => {
                    failures += 1;
                    assert_eq!(tree.check(), 500);
                    assert_eq!(tree.get(&1), None);
                    assert_eq!(tree.get(&10), Some(fake(5)));
                }
                Ok(()) => {
                    assert_eq!(tree.check(), 502);
                    assert_eq!(
                        (
                            tree.get(&1),
                            tree.get(&3),
                            tree.get(&10),
                            tree.get(&999_999)
                        ),
                        (Some(fake(1)), Some(fake(3)), None, Some(fake(9)))
                    );
                    break;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        rcu.synchronize();
    }
    assert!(failures >= 5, "only {failures} allocation points");
}

// ---------------------------------------------------------------- registry

type Hook = dyn Fn(u64) + Send + Sync;

fn counting() -> (Arc<Hook>, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let m = n.clone();
    (
        Arc::new(move |x| {
            m.fetch_add(x, Ordering::Relaxed);
        }),
        n,
    )
}

fn consumers_at<R: Rcu>(
    reg: &Registry<Hook, R>,
    reader: &R::Reader<'_>,
    k: &ProbeKey,
) -> Option<usize> {
    reg.read(reader).lookup(k).map(|p| p.consumers().len())
}

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

// ---------------------------------------------------------------- address spaces

mod mm_tests {
    use super::*;
    use crate::mm::{AddressSpace, AddressSpaceOps, MmId, PAGE_SIZE, VmFlags, VmaInfo};

    const P: u64 = PAGE_SIZE;
    type Mm = AddressSpace;

    fn exec(start: u64, end: u64, pgoff: u64, o: u64) -> VmaInfo {
        VmaInfo {
            start,
            end,
            pgoff,
            flags: VmFlags::EXEC,
            object: ObjectId(o),
        }
    }

    #[test]
    fn map_unmap_split_protect_remap() {
        let rcu = SlotRcu::new();
        let mm = Mm::new(MmId(1));
        let w = mm.write();
        w.map(&rcu, 10 * P, 4 * P, 0, ObjectId(7), VmFlags::EXEC)
            .unwrap();
        w.map(
            &rcu,
            20 * P,
            2 * P,
            8 * P,
            ObjectId(8),
            VmFlags::EXEC | VmFlags::SHARED,
        )
        .unwrap();
        assert_eq!(w.find(11 * P + 5), Some(exec(10 * P, 14 * P, 0, 7)));
        assert_eq!(w.find(14 * P), None);
        // Unmap the middle: two pieces remain, offsets kept.
        let gone = w.unmap(&rcu, 11 * P, 2 * P).unwrap();
        assert_eq!(gone, std::vec![exec(11 * P, 13 * P, P, 7)]);
        assert_eq!(w.find(10 * P), Some(exec(10 * P, 11 * P, 0, 7)));
        assert_eq!(w.find(13 * P), Some(exec(13 * P, 14 * P, 3 * P, 7)));
        // Split and protect.
        w.split(&rcu, 21 * P).unwrap();
        assert_eq!(w.mappings().len(), 4);
        w.protect(&rcu, 21 * P, P, VmFlags::NONE).unwrap();
        assert_eq!(w.find(21 * P).unwrap().flags, VmFlags::NONE);
        assert_eq!(
            w.find(20 * P).unwrap().flags,
            VmFlags::EXEC | VmFlags::SHARED
        );
        // Remap moves a whole mapping.
        w.remap(&rcu, 13 * P, P, 40 * P).unwrap();
        assert_eq!(w.find(40 * P), Some(exec(40 * P, 41 * P, 3 * P, 7)));
        assert_eq!(w.find(13 * P), None);
        // Replace what a mapping maps.
        w.replace_object(&rcu, 40 * P, ObjectId(9), 0).unwrap();
        assert_eq!(w.find(40 * P), Some(exec(40 * P, 41 * P, 0, 9)));
        // Fork copies, clear empties.
        let child: Mm = w.fork(&rcu, MmId(2)).unwrap();
        assert_eq!(child.mappings(), w.mappings());
        assert_eq!(w.clear(&rcu).unwrap().len(), 4);
        assert!(w.mappings().is_empty());
        drop(w);
        rcu.synchronize();
    }

    #[test]
    fn bad_ranges_are_errors_and_change_nothing() {
        let rcu = SlotRcu::new();
        let mm = Mm::new(MmId(1));
        let w = mm.write();
        w.map(&rcu, 10 * P, 4 * P, 0, ObjectId(7), VmFlags::EXEC)
            .unwrap();
        let before = w.mappings();
        assert_eq!(
            w.map(&rcu, 12 * P, 4 * P, 0, ObjectId(8), VmFlags::EXEC),
            Err(Error::Overlap)
        );
        assert_eq!(
            w.map(&rcu, 9 * P, 2 * P, 0, ObjectId(8), VmFlags::EXEC),
            Err(Error::Overlap)
        );
        assert_eq!(
            w.map(&rcu, 30 * P, 0, 0, ObjectId(8), VmFlags::EXEC),
            Err(Error::BadRange)
        );
        assert_eq!(
            w.map(&rcu, 30 * P + 1, P, 0, ObjectId(8), VmFlags::EXEC),
            Err(Error::BadRange)
        );
        assert_eq!(
            w.map(&rcu, u64::MAX - P + 1, 2 * P, 0, ObjectId(8), VmFlags::EXEC),
            Err(Error::BadRange)
        );
        assert_eq!(w.unmap(&rcu, 13 * P, 2 * P), Err(Error::NotMapped));
        assert_eq!(w.unmap(&rcu, 30 * P, P), Err(Error::NotMapped));
        assert_eq!(
            w.protect(&rcu, 8 * P, 4 * P, VmFlags::NONE),
            Err(Error::NotMapped)
        );
        assert_eq!(w.remap(&rcu, 10 * P, 2 * P, 40 * P), Err(Error::NotMapped));
        assert_eq!(w.split(&rcu, 30 * P), Err(Error::NotMapped));
        assert_eq!(
            w.replace_object(&rcu, 30 * P, ObjectId(1), 0),
            Err(Error::NotMapped)
        );
        w.map(&rcu, 40 * P, P, 0, ObjectId(8), VmFlags::EXEC)
            .unwrap();
        assert_eq!(w.remap(&rcu, 40 * P, P, 13 * P), Err(Error::Overlap));
        w.unmap(&rcu, 40 * P, P).unwrap();
        assert_eq!(w.mappings(), before);
        // Allocation failure at every point of a map and a middle unmap: nothing visible changes.
        for n in 0..40 {
            fail_after(Some(n));
            let r = w.map(&rcu, 50 * P, P, 0, ObjectId(3), VmFlags::EXEC);
            fail_after(None);
            match r {
                Err(Error::NoMemory) => assert_eq!(w.mappings(), before),
                Ok(_) => {
                    w.unmap(&rcu, 50 * P, P).unwrap();
                    break;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        let addr_map = |w: &crate::mm::MmWriter<'_, crate::lock::SpinLock>| {
            (10..14)
                .map(|p| w.find(p * P).map(|i| (i.object, i.offset_of(p * P))))
                .collect::<Vec<_>>()
        };
        let want = addr_map(&w);
        for n in 0..40 {
            fail_after(Some(n));
            let r = w.unmap(&rcu, 11 * P, P);
            fail_after(None);
            match r {
                // A split may remain, but every address still maps the same (object, offset).
                Err(Error::NoMemory) => assert_eq!(addr_map(&w), want),
                Ok(_) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        drop(w);
        rcu.synchronize();
    }

    #[test]
    fn speculation_fails_while_a_writer_is_inside_and_validates_after() {
        let rcu = SlotRcu::new();
        let mm = Mm::new(MmId(1));
        mm.write()
            .map(&rcu, 10 * P, 4 * P, 0, ObjectId(7), VmFlags::EXEC)
            .unwrap();
        let reader = rcu.register().unwrap();
        let _g = rcu.read_lock(&reader);
        let mut s = mm.speculate_begin().unwrap();
        assert_eq!(
            mm.speculate_find(&mut s, 12 * P + 3),
            Some((ObjectId(7), 2 * P + 3))
        );
        assert!(mm.speculate_validate(&s));
        // A change in between invalidates.
        let mut s = mm.speculate_begin().unwrap();
        assert!(mm.speculate_find(&mut s, 12 * P).is_some());
        mm.write().protect(&rcu, 10 * P, P, VmFlags::EXEC).unwrap();
        assert!(!mm.speculate_validate(&s));
        // Non-executable and unmapped addresses have no speculative answer.
        let mut s = mm.speculate_begin().unwrap();
        assert_eq!(mm.speculate_find(&mut s, 30 * P), None);
    }
}

// ---------------------------------------------------------------- breakpoints vs oracle

mod uprobes_tests {
    use super::*;
    use crate::mm::{MmId, PAGE_SIZE, VmFlags, VmaInfo};
    use crate::testing::{ByteText, Int3};
    use crate::uprobes::{Hit, Uprobes};
    use std::collections::{BTreeMap, BTreeSet};

    const P: u64 = PAGE_SIZE;
    const OBJECTS: u64 = 3;
    const OBJ_PAGES: u64 = 6;
    /// Offsets where probes go (and program traps sit), per object.
    const SPOTS: [u64; 7] = [0, 1, 7, P + 3, 2 * P, 3 * P + 100, 5 * P + 4095];
    /// A program trap (0xCC in the object itself) at this spot of each object.
    const PROGRAM_TRAP: u64 = 7;
    /// Past the end of every object.
    const PAST_END: u64 = OBJ_PAGES * P + 5;

    type U = Uprobes<Hook, SlotRcu, Int3, ByteText>;

    fn object_bytes(o: u64) -> Vec<u8> {
        (0..OBJ_PAGES * P)
            .map(|i| {
                if i == PROGRAM_TRAP {
                    0xCC
                } else {
                    (i as u8).wrapping_mul(31).wrapping_add(o as u8) % 0xCB
                }
            })
            .collect()
    }

    #[derive(Clone, Debug)]
    enum Op {
        Map(usize, u64, u64, u64, u64, bool),
        Unmap(usize, u64, u64),
        Split(usize, u64),
        Protect(usize, u64, u64, bool),
        Remap(usize, u64, u64, u64),
        Fork(usize),
        Exit(usize),
        Register(u64, usize, usize),
        Unregister(u64, usize, usize),
        Hit(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let mm = 0usize..4;
        prop_oneof![
            4 => (mm.clone(), 0u64..16, 1u64..5, 0..OBJECTS, 0u64..4, any::<bool>()).prop_map(|(m, s, n, o, g, x)| Op::Map(m, s, n, o, g, x)),
            2 => (mm.clone(), 0u64..16, 1u64..4).prop_map(|(m, s, n)| Op::Unmap(m, s, n)),
            1 => (mm.clone(), 0u64..16).prop_map(|(m, s)| Op::Split(m, s)),
            2 => (mm.clone(), 0u64..16, 1u64..4, any::<bool>()).prop_map(|(m, s, n, x)| Op::Protect(m, s, n, x)),
            1 => (mm.clone(), 0u64..16, 1u64..4, 0u64..24).prop_map(|(m, s, n, d)| Op::Remap(m, s, n, d)),
            1 => mm.clone().prop_map(Op::Fork),
            1 => mm.clone().prop_map(Op::Exit),
            4 => (0..OBJECTS, 0usize..SPOTS.len() + 1, 0usize..3).prop_map(|(o, s, c)| Op::Register(o, s, c)),
            3 => (0..OBJECTS, 0usize..SPOTS.len() + 1, 0usize..3).prop_map(|(o, s, c)| Op::Unregister(o, s, c)),
            4 => (mm, 0usize..64).prop_map(|(m, a)| Op::Hit(m, a)),
        ]
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Run(ProbeKey),
        NotOurs,
        Restart,
    }

    /// The oracle: what each address space maps and which probes are wanted; the expected code
    /// byte and hit outcome follow from those alone.
    #[derive(Default)]
    struct Oracle {
        mms: BTreeMap<u64, Vec<VmaInfo>>,
        probes: BTreeMap<ProbeKey, BTreeSet<usize>>,
    }

    impl Oracle {
        fn find(&self, mm: u64, addr: u64) -> Option<VmaInfo> {
            self.mms
                .get(&mm)?
                .iter()
                .find(|v| v.contains(addr))
                .copied()
        }
        fn expected_byte(&self, v: &VmaInfo, addr: u64) -> u8 {
            let off = v.offset_of(addr);
            let key = ProbeKey::new(v.object, off);
            if v.flags.contains(VmFlags::EXEC) && self.probes.contains_key(&key) {
                return 0xCC;
            }
            object_bytes(v.object.0)
                .get(off as usize)
                .copied()
                .unwrap_or(0)
        }
        fn hit(&self, mm: u64, addr: u64) -> Outcome {
            let Some(v) = self
                .find(mm, addr)
                .filter(|v| v.flags.contains(VmFlags::EXEC))
            else {
                return Outcome::Restart;
            };
            let key = ProbeKey::new(v.object, v.offset_of(addr));
            if self.probes.contains_key(&key) {
                return Outcome::Run(key);
            }
            if self.expected_byte(&v, addr) == 0xCC {
                Outcome::NotOurs
            } else {
                Outcome::Restart
            }
        }
        fn intersecting(&self, mm: u64, s: u64, e: u64) -> Vec<VmaInfo> {
            self.mms
                .get(&mm)
                .map(|vs| {
                    vs.iter()
                        .filter(|v| v.start < e && s < v.end)
                        .copied()
                        .collect()
                })
                .unwrap_or_default()
        }
        fn covered(&self, mm: u64, s: u64, e: u64) -> bool {
            let mut vs = self.intersecting(mm, s, e);
            vs.sort_by_key(|v| v.start);
            let mut at = s;
            for v in &vs {
                if v.start > at {
                    return false;
                }
                at = v.end;
            }
            !vs.is_empty() && at >= e
        }
        /// Cut every mapping of `mm` at `a` (if strictly inside).
        fn cut(&mut self, mm: u64, a: u64) {
            let vs = self.mms.get_mut(&mm).unwrap();
            if let Some(i) = vs.iter().position(|v| v.start < a && a < v.end) {
                let v = vs[i];
                vs[i].end = a;
                vs.push(VmaInfo {
                    start: a,
                    pgoff: v.pgoff + (a - v.start),
                    ..v
                });
            }
        }
    }

    /// Every address where a probe or a program trap of a mapped object sits, plus a few others.
    fn interesting(o: &Oracle, mm: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for v in o.mms.get(&mm).into_iter().flatten() {
            for s in SPOTS {
                if let Some(a) = v.addr_of(s) {
                    out.push(a);
                }
            }
            out.push(v.start + 11);
        }
        out.push(100 * P);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn breakpoints_and_hits_match_the_oracle(ops in proptest::collection::vec(op(), 1..120)) {
            let text = ByteText::new();
            for o in 0..OBJECTS {
                text.add_object(ObjectId(o), object_bytes(o));
            }
            let u: U = Uprobes::new(SlotRcu::new(), text);
            let reader = u.registry().rcu().register().unwrap();
            let consumers: Vec<Arc<Hook>> = (0..3).map(|_| counting().0).collect();
            let mut oracle = Oracle::default();
            let mut next_id = 1u64;
            let mut ids: Vec<u64> = Vec::new();
            for _ in 0..2 {
                u.create_mm(MmId(next_id)).unwrap();
                oracle.mms.insert(next_id, Vec::new());
                ids.push(next_id);
                next_id += 1;
            }
            let pick = |ids: &Vec<u64>, i: usize| ids.get(i % ids.len().max(1)).copied();
            for op in ops {
                match op {
                    Op::Map(m, s, n, o, g, x) => {
                        let Some(id) = pick(&ids, m) else { continue };
                        let mm = u.mm(MmId(id)).unwrap();
                        let flags = if x { VmFlags::EXEC } else { VmFlags::NONE };
                        let got = u.mmap(&mm, s * P, n * P, g * P, ObjectId(o), flags).map(|_| ());
                        let want = if oracle.intersecting(id, s * P, (s + n) * P).is_empty() {
                            oracle.mms.get_mut(&id).unwrap().push(VmaInfo { start: s * P, end: (s + n) * P, pgoff: g * P, flags, object: ObjectId(o) });
                            Ok(())
                        } else {
                            Err(Error::Overlap)
                        };
                        prop_assert_eq!(got, want);
                    }
                    Op::Unmap(m, s, n) => {
                        let Some(id) = pick(&ids, m) else { continue };
                        let got = u.munmap(&u.mm(MmId(id)).unwrap(), s * P, n * P);
                        let (a, b) = (s * P, (s + n) * P);
                        let want = if oracle.covered(id, a, b) {
                            oracle.cut(id, a);
                            oracle.cut(id, b);
                            oracle.mms.get_mut(&id).unwrap().retain(|v| v.end <= a || v.start >= b);
                            Ok(())
                        } else {
                            Err(Error::NotMapped)
                        };
                        prop_assert_eq!(got, want);
                    }
                    Op::Split(m, s) => {
                        let Some(id) = pick(&ids, m) else { continue };
                        let got = u.split(&u.mm(MmId(id)).unwrap(), s * P);
                        let want = if oracle.find(id, s * P).is_some() { oracle.cut(id, s * P); Ok(()) } else { Err(Error::NotMapped) };
                        prop_assert_eq!(got, want);
                    }
                    Op::Protect(m, s, n, x) => {
                        let Some(id) = pick(&ids, m) else { continue };
                        let flags = if x { VmFlags::EXEC } else { VmFlags::NONE };
                        let got = u.mprotect(&u.mm(MmId(id)).unwrap(), s * P, n * P, flags);
                        let (a, b) = (s * P, (s + n) * P);
                        let want = if oracle.covered(id, a, b) {
                            oracle.cut(id, a);
                            oracle.cut(id, b);
                            for v in oracle.mms.get_mut(&id).unwrap().iter_mut().filter(|v| v.start >= a && v.end <= b) {
                                v.flags = flags;
                            }
                            Ok(())
                        } else {
                            Err(Error::NotMapped)
                        };
                        prop_assert_eq!(got, want);
                    }
                    Op::Remap(m, s, n, d) => {
                        let Some(id) = pick(&ids, m) else { continue };
                        let got = u.mremap(&u.mm(MmId(id)).unwrap(), s * P, n * P, d * P);
                        let (a, b) = (s * P, (s + n) * P);
                        let here = oracle.intersecting(id, a, b);
                        let want = match here.as_slice() {
                            [v] if v.start == a && v.end == b => {
                                let v = *v;
                                if oracle.intersecting(id, d * P, (d + n) * P).iter().any(|w| *w != v) {
                                    Err(Error::Overlap)
                                } else {
                                    let vs = oracle.mms.get_mut(&id).unwrap();
                                    let w = vs.iter_mut().find(|w| **w == v).unwrap();
                                    w.start = d * P;
                                    w.end = (d + n) * P;
                                    Ok(())
                                }
                            }
                            _ => Err(Error::NotMapped),
                        };
                        prop_assert_eq!(got, want);
                    }
                    Op::Fork(m) => {
                        let Some(id) = pick(&ids, m) else { continue };
                        if ids.len() >= 4 { continue }
                        let child = next_id;
                        next_id += 1;
                        u.fork(&u.mm(MmId(id)).unwrap(), MmId(child)).unwrap();
                        let vs = oracle.mms[&id].clone();
                        oracle.mms.insert(child, vs);
                        ids.push(child);
                    }
                    Op::Exit(m) => {
                        let Some(id) = pick(&ids, m) else { continue };
                        u.exit(&u.mm(MmId(id)).unwrap()).unwrap();
                        prop_assert!(u.mm(MmId(id)).is_none());
                        oracle.mms.remove(&id);
                        ids.retain(|&i| i != id);
                    }
                    Op::Register(o, s, c) => {
                        let off = SPOTS.get(s).copied().unwrap_or(PAST_END);
                        let key = ProbeKey::new(ObjectId(o), off);
                        let got = u.register(key, consumers[c].clone());
                        let want = if off == PAST_END {
                            Err(Error::OffsetOutOfRange)
                        } else if off == PROGRAM_TRAP {
                            Err(Error::ExistingTrap)
                        } else if !oracle.probes.entry(key).or_default().insert(c) {
                            Err(Error::DuplicateConsumer)
                        } else {
                            Ok(())
                        };
                        if oracle.probes.get(&key).is_some_and(|v| v.is_empty()) {
                            oracle.probes.remove(&key);
                        }
                        prop_assert_eq!(got, want);
                    }
                    Op::Unregister(o, s, c) => {
                        let off = SPOTS.get(s).copied().unwrap_or(PAST_END);
                        let key = ProbeKey::new(ObjectId(o), off);
                        let got = u.unregister(&key, &consumers[c]);
                        let want = match oracle.probes.get_mut(&key) {
                            None => Err(Error::UnknownProbe),
                            Some(set) => {
                                if set.remove(&c) {
                                    if set.is_empty() {
                                        oracle.probes.remove(&key);
                                    }
                                    Ok(())
                                } else {
                                    Err(Error::UnknownConsumer)
                                }
                            }
                        };
                        prop_assert_eq!(got, want);
                    }
                    Op::Hit(m, a) => {
                        let Some(id) = pick(&ids, m) else { continue };
                        let addrs = interesting(&oracle, id);
                        let addr = addrs[a % addrs.len()];
                        let mm = u.mm(MmId(id)).unwrap();
                        let g = u.read(&reader);
                        let got = match u.resolve(&g, &*mm, addr).0 {
                            Hit::Run(p) => Outcome::Run(p.key()),
                            Hit::NotOurs => Outcome::NotOurs,
                            Hit::Restart => Outcome::Restart,
                        };
                        prop_assert_eq!(got, oracle.hit(id, addr), "hit at {:#x} of mm {}", addr, id);
                    }
                }
                // Every mapping and every code byte that matters matches the oracle.
                for &id in &ids {
                    let mm = u.mm(MmId(id)).unwrap();
                    let mut got = mm.mappings();
                    let mut want = oracle.mms[&id].clone();
                    got.sort_by_key(|v| v.start);
                    want.sort_by_key(|v| v.start);
                    prop_assert_eq!(&got, &want, "mappings of mm {}", id);
                    for v in &want {
                        for s in SPOTS {
                            if let Some(addr) = v.addr_of(s) {
                                prop_assert_eq!(u.text().byte(MmId(id), v, addr), oracle.expected_byte(v, addr), "byte at {:#x} of mm {} ({:?})", addr, id, v);
                            }
                        }
                    }
                }
            }
            u.sync();
        }
    }

    /// Invariant 1 for the whole speculative hit: address-space speculation, probe lookup and
    /// consumer traversal write no shared memory (every store/RMW through the facade is logged).
    #[test]
    fn speculative_resolve_writes_no_shared_memory() {
        let text = ByteText::new();
        text.add_object(ObjectId(1), object_bytes(1));
        let u: U = Uprobes::new(SlotRcu::new(), text);
        let mm = u.create_mm(MmId(1)).unwrap();
        u.mmap(&mm, 0, 4 * P, 0, ObjectId(1), VmFlags::EXEC)
            .unwrap();
        let (c, _) = counting();
        for off in [0, 1, P + 3, 2 * P] {
            u.register(ProbeKey::new(ObjectId(1), off), c.clone())
                .unwrap();
        }
        let reader = u.registry().rcu().register().unwrap();
        let g = u.read(&reader);
        let (runs, stores) = stores_during(|| {
            let mut runs = 0;
            for addr in [0, 1, P + 3, 2 * P] {
                let (hit, path) = u.resolve(&g, &*mm, addr);
                assert_eq!(path, crate::uprobes::Path::Speculative);
                if let Hit::Run(p) = hit {
                    for c in p.consumers() {
                        c(0);
                    }
                    runs += 1;
                }
            }
            runs
        });
        assert_eq!(runs, 4);
        assert!(
            stores.is_empty(),
            "the speculative hit path wrote shared memory at {stores:x?}"
        );
    }

    #[test]
    fn bad_registrations_change_nothing() {
        let text = ByteText::new();
        text.add_object(ObjectId(1), object_bytes(1));
        let u: U = Uprobes::new(SlotRcu::new(), text);
        let mm = u.create_mm(MmId(1)).unwrap();
        assert_eq!(u.create_mm(MmId(1)).unwrap_err(), Error::Overlap);
        u.mmap(&mm, 0, 4 * P, 0, ObjectId(1), VmFlags::EXEC)
            .unwrap();
        let (c, _) = counting();
        let writes = u.text().writes();
        assert_eq!(
            u.register(ProbeKey::new(ObjectId(1), PAST_END), c.clone()),
            Err(Error::OffsetOutOfRange)
        );
        assert_eq!(
            u.register(ProbeKey::new(ObjectId(2), 0), c.clone()),
            Err(Error::OffsetOutOfRange)
        );
        assert_eq!(
            u.register(ProbeKey::new(ObjectId(1), PROGRAM_TRAP), c.clone()),
            Err(Error::ExistingTrap)
        );
        assert_eq!(
            u.text().writes(),
            writes,
            "a refused registration wrote code"
        );
        assert!(u.registry().is_empty());
        // A registration on the program's own trap is refused, and a hit there is not ours.
        let reader = u.registry().rcu().register().unwrap();
        let g = u.read(&reader);
        assert!(matches!(u.resolve(&g, &*mm, PROGRAM_TRAP).0, Hit::NotOurs));
        assert!(matches!(u.resolve(&g, &*mm, 8).0, Hit::Restart));
    }

    /// Unregistration allocates nothing, however many mappings its walk visits (40 address
    /// spaces: more than one chunk of the reverse map): with any allocation failing it
    /// succeeds, and every breakpoint is gone.
    #[test]
    fn unregister_never_allocates_across_many_mappings() {
        let text = ByteText::new();
        text.add_object(ObjectId(1), object_bytes(1));
        let u: U = Uprobes::new(SlotRcu::new(), text);
        let mms: Vec<_> = (0..40)
            .map(|i| {
                let mm = u.create_mm(MmId(i + 1)).unwrap();
                u.mmap(&mm, 0, 4 * P, 0, ObjectId(1), VmFlags::EXEC)
                    .unwrap();
                mm
            })
            .collect();
        let reader = u.registry().rcu().register().unwrap();
        let k = ProbeKey::new(ObjectId(1), 3);
        let (c, _) = counting();
        for n in 0..4 {
            u.register(k, c.clone()).unwrap();
            {
                let g = u.read(&reader);
                for mm in &mms {
                    assert!(matches!(u.resolve(&g, &**mm, 3).0, Hit::Run(_)));
                }
            }
            fail_after(Some(n));
            let r = u.unregister(&k, &c);
            fail_after(None);
            assert_eq!(r, Ok(()), "unregister failed with allocation {n} failing");
            // (The probe's own removal from the tree may have been the allocation that failed:
            // then it is an orphan until the sync below retries it.)
            u.sync();
            let g = u.read(&reader);
            for mm in &mms {
                assert!(
                    matches!(u.resolve(&g, &**mm, 3).0, Hit::Restart),
                    "a breakpoint survived the unregistration"
                );
            }
        }
        assert!(u.registry().is_empty());
    }
}

// ---------------------------------------------------------------- XOL slots and the task cache

mod xol_tests {
    use super::*;
    use crate::arch::TextPatcher;
    use crate::mm::{MmId, PAGE_SIZE, VmFlags, VmaInfo};
    use crate::testing::{ByteText, Int3};
    use crate::uprobes::Uprobes;
    #[cfg(feature = "std")]
    use crate::xol::CondvarWait;
    use crate::xol::{LazyXol, SpinWait, Step, Task, WaitQueue, XolArea};

    const P: u64 = PAGE_SIZE;
    const XOL: u64 = 0x7fff_0000;
    type U = Uprobes<Hook, SlotRcu, Int3, ByteText>;

    fn world(probes: u64) -> (U, Arc<crate::mm::AddressSpace>, Arc<Hook>) {
        let text = ByteText::new();
        text.add_object(ObjectId(1), (0..4 * P).map(|i| (i % 0xC0) as u8).collect());
        let u: U = Uprobes::new(SlotRcu::new(), text);
        let mm = u.create_mm(MmId(1)).unwrap();
        u.mmap(&mm, 0, 4 * P, 0, ObjectId(1), VmFlags::EXEC)
            .unwrap();
        let (c, _) = counting();
        for i in 0..probes {
            u.register(ProbeKey::new(ObjectId(1), i * 16), c.clone())
                .unwrap();
        }
        (u, mm, c)
    }

    /// Runs a hit as an embedder would: consumers, then "execute" the slot (check what
    /// instruction fetch sees there is exactly the displaced instruction), then free the slot.
    fn hit<'r, W: WaitQueue>(
        u: &'r U,
        task: &mut Task<'r, Hook, SlotRcu, crate::lock::SpinLock, 64>,
        reader: &'r crate::rcu::SlotReader<'_>,
        mm: &crate::mm::AddressSpace,
        xol: &XolArea<W>,
        addr: u64,
        cache: bool,
    ) -> bool {
        let g = u.read(reader);
        match task.on_breakpoint(u, &g, mm, xol, addr, cache).unwrap() {
            Step::Run { probe, slot } => {
                for c in probe.consumers() {
                    c(0);
                }
                let mut fetched = [0u8; 1];
                u.text().fetch_xol(mm.id(), slot.addr(), &mut fetched);
                assert_eq!(
                    &fetched[..],
                    probe.probe().saved_insn().as_bytes(),
                    "executed bytes that are not the displaced instruction"
                );
                true
            }
            _ => false,
        }
    }

    #[test]
    fn repeated_hits_of_one_probe_copy_and_flush_once() {
        let (u, mm, _) = world(4);
        let xol = XolArea::new(XOL, 64, 8, SpinWait::default()).unwrap();
        let reader = u.registry().rcu().register().unwrap();
        let mut task = Task::new();
        for _ in 0..1000 {
            assert!(hit(&u, &mut task, &reader, &mm, &xol, 16, true));
        }
        assert_eq!(
            (task.copies(), task.flushes(), task.cache_hits()),
            (1, 1, 999)
        );
        // Without the cache: a copy and a flush every time.
        let mut cold = Task::new();
        for _ in 0..1000 {
            assert!(hit(&u, &mut cold, &reader, &mm, &xol, 16, false));
        }
        assert_eq!(
            (cold.copies(), cold.flushes(), cold.cache_hits()),
            (1000, 1000, 0)
        );
        assert_eq!(xol.free_slots(), 8);
    }

    #[test]
    fn a_slot_reused_by_another_probe_is_recopied() {
        let (u, mm, _) = world(4);
        let xol = XolArea::new(XOL, 64, 1, SpinWait::default()).unwrap();
        let reader = u.registry().rcu().register().unwrap();
        let (mut a, mut b) = (Task::new(), Task::new());
        assert!(hit(&u, &mut a, &reader, &mm, &xol, 16, true));
        assert!(hit(&u, &mut b, &reader, &mm, &xol, 32, true)); // overwrites the only slot
        assert!(hit(&u, &mut a, &reader, &mm, &xol, 16, true)); // must see it changed
        assert_eq!((a.copies(), a.flushes()), (2, 2));
    }

    fn many_threads_few_slots<W: WaitQueue + Default>() {
        let (u, mm, _) = world(64);
        let xol = XolArea::new(XOL, 64, 2, W::default()).unwrap();
        let done = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..6u64 {
                let (u, mm, xol, done) = (&u, &mm, &xol, &done);
                s.spawn(move || {
                    let reader = u.registry().rcu().register().unwrap();
                    let mut task = Task::new();
                    for i in 0..500u64 {
                        let addr = ((i * 7 + t) % 64) * 16;
                        assert!(hit(u, &mut task, &reader, mm, xol, addr, true));
                        // Hold the slot a little longer sometimes, so others must wait.
                        if i % 50 == 0 {
                            let g = u.read(&reader);
                            if let Step::Run { slot, .. } =
                                task.on_breakpoint(u, &g, &**mm, xol, addr, true).unwrap()
                            {
                                std::thread::sleep(std::time::Duration::from_micros(200));
                                drop(slot);
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        assert_eq!(done.load(Ordering::Relaxed), 6);
        assert_eq!(xol.free_slots(), 2);
    }

    #[test]
    fn more_threads_than_slots_all_complete_spin() {
        many_threads_few_slots::<SpinWait>();
    }

    #[cfg(feature = "std")]
    #[test]
    fn more_threads_than_slots_all_complete_condvar() {
        many_threads_few_slots::<CondvarWait>();
    }

    /// A patcher whose XOL writes or flushes fail on demand.
    struct Failing {
        inner: ByteText,
        fail_write: AtomicBool,
        fail_flush: AtomicBool,
    }

    impl TextPatcher for Failing {
        fn read_object(&self, o: ObjectId, off: u64, buf: &mut [u8]) -> crate::Result<()> {
            self.inner.read_object(o, off, buf)
        }
        fn read(&self, mm: MmId, v: &VmaInfo, a: u64, buf: &mut [u8]) -> crate::Result<()> {
            self.inner.read(mm, v, a, buf)
        }
        fn write(&self, mm: MmId, v: &VmaInfo, a: u64, b: &[u8]) -> crate::Result<()> {
            self.inner.write(mm, v, a, b)
        }
        fn read_xol(&self, mm: MmId, a: u64, buf: &mut [u8]) -> crate::Result<()> {
            self.inner.read_xol(mm, a, buf)
        }
        fn write_xol(&self, mm: MmId, a: u64, b: &[u8]) -> crate::Result<()> {
            if self.fail_write.load(Ordering::Relaxed) {
                Err(Error::NoMemory)
            } else {
                self.inner.write_xol(mm, a, b)
            }
        }
        fn flush_icache(&self, mm: MmId, a: u64, n: usize) -> crate::Result<()> {
            if self.fail_flush.load(Ordering::Relaxed) {
                Err(Error::NoMemory)
            } else {
                self.inner.flush_icache(mm, a, n)
            }
        }
    }

    #[test]
    fn every_error_path_returns_its_slot() {
        let inner = ByteText::new();
        inner.add_object(ObjectId(1), std::vec![0x90; 4 * P as usize]);
        let u: Uprobes<Hook, SlotRcu, Int3, Failing> = Uprobes::new(
            SlotRcu::new(),
            Failing {
                inner,
                fail_write: AtomicBool::new(false),
                fail_flush: AtomicBool::new(false),
            },
        );
        let mm = u.create_mm(MmId(1)).unwrap();
        u.mmap(&mm, 0, 4 * P, 0, ObjectId(1), VmFlags::EXEC)
            .unwrap();
        let (c, _) = counting();
        u.register(ProbeKey::new(ObjectId(1), 16), c).unwrap();
        let xol = XolArea::new(XOL, 64, 3, SpinWait::default()).unwrap();
        let reader = u.registry().rcu().register().unwrap();
        let mut task = Task::new();
        let mut errors = 0;
        for (w, f) in [(true, false), (false, true), (true, true)] {
            u.text().fail_write.store(w, Ordering::Relaxed);
            u.text().fail_flush.store(f, Ordering::Relaxed);
            for cache in [false, true] {
                let g = u.read(&reader);
                assert_eq!(
                    task.on_breakpoint(&u, &g, &*mm, &xol, 16, cache).err(),
                    Some(Error::NoMemory)
                );
                errors += 1;
                assert_eq!(xol.free_slots(), 3, "an error path kept its slot");
            }
        }
        assert_eq!(errors, 6);
        // And once it works, the slot is taken and then returned by the guard.
        u.text().fail_write.store(false, Ordering::Relaxed);
        u.text().fail_flush.store(false, Ordering::Relaxed);
        // A slot whose flush failed shows our bytes to a read, but must not be reused unflushed.
        let flushes = task.flushes();
        let g = u.read(&reader);
        match task.on_breakpoint(&u, &g, &*mm, &xol, 16, true).unwrap() {
            Step::Run { slot, .. } => {
                assert_eq!(xol.free_slots(), 2);
                drop(slot);
            }
            _ => panic!("expected a run"),
        }
        assert_eq!(
            task.flushes(),
            flushes + 1,
            "reused a slot whose last flush failed"
        );
        assert_eq!(xol.free_slots(), 3);
    }

    #[test]
    fn the_cache_drops_entries_when_the_mapping_or_the_probe_changes() {
        let (u, mm, c) = world(4);
        let xol = XolArea::new(XOL, 64, 4, SpinWait::default()).unwrap();
        let reader = u.registry().rcu().register().unwrap();
        let mut task = Task::new();
        assert!(hit(&u, &mut task, &reader, &mm, &xol, 16, true));
        assert!(hit(&u, &mut task, &reader, &mm, &xol, 16, true));
        assert_eq!((task.cached(), task.cache_hits()), (1, 1));
        // Any change to the address space invalidates.
        u.mprotect(&mm, 3 * P, P, VmFlags::NONE).unwrap();
        assert!(hit(&u, &mut task, &reader, &mm, &xol, 16, true));
        assert_eq!(
            task.cache_hits(),
            1,
            "a cache entry survived a change of the address space"
        );
        // Unregistering empties the probe: the entry is not trusted (and the hit falls back).
        u.unregister(&ProbeKey::new(ObjectId(1), 16), &c).unwrap();
        u.sync();
        let g = u.read(&reader);
        assert!(matches!(
            task.on_breakpoint(&u, &g, &*mm, &xol, 16, true).unwrap(),
            Step::Restart
        ));
        assert_eq!(task.cached(), 0);
    }

    #[test]
    fn bad_areas_are_errors() {
        assert_eq!(
            XolArea::new(XOL, 64, 0, SpinWait::default()).err(),
            Some(Error::BadRange)
        );
        assert_eq!(
            XolArea::new(XOL, 2, 4, SpinWait::default()).err(),
            Some(Error::BadRange)
        );
        assert_eq!(
            XolArea::new(u64::MAX - 64, 64, 4, SpinWait::default()).err(),
            Some(Error::BadRange)
        );
        let a = XolArea::new(XOL, 64, 2, SpinWait::default()).unwrap();
        assert!(
            a.try_take_slot(2).is_none(),
            "a slot index past the end was taken"
        );
    }

    #[test]
    fn the_area_is_created_once() {
        let lazy: LazyXol<SpinWait> = LazyXol::new();
        let made = AtomicU64::new(0);
        let addrs: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let a = lazy.get_or_create(|| {
                            made.fetch_add(1, Ordering::Relaxed);
                            XolArea::new(XOL, 64, 4, SpinWait::default())
                        });
                        a.unwrap() as *const _ as usize
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            addrs.windows(2).all(|w| w[0] == w[1]),
            "two areas were published"
        );
        assert!(made.load(Ordering::Relaxed) >= 1);
        assert_eq!(lazy.get().unwrap().slots(), 4);
    }

    /// Six threads, two slots: a slot is never owned by two threads at once. (This caught a
    /// guard built eagerly for a busy slot, whose drop freed someone else's slot.)
    #[test]
    fn slots_are_never_owned_twice() {
        let xol = XolArea::new(0x1000, 64, 2, SpinWait::default()).unwrap();
        let owners: Vec<std::sync::atomic::AtomicUsize> = (0..2)
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect();
        std::thread::scope(|s| {
            for t in 1..=6usize {
                let (xol, owners) = (&xol, &owners);
                s.spawn(move || {
                    for _ in 0..20000 {
                        let slot = xol.take();
                        let prev = owners[slot.index()].swap(t, Ordering::SeqCst);
                        assert_eq!(
                            prev,
                            0,
                            "slot {} taken by {t} while owned by {prev}",
                            slot.index()
                        );
                        std::hint::spin_loop();
                        owners[slot.index()].store(0, Ordering::SeqCst);
                        drop(slot);
                    }
                });
            }
        });
    }

    /// Invariant 1 for the cached hit: finding the breakpoint in the task's cache, checking it,
    /// reusing its slot and freeing it writes only that slot's own flag (a line no other slot
    /// shares), besides the reader's own RCU slot.
    #[test]
    fn a_cached_hit_writes_only_its_own_slot_flag() {
        let (u, mm, _) = world(4);
        let xol = XolArea::new(XOL, 64, 8, SpinWait::default()).unwrap();
        let reader = u.registry().rcu().register().unwrap();
        let mut task = Task::new();
        assert!(hit(&u, &mut task, &reader, &mm, &xol, 16, true));
        let g = u.read(&reader);
        let (slot_index, stores) =
            stores_during(
                || match task.on_breakpoint(&u, &g, &*mm, &xol, 16, true).unwrap() {
                    Step::Run { slot, .. } => slot.index(),
                    _ => usize::MAX,
                },
            );
        assert_eq!(task.copies(), 1, "the cached hit copied");
        let flag = xol.flag_addr(slot_index);
        // The test patcher's own lock is the embedder's business, not probe-core's.
        let patcher = u.text().lock_addrs();
        let ours: Vec<usize> = stores
            .into_iter()
            .filter(|a| !patcher.contains(a))
            .collect();
        assert!(!ours.is_empty());
        assert!(
            ours.iter().all(|&a| a == flag),
            "a cached hit wrote outside its slot's flag: {ours:x?} (flag {flag:x})"
        );
    }
}

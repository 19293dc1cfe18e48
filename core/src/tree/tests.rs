//! Unit and property tests of the copy-on-write tree.

extern crate std;

use crate::alloc_util::fail_after;
use crate::error::Error;
use crate::rcu::{Rcu, SlotRcu};
use crate::test_support::*;
use crate::tree::ProbeTree;
use alloc::vec::Vec;
use proptest::prelude::*;
use std::collections::BTreeMap;

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

proptest! {
    /// Inserting a key and removing it again never leaves the tree taller than it was, however
    /// the tree was built (the removal merges what the insert split).
    #[test]
    fn an_insert_and_its_removal_leave_the_tree_no_taller(
        keys in proptest::collection::vec(0u64..5000, 1..800),
        extra in proptest::collection::vec(0u64..5000, 1..20),
    ) {
        let rcu = SlotRcu::new();
        let tree: crate::tree::CowTree<u64, u64> = crate::tree::CowTree::new();
        // SAFETY: single-threaded test: the only writer and the only reader.
        unsafe {
            for &k in &keys {
                tree.insert(&rcu, k, fake(k)).unwrap();
            }
            for &k in &extra {
                if tree.get(&k).is_some() {
                    continue;
                }
                let (h, n) = (tree.height(), tree.check());
                tree.insert(&rcu, k, fake(k)).unwrap();
                prop_assert_eq!(tree.remove(&rcu, &k).unwrap(), Some(fake(k)));
                prop_assert!(tree.height() <= h, "height {} -> {}", h, tree.height());
                prop_assert_eq!(tree.check(), n);
            }
        }
        rcu.synchronize();
    }
}

/// The shape the address-space churn of the contention report makes: one full leaf (16
/// mappings), one more mapped in the middle and unmapped again. The tree is one leaf again.
#[test]
fn a_full_leaf_split_by_an_insert_is_merged_by_its_removal() {
    let rcu = SlotRcu::new();
    let tree: crate::tree::CowTree<u64, u64> = crate::tree::CowTree::new();
    // SAFETY: single-threaded test: the only writer and the only reader.
    unsafe {
        for i in 0..16u64 {
            tree.insert(&rcu, i * 10, fake(i)).unwrap();
        }
        assert_eq!(tree.height(), 1);
        for round in 0..3 {
            tree.insert(&rcu, 75, fake(99)).unwrap();
            assert_eq!(
                tree.height(),
                2,
                "round {round}: 17 entries need two levels"
            );
            tree.remove(&rcu, &75).unwrap();
            assert_eq!(
                tree.height(),
                1,
                "round {round}: the removal left the split"
            );
            assert_eq!(tree.check(), 16);
        }
    }
    rcu.synchronize();
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

/// A floor whose routed leaf holds nothing `<= key` (the leaf's least keys were removed, its
/// routing key left stale) is found in the left sibling: the one-descent fast path says "not
/// here" and the full walk answers. The case is really reached, and every answer is the
/// oracle's.
#[test]
fn tree_floor_falls_back_past_a_stale_routing_key() {
    let rcu = SlotRcu::new();
    let tree: crate::tree::CowTree<u64, u64> = crate::tree::CowTree::new();
    let mut oracle = BTreeMap::new();
    for k in 0..1000u64 {
        // SAFETY: single-threaded test: the only writer and the only reader.
        unsafe { tree.insert(&rcu, k, fake(k)) }.unwrap();
        oracle.insert(k, fake(k));
    }
    for k in 100..300u64 {
        // SAFETY: as above.
        unsafe { tree.remove(&rcu, &k) }.unwrap();
        oracle.remove(&k);
    }
    let mut fell_back = 0;
    for p in 0..1100u64 {
        // SAFETY: as above; the root is reachable under the single-threaded test.
        if unsafe { crate::tree::CowTree::floor_fast(tree.load_root(), &p) }.is_none() {
            fell_back += 1;
        }
        let want = oracle.range(..=p).next_back().map(|(k, v)| (*k, *v));
        // SAFETY: as above.
        assert_eq!(unsafe { tree.floor(&p) }, want, "floor({p})");
    }
    assert!(fell_back > 0, "no probe reached the fallback");
    rcu.synchronize();
}

//! The breakpoint lifecycle against a sequential oracle, and the uprobes unit tests.

extern crate std;

use crate::alloc_util::fail_after;
use crate::error::Error;
use crate::probe::{ObjectId, ProbeKey};
use crate::rcu::{Rcu, SlotRcu};
use crate::sync::audit::stores_during;
use crate::test_support::*;
use alloc::sync::Arc;
use alloc::vec::Vec;
use proptest::prelude::*;

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

/// Object 1 mapped executable over the first four pages of address space 1.
fn one_object_mapped() -> (U, Arc<crate::mm::AddressSpace>) {
    let text = ByteText::new();
    text.add_object(ObjectId(1), object_bytes(1));
    let u: U = Uprobes::new(SlotRcu::new(), text);
    let mm = u.create_mm(MmId(1)).unwrap();
    u.mmap(&mm, 0, 4 * P, 0, ObjectId(1), VmFlags::EXEC)
        .unwrap();
    (u, mm)
}

/// Invariant 1 for the whole speculative hit: address-space speculation, probe lookup and
/// consumer traversal write no shared memory (every store/RMW through the facade is logged).
#[test]
fn speculative_resolve_writes_no_shared_memory() {
    let (u, mm) = one_object_mapped();
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

/// An address space whose first `raced` speculations see a writer inside (as a real race
/// would: `speculate_begin` fails); counts how many were begun and how many took the lock.
struct RacedMm {
    inner: Arc<crate::mm::AddressSpace>,
    raced: core::cell::Cell<u32>,
    begun: core::cell::Cell<u32>,
    locked: core::cell::Cell<u32>,
}

// SAFETY: every method is the inner address space's, except that `speculate_begin` may fail
// (which is always allowed) and `locked_find` counts its calls.
unsafe impl crate::mm::AddressSpaceOps for RacedMm {
    fn id(&self) -> MmId {
        self.inner.id()
    }
    fn speculate_begin(&self) -> Option<crate::mm::Speculation> {
        self.begun.set(self.begun.get() + 1);
        if self.raced.get() > 0 {
            self.raced.set(self.raced.get() - 1);
            return None;
        }
        self.inner.speculate_begin()
    }
    fn speculate_find(
        &self,
        spec: &mut crate::mm::Speculation,
        addr: u64,
    ) -> Option<(ObjectId, u64)> {
        self.inner.speculate_find(spec, addr)
    }
    fn speculate_validate(&self, spec: &crate::mm::Speculation) -> bool {
        self.inner.speculate_validate(spec)
    }
    fn locked_find<T>(&self, addr: u64, f: impl FnOnce(Option<VmaInfo>) -> T) -> T {
        self.locked.set(self.locked.get() + 1);
        self.inner.locked_find(addr, f)
    }
    fn stamp(&self) -> Option<u64> {
        self.inner.stamp()
    }
    fn unchanged_since(&self, stamp: u64) -> bool {
        self.inner.unchanged_since(stamp)
    }
}

/// A speculation a writer raced is tried again, up to `SPECULATION_RETRIES` times, before the
/// lock; one that found nothing, unraced, takes the lock at once.
#[test]
fn a_raced_speculation_is_retried_before_the_lock() {
    use crate::uprobes::{Path, SPECULATION_RETRIES};
    let (u, mm) = one_object_mapped();
    let (c, _) = counting();
    u.register(ProbeKey::new(ObjectId(1), P + 3), c).unwrap();
    let reader = u.registry().rcu().register().unwrap();
    let g = u.read(&reader);
    let run = |raced: u32, addr: u64| {
        let m = RacedMm {
            inner: mm.clone(),
            raced: core::cell::Cell::new(raced),
            begun: core::cell::Cell::new(0),
            locked: core::cell::Cell::new(0),
        };
        let (hit, path) = u.resolve(&g, &m, addr);
        let ran = matches!(hit, Hit::Run(p) if p.key() == ProbeKey::new(ObjectId(1), addr));
        (ran, path, m.begun.get(), m.locked.get())
    };
    // Raced as often as it retries: the last retry answers, speculatively.
    assert_eq!(
        run(SPECULATION_RETRIES, P + 3),
        (true, Path::Speculative, SPECULATION_RETRIES + 1, 0)
    );
    // Raced once more: the lock answers, with the same probe.
    assert_eq!(
        run(SPECULATION_RETRIES + 1, P + 3),
        (true, Path::Locked, SPECULATION_RETRIES + 1, 1)
    );
    // Unraced and nothing there (no probe at this offset): one speculation, then the lock.
    assert_eq!(run(0, 2 * P), (false, Path::Locked, 1, 1));
}

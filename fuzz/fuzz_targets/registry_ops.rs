//! The registry and the address-space model driven by arbitrary operation sequences, against
//! sequential oracles (a `BTreeMap` of ordered consumer sets; a list of mappings), the same
//! oracles the proptests use:
//! * every result, errors included, is the oracle's;
//! * after every step the registry holds exactly the oracle's keys with exactly their
//!   consumers, in registration order, and nothing else;
//! * the model's locked and speculative lookups agree with the oracle for probed addresses,
//!   and a failed map or unmap changes nothing.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use probe_core::mm::{AddressSpace, AddressSpaceOps, MmId, VmFlags};
use probe_core::probe::{ObjectId, ProbeKey};
use probe_core::rcu::{Rcu, SlotRcu};
use probe_core::registry::Registry;
use probe_core::Error;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Arbitrary, Debug)]
enum Op {
    Register { object: u8, offset: u8, consumer: u8 },
    Unregister { object: u8, offset: u8, consumer: u8 },
    Sync,
    Map { page: u8, pages: u8, pgoff: u8, object: u8 },
    Unmap { page: u8, pages: u8 },
    Find { page: u8, within: u16 },
}

const PAGE: u64 = 0x1000;

fuzz_target!(|ops: Vec<Op>| {
    let reg: Registry<u32, SlotRcu> = Registry::new(SlotRcu::new());
    let reader = reg.rcu().register().unwrap();
    let consumers: Vec<Arc<u32>> = (0..4).map(Arc::new).collect();
    let mut oracle: BTreeMap<ProbeKey, Vec<usize>> = BTreeMap::new();
    let mm: AddressSpace = AddressSpace::new(MmId(1));
    // (start, end, pgoff, object) of each mapping.
    let mut maps: Vec<(u64, u64, u64, ObjectId)> = Vec::new();
    for op in ops.into_iter().take(400) {
        match op {
            Op::Register { object, offset, consumer } => {
                let key = ProbeKey::new(ObjectId(u64::from(object % 3)), u64::from(offset) * 4);
                let c = usize::from(consumer % 4);
                let want = if oracle.get(&key).is_some_and(|v| v.contains(&c)) {
                    Err(Error::DuplicateConsumer)
                } else {
                    oracle.entry(key).or_default().push(c);
                    Ok(())
                };
                assert_eq!(reg.register(key, consumers[c].clone()), want);
            }
            Op::Unregister { object, offset, consumer } => {
                let key = ProbeKey::new(ObjectId(u64::from(object % 3)), u64::from(offset) * 4);
                let c = usize::from(consumer % 4);
                let got = reg.unregister(&key, &consumers[c]);
                let want = match oracle.get_mut(&key) {
                    Some(v) if v.contains(&c) => {
                        v.retain(|&x| x != c);
                        Ok(())
                    }
                    Some(_) => Err(Error::UnknownConsumer),
                    None => Err(Error::UnknownProbe),
                };
                if oracle.get(&key).is_some_and(|v| v.is_empty()) {
                    oracle.remove(&key);
                }
                assert_eq!(got, want);
            }
            Op::Sync => reg.sync(),
            Op::Map { page, pages, pgoff, object } => {
                let start = u64::from(page) * PAGE;
                let len = u64::from(pages % 8) * PAGE;
                let object = ObjectId(u64::from(object % 3));
                let pgoff = u64::from(pgoff) * PAGE;
                let overlaps = maps.iter().any(|m| start < m.1 && m.0 < start + len);
                let r = mm.write().map(reg.rcu(), start, len, pgoff, object, VmFlags::EXEC);
                if len == 0 || overlaps {
                    // Refused, and nothing changed (checked below against the oracle).
                    let _ = r;
                } else if r.is_ok() {
                    maps.push((start, start + len, pgoff, object));
                }
            }
            Op::Unmap { page, pages } => {
                let start = u64::from(page) * PAGE;
                let len = u64::from(pages % 8) * PAGE;
                if mm.write().unmap(reg.rcu(), start, len).is_ok() && len > 0 {
                    // Trim the oracle the same way: keep the parts outside [start, start+len).
                    let end = start + len;
                    let mut next = Vec::new();
                    for (s, e, off, o) in maps.drain(..) {
                        if e <= start || s >= end {
                            next.push((s, e, off, o));
                            continue;
                        }
                        if s < start {
                            next.push((s, start, off, o));
                        }
                        if e > end {
                            next.push((end, e, off + (end - s), o));
                        }
                    }
                    maps = next;
                }
            }
            Op::Find { page, within } => {
                let addr = u64::from(page) * PAGE + u64::from(within) % PAGE;
                let want = maps
                    .iter()
                    .find(|m| addr >= m.0 && addr < m.1)
                    .map(|m| (m.3, m.2 + (addr - m.0)));
                let locked = mm.locked_find(addr, |v| v.map(|v| (v.object, v.offset_of(addr))));
                assert_eq!(locked, want, "locked find at {addr:#x}");
                let _g = reg.rcu().read_lock(&reader);
                if let Some(mut spec) = mm.speculate_begin() {
                    let found = mm.speculate_find(&mut spec, addr);
                    if mm.speculate_validate(&spec) {
                        assert_eq!(found, want, "speculative find at {addr:#x}");
                    }
                }
            }
        }
        // The registry's contents are the oracle's.
        let g = reg.read(&reader);
        for (k, cs) in &oracle {
            let p = g.lookup(k).expect("an oracle key is in the registry");
            let got = p.consumers();
            assert_eq!(got.len(), cs.len());
            for (a, &b) in got.iter().zip(cs) {
                assert!(Arc::ptr_eq(a, &consumers[b]));
            }
        }
        let mut n = 0;
        for o in 0..3 {
            g.probes_in(ObjectId(o), 0..u64::MAX, |_| {
                n += 1;
                true
            });
        }
        assert_eq!(n, oracle.len(), "nothing but the oracle's keys");
        // The model's mappings are the oracle's.
        let mut have: Vec<(u64, u64, u64, ObjectId)> = mm
            .mappings()
            .iter()
            .map(|v| (v.start, v.end, v.pgoff, v.object))
            .collect();
        have.sort();
        let mut want = maps.clone();
        want.sort();
        assert_eq!(have, want, "mappings");
    }
});

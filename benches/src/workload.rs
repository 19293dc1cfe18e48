//! The keys, addresses and consumers every contender is measured on.
//!
//! One workload per probe count. Probes sit on [`OBJECTS`] objects, every [`STRIDE`] bytes; the
//! churn writer registers and unregisters a separate set of probes placed between them (offset
//! `+ STRIDE / 2`), so the churn changes the very trees the hits search but never the answer a
//! hit gets. Each object is mapped once into the one address space of the resolution table, at
//! its own base with a gap after it; the address-space churn maps and unmaps one more object in
//! the gap after object `OBJECTS / 2`, in the middle of the VMA tree.
//!
//! A *consumer* adds 1 to `hits` and the probe's tag to `sum` in the hitting thread's own
//! [`Regs`]: every implementation calls the same closures, nothing shared is written, and the
//! pair (hits, sum) over a stream of targets proves two implementations found the same probes.

use probe_core::mm::PAGE_SIZE;
use probe_core::probe::{ObjectId, ProbeKey};
use std::sync::Arc;

/// Objects the probes are spread over.
pub const OBJECTS: u64 = 16;
/// Bytes between two hit probes of one object.
pub const STRIDE: u64 = 16;
/// Targets in one thread's stream (cycled).
pub const STREAM: usize = 4096;
/// The object the address-space churn maps and unmaps.
pub const CHURN_OBJECT: ObjectId = ObjectId(0xC0FFEE);
/// Pages of [`CHURN_OBJECT`].
pub const CHURN_PAGES: u64 = 4;
/// Gap left after each object's mapping (the churn mapping goes in one of them).
const GAP: u64 = 1 << 24;

/// What a probe hit may change: the hitting thread's own registers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Regs {
    /// Consumer calls.
    pub hits: u64,
    /// Sum of the tags of the probes whose consumers ran.
    pub sum: u64,
}

/// A consumer, as every contender stores it.
pub type Consumer = dyn Fn(&mut Regs) + Send + Sync;
/// A probe's consumers, as the alternatives store them (one allocation, shared on clone).
pub type Consumers = Arc<[Arc<Consumer>]>;

/// A consumer adding `tag` to the registers.
pub fn consumer(tag: u64) -> Arc<Consumer> {
    Arc::new(move |r: &mut Regs| {
        r.hits += 1;
        r.sum = r.sum.wrapping_add(tag);
    })
}

/// One probe: its key, where it is in the address space and in the kprobe arena, its tag.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// (object, file offset).
    pub key: ProbeKey,
    /// Trap address in the resolution table's address space.
    pub addr: u64,
    /// Offset in the `kprobe` crate's code arena (that crate keys probes by address).
    pub arena: usize,
    /// What its consumer adds to [`Regs::sum`].
    pub tag: u64,
}

/// One mapping of the resolution table's address space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Mapped object.
    pub object: u64,
    /// File offset of `start`.
    pub pgoff: u64,
}

/// The keys, mappings and streams of one probe count.
pub struct Workload {
    /// The probes hits go to (always registered).
    pub hit: Vec<Target>,
    /// The probes the churn writer registers and unregisters.
    pub churn: Vec<Target>,
    /// The objects' mappings, sorted by address.
    pub mappings: Vec<Mapping>,
    /// Where the churn mapping goes.
    pub churn_mapping: Mapping,
    /// Bytes of each object.
    pub object_len: u64,
    /// One stream of hit targets per thread index (the same for every contender).
    streams: Vec<Vec<Target>>,
}

/// The object id of object number `i`.
pub fn object(i: u64) -> ObjectId {
    ObjectId(1000 + i)
}

impl Workload {
    /// `probes` hit probes (and as many churn slots, at most 1024); streams for `threads` threads.
    pub fn new(probes: usize, threads: usize) -> Self {
        let per_object = (probes as u64).div_ceil(OBJECTS);
        let object_len = (per_object * STRIDE).div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let mappings: Vec<Mapping> = (0..OBJECTS)
            .map(|i| {
                let start = 0x1000_0000 + i * (object_len.next_multiple_of(PAGE_SIZE) + GAP);
                Mapping {
                    start,
                    end: start + object_len,
                    object: object(i).0,
                    pgoff: 0,
                }
            })
            .collect();
        let mid = mappings[OBJECTS as usize / 2 - 1];
        let churn_mapping = Mapping {
            start: mid.end + GAP / 2,
            end: mid.end + GAP / 2 + CHURN_PAGES * PAGE_SIZE,
            object: CHURN_OBJECT.0,
            pgoff: 0,
        };
        let target = |i: u64, shift: u64| {
            let obj = i % OBJECTS;
            let offset = (i / OBJECTS) * STRIDE + shift;
            Target {
                key: ProbeKey::new(object(obj), offset),
                addr: mappings[obj as usize].start + offset,
                arena: (obj * object_len + offset) as usize,
                tag: (i << 1 | (shift != 0) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 8,
            }
        };
        let hit: Vec<Target> = (0..probes as u64).map(|i| target(i, 0)).collect();
        let churn: Vec<Target> = (0..(probes as u64).min(1024))
            .map(|i| target(i * (probes as u64 / 1024).max(1), STRIDE / 2))
            .collect();
        let streams = (0..threads.max(1))
            .map(|t| {
                let mut x = 0x2545_F491_4F6C_DD1D ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9);
                (0..STREAM)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        hit[(x % hit.len() as u64) as usize]
                    })
                    .collect()
            })
            .collect();
        Self {
            hit,
            churn,
            mappings,
            churn_mapping,
            object_len,
            streams,
        }
    }

    /// Thread `t`'s stream of targets.
    pub fn stream(&self, t: usize) -> &[Target] {
        &self.streams[t % self.streams.len()]
    }

    /// The number of hit probes.
    pub fn probes(&self) -> usize {
        self.hit.len()
    }

    /// What [`Regs`] must hold after hitting each target of `stream` once.
    pub fn expected(stream: &[Target]) -> Regs {
        stream.iter().fold(Regs::default(), |r, t| Regs {
            hits: r.hits + 1,
            sum: r.sum.wrapping_add(t.tag),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_distinct_and_inside_their_mappings() {
        let w = Workload::new(1000, 2);
        let mut keys: Vec<_> = w.hit.iter().chain(&w.churn).map(|t| t.key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), w.hit.len() + w.churn.len());
        for t in w.hit.iter().chain(&w.churn) {
            let m = w
                .mappings
                .iter()
                .find(|m| m.object == t.key.object.0)
                .unwrap();
            assert!(m.start <= t.addr && t.addr < m.end);
            assert_eq!(t.addr - m.start + m.pgoff, t.key.offset);
        }
        let c = w.churn_mapping;
        assert!(
            w.mappings
                .iter()
                .all(|m| c.end <= m.start || m.end <= c.start)
        );
    }

    #[test]
    fn streams_differ_per_thread_and_repeat_per_workload() {
        let a = Workload::new(1000, 2);
        let b = Workload::new(1000, 2);
        assert_ne!(a.stream(0)[0].key, a.stream(1)[0].key);
        assert_eq!(a.stream(1)[7].key, b.stream(1)[7].key);
        assert_eq!(Workload::expected(a.stream(0)).hits, STREAM as u64);
    }
}

//! XOL slots and the task cache.

extern crate std;

use crate::error::Error;
use crate::probe::{ObjectId, ProbeKey};
use crate::rcu::{Rcu, SlotRcu};
use crate::sync::audit::stores_during;
use crate::test_support::*;
use alloc::sync::Arc;
use alloc::vec::Vec;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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

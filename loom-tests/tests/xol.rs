//! XOL slots and the per-thread breakpoint cache.
//!
//! Every model runs two threads. The two that run whole breakpoint hits on both threads (the
//! cache and slot-reuse models) are preemption-bounded ([`PB`]); the rest are unbounded.

#![cfg(loom)]
// Loom runs a model's threads as coroutines on one OS thread and its `spawn` does not ask for
// `Send`: the models share the facade's `UnsafeCell` (loom-tracked, not `Sync`) between them on
// purpose — an unsynchronized access to it is exactly what loom reports.
#![allow(clippy::arc_with_non_send_sync)]

mod common;
use common::{Seen, Tracked, X, Y, key, world};
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;
use probe_core::mm::PAGE_SIZE;
use probe_core::probe::ObjectId;
use probe_core::rcu::Rcu;
use probe_core::seeded::Bug;
use probe_core::sync::UnsafeCell;
use probe_core::xol::{CondvarWait, SpinWait, Step, Task, WaitQueue, XolArea};
use std::sync::Arc;

const XOL: u64 = 0x7fff_0000;
/// The preemption bound of the two models that run whole breakpoint hits on both threads
/// (registration, resolution, the task cache and a slot each): unbounded, the reuse model alone
/// needs 1.66 million executions (226 s here).
const PB: usize = 3;
const A: u64 = 0x40;

type T<'r> = Task<'r, Tracked, probe_core::rcu::SlotRcu, probe_core::lock::SpinLock, 1>;

/// One breakpoint hit through `task`, as an embedder runs it: consumers, then the displaced
/// instruction from the slot. Returns what it resolved to and whether instruction fetch saw
/// exactly the displaced bytes in the slot (asserted by the caller after joining: a loom thread
/// must not panic while another is still running).
fn hit_once<'r>(
    u: &'r common::U,
    reader: &'r probe_core::rcu::SlotReader<'_>,
    mm: &probe_core::mm::AddressSpace,
    xol: &XolArea<CondvarWait>,
    task: &mut T<'r>,
    addr: u64,
) -> (Seen, bool) {
    let g = u.read(reader);
    match task.on_breakpoint(u, &g, mm, xol, addr, true).unwrap() {
        Step::Run { probe, slot } => {
            probe.consumers().iter().for_each(|c| c.call());
            let mut fetched = [0u8; 1];
            u.text().fetch_xol(mm.id(), slot.addr(), &mut fetched);
            let ok = fetched[..] == *probe.probe().saved_insn().as_bytes();
            drop(slot);
            (Seen::Run(probe.key().object.0, probe.key().offset), ok)
        }
        Step::NotOurs => (Seen::NotOurs, true),
        Step::Restart => (Seen::Restart, true),
    }
}

/// Two threads take the area's only slot, write their id into its memory and read it back: a
/// slot owned twice, or handed over without release/acquire, is a race loom reports.
fn ownership() {
    let runs = common::Executions::new("xol slot ownership");
    let count = runs.counter();
    loom::model(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let area = Arc::new(XolArea::new(XOL, 64, 1, CondvarWait::default()).unwrap());
        let memory = Arc::new(UnsafeCell::new(0usize));
        let use_slot = |area: &XolArea<CondvarWait>, memory: &UnsafeCell<usize>, me: usize| {
            let slot = area.take();
            // SAFETY: the slot's memory is ours while we own the slot — what is being checked.
            memory.with_mut(|p| unsafe { *p = me });
            // SAFETY: as above.
            memory.with(|p| assert_eq!(unsafe { *p }, me, "lost update: the slot had two owners"));
            drop(slot);
        };
        let t = {
            let (area, memory) = (area.clone(), memory.clone());
            thread::spawn(move || use_slot(&area, &memory, 1))
        };
        use_slot(&area, &memory, 2);
        t.join().unwrap();
        assert_eq!(area.free_slots(), 1);
    });
}

#[test]
fn xol_slot_owned_by_one_thread_at_a_time() {
    ownership();
}

#[test]
fn seeded_take_is_not_one_atomic_step() {
    common::must_catch(Bug::XolTakeNotAtomic, ownership);
}

#[test]
fn seeded_free_without_release() {
    common::must_catch(Bug::XolFreeRelaxed, ownership);
}

/// A thread waiting on a full area is always woken when the slot frees (no lost wakeup: a lost
/// one leaves it asleep forever, which loom reports as a deadlock).
fn wakeup() {
    let runs = common::Executions::new("xol wakeup");
    let count = runs.counter();
    loom::model(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let area = Arc::new(XolArea::new(XOL, 64, 1, CondvarWait::default()).unwrap());
        let held = area.try_take().expect("the only slot");
        let t = {
            let area = area.clone();
            thread::spawn(move || drop(area.take()))
        };
        thread::yield_now();
        drop(held);
        t.join().unwrap();
    });
}

#[test]
fn xol_waiter_is_always_woken() {
    wakeup();
}

#[test]
fn seeded_free_checks_waiters_without_the_barrier() {
    common::must_catch(Bug::XolFreeWithoutBarrier, wakeup);
}

/// A thread hits a probe twice through its cache while another unregisters that probe's
/// consumer (+ sync), then replaces what the address maps and registers a probe for the new
/// mapping. Once the second hit can see all that happened, it must resolve to the new probe: a
/// cached breakpoint of the old mapping must never run. The unregistered consumer is never
/// called after `sync` (it is marked freed then).
fn cache_vs_change() {
    common::explore(
        "xol cache vs unregister+remap (preemption bound 3)",
        common::bounded(PB),
        &[(true, Seen::Run(Y, PAGE_SIZE + A))],
        move || {
            let (u, mm) = world();
            let old = Tracked::new();
            u.register(key(X, A), old.clone()).unwrap();
            u.register(key(Y, PAGE_SIZE + A), Tracked::new()).unwrap();
            let xol = XolArea::new(XOL, 64, 2, CondvarWait::default()).unwrap();
            let done = Arc::new(AtomicBool::new(false));
            let w = {
                let (u, mm, old, done) = (u.clone(), mm.clone(), old.clone(), done.clone());
                thread::spawn(move || {
                    u.unregister(&key(X, A), &old).unwrap();
                    u.sync();
                    old.check.mark_freed();
                    mm.write()
                        .replace_object(u.registry().rcu(), 0, ObjectId(Y), PAGE_SIZE)
                        .unwrap();
                    done.store(true, Ordering::Release);
                })
            };
            let reader = u.registry().rcu().register().unwrap();
            let mut task: T<'_> = Task::new();
            let (_, ok1) = hit_once(&u, &reader, &mm, &xol, &mut task, A);
            let after = done.load(Ordering::Acquire);
            let (second, ok2) = hit_once(&u, &reader, &mm, &xol, &mut task, A);
            drop(task);
            w.join().unwrap();
            assert!(
                ok1 && ok2,
                "executed bytes that are not the displaced instruction"
            );
            if after {
                assert_eq!(
                    second,
                    Seen::Run(Y, PAGE_SIZE + A),
                    "stale cache: ran a breakpoint of the old mapping"
                );
            }
            (after, second)
        },
    );
}

#[test]
fn xol_cache_never_runs_a_stale_breakpoint() {
    cache_vs_change();
}

#[test]
fn seeded_cache_without_invalidation() {
    common::must_catch(Bug::XolCacheNoInvalidation, cache_vs_change);
}

/// Two threads hit two different probes through one slot; each execution must fetch exactly its
/// probe's displaced instruction — a slot reused after the other thread rewrote it must be
/// recopied and flushed.
fn reuse() {
    let runs = common::Executions::new("xol slot reuse (preemption bound 3)");
    let count = runs.counter();
    common::bounded(PB).check(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (u, mm) = world();
        // Different displaced bytes at the two probes.
        u.text().add_object(
            ObjectId(X),
            (0..8 * PAGE_SIZE).map(|i| (i % 0x80) as u8).collect(),
        );
        u.register(key(X, A), Tracked::new()).unwrap();
        u.register(key(X, A + 1), Tracked::new()).unwrap();
        let xol = Arc::new(XolArea::new(XOL, 64, 1, CondvarWait::default()).unwrap());
        let t = {
            let (u, mm, xol) = (u.clone(), mm.clone(), xol.clone());
            thread::spawn(move || {
                let reader = u.registry().rcu().register().unwrap();
                let mut task: T<'_> = Task::new();
                hit_once(&u, &reader, &mm, &xol, &mut task, A + 1).1
            })
        };
        let ours = {
            let reader = u.registry().rcu().register().unwrap();
            let mut task: T<'_> = Task::new();
            let a = hit_once(&u, &reader, &mm, &xol, &mut task, A).1;
            a & hit_once(&u, &reader, &mm, &xol, &mut task, A).1
        };
        let theirs = t.join().unwrap();
        assert!(
            ours && theirs,
            "executed bytes that are not the displaced instruction"
        );
    });
}

#[test]
fn xol_reused_slot_is_never_executed_stale() {
    reuse();
}

#[test]
fn seeded_reuse_without_compare() {
    common::must_catch(Bug::XolReuseWithoutCompare, reuse);
}

/// Two threads create the address space's XOL area lazily at once: both get the same, fully
/// initialized area (one is published; the loser's is dropped unpublished), and both can use it.
fn lazy_area() {
    let runs = common::Executions::new("xol lazy area");
    let count = runs.counter();
    loom::model(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let lazy = Arc::new(probe_core::xol::LazyXol::<CondvarWait>::new());
        let t = {
            let lazy = lazy.clone();
            thread::spawn(move || {
                let a = lazy
                    .get_or_create(|| XolArea::new(XOL, 64, 2, CondvarWait::default()))
                    .unwrap();
                drop(a.try_take());
                a as *const _ as usize
            })
        };
        let a = lazy
            .get_or_create(|| XolArea::new(XOL, 64, 2, CondvarWait::default()))
            .unwrap();
        drop(a.try_take());
        let mine = a as *const _ as usize;
        let theirs = t.join().unwrap();
        assert_eq!(mine, theirs, "torn snapshot: two areas were published");
    });
}

#[test]
fn xol_area_is_published_once() {
    lazy_area();
}

#[test]
fn seeded_area_published_relaxed() {
    common::must_catch(Bug::XolPublishRelaxed, lazy_area);
}

/// `SpinWait`, the spinning `WaitQueue`: a waker writes, then wakes; a waiter that takes a
/// ticket showing the wake (the count moved) must see the write — the count's Release
/// increment in `wake_all` and the Acquire load in `prepare` carry it — and its `wait` on the
/// old ticket returns at once.
///
/// The waiter does not spin in `wait` for a wake still to come: loom explores every stale value
/// a load may return, and a loop of loads can read the old count any number of times, so such
/// a model never ends (loom stops it at its branch limit). `wait` loads the count with the
/// same Acquire as `prepare`, and the spin itself is a plain loop.
fn spin_wait() {
    let runs = common::Executions::new("SpinWait event count");
    let count = runs.counter();
    loom::model(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let queue = Arc::new(SpinWait::default());
        let written = Arc::new(UnsafeCell::new(0u32));
        let waiter = {
            let (queue, written) = (queue.clone(), written.clone());
            thread::spawn(move || {
                if queue.prepare() == 1 {
                    queue.wait(0);
                    // SAFETY: read only once the wake is seen (what is being checked).
                    written.with(|p| assert_eq!(unsafe { *p }, 1, "woken before the write"));
                }
            })
        };
        // SAFETY: the waiter reads only once it sees the wake.
        written.with_mut(|p| unsafe { *p = 1 });
        queue.wake_all();
        waiter.join().unwrap();
    });
}

#[test]
fn spin_wait_wakes_with_what_was_written() {
    spin_wait();
}

#[test]
fn seeded_spin_wait_wake_relaxed() {
    common::must_catch(Bug::SpinWaitWakeRelaxed, spin_wait);
}

/// `CondvarWait`, the blocking queue, as it is (the facade's mutex and condition variable are
/// loom's here): a waiter that took its ticket before the wake sleeps in `wait` until it comes
/// and then sees what the waker wrote; one that took it after sees the write at once. Unlike a
/// spinning wait, a condition-variable wait blocks, so loom explores it to the end, and a lost
/// wakeup leaves the waiter asleep: a deadlock loom reports.
fn condvar_wait() {
    let runs = common::Executions::new("CondvarWait event count");
    let count = runs.counter();
    loom::model(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let queue = Arc::new(CondvarWait::default());
        let written = Arc::new(UnsafeCell::new(0u32));
        let waiter = {
            let (queue, written) = (queue.clone(), written.clone());
            thread::spawn(move || {
                let ticket = queue.prepare();
                if ticket == 0 {
                    queue.wait(ticket);
                }
                // SAFETY: read only once the wake is seen (what is being checked).
                written.with(|p| assert_eq!(unsafe { *p }, 1, "woken before the write"));
            })
        };
        // SAFETY: the waiter reads only once it sees the wake.
        written.with_mut(|p| unsafe { *p = 1 });
        queue.wake_all();
        waiter.join().unwrap();
    });
}

#[test]
fn condvar_wait_wakes_with_what_was_written() {
    condvar_wait();
}

#[test]
fn seeded_condvar_notify_before_count() {
    common::must_catch(Bug::CondvarNotifyFirst, condvar_wait);
}

#[test]
fn seeded_condvar_notify_before_count_in_the_area() {
    common::must_catch(Bug::CondvarNotifyFirst, wakeup);
}

//! `SlotRcu`: nothing a reader may still see is freed before a grace period (Invariant 2).
//!
//! Two threads (a reader, an updater that unlinks, defers the free and waits — or first tries
//! once, giving up on a reader still inside: `try_synchronize`); unbounded. Both
//! modes of the domain: symmetric (SeqCst fences on both sides) and asymmetric (the reader's
//! light fence, the updater's heavy barrier — modelled as the SeqCst fence it amounts to; that a
//! real heavy barrier gives that is checked on hardware by `probe-arch-x86_64`'s
//! `asymmetric_fence` test).

#![cfg(loom)]

use loom::thread;
use probe_core::rcu::{Deferred, Rcu, SlotRcu};
use probe_core::seeded::Bug;
use probe_core::sync::{AtomicPtr, AtomicUsize, FreeCheck, Ordering};
use std::sync::Arc;

mod common;

struct Obj {
    check: FreeCheck,
}

struct SendPtr(*mut Obj);
// SAFETY: handed to the callback that frees it.
unsafe impl Send for SendPtr {}

/// The updater: unlink the object, defer its free, wait for the grace period that runs it.
fn unlink_and_free(rcu: &SlotRcu, ptr: &AtomicPtr<Obj>) {
    let old = ptr.swap(std::ptr::null_mut(), Ordering::AcqRel);
    let sp = SendPtr(old);
    rcu.defer(
        Deferred::new(move || {
            let sp = sp;
            // SAFETY: a grace period has passed (that is what is being checked).
            unsafe { &*sp.0 }.check.mark_freed();
            // The memory is leaked on purpose: a buggy run must trip the check, not UB.
        })
        .unwrap(),
    );
    rcu.synchronize();
}

fn model() {
    model_of("rcu", SlotRcu::new);
}

/// Under loom the heavy barrier has nothing to do: the light fence is modelled as the SeqCst
/// fence the pair amounts to (`probe_core::sync::light_fence`).
fn model_heavy_barrier() {}

/// The asymmetric domain: the reader's other code path (a plain store and the light fence).
fn asymmetric() -> SlotRcu {
    // SAFETY: under loom the light fence is a SeqCst fence, which is the guarantee the heavy
    // barrier's contract asks for.
    unsafe { SlotRcu::with_heavy_barrier(model_heavy_barrier) }
}

fn model_asymmetric() {
    model_of("rcu asymmetric", asymmetric);
}

/// The reader: one read section that loads the pointer and checks the object it saw (if any)
/// is not freed; returns whether it saw it.
fn spawn_reader(rcu: &Arc<SlotRcu>, ptr: &Arc<AtomicPtr<Obj>>) -> thread::JoinHandle<bool> {
    let (rcu, ptr) = (rcu.clone(), ptr.clone());
    thread::spawn(move || {
        let r = rcu.register().unwrap();
        let g = rcu.read_lock(&r);
        // Acquire pairs with nothing here (the object is never re-initialized), but is what a
        // real reader does.
        let p = ptr.load(Ordering::Acquire);
        let saw = !p.is_null();
        if saw {
            // SAFETY: the guard is what this model checks.
            unsafe { &*p }.check.check();
        }
        drop(g);
        saw
    })
}

fn model_of(name: &'static str, make: fn() -> SlotRcu) {
    common::explore(name, common::unbounded(), &[false, true], move || {
        let rcu = Arc::new(make());
        let obj = Box::into_raw(Box::new(Obj {
            check: FreeCheck::new(),
        }));
        let ptr = Arc::new(AtomicPtr::new(obj));
        let reader = spawn_reader(&rcu, &ptr);
        unlink_and_free(&rcu, &ptr);
        reader.join().unwrap()
    });
}

#[test]
fn rcu_no_free_before_grace_period() {
    model();
}

#[test]
fn seeded_synchronize_does_not_wait() {
    common::must_catch(Bug::RcuNoGracePeriod, model);
}

#[test]
fn seeded_reader_enters_without_fence() {
    common::must_catch(Bug::RcuReaderNoFence, model);
}

#[test]
fn rcu_asymmetric_no_free_before_grace_period() {
    model_asymmetric();
}

#[test]
fn seeded_asymmetric_synchronize_does_not_wait() {
    common::must_catch(Bug::RcuNoGracePeriod, model_asymmetric);
}

#[test]
fn seeded_asymmetric_reader_enters_without_fence() {
    common::must_catch(Bug::RcuReaderNoFence, model_asymmetric);
}

/// `try_synchronize`: the updater unlinks, defers the free and makes one attempt with a
/// patience of one poll (so loom explores the give-up), then waits with `synchronize`. Whether
/// the attempt completes or gives up, nothing the reader may see is freed before its section
/// ends, and the callback runs exactly once. Two threads, unbounded.
fn model_try() {
    // (the reader saw the object, the attempt completed): both a completed attempt and a
    // give-up on a reader holding the object must be among the explored executions.
    let must_see = [(false, true), (true, false)];
    common::explore("rcu try", common::unbounded(), &must_see, || {
        let rcu = Arc::new(SlotRcu::new());
        let obj = Box::into_raw(Box::new(Obj {
            check: FreeCheck::new(),
        }));
        let ptr = Arc::new(AtomicPtr::new(obj));
        let reader = spawn_reader(&rcu, &ptr);
        let old = ptr.swap(std::ptr::null_mut(), Ordering::AcqRel);
        let sp = SendPtr(old);
        let runs = Arc::new(AtomicUsize::new(0));
        let runs2 = runs.clone();
        rcu.defer(
            Deferred::new(move || {
                let sp = sp;
                // SAFETY: a grace period has passed (that is what is being checked).
                unsafe { &*sp.0 }.check.mark_freed();
                // Relaxed: read after the join below.
                runs2.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap(),
        );
        let completed = rcu.try_synchronize(1);
        rcu.synchronize();
        let saw = reader.join().unwrap();
        // Relaxed: this thread ran every callback (or joined the one that did not exist).
        assert_eq!(
            runs.load(Ordering::Relaxed),
            1,
            "the callback ran twice or never"
        );
        (saw, completed)
    });
}

#[test]
fn rcu_try_no_free_before_grace_period() {
    model_try();
}

#[test]
fn seeded_try_runs_callbacks_on_give_up() {
    common::must_catch(Bug::RcuTryRunsOnGiveUp, model_try);
}

/// Nested read sections: the outer one still protects after the inner one ends.
#[test]
fn rcu_nested_sections() {
    loom::model(|| {
        let rcu = Arc::new(SlotRcu::new());
        let obj = Box::into_raw(Box::new(Obj {
            check: FreeCheck::new(),
        }));
        let ptr = Arc::new(AtomicPtr::new(obj));
        let reader = {
            let (rcu, ptr) = (rcu.clone(), ptr.clone());
            thread::spawn(move || {
                let r = rcu.register().unwrap();
                let outer = rcu.read_lock(&r);
                let p = ptr.load(Ordering::Acquire);
                drop(rcu.read_lock(&r));
                if !p.is_null() {
                    // SAFETY: the outer guard.
                    unsafe { &*p }.check.check();
                }
                drop(outer);
            })
        };
        unlink_and_free(&rcu, &ptr);
        reader.join().unwrap();
    });
}

//! Speculative resolution racing with address-space changes: the answer is the probe for what the
//! address mapped at one instant, or a fallback — never a stale or torn (object, offset)
//! (Invariant 3).
//!
//! Each model: two threads (a writer changing the address space, a hit resolving), unbounded.
//! The models register probes at the *torn* keys too (object of one version, offset of the
//! other), so a torn read that got accepted shows up as a `Run` on the wrong key.
//!
//! `resolve` retries a raced speculation (under loom: after one yield, up to
//! `SPECULATION_RETRIES` times), so these models also check that a retry finds afresh: the
//! seeded `ResolveRetryKeepsFind` re-validates the raced attempt's key around a new begin and
//! is caught resolving X@A, a key that never was what the address mapped.

#![cfg(loom)]

mod common;
use common::{Seen, Tracked, U, X, Y, hit, key, world};
use loom::thread;
use probe_core::mm::{AddressSpace, PAGE_SIZE, VmFlags};
use probe_core::probe::ObjectId;
use probe_core::seeded::Bug;
use std::sync::Arc;

const P: u64 = PAGE_SIZE;
const A: u64 = 0x40;

fn run(
    name: &'static str,
    setup: impl Fn(&U, &AddressSpace) + Sync + Send + 'static,
    writer: impl Fn(&U, &AddressSpace) + Sync + Send + 'static,
    addr: u64,
    allowed: &'static [Seen],
    must_see: &'static [Seen],
) {
    let (setup, writer) = (Arc::new(setup), Arc::new(writer));
    common::explore(name, common::unbounded(), must_see, move || {
        let (u, mm) = world();
        setup(&u, &mm);
        let w = {
            let (u, mm, writer) = (u.clone(), mm.clone(), writer.clone());
            thread::spawn(move || writer(&u, &mm))
        };
        let got = hit(&u, &mm, addr);
        w.join().unwrap();
        assert!(
            allowed.contains(&got),
            "torn snapshot: resolved {got:?}, allowed only {allowed:?}"
        );
        u.sync();
        got
    });
}

/// The VMA at 0 is switched from X@0 to Y@P in place, then a probe is registered at X's key.
/// Allowed: the locked answers before (no probe: Restart) and after (Y@P+A); never X@A (it never
/// existed while X was mapped there), never the torn Y@A or X@P+A.
fn replace_then_register() {
    run(
        "resolve vs replace+register",
        |u, _| {
            for (o, off) in [(Y, P + A), (Y, A), (X, P + A)] {
                u.register(key(o, off), Tracked::new()).unwrap();
            }
        },
        |u, mm| {
            mm.write()
                .replace_object(u.registry().rcu(), 0, ObjectId(Y), P)
                .unwrap();
            u.register(key(X, A), Tracked::new()).unwrap();
        },
        A,
        &[Seen::Restart, Seen::Run(Y, P + A)],
        &[Seen::Restart, Seen::Run(Y, P + A)],
    );
}

#[test]
fn resolve_vs_replace_then_register() {
    replace_then_register();
}

#[test]
fn seeded_andrii_first_draft_only_vm_lock_seq() {
    common::must_catch(Bug::MmOnlyVmaLockSeq, replace_then_register);
}

#[test]
fn seeded_reader_skips_the_odd_check() {
    common::must_catch(Bug::SeqReaderAcceptsOdd, replace_then_register);
}

#[test]
fn seeded_validate_before_probe_lookup() {
    common::must_catch(Bug::ResolveValidateBeforeLookup, replace_then_register);
}

#[test]
fn seeded_retry_keeps_the_raced_find() {
    common::must_catch(Bug::ResolveRetryKeepsFind, replace_then_register);
}

/// Unmapping under a hit: the probe before, a restart after, nothing freed under the reader.
fn unmap() {
    run(
        "resolve vs unmap",
        |u, _| u.register(key(X, A), Tracked::new()).unwrap(),
        |u, mm| u.munmap(mm, 0, P).unwrap(),
        A,
        &[Seen::Run(X, A), Seen::Restart],
        &[Seen::Run(X, A), Seen::Restart],
    );
}

#[test]
fn resolve_vs_unmap() {
    unmap();
}

#[test]
fn seeded_unmapped_vma_freed_without_deferral() {
    common::must_catch(Bug::MmFreeWithoutDeferral, unmap);
}

/// Splitting a mapping never changes what an address maps: the probe, always.
#[test]
fn resolve_vs_split() {
    run(
        "resolve vs split",
        |u, mm| {
            u.munmap(mm, 0, P).unwrap();
            u.mmap(mm, 0, 2 * P, 0, ObjectId(X), VmFlags::EXEC).unwrap();
            u.register(key(X, P + A), Tracked::new()).unwrap();
        },
        |u, mm| u.split(mm, P).unwrap(),
        P + A,
        &[Seen::Run(X, P + A)],
        &[Seen::Run(X, P + A)],
    );
}

/// Moving a mapping onto the hit address: nothing there before (restart), the probe after; a
/// torn read (old start, new end) would compute X@4P+A.
#[test]
fn resolve_vs_remap() {
    run(
        "resolve vs remap",
        |u, _| {
            u.register(key(X, A), Tracked::new()).unwrap();
            u.register(key(X, 4 * P + A), Tracked::new()).unwrap();
        },
        |u, mm| u.mremap(mm, 0, P, 4 * P).unwrap(),
        4 * P + A,
        &[Seen::Restart, Seen::Run(X, A)],
        &[Seen::Restart, Seen::Run(X, A)],
    );
}

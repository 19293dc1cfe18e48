//! Helpers the unit tests of several modules share (test builds only).

extern crate std;

use crate::probe::{ObjectId, ProbeKey};
use crate::rcu::Rcu;
use crate::registry::Registry;
use alloc::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// `ProbeKey::new(ObjectId(o), off)`.
pub(crate) fn key(o: u64, off: u64) -> ProbeKey {
    ProbeKey::new(ObjectId(o), off)
}

/// A value pointer that is never dereferenced (trees of fake values).
pub(crate) fn fake(v: u64) -> *const u64 {
    v as usize as *const u64
}

/// The consumer type of the tests: called with a number to add.
pub(crate) type Hook = dyn Fn(u64) + Send + Sync;

/// A consumer that adds its argument to the returned counter.
pub(crate) fn counting() -> (Arc<Hook>, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let m = n.clone();
    (
        Arc::new(move |x| {
            m.fetch_add(x, Ordering::Relaxed);
        }),
        n,
    )
}

pub(crate) fn consumers_at<R: Rcu>(
    reg: &Registry<Hook, R>,
    reader: &R::Reader<'_>,
    k: &ProbeKey,
) -> Option<usize> {
    reg.read(reader).lookup(k).map(|p| p.consumers().len())
}

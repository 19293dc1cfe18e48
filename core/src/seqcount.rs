//! Sequence counter: optimistic readers, serialized writers.
//!
//! A writer makes the counter odd before it changes the data and even again after. A reader
//! notes the counter, reads the data, and re-reads the counter: if both values are equal and even,
//! no writer was inside while it read, and what it read is a consistent snapshot. Otherwise it
//! throws the result away — retries, or (in probe-core's hit path) falls back to the locked path.
//! Readers never write, so any number of them run on any number of CPUs without sharing a line
//! in exclusive state.
//!
//! This is the protocol of the 2024 speculative uprobe lookup (seed 003), in the corrected form
//! Peter Zijlstra gave there: the begin value must be even (an odd value means a writer is in),
//! and the pre and post values must be equal.
//!
//! # Orderings
//!
//! ```text
//!  writer                                   reader
//!  ------                                   ------
//!  seq += 1         (Relaxed)               s0 = seq        (Acquire)    [pairs with W-end]
//!  fence(Release)   [W-begin]               if s0 odd: writer inside
//!  data stores      (Relaxed)               data loads      (Relaxed)
//!  seq += 1         (Release) [W-end]       fence(Acquire)  [pairs with W-begin]
//!                                           s1 = seq        (Relaxed)
//!                                           valid iff s1 == s0
//! ```
//!
//! * **W-begin** — the release fence orders the odd store *before* the data stores. Without it
//!   the data stores may become visible before the counter goes odd, and a reader can see new data
//!   with an old, even counter on both ends (the mistake Jann Horn pointed out in the 2024 series).
//!   If a reader's data load observes any store made after the fence, its acquire fence
//!   synchronizes with this one, so its re-check sees at least `s + 1` and fails.
//! * **W-end** — the release store publishes every data store; a reader whose begin-load sees it
//!   (acquire) reads data at least that new.
//! * The data itself is read and written through Relaxed atomics, never as plain memory: a plain
//!   read racing with a writer is undefined behaviour in Rust even if the result is discarded.
//!
//! # Invariants
//!
//! * The counter is odd exactly while a writer is between `write_begin` and `write_end`.
//! * Writers are serialized by the caller (the address-space lock, say); `write_begin` is
//!   `unsafe` because two concurrent writers would make the counter even while both are inside.
//!
//! # Example
//!
//! ```
//! use probe_core::seqcount::SeqCount;
//! use probe_core::sync::{AtomicU64, Ordering::Relaxed};
//!
//! let seq = SeqCount::new();
//! let (lo, hi) = (AtomicU64::new(0), AtomicU64::new(0));
//!
//! // Writer (serialized by the caller).
//! // SAFETY: this is the only writer.
//! let w = unsafe { seq.write_begin() };
//! lo.store(1, Relaxed);
//! hi.store(1, Relaxed);
//! drop(w);
//!
//! // Reader: retry until consistent.
//! let (a, b) = seq.read(|| (lo.load(Relaxed), hi.load(Relaxed)));
//! assert_eq!(a, b);
//!
//! // Speculative reader: one attempt, give up if a writer is in.
//! if let Some(t) = seq.try_begin() {
//!     let v = lo.load(Relaxed);
//!     if seq.validate(t) {
//!         assert_eq!(v, 1);
//!     }
//! }
//! ```

use crate::sync::{AtomicUsize, Ordering, fence, spin_loop};

/// A sequence counter. See the [module docs](self).
#[derive(Debug, Default)]
pub struct SeqCount {
    seq: AtomicUsize,
}

/// A reader's begin value: proof that the counter was even when the read started.
///
/// Pass it to [`SeqCount::validate`] (or [`SeqCount::retry`]) after reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a read section is only meaningful if it is validated"]
pub struct SeqToken(usize);

impl SeqToken {
    /// A token with an arbitrary value (loom seeded-bug models only).
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn from_raw(v: usize) -> Self {
        SeqToken(v)
    }

    /// The even counter value the read section began at.
    pub fn value(self) -> usize {
        self.0
    }
}

/// An open write section; dropping it ends the section (the counter becomes even again).
#[derive(Debug)]
#[must_use = "dropping the guard ends the write section at once"]
pub struct SeqWriteGuard<'a> {
    seq: &'a SeqCount,
}

impl SeqCount {
    /// A counter at zero (no writer inside).
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            seq: AtomicUsize::new(0),
        }
    }

    /// A counter at zero (no writer inside).
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            seq: AtomicUsize::new(0),
        }
    }

    /// Starts a speculative read: `None` at once if a writer is inside, no waiting.
    ///
    /// This is what the hit path uses: a writer inside means "take the locked path", not "spin".
    #[inline]
    pub fn try_begin(&self) -> Option<SeqToken> {
        // Acquire pairs with the Release store in `SeqWriteGuard::drop` (W-end): data read after
        // this is at least as new as the last completed write section.
        let s = self.seq.load(Ordering::Acquire);
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::SeqReaderAcceptsOdd) {
            return Some(SeqToken(s));
        }
        if s & 1 == 1 { None } else { Some(SeqToken(s)) }
    }

    /// Starts a read, spinning while a writer is inside.
    #[inline]
    pub fn begin(&self) -> SeqToken {
        loop {
            if let Some(t) = self.try_begin() {
                return t;
            }
            spin_loop();
        }
    }

    /// Ends a read: `true` if no writer ran since `token` was taken, so what was read is a
    /// consistent snapshot.
    #[inline]
    pub fn validate(&self, token: SeqToken) -> bool {
        #[cfg(loom)]
        let skip_fence = crate::seeded::is(crate::seeded::Bug::SeqReaderNoFence);
        #[cfg(not(loom))]
        let skip_fence = false;
        if !skip_fence {
            // Pairs with the Release fence in `write_begin` (W-begin): if any data load above saw
            // a store from a write section, the load below sees that section's odd value (or
            // later). It also keeps the data loads from moving below the re-check.
            fence(Ordering::Acquire);
        }
        // Relaxed: ordered by the fence just above.
        self.seq.load(Ordering::Relaxed) == token.0
    }

    /// [`SeqCount::validate`] against a token's raw value (one kept across read sections, as a
    /// stamp of the state it was taken in).
    #[inline]
    pub fn validate_raw(&self, value: usize) -> bool {
        self.validate(SeqToken(value))
    }

    /// `!validate(token)`: the kernel's `read_seqcount_retry` spelling.
    #[inline]
    pub fn retry(&self, token: SeqToken) -> bool {
        !self.validate(token)
    }

    /// Runs `f` until it completes with no writer interfering, and returns its result.
    ///
    /// `f` must read shared data only through atomics (Relaxed is enough); it may run many times.
    pub fn read<T>(&self, mut f: impl FnMut() -> T) -> T {
        loop {
            let t = self.begin();
            let v = f();
            if self.validate(t) {
                return v;
            }
            spin_loop();
        }
    }

    /// The raw counter value (for diagnostics and for embedders that store it, as the kernel
    /// stores `mm_lock_seq` in `vm_lock_seq`).
    #[inline]
    pub fn raw(&self) -> usize {
        // Relaxed: a diagnostic snapshot, not part of any read section.
        self.seq.load(Ordering::Relaxed)
    }

    /// Opens a write section: the counter becomes odd, and every store after this call is
    /// ordered after that.
    ///
    /// # Safety
    ///
    /// Writers must be serialized: no other write section on this counter may be open at the same
    /// time (hold the lock that protects the data). Two concurrent writers would make the counter
    /// even again while both are inside, and readers would accept torn data.
    #[inline]
    pub unsafe fn write_begin(&self) -> SeqWriteGuard<'_> {
        // One read-modify-write rather than a load and a store: writers are serialized, so both
        // are correct, but a single access is what loom's race tracking follows (it remembers one
        // last access per object, so a writer's own load would hide the race between its store
        // and a reader's earlier load — tokio-rs/loom#392-style). Writers are rare; the cost is
        // nothing on a path that changes an address space.
        // Relaxed: made visible before the data stores by the fence below.
        let _s = self.seq.fetch_add(1, Ordering::Relaxed);
        debug_assert!(
            _s & 1 == 0,
            "SeqCount::write_begin while a write section is open"
        );
        #[cfg(loom)]
        let skip_fence = crate::seeded::is(crate::seeded::Bug::SeqWriterBeginUnordered);
        #[cfg(not(loom))]
        let skip_fence = false;
        if !skip_fence {
            // W-begin. Pairs with the Acquire fence in `validate`: orders the odd store above
            // before every data store the caller makes next.
            fence(Ordering::Release);
        }
        SeqWriteGuard { seq: self }
    }
}

impl Drop for SeqWriteGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // W-end. Release pairs with the Acquire load in `try_begin`: publishes the data stores.
        // (A read-modify-write for the reason given in `write_begin`.)
        self.seq.seq.fetch_add(1, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn odd_while_writing_even_after() {
        let s = SeqCount::new();
        assert_eq!(s.raw(), 0);
        // SAFETY: single writer.
        let w = unsafe { s.write_begin() };
        assert_eq!(s.raw() & 1, 1);
        assert!(
            s.try_begin().is_none(),
            "try_begin must fail while a writer is inside"
        );
        drop(w);
        assert_eq!(s.raw(), 2);
        assert!(s.try_begin().is_some());
    }

    #[test]
    fn validate_rejects_a_write_in_between() {
        let s = SeqCount::new();
        let t = s.try_begin().unwrap();
        assert!(s.validate(t));
        // SAFETY: single writer.
        drop(unsafe { s.write_begin() });
        assert!(!s.validate(t));
        assert!(s.retry(t));
    }

    #[test]
    fn readers_store_nothing() {
        let s = SeqCount::new();
        let (ok, stores) = crate::sync::audit::stores_during(|| {
            let t = s.try_begin().unwrap();
            s.validate(t)
        });
        assert!(ok);
        assert!(
            stores.is_empty(),
            "a seqcount reader wrote shared memory: {stores:?}"
        );
    }

    #[test]
    fn concurrent_readers_never_see_torn_pairs() {
        extern crate std;
        use crate::sync::AtomicU64;
        use std::sync::Arc;
        let shared = Arc::new((SeqCount::new(), AtomicU64::new(0), AtomicU64::new(0)));
        let w = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for i in 1..=20_000u64 {
                    // SAFETY: this thread is the only writer.
                    let g = unsafe { shared.0.write_begin() };
                    shared.1.store(i, Ordering::Relaxed);
                    shared.2.store(i, Ordering::Relaxed);
                    drop(g);
                }
            })
        };
        let mut seen = 0u64;
        while seen < 20_000 {
            let (a, b) = shared.0.read(|| {
                (
                    shared.1.load(Ordering::Relaxed),
                    shared.2.load(Ordering::Relaxed),
                )
            });
            assert_eq!(a, b, "torn read accepted");
            assert!(a >= seen, "went backwards");
            seen = a;
        }
        w.join().unwrap();
    }
}

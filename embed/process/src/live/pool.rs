//! The reader pool: the hit path's RCU readers, one claimed per hit with one swap on a line of
//! the hitting thread's own (its entry from last time), so a hit writes no line another thread
//! writes in the common case (`Live::pool_moves` counts the exceptions).

use super::*;

/// A pooled RCU reader of the hit path's one domain, claimed by a hit with one swap. Each on its
/// own cache lines, and each thread starts from the entry it used last: in the common case a hit
/// writes only lines no other thread writes.
#[repr(align(128))]
pub(super) struct Pooled {
    pub(super) busy: AtomicBool,
    pub(super) reader: <SlotRcu as Rcu>::Reader<'static>,
}

/// The most trap handlers that run at the same moment without waiting for a pooled reader.
pub(super) const POOL: usize = 256;

/// How often a hit did not find its thread's pool entry free and took another: the only shared
/// line a hit writes, and only then ([`Live::pool_moves`]).
pub(super) static POOL_MOVES: AtomicU64 = AtomicU64::new(0);

std::thread_local! {
    /// The pool entry this thread used last (a hint; any free entry will do).
    static POOL_HINT: core::cell::Cell<usize> = const { core::cell::Cell::new(usize::MAX) };
}

impl Live {
    pub(super) fn claim(&self) -> &Pooled {
        // A const-initialized thread-local: no allocation, safe in a signal handler.
        let hint = POOL_HINT.with(|h| h.get());
        let start = if hint == usize::MAX {
            // SAFETY: gettid has no preconditions (and is async-signal-safe).
            let tid = unsafe { libc::gettid() };
            tid as usize
        } else {
            hint
        } % POOL;
        loop {
            for k in 0..POOL {
                let i = (start + k) % POOL;
                let p = &self.pool[i];
                // Acquire pairs with the Release store in `release`: the previous user's reads
                // are done.
                if !p.busy.swap(true, Ordering::Acquire) {
                    if i != start {
                        // The uncommon path: this thread's entry was taken.
                        // Relaxed: a statistic.
                        POOL_MOVES.fetch_add(1, Ordering::Relaxed);
                    }
                    if i != start || hint == usize::MAX {
                        // Remember it (and never ask for the thread id again: a system call).
                        POOL_HINT.with(|h| h.set(i));
                    }
                    return p;
                }
            }
            core::hint::spin_loop();
        }
    }

    pub(super) fn release(p: &Pooled) {
        // Release pairs with the Acquire swap in `claim`.
        p.busy.store(false, Ordering::Release);
    }
}

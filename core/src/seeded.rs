//! Seeded bugs for the loom suite (compiled only under `cfg(loom)`).
//!
//! A model that cannot fail proves nothing, so every loom model in `loom-tests` is run twice: once
//! on the real protocol, and once with one deliberate bug switched on here, where it must fail
//! (`#[should_panic]`). The knob is thread-local: loom runs a model's threads as coroutines on the
//! test's own OS thread, so concurrently running tests never see each other's bug.
//!
//! None of this exists outside `cfg(loom)`; release and test builds contain no knob.

extern crate std;
use std::cell::Cell;

/// One deliberate mistake in one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// The real code.
    None,
    /// `SeqCount` writer: the begin-increment is not ordered before the data stores (no release
    /// fence after it) — the mistake Jann Horn pointed out in the 2024 speculative-uprobe series.
    SeqWriterBeginUnordered,
    /// `SeqCount` reader: `begin` accepts an odd sequence (a writer is inside).
    SeqReaderAcceptsOdd,
    /// `SeqCount` reader: the re-check has no acquire fence before it.
    SeqReaderNoFence,
    /// RCU: `synchronize` returns without waiting for readers (free before the grace period).
    RcuNoGracePeriod,
    /// RCU: `try_synchronize` gives up on a reader still inside its section, and runs the
    /// callbacks anyway.
    RcuTryRunsOnGiveUp,
    /// RCU: a deferred callback is pushed onto the lock-free stack with a relaxed
    /// compare-exchange, so the taker may run it without seeing what it captured.
    DeferredPushRelaxed,
    /// RCU: the reader announces itself without the full fence (store→load reordering).
    RcuReaderNoFence,
    /// Probe refcount: a plain increment instead of increment-not-zero resurrects a dying probe.
    RefcountPlainInc,
    /// Tree: the new root is published with a relaxed store instead of release.
    TreePublishRelaxed,
    /// Tree: replaced nodes are freed at once instead of after a grace period.
    TreeFreeNodesEarly,
    /// Consumers: the removed consumer list is freed at once instead of after a grace period.
    ConsumerFreeEarly,
    /// Consumers: a replaced list is recycled as the probe's spare at once (emptied for the next
    /// unregistration to fill) instead of being retired through a grace period.
    SpareRecycledEarly,
    /// Consumers: the new consumer list is published with a relaxed store instead of release.
    ConsumerPublishRelaxed,
    /// Spinlock: unlock with a relaxed store instead of release.
    LockUnlockRelaxed,
    /// Speculative resolve, Andrii Nakryiko's first draft (seed 003): compare only the VMA's
    /// `vm_lock_seq` before and after, never `mm_lock_seq`.
    MmOnlyVmaLockSeq,
    /// Address space: an unmapped VMA is freed at once, not deferred.
    MmFreeWithoutDeferral,
    /// Speculative resolve: validation done before the probe lookup instead of after it.
    ResolveValidateBeforeLookup,
    /// Speculative resolve: a raced speculation's retry keeps the (object, offset) the raced one
    /// found and only begins and validates again, so it can trust a key that was never what the
    /// address mapped.
    ResolveRetryKeepsFind,
    /// Locked resolve: a lookup miss answers "not ours" without checking for a trap there.
    ResolveMissIsNotOurs,
    /// Unregistration lets the probe leave the tree before restoring its breakpoints (the
    /// ordering this crate had first): a hit in between sees our trap and no probe.
    UnregisterDropsProbeFirst,
    /// Fork does not take the fork gate, so a registration walk can miss the child.
    ForkWithoutGate,
    /// XOL: a slot is taken with a load and a store instead of one `fetch_or`.
    XolTakeNotAtomic,
    /// XOL: a slot is freed with a relaxed clear instead of release.
    XolFreeRelaxed,
    /// XOL: the freer checks for waiters without the full barrier after clearing its bit.
    XolFreeWithoutBarrier,
    /// XOL: cached breakpoints are trusted without checking the address space or the probe.
    XolCacheNoInvalidation,
    /// XOL: a cached slot is reused without comparing its bytes.
    XolReuseWithoutCompare,
    /// XOL: the lazily created area is published with a relaxed compare-exchange.
    XolPublishRelaxed,
    /// Optimizer: the optimized flag is cleared when a probe is queued for unoptimization, while
    /// its jump is still in the code (the bug Linux fixed in 2019, "kprobes: Set unoptimized flag
    /// after unoptimizing code").
    OptimizedFlagClearedEarly,
    /// Optimizer: step 1 returns early when the unoptimizing list is empty, so probes a collision
    /// force-unoptimized onto the freeing list are never freed (Linux 2023, "kprobes: Fix to
    /// handle forcibly unoptimized kprobes on freeing_list").
    FreeingListSkipped,
    /// Optimizer: a probe blocked by a neighbour's breakpoint is not retried when that neighbour is
    /// disarmed through the queue (Linux 2026, "kprobes: retry blocked optprobe in
    /// do_free_cleaned_kprobes").
    BlockedNotRetried,
    /// Optimizer: unused probes and their trampolines are freed before the quiescence wait.
    FreeBeforeQuiescence,
    /// Optimizer: reviving an unused probe (a registration before the optimizer freed it)
    /// restores its users and enabled state but does not publish the hit-visible flags, so
    /// hits keep skipping its consumers.
    RevivalWithoutFire,
    /// Kprobes: the domain handle's `clone` creates a new domain, so the registry and the
    /// optimizer each retire through their own and the trap's one guard protects neither (what
    /// `SharedRcu` forbids). Read by the loom model's own handle type.
    KprobesDomainPerStructure,
    /// Optimizer: the optimizing list is patched before the unoptimizing one and before the wait.
    OptimizeBeforeUnoptimize,
    /// x86 live patch: the first byte is written before the tail (no int3 first).
    PatchFirstByteFirst,
    /// Live quiescence scan: an answer counts for whatever round is current, not the one it
    /// answers (a late answer to an abandoned round completes the new one).
    ScanAnswerAnyRound,
    /// Optimizer: a trampoline is retired when its jump goes out, though its probe stays in the
    /// table (a collision) — hits still enter it, and a quiescence wait that looks in retired
    /// trampolines waits for ever (the process embedding's 2026-12 livelock).
    RetireLiveTrampoline,
    /// Optimizer: a freed trampoline is never retired (the quiescence wait before its free does
    /// not look in it).
    RetireSkipped,
    /// Tree: a hot word changed in place is stored Relaxed (a hit reads the new consumer list's
    /// pointer without its contents).
    HotWordRelaxed,
    /// Registry: a new consumer list is published in the probe but not in its leaf's hot word
    /// (hits keep reading the old list after its free).
    HotWordNotUpdated,
    /// Registry: a new consumer list is published (probe and hot word) without the tree lock, so
    /// a leaf copied meanwhile by another object's writer carries the old word.
    HotWordOutsideTreeLock,
    /// `SpinWait`: `wake_all` advances the event count Relaxed, so a waiter that sees the new
    /// count does not see what the waker wrote before waking it.
    SpinWaitWakeRelaxed,
    /// `CondvarWait`: `wake_all` notifies before it advances the event count, so a waiter that
    /// read the old count and went to sleep after the notify is never woken (a loom deadlock).
    CondvarNotifyFirst,
}

std::thread_local! {
    static ACTIVE: Cell<Bug> = const { Cell::new(Bug::None) };
}

/// Switches `bug` on for the current thread (and so for every loom model it runs).
pub fn set(bug: Bug) {
    ACTIVE.with(|b| b.set(bug));
}

/// Is `bug` switched on?
#[inline]
pub fn is(bug: Bug) -> bool {
    ACTIVE.with(|b| b.get() == bug)
}

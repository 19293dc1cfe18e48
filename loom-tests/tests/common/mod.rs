//! Shared by the loom models: running a model with a seeded bug and checking it was caught for
//! the right reason.

#![allow(dead_code)]

use probe_core::seeded::{self, Bug};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// What a model reports when it catches a bug: loom's own race detector on a facade
/// `UnsafeCell`/`FreeCheck`, or one of the models' assertions.
pub const CAUGHT: &[&str] = &[
    "Causality violation",
    "use after free",
    "torn snapshot",
    "consumer called after",
    "lost update",
    "answered not ours",
    "hit missed",
    "deadlock",
    "stale cache",
    "not the displaced instruction",
    "middle of a jump",
    "half-written jump",
    "never freed",
    "never retried",
    "executed twice or skipped",
    "code differs",
    "retired trampoline",
];

/// Runs `model` with `bug` switched on and asserts it fails with one of [`CAUGHT`].
///
/// A seeded-bug model that passes, or that fails for an unrelated reason (a deadlock, a leak, a
/// coverage assertion), is a broken model, and this says so.
pub fn must_catch(bug: Bug, model: impl FnOnce()) {
    seeded::set(bug);
    let r = catch_unwind(AssertUnwindSafe(model));
    seeded::set(Bug::None);
    let err = match r {
        Ok(()) => panic!("the model did not catch the seeded bug {bug:?}"),
        Err(e) => e,
    };
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        CAUGHT.iter().any(|c| msg.contains(c)),
        "the model failed on seeded bug {bug:?}, but not by catching it: {msg}"
    );
}

/// A loom model builder with a preemption bound, for models with more than two threads.
pub fn bounded(bound: usize) -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b
}

use probe_core::lock::SpinLock;
use probe_core::probe::{ObjectId, ProbeKey};
use probe_core::rcu::SlotRcu;
use probe_core::registry::Registry;
use probe_core::sync::FreeCheck;

/// A consumer whose use after its unregistration (+ `sync`) is a detected race.
#[derive(Debug, Default)]
pub struct Tracked {
    pub check: FreeCheck,
}

impl Tracked {
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self::default())
    }
    /// What a hit does with a consumer.
    pub fn call(&self) {
        self.check.check();
    }
}

/// The registry the models use: the loom-checkable RCU, one object lock (fewer loom objects;
/// the hashing is not what is being checked).
pub type Reg = Registry<Tracked, SlotRcu, SpinLock, 1>;

pub fn key(object: u64, offset: u64) -> ProbeKey {
    ProbeKey::new(ObjectId(object), offset)
}

/// Counts a model's executions and prints the count (the suite's size, in the test output).
pub struct Executions {
    name: &'static str,
    n: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Executions {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            n: Default::default(),
        }
    }
    /// A handle to bump once per execution, from inside the model closure.
    pub fn counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        self.n.clone()
    }
}

impl Drop for Executions {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            eprintln!(
                "loom model {}: {} executions",
                self.name,
                self.n.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    }
}

use probe_core::mm::{AddressSpace, MmId, PAGE_SIZE, VmFlags};
use probe_core::rcu::Rcu;
use probe_core::testing::{ByteText, Int3};
use probe_core::uprobes::{Hit, Uprobes};

/// A lock loom does not model, for the test patcher only: its critical sections contain no loom
/// operation, so a model thread is never switched out while holding it, and it is never found
/// held. (It panics if it ever is.) The patcher stands in for the embedder's memory; keeping its
/// internals out of the model keeps the models about the protocol.
#[derive(Default)]
pub struct Unmodeled(std::sync::atomic::AtomicBool);

// SAFETY: mutual exclusion by a real atomic swap (Acquire) and release store.
unsafe impl probe_core::lock::RawLock for Unmodeled {
    fn lock(&self) {
        assert!(
            self.try_lock(),
            "the test patcher's lock was found held: a loom switch inside it"
        );
    }
    fn try_lock(&self) -> bool {
        !self.0.swap(true, std::sync::atomic::Ordering::Acquire)
    }
    unsafe fn unlock(&self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// The breakpoint layer the models use (one lock slot: fewer loom objects).
pub type U = Uprobes<Tracked, SlotRcu, Int3, ByteText<Unmodeled>, SpinLock, 1>;

/// Object ids of the models.
pub const X: u64 = 1;
pub const Y: u64 = 2;

/// A `U` with objects X and Y (8 pages of non-trap bytes each) and one address space whose first
/// page maps X from offset 0, executable.
pub fn world() -> (std::sync::Arc<U>, std::sync::Arc<AddressSpace>) {
    let text = ByteText::new();
    for o in [X, Y] {
        text.add_object(ObjectId(o), vec![0x90; 8 * PAGE_SIZE as usize]);
    }
    let u = std::sync::Arc::new(U::new(SlotRcu::new(), text));
    let mm = u.create_mm(MmId(1)).unwrap();
    u.mmap(&mm, 0, PAGE_SIZE, 0, ObjectId(X), VmFlags::EXEC)
        .unwrap();
    (u, mm)
}

/// What a hit resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seen {
    Run(u64, u64),
    NotOurs,
    Restart,
}

/// Resolves `addr` in `mm`, calling the consumers of a `Run` (inside the read section).
pub fn hit(u: &U, mm: &AddressSpace, addr: u64) -> Seen {
    let r = u.registry().rcu().register().unwrap();
    let g = u.read(&r);
    match u.resolve(&g, mm, addr).0 {
        Hit::Run(p) => {
            p.consumers().iter().for_each(|c| c.call());
            Seen::Run(p.key().object.0, p.key().offset)
        }
        Hit::NotOurs => Seen::NotOurs,
        Hit::Restart => Seen::Restart,
    }
}

/// Runs `model` under `builder`, counting its executions (printed when the run ends) and
/// collecting the outcome each execution returns; then checks coverage: every outcome in
/// `must_see` was reached in some execution — otherwise loom did not explore the interleavings
/// the model exists for, and the model is reported broken (not caught: see [`CAUGHT`]).
pub fn explore<T>(
    name: &'static str,
    builder: loom::model::Builder,
    must_see: &[T],
    model: impl Fn() -> T + Sync + Send + 'static,
) where
    T: Ord + std::fmt::Debug + Send + 'static,
{
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let seen2 = seen.clone();
    let runs = Executions::new(name);
    let count = runs.counter();
    builder.check(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let outcome = model();
        seen2.lock().unwrap().insert(outcome);
    });
    let seen = seen.lock().unwrap();
    for m in must_see {
        assert!(seen.contains(m), "loom never explored {m:?}: {seen:?}");
    }
}

/// An unbounded loom model builder.
pub fn unbounded() -> loom::model::Builder {
    loom::model::Builder::new()
}

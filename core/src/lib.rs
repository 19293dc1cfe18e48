//! # probe-core
//!
//! The concurrency core of a dynamic-instrumentation system — what Linux calls uprobes and
//! kprobes — for embedding in a kernel, a hypervisor or a process. `#![no_std]` with `alloc`.
//!
//! The embedder owns memory, threads, traps and time. probe-core owns the data structures and
//! protocols that stay correct while many CPUs hit probes and others register and unregister
//! them at the same moment:
//!
//! * [`registry`] — probes by (object, offset), consumers, reference counts, two-phase
//!   unregister. The hit path ([`registry::Registry::read`] → lookup → consumers) takes no lock
//!   and writes no shared memory.
//! * [`tree`] — the copy-on-write B-tree behind it: lock-free, store-free, bounded lookups.
//! * [`rcu`] — the read-side/grace-period abstraction every embedder plugs its own RCU into, with
//!   a crossbeam-epoch default and a small slot-based implementation that loom checks.
//! * [`seqcount`] — the sequence counter that speculative address resolution is built on.
//! * [`optimizer`] — delayed (un)optimization batching: breakpoints become jumps to trampolines,
//!   and back, a whole list per live patch and per quiescence wait (kprobes' optimizer, with
//!   Linux's 2019, 2023 and 2026 fixes).
//! * [`embedding`] — the embedder's contract (every trait method: who calls it, under which
//!   lock, whether it may allocate, sleep or fail) and a "kprobes in your kernel" walk-through.
//! * [`kprobes`] — consumers at code addresses over one registry and one optimizer in one RCU
//!   domain: register / unregister / enable / disable, revival of unused probes, one read
//!   section per trap, a recursion guard. What a kernel embeds as its kprobes.
//! * [`lock`] — the raw-lock trait, a spinlock, and the hashed per-object lock table.
//! * [`sync`] — the one facade over atomics and fences (loom under `--cfg loom`).
//! * [`error`] — one error type, a variant per bad input.
//! * [`types`] — the vocabulary every layer speaks: [`types::ObjectId`], [`types::ProbeKey`],
//!   [`types::MmId`], [`types::VmaInfo`], [`types::SavedInsn`].
//!
//! Every protocol is model-checked under loom in the `probe-loom-tests` package, each model with a
//! seeded bug that it must catch. ARCHITECTURE.md maps each invariant to its model.
//!
//! # Quick start
//!
//! ```
//! use probe_core::prelude::*;
//! use std::sync::Arc;
//!
//! let reg: Registry<dyn Fn() + Send + Sync, EpochRcu> = Registry::new(EpochRcu::new());
//! let key = ProbeKey::new(ObjectId(7), 0x40);
//! reg.register(key, Arc::new(|| println!("hit"))).unwrap();
//!
//! let reader = reg.rcu().register().unwrap();
//! let guard = reg.read(&reader);
//! for consumer in guard.lookup(&key).unwrap().consumers() {
//!     consumer();
//! }
//! ```
//!
//! # Features
//!
//! * `epoch` (default) — `rcu::EpochRcu`, over crossbeam-epoch (`no_std` + `alloc`). Turn
//!   default features off when the embedder brings its own RCU (a kernel's, or [`rcu::SlotRcu`]):
//!   crossbeam is then not built at all.
//! * `std` — conveniences that need the standard library (`lock::YieldRelax`). Never needed
//!   for correctness; the crate is `no_std` without it (CI proves it by linking it into a
//!   `no_std` staticlib with its own panic handler, with and without `epoch`).

#![no_std]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod arch;
pub mod embedding;
pub mod error;
pub mod kprobes;
pub mod lock;
pub mod mm;
pub mod optimizer;
pub mod probe;
pub mod rcu;
pub mod registry;
pub mod scan;
pub mod seqcount;
pub mod sync;
pub mod testing;
pub mod tree;
pub mod types;
pub mod uprobes;
pub mod xol;

mod alloc_util;

#[cfg(loom)]
pub mod seeded;

#[cfg(all(test, not(loom)))]
mod test_support;

pub use error::{Error, Result};

/// The names most embedders need.
pub mod prelude {
    pub use crate::arch::{Arch, CodeSpace, TextPatcher};
    pub use crate::error::{Error, Result};
    pub use crate::kprobes::{Kprobe, KprobeTrap, Kprobes, Ran, Reentry};
    pub use crate::lock::{LockTable, RawLock, SpinLock};
    pub use crate::mm::{AddressSpace, AddressSpaceOps, MmId, PAGE_SIZE, VmFlags, VmaInfo};
    pub use crate::optimizer::{Armed, Optimizer, Then, Trap};
    pub use crate::probe::{ConsumerHandle, ObjectId, Probe, ProbeKey};
    #[cfg(all(feature = "epoch", not(loom)))]
    pub use crate::rcu::EpochRcu;
    pub use crate::rcu::{Rcu, SlotRcu};
    pub use crate::registry::{ProbeRef, ProbeView, ReadGuard, Registry};
    pub use crate::uprobes::{Hit, Path, Uprobes};
}

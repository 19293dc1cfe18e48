//! The embedder's contract, and kprobes in your kernel: what probe-core calls, from where, and
//! what each call may do — written once; every embedder trait links here.
//!
//! # Contexts
//!
//! probe-core runs in three kinds of context, all the embedder's:
//!
//! * **hit** — a trap (a breakpoint exception, a SIGTRAP handler, a VM exit) or a trampoline's
//!   call. In a kernel: interrupts off, possibly inside any lock of the interrupted code.
//!   probe-core takes no lock, makes no allocation, frees nothing and writes no shared line
//!   here in the common case (tests audit every store).
//! * **writer** — register, unregister, enable, disable, map and unmap: ordinary thread
//!   context, holding probe-core's writer locks as the table says.
//! * **optimizer** — a run of the delayed optimizer (the embedder's timer or worker), holding
//!   the optimizer's lock.
//!
//! # The locks
//!
//! | lock | who takes it | held across | so in a kernel |
//! |---|---|---|---|
//! | `M`: the optimizer's lock, [`Kprobes`](crate::kprobes::Kprobes)' mutex | writers, optimizer runs | allocation, [`CodeSpace::patch`], [`CodeSpace::quiesce`], [`Rcu::synchronize`] | a sleeping mutex (`kprobe_mutex`, `text_mutex`) |
//! | `L`: the registry's tree and object locks, the address spaces' write locks | writers only | allocation (list, probe and tree-node copies), [`TextPatcher`](crate::arch::TextPatcher) writes | a mutex, or a spinlock your allocator may be called under; never an interrupts-off lock that a hit or an interrupt handler takes |
//!
//! **No hit path takes either.** Locks are passed in initialized ([`Kprobes::with_locks`],
//! [`Registry::with_locks`](crate::registry::Registry::with_locks),
//! [`Optimizer::with_lock`](crate::optimizer::Optimizer::with_lock)), so a kernel can give each
//! its lock class; `Default` is only a convenience. A [`ProbeRef`](crate::registry::ProbeRef)'s
//! last drop takes `L` briefly: do not drop one in a hit.
//!
//! [`Kprobes::with_locks`]: crate::kprobes::Kprobes::with_locks
//!
//! # Every method, its caller and what it may do
//!
//! "Alloc" means may allocate, "sleep" may block, "fail" may return an error (which probe-core
//! turns into a failed operation that changed nothing, or a fallback that stays correct).
//!
//! | method | called from | alloc | sleep | fail |
//! |---|---|---|---|---|
//! | [`Rcu::register`] | the embedder, once per CPU or thread (probe-core never calls it) | yes | yes | yes |
//! | [`Rcu::read_lock`] | hits; writers reading the tree | no | no | no |
//! | [`Rcu::defer`] | writers under `L` or `M`; a `ProbeRef`'s last drop — never a hit | no ([`Deferred`](crate::rcu::Deferred) was allocated before; queue it on a [`DeferredList`](crate::rcu::DeferredList) or [`DeferredStack`](crate::rcu::DeferredStack)) | no | no |
//! | [`Rcu::synchronize`] | optimizer runs under `M`; `Registry::sync`, `Kprobes::sync` with no lock — never inside a read section | yes | yes | no |
//! | [`RawLock`] `lock` / `try_lock` / `unlock` | writers and optimizer runs — never a hit | — | `M`: yes, `L`: as you choose (table above) | no |
//! | [`CodeSpace::read_original`], [`CodeSpace::check_boundary`], [`CodeSpace::prepare_detour`] | registration, under `M` | yes | yes | yes: the registration fails (or, for `prepare_detour`, the probe stays a breakpoint) |
//! | [`CodeSpace::read`] | a hit where no probe is (is a trap still there?) | no | no | yes: the trap is answered "not ours" |
//! | [`CodeSpace::patch`] | writers and optimizer runs, under `M` | no (the batch is preallocated) | yes (cross-CPU syncs) | yes, all or nothing: the batch rolled back; a run retries, a registration or enable fails and changes nothing, a disable leaves the harmless breakpoint to the next run |
//! | [`CodeSpace::quiesce`] | optimizer runs, under `M` | yes | yes | no |
//! | [`CodeSpace::retire_detour`] | optimizer runs and writers under `M`, once per trampoline, after its probe left the table and before the wait that precedes its free | yes | no | no |
//! | [`CodeSpace::free_detour`] | optimizer runs under `M`, after a quiescence wait; failed registrations | yes | yes | no |
//! | [`CodeSpace::kick`] | writers under `M` | no | no (schedule the run; never run the optimizer from inside it: `M` is held) | no |
//! | `live_patch::CodeWriter` `write` / `sync_cores` (the x86_64 crate) | inside [`CodeSpace::patch`], so under `M` | no | `sync_cores`: yes | `write`: yes, having stored nothing; `patch_batch` then rolls the batch back through the same protocol in reverse |
//! | [`TextPatcher`](crate::arch::TextPatcher) `read_object`, `read`, `write` | writers installing and removing breakpoints, under `L` and the address space's write lock; `read` also on the locked-resolve hit path | `read`: no; others: yes | `read`: no; others: yes | yes: the operation fails and changes nothing |
//! | [`TextPatcher`](crate::arch::TextPatcher) `read_xol`, `write_xol`, `flush_icache` | hits (preparing an out-of-line copy) | no | no | yes: the hit falls back to another slot or restarts |
//! | [`AddressSpaceOps`](crate::mm::AddressSpaceOps) `speculate_*`, `stamp`, `unchanged_since` | hits | no | no | answers, not errors |
//! | [`AddressSpaceOps::locked_find`](crate::mm::AddressSpaceOps::locked_find) | a hit whose speculation failed | no | it waits for the address space's writer | no |
//! | [`WaitQueue`](crate::xol::WaitQueue) `prepare` / `wait` / `wake_all` | hits waiting for an out-of-line slot, and freeing one (uprobes: process context) | no | `wait`: yes | no |
//!
//! An embedder's own failure is reported as [`Error::Embedder`](crate::Error::Embedder) with the
//! embedder's code (an errno), which probe-core passes on unchanged.
//!

//! # Kprobes in your kernel
//!
//! A kernel brings five things: its RCU ([`Rcu`]), its locks ([`RawLock`]), its text as a
//! [`CodeSpace`] (the arch crate supplies the analysis, the trampolines' code and the live
//! patch), a per-CPU [`Reentry`](crate::kprobes::Reentry), and the trap handler that asks
//! [`Kprobes`](crate::kprobes::Kprobes). This walk-through builds each, in miniature and
//! compiled as a test; a real kernel replaces the bodies, not the shape.
//!
//! ```
//! use probe_core::arch::{CodeSpace, Detour, NotOptimizable, Patch};
//! use probe_core::kprobes::{Kprobe, KprobeTrap, Kprobes, Ran, Reentry};
//! use probe_core::lock::RawLock;
//! use probe_core::optimizer::Then;
//! use probe_core::rcu::{Rcu, SlotRcu};
//! use probe_core::testing::Int3;
//! use probe_core::{Error, Result};
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
//!
//! // 1. The kernel's lock: a ticket spinlock. (Writers only ever take it; a kernel would make
//! //    `M` its mutex.) Acquire on lock pairs with the Release on unlock.
//! #[derive(Default)]
//! struct TicketLock { next: AtomicU32, serving: AtomicU32 }
//! unsafe impl RawLock for TicketLock {
//!     fn lock(&self) {
//!         let me = self.next.fetch_add(1, Ordering::Relaxed);
//!         while self.serving.load(Ordering::Acquire) != me { core::hint::spin_loop() }
//!     }
//!     fn try_lock(&self) -> bool {
//!         let s = self.serving.load(Ordering::Relaxed);
//!         self.next.compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed).is_ok()
//!     }
//!     unsafe fn unlock(&self) {
//!         let s = self.serving.load(Ordering::Relaxed);
//!         self.serving.store(s + 1, Ordering::Release);
//!     }
//! }
//!
//! // 2. The kernel's text: 32 one-byte instructions. `patch` is where a real kernel calls the
//! //    arch crate's live patch (x86: `live_patch::patch_batch(&text_poke, batch)`);
//! //    `prepare_detour` is where it runs the arch analysis and writes a trampoline — this one
//! //    keeps every probe a breakpoint.
//! struct Text { bytes: [AtomicU8; 32] }
//! impl CodeSpace for Text {
//!     type Arch = Int3; // x86's one-byte 0xCC
//!     fn read_original(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
//!         let a = addr as usize;
//!         if a + buf.len() > 32 { return Err(Error::OffsetOutOfRange) }
//!         for (i, b) in buf.iter_mut().enumerate() { *b = (a + i) as u8 + 1 }
//!         Ok(())
//!     }
//!     fn check_boundary(&self, addr: u64) -> Result<()> {
//!         if addr < 32 { Ok(()) } else { Err(Error::OffsetOutOfRange) }
//!     }
//!     fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
//!         for (i, b) in buf.iter_mut().enumerate() {
//!             *b = self.bytes.get(addr as usize + i).ok_or(Error::OffsetOutOfRange)?
//!                 .load(Ordering::Acquire);
//!         }
//!         Ok(())
//!     }
//!     fn prepare_detour(&self, _addr: u64) -> core::result::Result<Detour, NotOptimizable> {
//!         Err(NotOptimizable::Unsupported)
//!     }
//!     fn free_detour(&self, _: &Detour) {}
//!     fn patch(&self, batch: &[Patch]) -> Result<()> {
//!         for p in batch {
//!             for (i, b) in p.new_bytes().iter().enumerate() {
//!                 self.bytes[p.addr as usize + i].store(*b, Ordering::Release);
//!             }
//!         }
//!         Ok(()) // all or nothing: on an error every site must hold its `old` bytes again
//!     }
//!     fn quiesce(&self) {} // synchronize_rcu_tasks()
//! }
//!
//! // 3. The kernel's RCU, one domain for everything (here `SlotRcu`; a kernel passes its own
//! //    `&'static` RCU), and the kprobes over the text.
//! let rcu: &'static SlotRcu = Box::leak(Box::new(SlotRcu::new()));
//! type Handler = fn(u64);
//! let text = Text { bytes: core::array::from_fn(|i| AtomicU8::new(i as u8 + 1)) };
//! let kprobes: Kprobes<Handler, Text, &'static SlotRcu, TicketLock, TicketLock> =
//!     Kprobes::with_locks(text, rcu, TicketLock::default(), TicketLock::default(),
//!                         TicketLock::default);
//!
//! // 4. Per CPU: an RCU reader and a recursion flag, made at CPU bring-up.
//! let cpu0_reader = rcu.register().unwrap();
//! let cpu0 = Reentry::new();
//!
//! // 5. register_kprobe.
//! static HITS: AtomicU32 = AtomicU32::new(0);
//! let kp = Arc::new(Kprobe::new(8, (|_ip| { HITS.fetch_add(1, Ordering::Relaxed); }) as Handler));
//! kprobes.register(kp.clone()).unwrap();
//! assert_eq!(kprobes.space().bytes[8].load(Ordering::Relaxed), 0xCC);
//!
//! // 6. The breakpoint exception handler (interrupts off): one read section for the whole trap.
//! let trap = |ip: u64| -> &'static str {
//!     let g = kprobes.read(&cpu0_reader);
//!     match g.on_breakpoint(ip) {
//!         KprobeTrap::Probe { consumers, then } => {
//!             match consumers.run(&cpu0, |kp| (kp.handler())(ip)) {
//!                 Ran::Ran(_) => {}
//!                 Ran::Missed(_) => {} // counted in each kprobe's nmissed
//!             }
//!             match then {
//!                 Then::Step => "single-step the original instruction out of line",
//!                 Then::Detour(_) => "continue at the trampoline's displaced instructions",
//!             }
//!         }
//!         KprobeTrap::NotOurs => "not ours: the kernel's own int3 handling",
//!         KprobeTrap::Restart => "re-execute: the probe went away",
//!     }
//! };
//! assert_eq!(trap(8), "single-step the original instruction out of line");
//! assert_eq!(HITS.load(Ordering::Relaxed), 1);
//!
//! // 7. unregister_kprobe: two-phase. Hits stop calling it; after sync, its data may go.
//! kprobes.unregister(&kp).unwrap();
//! kprobes.sync();
//! kprobes.wait_for_optimizer(); // the optimizer's worker: original bytes, probe freed
//! assert_eq!(kprobes.space().bytes[8].load(Ordering::Relaxed), 9);
//! assert_eq!(trap(8), "re-execute: the probe went away");
//! ```

// The names the docs above link to (imports used only by rustdoc's links).
#[allow(unused_imports)]
use crate::{arch::CodeSpace, lock::RawLock, rcu::Rcu};

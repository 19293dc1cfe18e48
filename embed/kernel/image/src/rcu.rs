//! The kernel's RCU: quiescent-state based, as a kernel's classic RCU is.
//!
//! A CPU is inside a read section whenever it is not at a quiescent point; the worker loop
//! announces one per iteration ([`quiescent`]), between hits. Nothing else is needed on the read
//! side — a trap handler (interrupts off) or a trampoline call never passes a quiescent point —
//! so `read_lock` costs nothing. [`KernelRcu::synchronize`] snapshots every other online CPU's
//! counter and waits until each has moved; then it runs the callbacks deferred before it began.
//! Callbacks queue on a [`DeferredStack`] through their own link: `defer` never allocates.

use crate::percpu::{PERCPU, this_cpu_index};
use crate::smp::ONLINE;
use crate::sync::Ordering;
use probe_core::rcu::{Deferred, DeferredStack, Rcu};

/// The one RCU domain of this kernel.
pub struct KernelRcu {
    pending: DeferredStack,
}

impl KernelRcu {
    /// A domain with nothing pending.
    pub const fn new() -> Self {
        Self {
            pending: DeferredStack::new(),
        }
    }
}

/// This CPU passed a quiescent state: it holds no reference it found under a read section.
pub fn quiescent() {
    // Release pairs with the Acquire load in `synchronize`: everything this CPU did in the read
    // sections before happens-before the frees that wait for this counter.
    PERCPU[this_cpu_index()].qs.fetch_add(1, Ordering::Release);
}

/// A CPU's read-side handle: which CPU it is.
pub struct CpuReader(#[allow(dead_code)] pub usize);

/// A read section (nothing to do: see the module docs).
pub struct Guard;

// SAFETY: `synchronize` returns only after every other online CPU passed a quiescent state after
// it began, and a CPU is in a read section everywhere but at its quiescent points: every guard
// that existed when it began has ended (guarantees 1 and 2; callbacks run after that wait).
// Guards protect whatever this one domain retires, whichever handle took them (3).
unsafe impl Rcu for KernelRcu {
    type Reader<'d> = CpuReader;
    type Guard<'r> = Guard;

    fn register(&self) -> probe_core::Result<CpuReader> {
        Ok(CpuReader(this_cpu_index()))
    }

    #[inline]
    fn read_lock<'r>(&'r self, _reader: &'r CpuReader) -> Guard {
        Guard
    }

    fn defer(&self, f: Deferred) {
        self.pending.push(f);
    }

    fn synchronize(&self) {
        let batch = self.pending.take_all();
        let me = this_cpu_index();
        let online = ONLINE.load(Ordering::Acquire);
        let mut snap = [0u64; crate::percpu::MAX_CPUS];
        for (cpu, s) in snap.iter_mut().enumerate().take(online) {
            // Acquire pairs with the Release increment in `quiescent`.
            *s = PERCPU[cpu].qs.load(Ordering::Acquire);
        }
        for (cpu, s) in snap.iter().enumerate().take(online) {
            if cpu == me {
                continue;
            }
            // Acquire: as above (and pairs with the Release store of `offline`).
            while PERCPU[cpu].qs.load(Ordering::Acquire) == *s
                && !PERCPU[cpu].offline.load(Ordering::Acquire)
            {
                core::hint::spin_loop();
            }
        }
        batch.run_all();
    }
}

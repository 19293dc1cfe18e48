//! Per-CPU data, indexed by LAPIC ID (QEMU numbers CPUs 0..n-1).

use crate::sync::{AtomicBool, AtomicU64};
use probe_core::kprobes::Reentry;

/// The most CPUs this kernel runs.
pub const MAX_CPUS: usize = 8;

/// What each CPU keeps for itself (others read `qs`, `sync_ack` and `rip`).
#[repr(align(128))]
pub struct PerCpu {
    /// Quiescent states passed (the RCU's per-CPU counter).
    pub qs: AtomicU64,
    /// The last sync IPI this CPU answered.
    pub sync_ack: AtomicU64,
    /// Where this CPU was interrupted by the last sync IPI.
    pub rip: AtomicU64,
    /// Running kprobe consumers now (kprobes' `current_kprobe`).
    pub reentry: Reentry,
    /// Parked for good: no read sections any more (grace periods stop waiting for it).
    pub offline: AtomicBool,
}

/// One entry per CPU.
pub static PERCPU: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        qs: AtomicU64::new(0),
        sync_ack: AtomicU64::new(0),
        rip: AtomicU64::new(0),
        reentry: Reentry::new(),
        offline: AtomicBool::new(false),
    }
}; MAX_CPUS];

/// This CPU's index (its LAPIC ID).
pub fn this_cpu_index() -> usize {
    (crate::apic::id() as usize).min(MAX_CPUS - 1)
}

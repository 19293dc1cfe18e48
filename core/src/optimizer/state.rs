//! The states: what the code at a probe holds ([`Code`]), which list it is on ([`Queue`]), what
//! arming it did ([`Armed`]), the snapshot an embedder reads ([`ProbeState`]); and one probe
//! site — the word hits read (`FIRE`, `DETOUR`) beside the writer's state, which only the lock
//! holder touches.

use crate::arch::{Detour, MAX_DETOUR, NotOptimizable};
use crate::sync::{AtomicU32, FreeCheck, Ordering, UnsafeCell};

/// Hit-visible flag: hits run the consumers (the probe is enabled).
pub(super) const FIRE: u32 = 1;
/// Hit-visible flag: "optimized" in the kprobes sense — continue through the trampoline.
pub(super) const DETOUR: u32 = 2;

/// What the code at a probe holds (writer-side bookkeeping, exact under the lock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// The original instructions.
    Original,
    /// The breakpoint over the first instruction.
    Breakpoint,
    /// The jump to the trampoline over the whole detour range.
    Jump,
}

/// Which list a probe is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    /// None.
    None,
    /// Waiting for the next run to turn its breakpoint into a jump.
    Optimizing,
    /// Waiting for the next run to turn its jump back into a breakpoint (or the original).
    Unoptimizing,
    /// Unoptimized and unused: freed by the next run after its quiescence wait.
    Freeing,
}

impl Queue {
    pub(super) fn index(self) -> Option<usize> {
        match self {
            Queue::None => None,
            Queue::Optimizing => Some(0),
            Queue::Unoptimizing => Some(1),
            Queue::Freeing => Some(2),
        }
    }
}

/// What registration did to the code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Armed {
    /// A breakpoint now, queued: the next optimizer run turns it into a jump.
    Optimizing,
    /// A breakpoint, and it stays one: the arch analysis says why.
    Breakpoint(NotOptimizable),
    /// A breakpoint for now: an armed probe inside its jump range blocks it. It is retried when
    /// that probe is disarmed.
    Blocked,
    /// A breakpoint that must stay one: a user asked for single-step semantics.
    SingleStep,
    /// Not in the code: everything is disarmed ([`Optimizer::disarm_all`](super::Optimizer::disarm_all)).
    Disarmed,
    /// Disabled: not in the code until [`Optimizer::enable`](super::Optimizer::enable).
    Disabled,
    /// Already registered by another user: one more user, nothing changed in the code.
    Shared,
}

/// A snapshot of one probe's state (taken under the optimizer's lock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeState {
    /// Registrations holding it.
    pub users: u32,
    /// Enabled (hits run consumers; it wants to be in the code).
    pub enabled: bool,
    /// Optimized in the kprobes sense (queued for optimization, optimized, or queued for
    /// unoptimization): hits continue through the trampoline.
    pub optimized: bool,
    /// The list it is on.
    pub queue: Queue,
    /// What the code holds.
    pub code: Code,
    /// Why it can never be optimized, if so.
    pub not_optimizable: Option<NotOptimizable>,
    /// Pinned to a breakpoint for single-step semantics.
    pub single_step: bool,
    /// Bytes its jump covers (or would): 0 if it can never be optimized.
    pub jump_len: u8,
}

impl ProbeState {
    /// Queued on the optimizing or the unoptimizing list.
    pub fn queued(&self) -> bool {
        queued(self.queue)
    }
    /// Disabled with no users: waiting to be freed.
    pub fn unused(&self) -> bool {
        unused(self.users, self.enabled)
    }
    /// Disabled and not queued: none of its bytes is in the code, none is coming.
    pub fn disarmed(&self) -> bool {
        disarmed(self.enabled, self.queue)
    }
}

/// Queued on the optimizing or the unoptimizing list.
pub(super) fn queued(q: Queue) -> bool {
    matches!(q, Queue::Optimizing | Queue::Unoptimizing)
}

/// Disabled with no users (kprobes' `kprobe_unused`).
pub(super) fn unused(users: u32, enabled: bool) -> bool {
    users == 0 && !enabled
}

/// Disabled and not queued (kprobes' `kprobe_disarmed`).
pub(super) fn disarmed(enabled: bool, q: Queue) -> bool {
    !enabled && !queued(q)
}

/// The writer-side state of one probe site (a copy in and out under the lock).
#[derive(Clone, Copy, Debug)]
pub(super) struct SiteW {
    pub(super) users: u32,
    pub(super) enabled: bool,
    pub(super) optimized: bool,
    pub(super) single_step: bool,
    pub(super) code: Code,
    pub(super) queue: Queue,
    pub(super) pos: usize,
    pub(super) hashed: bool,
}

/// One probe site: what hits read (`flags`, `detour`) first.
#[repr(C, align(64))]
pub(super) struct Site {
    pub(super) flags: AtomicU32,
    pub(super) addr: u64,
    pub(super) detour: core::result::Result<Detour, NotOptimizable>,
    /// The original bytes of the span the probe may write (`span` bytes).
    pub(super) original: [u8; MAX_DETOUR],
    pub(super) span: u8,
    pub(super) w: UnsafeCell<SiteW>,
    pub(super) free_check: FreeCheck,
}

impl Site {
    /// The writer state.
    ///
    /// # Safety
    ///
    /// The caller holds the optimizer's lock.
    pub(super) unsafe fn w(&self) -> SiteW {
        self.free_check.check();
        // SAFETY: the lock serializes every access (INVARIANT at the top of the module).
        self.w.with(|p| unsafe { *p })
    }

    /// # Safety
    ///
    /// As for [`Site::w`].
    pub(super) unsafe fn set_w(&self, w: SiteW) {
        // SAFETY: as in `w`.
        self.w.with_mut(|p| unsafe { *p = w });
    }

    /// Publishes the hit-visible flags derived from `w`.
    pub(super) fn publish(&self, w: &SiteW) {
        let f = if w.enabled { FIRE } else { 0 } | if w.optimized { DETOUR } else { 0 };
        // Release pairs with the Acquire load in `on_breakpoint` / `on_trampoline`: a hit that
        // sees DETOUR cleared also sees the original bytes the patch restored before it.
        self.flags.store(f, Ordering::Release);
    }

    pub(super) fn original(&self, len: usize) -> &[u8] {
        &self.original[..len.min(usize::from(self.span))]
    }
}

//! The hit side: a trap at a probe ([`Optimizer::on_breakpoint`]) and a trampoline's call
//! ([`Optimizer::on_trampoline`]) each read one flag word of a site found in the copy-on-write
//! table, under the caller's read guard — no lock, no store. The answer says whether to run the
//! consumers and how to continue ([`Trap`], [`Then`]).

use super::Optimizer;
use super::state::{DETOUR, FIRE, Site};
use crate::arch::{Arch, CodeSpace, Detour, MAX_BREAKPOINT};
use crate::lock::RawLock;
use crate::rcu::Rcu;
use crate::sync::Ordering;

/// How a hit continues after a trap at a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then<'g> {
    /// Execute the original first instruction out of line (or emulate it), then continue after it.
    Step,
    /// Continue at the trampoline's displaced-instructions entry ([`Detour::displaced`]); it
    /// returns to `addr + len`. The consumers have already run: do not call them again.
    Detour(&'g Detour),
}

/// The answer to a trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trap<'g> {
    /// Ours. Run the consumers if `fire` (false while the probe is disabled), then continue as
    /// `then` says.
    Probe {
        /// Run the consumers.
        fire: bool,
        /// How to continue.
        then: Then<'g>,
    },
    /// No probe, and a trap instruction is there: the program's own. Deliver it.
    NotOurs,
    /// No probe, and no trap there any more: it was removed while this CPU trapped. Execute the
    /// instruction again.
    Restart,
}

impl<S: CodeSpace, R: Rcu, L: RawLock> Optimizer<S, R, L> {
    /// A CPU trapped at `addr`. Lock-free and store-free.
    ///
    /// ```
    /// use probe_core::optimizer::{Armed, Optimizer, Then, Trap};
    /// use probe_core::rcu::{EpochRcu, Rcu};
    /// use probe_core::testing::ByteCode;
    ///
    /// let code: ByteCode = ByteCode::new(vec![0x90; 64], 5); // 64 one-byte insns, 5-byte jumps
    /// let opt: Optimizer<_, _> = Optimizer::new(code, EpochRcu::new());
    /// assert_eq!(opt.register(16).unwrap(), Armed::Optimizing); // a breakpoint now, a jump later
    /// opt.wait_for_optimizer(); // or the embedder's timer calls run_optimizer()
    ///
    /// let reader = opt.rcu().register().unwrap();
    /// let guard = opt.rcu().read_lock(&reader);
    /// let Trap::Probe { fire, then: Then::Detour(d) } = opt.on_breakpoint(&guard, 16) else {
    ///     panic!("an optimized probe detours")
    /// };
    /// assert!(fire); // run the consumers, then continue at d.displaced
    /// assert_eq!(d.len, 5);
    /// assert_eq!(opt.on_breakpoint(&guard, 17), Trap::Restart); // no probe, no trap there
    /// ```
    #[inline]
    pub fn on_breakpoint<'g>(&'g self, _guard: &'g R::Guard<'_>, addr: u64) -> Trap<'g> {
        if let Some(site) = self.find(addr) {
            // Acquire pairs with the Release store in `Site::publish`.
            let f = site.flags.load(Ordering::Acquire);
            let then = match (&site.detour, f & DETOUR != 0) {
                (Ok(d), true) => Then::Detour(d),
                _ => Then::Step,
            };
            return Trap::Probe {
                fire: f & FIRE != 0,
                then,
            };
        }
        let n = <S::Arch as Arch>::BREAKPOINT.len().min(MAX_BREAKPOINT);
        let mut b = [0u8; MAX_BREAKPOINT];
        match self.space.read(addr, &mut b[..n]) {
            Ok(()) if !<S::Arch as Arch>::is_trap(&b[..n]) => Trap::Restart,
            // A trap is there (or the address is not even code): not one of ours.
            _ => Trap::NotOurs,
        }
    }

    /// A trampoline calls in for the probe at `addr`: run the consumers? (`false` once the probe
    /// is disabled or gone: its trampoline can still be entered until the next quiescence wait.)
    #[inline]
    pub fn on_trampoline(&self, _guard: &R::Guard<'_>, addr: u64) -> bool {
        // Acquire pairs with the Release store in `Site::publish`.
        self.find(addr)
            .is_some_and(|s| s.flags.load(Ordering::Acquire) & FIRE != 0)
    }

    #[inline]
    pub(super) fn find(&self, addr: u64) -> Option<&Site> {
        // SAFETY: the caller holds a read guard of `self.rcu` (both public callers take one), and
        // a site is freed only after it left the table and a grace period passed (INVARIANT).
        let p = unsafe { self.table.get(&addr) }?;
        // SAFETY: as above.
        let s = unsafe { &*p };
        s.free_check.check();
        Some(s)
    }
}

//! Collisions: a breakpoint wanted inside another probe's jump forces that jump out
//! ([`Locked::force_unoptimize`], kprobes' `get_optimized_kprobe` and the forced unoptimize), the
//! jump's probe is then *blocked* while the breakpoint stays, and retried when it goes (the 2026
//! fix).

use super::Code;
use super::Locked;
use super::state::{Site, disarmed};
use crate::arch::{CodeSpace, Detour, MAX_DETOUR};
use crate::error::Result;
use crate::lock::RawLock;
use crate::rcu::Rcu;

impl<S: CodeSpace, R: Rcu, L: RawLock> Locked<'_, S, R, L> {
    /// The optimized probe (kprobes meaning) whose jump range holds `addr`, other than one at
    /// `addr` itself (kprobes' `get_optimized_kprobe`).
    pub(super) fn covering_optimized(&self, addr: u64) -> Option<&Site> {
        let mut k = addr.checked_sub(1)?;
        loop {
            // SAFETY: locked: the writer side of the table.
            let (a, p) = unsafe { self.opt.table.floor_locked(&k) }?;
            if a + (MAX_DETOUR as u64) <= addr {
                return None;
            }
            // SAFETY: a hashed site is live.
            let s = unsafe { &*p };
            if let Ok(d) = &s.detour {
                // SAFETY: locked.
                if unsafe { s.w() }.optimized && addr < a + u64::from(d.len) {
                    return Some(s);
                }
            }
            k = a.checked_sub(1)?;
        }
    }

    /// Every prepared probe whose jump range holds `addr` (other than one at `addr`), optimized
    /// or not: the probes a probe at `addr` may be blocking. Calls `f` on each.
    pub(super) fn for_each_covering(&mut self, addr: u64, mut f: impl FnMut(&mut Self, &Site)) {
        let Some(mut k) = addr.checked_sub(1) else {
            return;
        };
        loop {
            // SAFETY: locked: the writer side of the table.
            let Some((a, p)) = (unsafe { self.opt.table.floor_locked(&k) }) else {
                return;
            };
            if a + (MAX_DETOUR as u64) <= addr {
                return;
            }
            // SAFETY: a hashed site is live; sites are freed only by this thread under the lock,
            // and `f` frees none.
            let s = unsafe { &*p };
            if let Ok(d) = &s.detour
                && addr < a + u64::from(d.len)
            {
                f(self, s);
            }
            let Some(next) = a.checked_sub(1) else { return };
            k = next;
        }
    }

    /// Is an armed (not disarmed) probe inside `s`'s jump range, past its first byte?
    pub(super) fn blocked(&self, s: &Site, d: &Detour) -> bool {
        let end = s.addr + u64::from(d.len);
        let mut k = end - 1;
        while k > s.addr {
            // SAFETY: locked: the writer side of the table.
            let Some((a, p)) = (unsafe { self.opt.table.floor_locked(&k) }) else {
                return false;
            };
            if a <= s.addr {
                return false;
            }
            // SAFETY: a hashed site is live; locked.
            let w = unsafe { (*p).w() };
            if !disarmed(w.enabled, w.queue) {
                return true;
            }
            k = a - 1;
        }
        false
    }

    /// Rewrites `s`'s jump now and clears its optimized flag after (kprobes'
    /// `force_unoptimize_kprobe`).
    pub(super) fn force_unoptimize(&mut self, s: &Site) -> Result<()> {
        // SAFETY: locked.
        let w = unsafe { s.w() };
        let to = self.rest_code(&w);
        if w.code == Code::Jump {
            self.patch_now(s, to)?;
            self.with_inner(|i| i.stats.unoptimized += 1);
            #[cfg(loom)]
            if crate::seeded::is(crate::seeded::Bug::RetireLiveTrampoline) {
                // The seeded bug: retired as its jump goes out, though it stays in the table.
                if let Ok(d) = &s.detour {
                    self.opt.space.retire_detour(d);
                }
            }
        } else if w.code != to {
            self.patch_now(s, to)?;
        }
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        w.optimized = false;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        // After the bytes are back (the 2019 rule).
        s.publish(&w);
        Ok(())
    }

    /// Re-queues the probes that a probe at `addr` was blocking (it has just been disarmed).
    pub(super) fn retry_blocked(&mut self, addr: u64) {
        self.for_each_covering(addr, |l, q| {
            // SAFETY: locked.
            let w = unsafe { q.w() };
            if w.enabled && !w.optimized {
                l.optimize(q);
            }
        });
    }
}

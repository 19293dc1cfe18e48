//! The three lists (optimizing, unoptimizing, freeing) and the optimizer's run over them: step 0
//! re-arms what a failed patch left disarmed, step 1 unoptimizes the unoptimizing list in one
//! batch, step 2 waits (a grace period of the hits' RCU domain and the embedder's quiescence),
//! step 3 optimizes the optimizing list in one batch, step 4 frees the freeing list.

use super::state::{Site, unused};
use super::{Code, Queue};
use super::{Locked, free_site};
use crate::arch::{CodeSpace, Detour};
use crate::lock::RawLock;
use crate::rcu::Rcu;

impl<S: CodeSpace, R: Rcu, L: RawLock> Locked<'_, S, R, L> {
    pub(super) fn enqueue(&mut self, s: &Site, q: Queue) {
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        if w.queue != Queue::None {
            self.dequeue(s);
            // SAFETY: locked.
            w = unsafe { s.w() };
        }
        let Some(ix) = q.index() else { return };
        w.pos = self.with_inner(|i| {
            let v = &mut i.queues[ix];
            // Never allocates: capacity for every live site (INVARIANT).
            v.push(s as *const Site);
            v.len() - 1
        });
        w.queue = q;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
    }

    pub(super) fn dequeue(&mut self, s: &Site) {
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        let Some(ix) = w.queue.index() else { return };
        let pos = w.pos;
        let moved = self.with_inner(|i| {
            let v = &mut i.queues[ix];
            v.swap_remove(pos);
            v.get(pos).copied()
        });
        if let Some(m) = moved {
            // SAFETY: a live site on the list; locked.
            let m = unsafe { &*m };
            // SAFETY: locked.
            let mut mw = unsafe { m.w() };
            mw.pos = pos;
            // SAFETY: locked.
            unsafe { m.set_w(mw) };
        }
        w.queue = Queue::None;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
    }

    pub(super) fn run(&mut self) {
        self.with_inner(|i| {
            i.kicked = false;
            i.stats.runs += 1;
        });
        #[cfg(loom)]
        let optimize_first = crate::seeded::is(crate::seeded::Bug::OptimizeBeforeUnoptimize);
        #[cfg(not(loom))]
        let optimize_first = false;
        if optimize_first {
            // The seeded bug: step 3 before steps 1 and 2.
            self.do_optimize();
        }
        self.do_rearm();
        self.do_unoptimize();
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::FreeBeforeQuiescence) {
            self.do_free();
        }
        // Step 2: one grace period for hits that may still hold a removed probe, one quiescence
        // wait for CPUs inside replaced bytes or cut-off trampolines.
        self.opt.rcu.synchronize();
        self.opt.space.quiesce();
        self.with_inner(|i| i.stats.waits += 2);
        if !optimize_first {
            self.do_optimize();
        }
        self.do_free();
        // Anything queued while running (nothing, unless a retry could not fit): run again later.
        if !self.idle() {
            self.kick();
        }
    }

    /// The last site on list `ix`.
    pub(super) fn pop(&mut self, ix: usize) -> Option<*const Site> {
        self.with_inner(|i| i.queues[ix].last().copied())
    }

    /// Is `s`, on the unoptimizing list, an enabled probe whose arming failed (see
    /// [`Locked::repair_later`])? It wants its breakpoint, which only `arm` may put in (a
    /// covering jump has to go first), so step 1 leaves it to step 0.
    pub(super) fn wants_rearm(&mut self, s: &Site) -> bool {
        // SAFETY: locked.
        let w = unsafe { s.w() };
        !w.optimized && w.enabled && !self.with_inner(|i| i.all_disarmed)
    }

    /// The index on the unoptimizing list of the next site `step` applies to.
    pub(super) fn find_on_unoptimizing(
        &mut self,
        mut want: impl FnMut(&mut Self, &Site) -> bool,
    ) -> Option<*const Site> {
        let n = self.with_inner(|i| i.queues[1].len());
        for k in 0..n {
            let p = self.with_inner(|i| i.queues[1][k]);
            // SAFETY: a live site on the list.
            if want(self, unsafe { &*p }) {
                return Some(p);
            }
        }
        None
    }

    /// Step 0: arm the enabled probes whose arming failed earlier, one by one through `arm`
    /// (which forces a covering jump back first). One that fails again stays for the next run.
    pub(super) fn do_rearm(&mut self) {
        while let Some(p) = self.find_on_unoptimizing(|l, s| l.wants_rearm(s)) {
            // SAFETY: a live site on the list.
            let s = unsafe { &*p };
            self.dequeue(s);
            if self.arm(s).is_err() {
                self.repair_later(s);
                return;
            }
            // A probe whose jump `arm` forced back may be optimized again later.
            self.retry_blocked(s.addr);
        }
    }

    /// Tells the embedder that `d` can no longer be entered ([`CodeSpace::retire_detour`]):
    /// its site is out of the table (and so, being unused, out of the code too).
    pub(super) fn retire_detour(&mut self, d: &Detour) {
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::RetireSkipped) {
            return;
        }
        self.opt.space.retire_detour(d);
    }

    /// Step 1.
    pub(super) fn do_unoptimize(&mut self) {
        let n = self.with_inner(|i| i.queues[1].len());
        #[cfg(loom)]
        if n == 0 && crate::seeded::is(crate::seeded::Bug::FreeingListSkipped) {
            // The 2023 bug: nothing to unoptimize, so the freeing list is not looked at either.
            return;
        }
        if n > 0 {
            // One batch for the whole list (but the re-arms step 0 could not do).
            for k in 0..n {
                let p = self.with_inner(|i| i.queues[1][k]);
                // SAFETY: a live site on the list.
                let s = unsafe { &*p };
                if self.wants_rearm(s) {
                    continue;
                }
                // SAFETY: locked.
                let w = unsafe { s.w() };
                let to = self.rest_code(&w);
                self.stage(s, to);
            }
            if self.flush().is_err() {
                // Nothing changed: every site keeps its code, its flags and its place on the
                // list, and the next run tries again. The freeing list waits too (its sites
                // may be the neighbours of these).
                self.kick();
                return;
            }
            // Only now, with the bytes back, do the flags go (the 2019 rule).
            while let Some(p) = self.find_on_unoptimizing(|l, s| !l.wants_rearm(s)) {
                // SAFETY: a live site on the list.
                let s = unsafe { &*p };
                self.dequeue(s);
                // SAFETY: locked.
                let mut w = unsafe { s.w() };
                let was_jump = w.code == Code::Jump;
                #[cfg(loom)]
                if was_jump && crate::seeded::is(crate::seeded::Bug::RetireLiveTrampoline) {
                    // The seeded bug: retired as its jump goes out, whether or not it stays.
                    if let Ok(d) = &s.detour {
                        self.opt.space.retire_detour(d);
                    }
                }
                let repaired = !w.optimized;
                w.code = self.rest_code(&w);
                w.optimized = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                s.publish(&w);
                if was_jump {
                    self.with_inner(|i| i.stats.unoptimized += 1);
                }
                let _ = repaired;
                if unused(w.users, w.enabled) {
                    self.enqueue(s, Queue::Freeing);
                }
                if !w.enabled {
                    // Disarmed now: whatever it was blocking may be optimized (Linux 2026).
                    #[cfg(loom)]
                    if crate::seeded::is(crate::seeded::Bug::BlockedNotRetried) {
                        continue;
                    }
                    self.retry_blocked(s.addr);
                }
            }
        }
        // The freeing list: unhash every unused site still in the table, in one tree batch —
        // including those a collision force-unoptimized (Linux 2023).
        let m = self.with_inner(|i| i.queues[2].len());
        let mut any = false;
        for k in 0..m {
            let p = self.with_inner(|i| i.queues[2][k]);
            // SAFETY: a live site on the list; locked.
            any |= unsafe { (*p).w() }.hashed;
        }
        if !any {
            return;
        }
        let opt = self.opt;
        // SAFETY: locked (the table's write lock); every writer uses `opt.rcu`.
        let r = unsafe {
            opt.table.batch(&opt.rcu, |b| {
                for k in 0..m {
                    let p = self.with_inner(|i| i.queues[2][k]);
                    // SAFETY: a live site on the list; locked.
                    let s = &*p;
                    if s.w().hashed {
                        b.remove(&s.addr)?;
                    }
                }
                Ok(())
            })
        };
        if r.is_ok() {
            for k in 0..m {
                let p = self.with_inner(|i| i.queues[2][k]);
                // SAFETY: a live site on the list; locked.
                let s = unsafe { &*p };
                // SAFETY: locked.
                let mut w = unsafe { s.w() };
                w.hashed = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                if let Ok(d) = &s.detour {
                    // Out of the table and out of the code: no new way in. Before the wait.
                    self.retire_detour(d);
                }
            }
        }
        // On failure they stay hashed and listed; step 4 skips them and the next run retries.
    }

    /// Step 3.
    pub(super) fn do_optimize(&mut self) {
        if self.with_inner(|i| i.all_disarmed) {
            // Never optimize while everything is disarmed; `disarm_all` emptied the list anyway.
            return;
        }
        let n = self.with_inner(|i| i.queues[0].len());
        if n == 0 {
            return;
        }
        for k in 0..n {
            let p = self.with_inner(|i| i.queues[0][k]);
            // SAFETY: a live site on the list.
            self.stage(unsafe { &*p }, Code::Jump);
        }
        if self.flush().is_err() {
            // Nothing changed: the sites stay breakpoints on the optimizing list (their
            // optimized flag set, as while queued), and the next run tries again.
            self.kick();
            return;
        }
        while let Some(p) = self.pop(0) {
            // SAFETY: a live site on the list.
            let s = unsafe { &*p };
            self.dequeue(s);
            // SAFETY: locked.
            let mut w = unsafe { s.w() };
            w.code = Code::Jump;
            // SAFETY: locked.
            unsafe { s.set_w(w) };
            self.with_inner(|i| i.stats.optimized += 1);
        }
    }

    /// Step 4.
    pub(super) fn do_free(&mut self) {
        let mut k = 0;
        loop {
            let Some(p) = self.with_inner(|i| i.queues[2].get(k).copied()) else {
                return;
            };
            // SAFETY: a live site on the list; locked.
            let w = unsafe { (*p).w() };
            if w.hashed {
                // Could not be unhashed (no memory): the next run tries again.
                k += 1;
                continue;
            }
            // SAFETY: as above.
            let s = unsafe { &*p };
            self.dequeue(s);
            if let Ok(d) = &s.detour {
                self.opt.space.free_detour(d);
            }
            self.with_inner(|i| {
                i.sites -= 1;
                i.stats.freed += 1;
            });
            // SAFETY: out of the table, a grace period and a quiescence wait ago, and off every
            // list: nothing can reach it.
            unsafe { free_site(p) };
        }
    }
}

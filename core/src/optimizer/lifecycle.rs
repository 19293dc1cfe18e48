//! A probe's life under the lock: register (create, or share, or revive an unused probe),
//! enable / disable, single-step, unregister and retire; arming and disarming, and queueing for
//! (un)optimization — kprobes' primitives, which every public operation is built from.

use super::state::{Site, SiteW, queued, unused};
use super::{Armed, Code, Queue};
use super::{Locked, SendSite, free_site};
use crate::alloc_util::try_box;
use crate::arch::{Arch, CodeSpace, Detour, MAX_DETOUR, NotOptimizable};
use crate::error::{Error, Result};
use crate::lock::RawLock;
use crate::rcu::{Deferred, Rcu};
use crate::sync::{AtomicU32, FreeCheck, UnsafeCell};
use alloc::boxed::Box;

impl<S: CodeSpace, R: Rcu, L: RawLock> Locked<'_, S, R, L> {
    /// Queues `s` for optimization if it may be optimized (kprobes' `optimize_kprobe`).
    pub(super) fn optimize(&mut self, s: &Site) -> Armed {
        let d = match &s.detour {
            Ok(d) => d,
            Err(why) => return Armed::Breakpoint(*why),
        };
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        if self.with_inner(|i| i.all_disarmed) {
            return Armed::Disarmed;
        }
        if !w.enabled {
            return Armed::Disabled;
        }
        if w.single_step {
            return Armed::SingleStep;
        }
        if w.code == Code::Original {
            // Its breakpoint is not in (an arm that failed, waiting for step 0): a jump may
            // only ever follow a breakpoint and a quiescence wait, never the original bytes.
            return Armed::Blocked;
        }
        if w.optimized {
            if w.queue == Queue::Unoptimizing {
                // Its jump is still in the code: taking it off the list is all it takes.
                self.dequeue(s);
            }
            return Armed::Optimizing;
        }
        if self.blocked(s, d) || self.covering_optimized(s.addr).is_some() {
            return Armed::Blocked;
        }
        w.optimized = true;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        // DETOUR before the jump exists: a trap now continues through the (ready) trampoline,
        // so no hit is ever stepped into bytes the coming jump will cover.
        s.publish(&w);
        self.enqueue(s, Queue::Optimizing);
        self.kick();
        Armed::Optimizing
    }

    /// Takes `s` out of the optimized state (kprobes' `unoptimize_kprobe`): at once if `force`,
    /// else through the unoptimizing list. Only a forced one patches, and so only a forced one
    /// can fail — then nothing changed.
    pub(super) fn unoptimize(&mut self, s: &Site, force: bool) -> Result<()> {
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        if !w.optimized {
            return Ok(());
        }
        match w.queue {
            Queue::Optimizing => {
                // Its jump never reached the code: dequeue, and the breakpoint is what remains.
                self.dequeue(s);
                // SAFETY: locked.
                w = unsafe { s.w() };
                w.optimized = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                s.publish(&w);
            }
            Queue::Unoptimizing => {
                if force {
                    self.force_unoptimize(s)?;
                    if unused(w.users, w.enabled) {
                        // Still in the table: the next run's freeing-list pass unhashes it
                        // (Linux 2023: even when its unoptimizing list is empty then).
                        self.enqueue(s, Queue::Freeing);
                    } else {
                        self.dequeue(s);
                    }
                    if !w.enabled {
                        // Disarmed now, outside any run: retry what it was blocking here.
                        self.retry_blocked(s.addr);
                    }
                }
            }
            Queue::None | Queue::Freeing => {
                if force {
                    self.force_unoptimize(s)?;
                } else {
                    #[cfg(loom)]
                    if crate::seeded::is(crate::seeded::Bug::OptimizedFlagClearedEarly) {
                        // The 2019 bug: the flag goes when the probe is queued, while its jump is
                        // still in the code.
                        w.optimized = false;
                        // SAFETY: locked.
                        unsafe { s.set_w(w) };
                        s.publish(&w);
                    }
                    self.enqueue(s, Queue::Unoptimizing);
                    self.kick();
                }
            }
        }
        Ok(())
    }

    /// Puts `s`'s breakpoint in the code and queues it for optimization (kprobes'
    /// `__arm_kprobe`).
    ///
    /// Fails (a patch failed) with `s`'s code unchanged; a covering jump forced back before the
    /// failure stays a breakpoint, and [`Locked::retry_blocked`] re-queues it.
    pub(super) fn arm(&mut self, s: &Site) -> Result<Armed> {
        // A jump covering this address goes first.
        if let Some(q) = self.covering_optimized(s.addr) {
            // `q` is a different, live, hashed site; `unoptimize` frees nothing.
            let q: *const Site = q;
            // SAFETY: as above.
            self.unoptimize(unsafe { &*q }, true)?;
        }
        // SAFETY: locked.
        let w = unsafe { s.w() };
        if w.code == Code::Original {
            self.patch_now(s, Code::Breakpoint)?;
        }
        // Probes this one now blocks cannot be optimized: any queued for it are dequeued by the
        // collision check above (optimized covers queued). Then try this one.
        Ok(self.optimize(s))
    }

    /// Takes `s` out of the code (kprobes' `__disarm_kprobe`): through the queue if its jump is
    /// there, else at once — and then retries the probes it was blocking.
    ///
    /// Never fails: a failed patch leaves the breakpoint (a disabled probe's breakpoint only
    /// steps its instruction) and sends the site to the next run's repair.
    pub(super) fn disarm(&mut self, s: &Site, reopt: bool) {
        // Not forced: cannot fail.
        let _ = self.unoptimize(s, false);
        // SAFETY: locked.
        let w = unsafe { s.w() };
        if !queued(w.queue) {
            let to = self.rest_code(&w);
            if w.code != to && w.code != Code::Jump && self.patch_now(s, to).is_err() {
                self.repair_later(s);
                return;
            }
            if reopt {
                self.retry_blocked(s.addr);
            }
        }
    }

    pub(super) fn register(&mut self, addr: u64) -> Result<Armed> {
        if let Some(s) = self.site(addr) {
            // SAFETY: locked.
            let mut w = unsafe { s.w() };
            if unused(w.users, w.enabled) {
                let s: *const Site = s;
                // SAFETY: hashed, so live; sites are freed only by runs and retirements under
                // this lock, and `revive` runs neither.
                return Ok(self.revive(unsafe { &*s }));
            }
            w.users = w.users.checked_add(1).ok_or(Error::NoMemory)?;
            // SAFETY: locked.
            unsafe { s.set_w(w) };
            return Ok(Armed::Shared);
        }
        self.opt.space.check_boundary(addr)?;
        let bp = <S::Arch as Arch>::BREAKPOINT;
        let mut original = [0u8; MAX_DETOUR];
        self.opt
            .space
            .read_original(addr, &mut original[..bp.len()])?;
        if <S::Arch as Arch>::is_trap(&original[..bp.len()]) {
            return Err(Error::ExistingTrap);
        }
        let detour = self.opt.space.prepare_detour(addr);
        let span = match &detour {
            Ok(d) => usize::from(d.len).clamp(bp.len(), MAX_DETOUR),
            Err(_) => bp.len(),
        };
        let read = self.opt.space.read_original(addr, &mut original[..span]);
        let opt = self.opt;
        let fail = |d: &core::result::Result<Detour, NotOptimizable>, e| {
            if let Ok(d) = d {
                opt.space.free_detour(d);
            }
            e
        };
        if let Err(e) = read {
            return Err(fail(&detour, e));
        }
        // Capacity for one more site on every list and in the scratch: runs never allocate.
        let reserved = self.with_inner(|i| {
            let need = i.sites + 1;
            for v in &mut i.queues {
                v.try_reserve(need - v.len()).map_err(|_| Error::NoMemory)?;
            }
            let n = i.scratch.len();
            i.scratch.try_reserve(need - n).map_err(|_| Error::NoMemory)
        });
        if let Err(e) = reserved {
            return Err(fail(&detour, e));
        }
        let site = Site {
            flags: AtomicU32::new(0),
            addr,
            detour,
            original,
            span: span as u8,
            w: UnsafeCell::new(SiteW {
                users: 1,
                enabled: true,
                optimized: false,
                single_step: false,
                code: Code::Original,
                queue: Queue::None,
                pos: 0,
                hashed: true,
            }),
            free_check: FreeCheck::new(),
        };
        let b = match try_box(site) {
            Ok(b) => b,
            Err(e) => return Err(fail(&detour, e)),
        };
        let p = Box::into_raw(b);
        // SAFETY: locked (the table's write lock); every writer uses `self.opt.rcu`.
        if let Err(e) = unsafe { self.opt.table.insert(&self.opt.rcu, addr, p) } {
            // SAFETY: never published.
            let b = unsafe { Box::from_raw(p) };
            return Err(fail(&b.detour, e));
        }
        self.with_inner(|i| i.sites += 1);
        // SAFETY: just published; freed only under this lock.
        let s = unsafe { &*p };
        // SAFETY: locked.
        let w = unsafe { s.w() };
        // Hits fire from now on; the breakpoint comes after the table entry, so a trap on it
        // always finds the probe.
        s.publish(&w);
        if self.with_inner(|i| i.all_disarmed) {
            return Ok(Armed::Disarmed);
        }
        let armed = match self.arm(s) {
            Ok(a) => a,
            Err(e) => {
                // No byte of ours reached the code: take the site back out, as if never made.
                // SAFETY: locked.
                let mut w = unsafe { s.w() };
                w.users = 0;
                w.enabled = false;
                w.optimized = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                s.publish(&w);
                self.dequeue(s);
                self.retire(s);
                // A covering jump that `arm` forced back before failing: optimize it again.
                self.retry_blocked(addr);
                return Err(e);
            }
        };
        // A breakpoint inside the ranges of prepared neighbours blocks them: any queued for
        // optimization come off the list (the collision check in `arm` handled the ones whose
        // jump was in the code or queued).
        Ok(armed)
    }

    /// Registers the first user of an unused probe that is still in the table (kprobes'
    /// `reuse_unused_kprobe`): instead of failing until the optimizer has freed it, it is
    /// enabled again where it stands. Its site, trampoline and saved bytes are still valid (it
    /// left no table, no trampoline was freed); what its last unregistration set in motion is
    /// undone through the same rules as any enable:
    ///
    /// * on the unoptimizing list with its jump in the code: `optimize` only dequeues it, and
    ///   the jump stays;
    /// * on the freeing list (a forced unoptimization or a failed table removal put it there
    ///   while it is still hashed): it comes off that list first, so no run frees a probe that
    ///   has a user again;
    /// * disarmed: `arm` puts its breakpoint back and queues it for optimization.
    pub(super) fn revive(&mut self, s: &Site) -> Armed {
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        if w.queue == Queue::Freeing {
            self.dequeue(s);
            // SAFETY: locked.
            w = unsafe { s.w() };
        }
        w.users = 1;
        w.enabled = true;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        #[cfg(loom)]
        let fire = !crate::seeded::is(crate::seeded::Bug::RevivalWithoutFire);
        #[cfg(not(loom))]
        let fire = true;
        if fire {
            // Hits fire again from now on (Release in `publish`; the breakpoint `arm` writes
            // comes after it, as in a first registration).
            s.publish(&w);
        }
        self.with_inner(|i| i.stats.revived += 1);
        if self.with_inner(|i| i.all_disarmed) {
            return Armed::Disarmed;
        }
        match self.arm(s) {
            Ok(a) => a,
            Err(_) => {
                // Its code stays as it was (the original, or its jump): the next run repairs it
                // to its breakpoint and queues it again. The registration itself holds.
                self.repair_later(s);
                Armed::Optimizing
            }
        }
    }

    pub(super) fn unregister(&mut self, addr: u64) -> Result<()> {
        let (s, mut w) = self.registered(addr)?;
        w.users -= 1;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        if w.users > 0 {
            return Ok(());
        }
        if w.enabled {
            w.enabled = false;
            // SAFETY: locked.
            unsafe { s.set_w(w) };
            // Hits stop running consumers now.
            s.publish(&w);
            self.disarm(s, true);
        }
        // SAFETY: locked.
        let w = unsafe { s.w() };
        if !queued(w.queue) && w.queue != Queue::Freeing {
            // Disarmed: out of the table now.
            self.retire(s);
        }
        Ok(())
    }

    /// `s` is unused and disarmed: unhash it; free it after a grace period if it never had a
    /// trampoline, else after the next run's quiescence wait.
    pub(super) fn retire(&mut self, s: &Site) {
        let addr = s.addr;
        // SAFETY: locked (the table's write lock); every writer uses `self.opt.rcu`.
        let removed = unsafe { self.opt.table.remove(&self.opt.rcu, &addr) };
        if removed.is_err() {
            // No memory for the copy-on-write path: leave it to the next run's freeing pass.
            self.enqueue(s, Queue::Freeing);
            self.kick();
            return;
        }
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        w.hashed = false;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        if let Ok(d) = &s.detour {
            self.retire_detour(d);
            self.enqueue(s, Queue::Freeing);
            self.kick();
            return;
        }
        let p = SendSite(s as *const Site);
        let free = Deferred::new(move || {
            let p = p;
            // SAFETY: out of the table a grace period ago; never in a trampoline (no detour).
            unsafe { free_site(p.0) }
        });
        match free {
            Ok(cb) => {
                self.with_inner(|i| {
                    i.sites -= 1;
                    i.stats.freed += 1;
                });
                self.opt.rcu.defer(cb);
            }
            // No memory for the callback: the next run frees it after its waits.
            Err(_) => {
                self.enqueue(s, Queue::Freeing);
                self.kick();
            }
        }
    }

    pub(super) fn set_enabled(&mut self, addr: u64, on: bool) -> Result<()> {
        let (s, mut w) = self.registered(addr)?;
        if w.enabled == on {
            return Ok(());
        }
        w.enabled = on;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        s.publish(&w);
        if on {
            if !self.with_inner(|i| i.all_disarmed)
                && let Err(e) = self.arm(s)
            {
                // Back to disabled, as before the call: its code never changed.
                // SAFETY: locked.
                let mut w = unsafe { s.w() };
                w.enabled = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                s.publish(&w);
                self.retry_blocked(addr);
                return Err(e);
            }
        } else {
            self.disarm(s, true);
        }
        Ok(())
    }

    pub(super) fn set_single_step(&mut self, addr: u64, on: bool) -> Result<()> {
        let (s, mut w) = self.registered(addr)?;
        w.single_step = on;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        if on {
            if let Err(e) = self.unoptimize(s, true) {
                // Still optimized, as before the call.
                w.single_step = false;
                // SAFETY: locked.
                unsafe { s.set_w(w) };
                return Err(e);
            }
        } else {
            self.optimize(s);
        }
        Ok(())
    }

    /// Every hashed site, highest address first (no allocation: repeated floor lookups).
    pub(super) fn for_each_site(&mut self, mut f: impl FnMut(&mut Self, &Site)) {
        let mut k = u64::MAX;
        loop {
            // SAFETY: locked: the writer side of the table.
            let Some((a, p)) = (unsafe { self.opt.table.floor_locked(&k) }) else {
                return;
            };
            // SAFETY: hashed and live; `f` frees nothing.
            f(self, unsafe { &*p });
            let Some(next) = a.checked_sub(1) else { return };
            k = next;
        }
    }

    pub(super) fn disarm_all(&mut self) {
        if self.with_inner(|i| core::mem::replace(&mut i.all_disarmed, true)) {
            return;
        }
        self.for_each_site(|l, s| {
            // SAFETY: locked.
            if unsafe { s.w() }.enabled {
                l.disarm(s, false);
            }
        });
    }

    pub(super) fn arm_all(&mut self) {
        if !self.with_inner(|i| core::mem::replace(&mut i.all_disarmed, false)) {
            return;
        }
        self.for_each_site(|l, s| {
            // SAFETY: locked.
            if unsafe { s.w() }.enabled && l.arm(s).is_err() {
                // Its breakpoint did not go in: the next run's repair puts it there.
                l.repair_later(s);
            }
        });
    }
}

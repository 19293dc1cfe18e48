//! The code: which bytes each [`Code`] state puts at a probe, staging a site's change into the
//! batch, and flushing the batch through [`CodeSpace::patch`] (all or nothing).

use super::Locked;
use super::state::{Site, SiteW};
use super::{Code, Queue};
use crate::arch::{Arch, CodeSpace, MAX_DETOUR, Patch};
use crate::error::Result;
use crate::lock::RawLock;
use crate::rcu::Rcu;

impl<S: CodeSpace, R: Rcu, L: RawLock> Locked<'_, S, R, L> {
    /// The bytes `code` means for site `s` over its first `n` bytes (`n` ≤ its span).
    pub(super) fn bytes_for(s: &Site, code: Code, n: usize, out: &mut [u8; MAX_DETOUR]) {
        out[..n].copy_from_slice(s.original(n));
        match (code, &s.detour) {
            (Code::Jump, Ok(d)) => out[..n].copy_from_slice(&d.jump_bytes()[..n]),
            (Code::Breakpoint, _) | (Code::Jump, Err(_)) => {
                let bp = <S::Arch as Arch>::BREAKPOINT;
                let m = bp.len().min(n);
                out[..m].copy_from_slice(&bp[..m]);
            }
            (Code::Original, _) => {}
        }
    }

    /// How many bytes a change between `a` and `b` touches: the whole span when a jump is
    /// involved, else only the breakpoint's bytes (a neighbour's breakpoint may sit inside the
    /// span, and is not ours to write).
    pub(super) fn width(s: &Site, a: Code, b: Code) -> usize {
        let span = usize::from(s.span);
        if a == Code::Jump || b == Code::Jump {
            span
        } else {
            <S::Arch as Arch>::BREAKPOINT.len().min(span)
        }
    }

    /// Appends the patch taking `s` from its current code to `to` onto the scratch batch.
    pub(super) fn stage(&mut self, s: &Site, to: Code) {
        // SAFETY: locked.
        let from = unsafe { s.w() }.code;
        if from == to {
            return;
        }
        let n = Self::width(s, from, to);
        let mut old = [0u8; MAX_DETOUR];
        let mut new = [0u8; MAX_DETOUR];
        Self::bytes_for(s, from, n, &mut old);
        Self::bytes_for(s, to, n, &mut new);
        if let Some(p) = Patch::new(s.addr, &old[..n], &new[..n]) {
            // Never allocates: capacity for every live site (INVARIANT).
            self.with_inner(|i| i.scratch.push(p));
        }
    }

    /// Sends the staged batch through the arch's live patch. On an error the embedder has left
    /// every site of the batch as it was ([`CodeSpace::patch`]'s contract), and so does the
    /// caller with its bookkeeping.
    pub(super) fn flush(&mut self) -> Result<()> {
        let batch = self.with_inner(|i| core::mem::take(&mut i.scratch));
        let r = if batch.is_empty() {
            Ok(())
        } else {
            self.opt.space.patch(&batch)
        };
        let n = batch.len() as u64;
        self.with_inner(|i| {
            if n > 0 {
                if r.is_ok() {
                    i.stats.batches += 1;
                    i.stats.patched += n;
                } else {
                    i.stats.failed_patches += 1;
                }
            }
            let mut batch = batch;
            batch.clear();
            i.scratch = batch;
        });
        r
    }

    /// Rewrites the code of one site now (a batch of one). On failure the code and the site's
    /// bookkeeping are unchanged.
    pub(super) fn patch_now(&mut self, s: &Site, to: Code) -> Result<()> {
        self.stage(s, to);
        self.flush()?;
        // SAFETY: locked.
        let mut w = unsafe { s.w() };
        w.code = to;
        // SAFETY: locked.
        unsafe { s.set_w(w) };
        Ok(())
    }

    /// A site whose immediate patch failed: its code is still what `code` says, but not what
    /// its state wants. The unoptimizing list doubles as the repair list: while on it the site
    /// counts as armed (no neighbour's jump may cover it), and the next run brings its code to
    /// its resting state — a disabled one's original bytes in step 1's batch, an enabled one's
    /// breakpoint through `arm` in step 0 (which forces a covering jump back first, and queues
    /// it for optimization).
    pub(super) fn repair_later(&mut self, s: &Site) {
        self.enqueue(s, Queue::Unoptimizing);
        self.kick();
    }

    /// What an unoptimized site should hold: its breakpoint if armed, else the original.
    pub(super) fn rest_code(&mut self, w: &SiteW) -> Code {
        let all_disarmed = self.with_inner(|i| i.all_disarmed);
        if w.enabled && !all_disarmed {
            Code::Breakpoint
        } else {
            Code::Original
        }
    }
}

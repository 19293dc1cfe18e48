//! Changing multi-byte code that other CPUs are executing: the int3-first protocol, batched.
//!
//! # Why a protocol
//!
//! An x86 CPU may fetch an instruction while another CPU stores to its bytes; the Intel SDM
//! (vol. 3, "Handling Self- and Cross-Modifying Code") defines the result only if the modifying
//! CPU makes the executing CPUs serialize before they run the new bytes. A CPU that fetched half
//! of an old 5-byte sequence and half of a new one would execute garbage. The protocol makes
//! every intermediate state safe to execute:
//!
//! 1. write `INT3` over the first byte of every site that changes; **sync**. Any CPU arriving at
//!    a site now traps, and the trap handler knows what the site is becoming (probe-core's
//!    optimizer answers every trap at a probe while its bytes change: see
//!    `probe_core::optimizer::Optimizer::on_breakpoint`).
//! 2. write the tail bytes (all but the first) of every site; **sync**. Nobody executes a tail
//!    now: a CPU reaching the site traps on its first byte.
//! 3. write the first byte of every site that does not stay `INT3`; **sync**.
//!
//! Three synchronizations per batch, whatever its size — the point of batching. Steps with
//! nothing to write are skipped with their sync (arming a breakpoint: one sync; removing one:
//! one sync).
//!
//! # Cache maintenance
//!
//! x86 keeps instruction caches coherent with stores: there is no line-by-line flush to do. What
//! x86 does need is the cross-core serialization above, supplied by the embedder through
//! [`CodeWriter::sync_cores`]: an IPI that makes every CPU execute a serializing instruction in a
//! kernel; `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` in a process; a VM exit per
//! vCPU in a hypervisor.

use crate::INT3;
use probe_core::Result;
use probe_core::arch::Patch;

/// The embedder's access to code, as the protocol needs it.
///
/// Called only from inside the embedder's `CodeSpace::patch`, so under the optimizer's lock; see
/// [the embedder's contract](probe_core::embedding).
pub trait CodeWriter {
    /// Stores `bytes` at `addr` (an alias mapping, `text_poke`, guest memory). Plain stores: the
    /// protocol makes them safe.
    ///
    /// # Errors
    ///
    /// The embedder's failure (`Error::Embedder` with its errno, say). A failed write must
    /// have stored nothing at those bytes; [`patch_batch`] then rolls back what the batch
    /// wrote before it. Rewriting bytes the same batch has just written successfully is
    /// expected not to fail (the rollback does that, retrying a few times).
    fn write(&self, addr: u64, bytes: &[u8]) -> Result<()>;
    /// Returns once every other CPU that may execute this code has executed a serializing
    /// instruction after the writes so far.
    fn sync_cores(&self);
}

/// How often a rollback write is retried before the rollback gives up.
const ROLLBACK_TRIES: u32 = 8;

/// Applies `batch` with the int3-first protocol. Only the bytes that differ between a site's
/// `old` and `new` are written (a neighbour's breakpoint inside a site's span is not ours).
/// Returns the number of synchronizations made (at most 3).
///
/// # Errors
///
/// The writer's first error — after a **rollback**: the same protocol in reverse takes every
/// site back to its `old` bytes (INT3 over the first bytes already changed, old tails, old first
/// bytes, a sync after each step), so every state a CPU can fetch stays safe, and the batch is
/// all or nothing, as `CodeSpace::patch` promises. Only a writer that also fails to rewrite
/// bytes it has just written (after a few tries) leaves a torn batch; the error is
/// returned then too.
pub fn patch_batch<W: CodeWriter + ?Sized>(w: &W, batch: &[Patch]) -> Result<u32> {
    #[cfg(loom)]
    if probe_core::seeded::is(probe_core::seeded::Bug::PatchFirstByteFirst) {
        // The seeded bug: first bytes before tails, no int3 guard.
        let mut syncs = 0;
        for p in batch {
            if first_new(p) {
                w.write(p.addr, &p.new_bytes()[..1])?;
            }
        }
        w.sync_cores();
        syncs += 1;
        for p in batch {
            for (s, e) in runs(p) {
                w.write(p.addr + s as u64, &p.new_bytes()[s..e])?;
            }
        }
        w.sync_cores();
        return Ok(syncs + 1);
    }
    let mut syncs = 0;
    // Step 1: INT3 over the first byte of every changing site (unless it already is one).
    let mut wrote = false;
    for (i, p) in batch.iter().enumerate() {
        if int3_first(p) {
            if let Err(e) = w.write(p.addr, &[INT3]) {
                undo_firsts(w, &batch[..i]);
                return Err(e);
            }
            wrote = true;
        }
    }
    syncs += sync_if(w, wrote);
    // Step 2: the tail bytes that differ, in runs.
    wrote = false;
    for (i, p) in batch.iter().enumerate() {
        for (s, e) in runs(p) {
            if let Err(err) = w.write(p.addr + s as u64, &p.new_bytes()[s..e]) {
                undo_tails(w, &batch[..i], Some((p, s)));
                undo_firsts(w, batch);
                return Err(err);
            }
            wrote = true;
        }
    }
    syncs += sync_if(w, wrote);
    // Step 3: the first byte, where the site does not stay INT3.
    wrote = false;
    for (i, p) in batch.iter().enumerate() {
        if first_new(p) {
            if let Err(e) = w.write(p.addr, &p.new_bytes()[..1]) {
                // Sites before `i` run their new code: guard them with INT3 again first.
                let mut guarded = false;
                for q in batch[..i].iter().filter(|q| first_new(q)) {
                    guarded |= retry(w, q.addr, &[INT3]);
                }
                sync_if(w, guarded);
                undo_tails(w, batch, None);
                undo_firsts(w, batch);
                return Err(e);
            }
            wrote = true;
        }
    }
    syncs += sync_if(w, wrote);
    Ok(syncs)
}

/// Does `p` change at all?
fn changes(p: &Patch) -> bool {
    p.old() != p.new_bytes()
}

/// Step 1 writes INT3 over `p`'s first byte.
fn int3_first(p: &Patch) -> bool {
    changes(p) && p.old().first() != Some(&INT3)
}

/// Step 3 writes `p`'s new first byte.
fn first_new(p: &Patch) -> bool {
    changes(p) && matches!(p.new_bytes().first(), Some(&b) if b != INT3)
}

/// The runs `[start, end)` of tail bytes (past the first) where `p`'s old and new differ.
fn runs(p: &Patch) -> impl Iterator<Item = (usize, usize)> + '_ {
    let (old, new) = (p.old(), p.new_bytes());
    let mut i = 1;
    core::iter::from_fn(move || {
        while i < new.len() && old[i] == new[i] {
            i += 1;
        }
        if i >= new.len() {
            return None;
        }
        let start = i;
        while i < new.len() && old[i] != new[i] {
            i += 1;
        }
        Some((start, i))
    })
}

fn sync_if<W: CodeWriter + ?Sized>(w: &W, wrote: bool) -> u32 {
    if wrote {
        w.sync_cores();
    }
    u32::from(wrote)
}

/// A rollback write, retried; `true` if written (the rollback goes on either way).
fn retry<W: CodeWriter + ?Sized>(w: &W, addr: u64, bytes: &[u8]) -> bool {
    (0..ROLLBACK_TRIES).any(|_| w.write(addr, bytes).is_ok())
}

/// Rollback: the old tail runs of `sites`, and of `partial` (a site whose runs before offset
/// `s` were written), then a sync. Every site concerned has INT3 at its first byte.
fn undo_tails<W: CodeWriter + ?Sized>(w: &W, sites: &[Patch], partial: Option<(&Patch, usize)>) {
    let mut wrote = false;
    for p in sites {
        for (s, e) in runs(p) {
            wrote |= retry(w, p.addr + s as u64, &p.old()[s..e]);
        }
    }
    if let Some((p, upto)) = partial {
        for (s, e) in runs(p).filter(|&(s, _)| s < upto) {
            wrote |= retry(w, p.addr + s as u64, &p.old()[s..e]);
        }
    }
    sync_if(w, wrote);
}

/// Rollback: the old first byte of every site of `sites` that step 1 guarded, then a sync.
fn undo_firsts<W: CodeWriter + ?Sized>(w: &W, sites: &[Patch]) {
    let mut wrote = false;
    for p in sites.iter().filter(|p| int3_first(p)) {
        wrote |= retry(w, p.addr, &p.old()[..1]);
    }
    sync_if(w, wrote);
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use core::cell::RefCell;
    use std::vec::Vec;

    /// Memory plus a log of every state each write exposed, and an optional failing write.
    struct Mem {
        bytes: RefCell<Vec<u8>>,
        states: RefCell<Vec<Vec<u8>>>,
        /// The write (0-based, counting attempts) that fails, storing nothing.
        fail_at: Option<usize>,
        writes: RefCell<usize>,
    }

    impl CodeWriter for Mem {
        fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
            let n = *self.writes.borrow();
            *self.writes.borrow_mut() += 1;
            if self.fail_at == Some(n) {
                return Err(probe_core::Error::Embedder(-14));
            }
            let a = addr as usize;
            self.bytes.borrow_mut()[a..a + bytes.len()].copy_from_slice(bytes);
            // Every store is visible to fetches at once (the worst case): record it.
            self.states.borrow_mut().push(self.bytes.borrow().clone());
            Ok(())
        }
        fn sync_cores(&self) {}
    }

    fn mem(b: &[u8]) -> Mem {
        Mem {
            bytes: RefCell::new(b.to_vec()),
            states: RefCell::new(Vec::new()),
            fail_at: None,
            writes: RefCell::new(0),
        }
    }

    const ORIG: [u8; 5] = [0x48, 0x89, 0xE5, 0x53, 0x41];
    const JMP: [u8; 5] = [0xE9, 0x10, 0x20, 0x30, 0x40];

    #[test]
    fn optimize_unoptimize_arm_disarm_sync_counts() {
        let bp = [INT3, 0x89, 0xE5, 0x53, 0x41];
        let cases: [(&[u8], &[u8], u32); 5] = [
            (&ORIG, &bp, 1),  // arm
            (&bp, &ORIG, 1),  // disarm
            (&bp, &JMP, 2),   // optimize
            (&JMP, &bp, 2),   // unoptimize, stays armed
            (&JMP, &ORIG, 3), // unoptimize and disarm
        ];
        for (old, new, syncs) in cases {
            let m = mem(old);
            let p = Patch::new(0, old, new).unwrap();
            assert_eq!(patch_batch(&m, &[p]), Ok(syncs), "{old:x?} → {new:x?}");
            assert_eq!(*m.bytes.borrow(), new);
        }
    }

    /// Every state a fetch could see is old, new, or has INT3 at the first byte; and a state with
    /// the new first byte (not INT3) already has the whole new tail.
    #[test]
    fn every_intermediate_state_is_safe() {
        let bp = [INT3, 0x89, 0xE5, 0x53, 0x41];
        for (old, new) in [(&ORIG, &JMP), (&JMP, &ORIG), (&bp, &JMP), (&JMP, &bp)] {
            let m = mem(old);
            patch_batch(&m, &[Patch::new(0, old, new).unwrap()]).unwrap();
            for s in m.states.borrow().iter() {
                assert!(
                    s[0] == INT3 || s[..] == old[..] || s[..] == new[..],
                    "unsafe state {s:x?} between {old:x?} and {new:x?}"
                );
            }
        }
    }

    #[test]
    fn a_batch_costs_three_syncs_however_large() {
        let n = 1000;
        let mut text = Vec::new();
        for _ in 0..n {
            text.extend_from_slice(&JMP);
        }
        let m = mem(&text);
        let batch: Vec<Patch> = (0..n)
            .map(|i| Patch::new(5 * i as u64, &JMP, &ORIG).unwrap())
            .collect();
        assert_eq!(patch_batch(&m, &batch), Ok(3));
        assert!(m.bytes.borrow().chunks(5).all(|c| c == ORIG));
    }

    #[test]
    fn only_differing_bytes_are_written() {
        // A neighbour's INT3 at offset 2 sits inside the span; old and new agree there.
        let old = [INT3, 0x89, INT3, 0x53, 0x41];
        let mut cur = old;
        cur[2] = 0x77; // what memory holds there is not ours: must stay untouched
        let m = mem(&cur);
        let new = [0x48, 0x89, INT3, 0x53, 0x41];
        patch_batch(&m, &[Patch::new(0, &old, &new).unwrap()]).unwrap();
        assert_eq!(m.bytes.borrow()[2], 0x77);
        assert_eq!(m.bytes.borrow()[0], 0x48);
        assert_eq!(patch_batch(&m, &[]), Ok(0));
    }

    /// A write failing at any point of a batch — in any step, at any site — rolls the whole
    /// batch back: the call fails, every site holds its old bytes, and every state a fetch
    /// could see on the way (forward and back) is old, new, or INT3 first.
    #[test]
    fn a_failed_write_rolls_the_whole_batch_back() {
        let bp = [INT3, 0x89, 0xE5, 0x53, 0x41];
        let jmp2 = [0xE9, 0x11, 0x22, 0x33, 0x44];
        let sites: [(&[u8; 5], &[u8; 5]); 4] =
            [(&ORIG, &JMP), (&JMP, &ORIG), (&bp, &jmp2), (&JMP, &bp)];
        let mut text = Vec::new();
        for (old, _) in &sites {
            text.extend_from_slice(&old[..]);
        }
        let batch: Vec<Patch> = sites
            .iter()
            .enumerate()
            .map(|(i, (o, n))| Patch::new(5 * i as u64, &o[..], &n[..]).unwrap())
            .collect();
        let total = {
            let m = mem(&text);
            patch_batch(&m, &batch).unwrap();
            *m.writes.borrow()
        };
        assert!(total >= 10, "the batch made only {total} writes");
        for k in 0..total {
            let mut m = mem(&text);
            m.fail_at = Some(k);
            assert_eq!(
                patch_batch(&m, &batch),
                Err(probe_core::Error::Embedder(-14)),
                "write {k} failed but the batch did not"
            );
            assert_eq!(*m.bytes.borrow(), text, "write {k} failed: not rolled back");
            for s in m.states.borrow().iter() {
                for (i, (old, new)) in sites.iter().enumerate() {
                    let c = &s[5 * i..5 * i + 5];
                    assert!(
                        c[0] == INT3 || c == &old[..] || c == &new[..],
                        "write {k} failed: unsafe state {c:x?} at site {i}"
                    );
                }
            }
        }
    }
}

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
use probe_core::arch::Patch;

/// The embedder's access to code, as the protocol needs it.
///
/// Called only from inside the embedder's `CodeSpace::patch`, so under the optimizer's lock; see
/// [the embedder's contract](probe_core::embedding).
pub trait CodeWriter {
    /// Stores `bytes` at `addr` (an alias mapping, `text_poke`, guest memory). Plain stores: the
    /// protocol makes them safe.
    fn write(&self, addr: u64, bytes: &[u8]);
    /// Returns once every other CPU that may execute this code has executed a serializing
    /// instruction after the writes so far.
    fn sync_cores(&self);
}

/// Applies `batch` with the int3-first protocol. Only the bytes that differ between a site's
/// `old` and `new` are written (a neighbour's breakpoint inside a site's span is not ours).
/// Returns the number of synchronizations made (at most 3).
pub fn patch_batch<W: CodeWriter + ?Sized>(w: &W, batch: &[Patch]) -> u32 {
    #[cfg(loom)]
    if probe_core::seeded::is(probe_core::seeded::Bug::PatchFirstByteFirst) {
        // The seeded bug: first bytes before tails, no int3 guard.
        let mut syncs = 0;
        syncs += u32::from(phase(w, batch, first_bytes));
        syncs += u32::from(phase(w, batch, tails));
        return syncs;
    }
    let mut syncs = 0;
    syncs += u32::from(phase(w, batch, int3_over_first));
    syncs += u32::from(phase(w, batch, tails));
    syncs += u32::from(phase(w, batch, first_bytes));
    syncs
}

/// Runs one step over every site, then syncs if it wrote anything.
fn phase<W: CodeWriter + ?Sized>(w: &W, batch: &[Patch], step: fn(&W, &Patch) -> bool) -> bool {
    let mut wrote = false;
    for p in batch {
        wrote |= step(w, p);
    }
    if wrote {
        w.sync_cores();
    }
    wrote
}

/// Step 1: `INT3` over the first byte of a changing site (unless it already is one).
fn int3_over_first<W: CodeWriter + ?Sized>(w: &W, p: &Patch) -> bool {
    let (old, new) = (p.old(), p.new_bytes());
    if old == new || old.first() == Some(&INT3) {
        return false;
    }
    w.write(p.addr, &[INT3]);
    true
}

/// Step 2: the tail bytes that differ, in runs.
fn tails<W: CodeWriter + ?Sized>(w: &W, p: &Patch) -> bool {
    let (old, new) = (p.old(), p.new_bytes());
    let mut wrote = false;
    let mut i = 1;
    while i < new.len() {
        if old[i] == new[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < new.len() && old[i] != new[i] {
            i += 1;
        }
        w.write(p.addr + start as u64, &new[start..i]);
        wrote = true;
    }
    wrote
}

/// Step 3: the first byte, where the site does not stay `INT3`.
fn first_bytes<W: CodeWriter + ?Sized>(w: &W, p: &Patch) -> bool {
    let (old, new) = (p.old(), p.new_bytes());
    match new.first() {
        Some(&b) if old != new && b != INT3 => {
            w.write(p.addr, &[b]);
            true
        }
        _ => false,
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use core::cell::RefCell;
    use std::vec::Vec;

    /// Memory plus a log of every state each sync exposed.
    struct Mem {
        bytes: RefCell<Vec<u8>>,
        states: RefCell<Vec<Vec<u8>>>,
    }

    impl CodeWriter for Mem {
        fn write(&self, addr: u64, bytes: &[u8]) {
            let a = addr as usize;
            self.bytes.borrow_mut()[a..a + bytes.len()].copy_from_slice(bytes);
            // Every store is visible to fetches at once (the worst case): record it.
            self.states.borrow_mut().push(self.bytes.borrow().clone());
        }
        fn sync_cores(&self) {}
    }

    fn mem(b: &[u8]) -> Mem {
        Mem {
            bytes: RefCell::new(b.to_vec()),
            states: RefCell::new(Vec::new()),
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
            assert_eq!(patch_batch(&m, &[p]), syncs, "{old:x?} → {new:x?}");
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
            patch_batch(&m, &[Patch::new(0, old, new).unwrap()]);
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
        assert_eq!(patch_batch(&m, &batch), 3);
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
        patch_batch(&m, &[Patch::new(0, &old, &new).unwrap()]);
        assert_eq!(m.bytes.borrow()[2], 0x77);
        assert_eq!(m.bytes.borrow()[0], 0x48);
        assert_eq!(patch_batch(&m, &[]), 0);
    }
}

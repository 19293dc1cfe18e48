//! The round protocol of a quiescence scan: "has every other thread answered *this* question,
//! and did any say it is inside?"
//!
//! A process embedding has no `synchronize_rcu_tasks()`. To learn that no thread can still be
//! inside code it is about to overwrite or free, the scanner signals every other thread; each
//! answers from its signal handler, where the interrupted context shows where it stopped. A scan
//! is a *round*:
//!
//! ```text
//!  scanner                                   each signalled thread (in its handler)
//!  -------                                   --------------------------------------
//!  round = begin()   busy = 0, state = round<<32     r = the round named in the signal's value
//!  signal every thread with `round`          if inside: busy += 1                [A-busy]
//!  wait until answered(round) == threads     state += 1, only if state>>32 == r  [A-count]
//!  if busy() == 0: done, else a new round
//! ```
//!
//! **Why a round number travels with the signal.** A scan may give up on a round (a thread that
//! exits never answers; the scanner times out) and start another. A late answer to the old round
//! must not count for the new one: if it did, the count could reach the number of threads while
//! one of them — inside, and not yet answered — is still unheard, and the scanner would free
//! code under it (the seeded bug `ScanAnswerAnyRound`; `loom-tests/tests/scan.rs` catches it with
//! two threads and a scanner that gives up once).
//!
//! **Why busy before count.** The scanner reads `busy` after seeing the count complete; each
//! answer's busy increment is ordered before its count increment (both SeqCst), so the scanner
//! sees every busy answer it counted. A late busy answer may bump the new round's `busy`
//! without being counted: a spurious retry, never a missed one.

use crate::sync::{AtomicU64, Ordering};

/// The scanner's rounds and the answers to them.
#[derive(Debug, Default)]
pub struct ScanRounds {
    /// `round << 32 | answers`.
    state: AtomicU64,
    /// Busy answers in the current round (and possibly late ones: conservative).
    busy: AtomicU64,
}

impl ScanRounds {
    /// No round yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a new round (scanner only; one scanner at a time) and returns its number, to be
    /// sent with the signals.
    pub fn begin(&self) -> u32 {
        let round = ((self.state.load(Ordering::SeqCst) >> 32) as u32)
            .wrapping_add(1)
            .max(1);
        self.busy.store(0, Ordering::SeqCst);
        self.state.store(u64::from(round) << 32, Ordering::SeqCst);
        round
    }

    /// A thread's answer to `round`: is it inside? Returns whether the answer counted (false
    /// for a late answer to an earlier round).
    pub fn answer(&self, round: u32, inside: bool) -> bool {
        if inside {
            // [A-busy] before [A-count]: see the module docs.
            self.busy.fetch_add(1, Ordering::SeqCst);
        }
        let mut cur = self.state.load(Ordering::SeqCst);
        loop {
            #[cfg(loom)]
            let any_round = crate::seeded::is(crate::seeded::Bug::ScanAnswerAnyRound);
            #[cfg(not(loom))]
            let any_round = false;
            if (cur >> 32) as u32 != round && !any_round {
                return false;
            }
            match self
                .state
                .compare_exchange(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    /// Answers counted in `round` so far (0 once a newer round began).
    pub fn answered(&self, round: u32) -> u64 {
        let s = self.state.load(Ordering::SeqCst);
        if (s >> 32) as u32 == round {
            s & 0xFFFF_FFFF
        } else {
            0
        }
    }

    /// Did any answer of the current round say "inside"? Read after the count completed.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) != 0
    }
}

//! The optimizer (delayed (un)optimization batching, seed 002 and its later fixes) racing with a
//! CPU executing the probed code.
//!
//! # The machine
//!
//! A text of three one-byte instructions `01 02 03` at addresses 0..3, held in one atomic word:
//! an instruction fetch is one Acquire load of the word, so a fetch never straddles a store. On
//! real hardware that is what the live patch's cross-CPU syncs buy (no CPU is mid-fetch when
//! bytes change); here it lets the model see every state *between* the protocol's steps, which is
//! what the protocol must make safe. A jump is two bytes, `E9 8n`, to trampoline `n`; a
//! breakpoint is `CC`. Code is written only by the real x86 int3-first live patch
//! (`probe_arch_x86_64::live_patch`), through a writer that stores the word with Release.
//!
//! The CPU makes one pass from address 0 to 3 under an RCU read guard held for the whole pass:
//! for the optimizer's grace period, that CPU is "inside the code" from its first fetch to its
//! last — stopped between two instructions, or in a trampoline, or redirected by a trap answer.
//! So the optimizer's grace period is also the model's quiescence wait, and the model's
//! `CodeSpace::quiesce` has nothing left to wait for.
//!
//! The pass asserts what every hit must get: each original instruction executed exactly once and
//! in order (never the middle of a jump, never a half-written jump), every trampoline alive while
//! the CPU is in it, every probe's consumers at most once per pass — exactly once for a probe
//! enabled throughout.
//!
//! # Retired trampolines
//!
//! [`CodeSpace::retire_detour`] tells an embedder that a trampoline can no longer be entered, so
//! that its quiescence wait looks for CPUs inside that one (and only those: a CPU is always
//! inside a hot probe's live trampoline). The model checks both halves of that contract:
//!
//! * a CPU that saw a trampoline retired before its pass began (one SeqCst load) never enters
//!   it in that pass — no jump to it in the code, no trap answer naming it. Retiring a live one is not a crash in an embedding but a wait that never ends;
//!   here it is this assertion;
//! * every freed trampoline was retired, and a quiescence wait came after its retirement.
//!
//! Two threads each (the CPU and the writer, which also runs the optimizer): unbounded.

#![cfg(loom)]

mod common;
use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use loom::thread;
use probe_arch_x86_64::X86_64;
use probe_arch_x86_64::live_patch::{CodeWriter, patch_batch};
use probe_core::arch::{CodeSpace, Detour, MAX_DETOUR, NotOptimizable, Patch};
use probe_core::optimizer::{Code, Optimizer, Then, Trap};
use probe_core::rcu::{Rcu, SlotRcu};
use probe_core::seeded::Bug;
use probe_core::sync::FreeCheck;
use probe_core::{Error, Result};
use std::sync::Arc;

const ORIGINAL: [u8; 3] = [0x01, 0x02, 0x03];
const LEN: usize = 3;
/// Every jump covers two one-byte instructions.
const JUMP_LEN: u8 = 2;
const TRAMPOLINE: u64 = 0x1000;
const DISPLACED: u64 = 0x2000;
const SLOTS: usize = 4;

/// A trampoline: its lifetime is what the model checks.
struct Trampoline {
    check: FreeCheck,
}

/// The model's code space. See the module docs.
struct ModelCode {
    text: AtomicU32,
    /// The writer's copy (writes happen under the optimizer's lock): stores never load the word
    /// the CPU loads (loom #392).
    shadow: std::sync::atomic::AtomicU32,
    trampolines: Vec<Trampoline>,
    /// Bit `n`: trampoline `n` was retired (`retire_detour`). Read by the CPU before each fetch.
    retired: AtomicU32,
    /// Writer side: bit `n`, a quiescence wait ran after trampoline `n` was retired.
    waited: std::sync::atomic::AtomicU32,
    /// Writer side: a free that broke the retirement contract (what it was).
    bad_free: std::sync::Mutex<Option<String>>,
    /// Trampoline number → address it serves, `u64::MAX` when free (writer-side bookkeeping).
    owner: Vec<std::sync::atomic::AtomicU64>,
    next: std::sync::atomic::AtomicUsize,
}

fn word(b: [u8; LEN]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], 0])
}

fn unword(w: u32) -> [u8; LEN] {
    let b = w.to_le_bytes();
    [b[0], b[1], b[2]]
}

impl ModelCode {
    fn new() -> Self {
        Self {
            text: AtomicU32::new(word(ORIGINAL)),
            shadow: std::sync::atomic::AtomicU32::new(word(ORIGINAL)),
            trampolines: (0..SLOTS)
                .map(|_| Trampoline {
                    check: FreeCheck::new(),
                })
                .collect(),
            retired: AtomicU32::new(0),
            waited: Default::default(),
            bad_free: Default::default(),
            owner: (0..SLOTS)
                .map(|_| std::sync::atomic::AtomicU64::new(u64::MAX))
                .collect(),
            next: Default::default(),
        }
    }
    /// One instruction fetch: the bytes at `pc` and `pc + 1` from one snapshot.
    fn fetch(&self, pc: usize) -> (u8, u8) {
        // Acquire pairs with the Release store in `write`.
        let w = unword(self.text.load(Ordering::Acquire));
        (w[pc], if pc + 1 < LEN { w[pc + 1] } else { 0 })
    }
    /// The code now (after the threads joined).
    fn bytes(&self) -> [u8; LEN] {
        unword(self.text.load(Ordering::Acquire))
    }
    fn id(d: &Detour) -> usize {
        (d.trampoline - TRAMPOLINE) as usize
    }
}

impl CodeWriter for ModelCode {
    fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        let mut w = unword(self.shadow.load(std::sync::atomic::Ordering::Relaxed));
        w[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes);
        let w = word(w);
        self.shadow.store(w, std::sync::atomic::Ordering::Relaxed);
        // Release pairs with the Acquire load in `fetch`: the probe's table entry and flags
        // written before this store are seen by a CPU that fetches these bytes.
        self.text.store(w, Ordering::Release);
        Ok(())
    }
    /// Fetches are atomic in the model (see the module docs): nothing to serialize.
    fn sync_cores(&self) {}
}

impl CodeSpace for ModelCode {
    type Arch = X86_64;
    fn read_original(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let a = addr as usize;
        buf.copy_from_slice(
            ORIGINAL
                .get(a..a + buf.len())
                .ok_or(Error::OffsetOutOfRange)?,
        );
        Ok(())
    }
    fn check_boundary(&self, addr: u64) -> Result<()> {
        if addr as usize >= LEN {
            return Err(Error::OffsetOutOfRange);
        }
        Ok(())
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let w = self.bytes();
        let a = addr as usize;
        buf.copy_from_slice(w.get(a..a + buf.len()).ok_or(Error::OffsetOutOfRange)?);
        Ok(())
    }
    fn prepare_detour(&self, addr: u64) -> std::result::Result<Detour, NotOptimizable> {
        if addr as usize + usize::from(JUMP_LEN) > LEN {
            return Err(NotOptimizable::TooShort);
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if id >= SLOTS {
            return Err(NotOptimizable::NoMemory);
        }
        self.owner[id].store(addr, std::sync::atomic::Ordering::Relaxed);
        let mut jump = [0xCC; MAX_DETOUR];
        jump[0] = 0xE9;
        jump[1] = 0x80 | id as u8;
        Ok(Detour {
            len: JUMP_LEN,
            jump,
            trampoline: TRAMPOLINE + id as u64,
            displaced: DISPLACED + id as u64,
        })
    }
    fn free_detour(&self, d: &Detour) {
        let id = Self::id(d);
        let bit = 1 << id;
        // Relaxed: the writer's own bookkeeping (the CPU reads `retired` only).
        if self.retired.load(Ordering::Relaxed) & bit == 0 {
            *self.bad_free.lock().unwrap() = Some(format!("trampoline {id} freed, never retired"));
        } else if self.waited.load(std::sync::atomic::Ordering::Relaxed) & bit == 0 {
            *self.bad_free.lock().unwrap() = Some(format!(
                "retired trampoline {id} freed with no wait after its retirement"
            ));
        }
        self.owner[id].store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        self.trampolines[id].check.mark_freed();
    }
    fn patch(&self, batch: &[Patch]) -> Result<()> {
        patch_batch(self, batch).map(|_| ())
    }
    fn retire_detour(&self, d: &Detour) {
        let bit = 1 << Self::id(d);
        // SeqCst: the CPU's load before its fetch (`pass`) must see it if it comes after.
        self.retired.fetch_or(bit, Ordering::SeqCst);
        self.waited
            .fetch_and(!bit, std::sync::atomic::Ordering::Relaxed);
    }
    /// The wait itself is the grace period (see the module docs); the model records that one
    /// happened after each retirement so far.
    fn quiesce(&self) {
        // Relaxed: the writer's own bookkeeping.
        let r = self.retired.load(Ordering::Relaxed);
        self.waited
            .fetch_or(r, std::sync::atomic::Ordering::Relaxed);
    }
}

type Opt = Optimizer<ModelCode, SlotRcu>;

/// How the pass went through address 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Way {
    /// The original instruction.
    Original,
    /// A trap, then the original instruction stepped out of line.
    Stepped,
    /// A trap, then the trampoline's displaced instructions.
    TrapDetour,
    /// The jump, through the trampoline.
    Jumped,
}

struct Pass {
    way: Way,
    fires: [u32; LEN],
}

/// One pass of the CPU over the text. See the module docs. A failed check is returned, not
/// raised, so that the model reports it only after joining the writer (a loom thread must not
/// outlive a failing execution).
fn pass(opt: &Opt) -> std::result::Result<Pass, String> {
    let reader = opt.rcu().register().unwrap();
    let g = opt.rcu().read_lock(&reader);
    let code = opt.space();
    let mut log = Vec::new();
    let mut fires = [0; LEN];
    let mut way = None;
    let mut pc = 0usize;
    let mut restarts = 0;
    // SeqCst pairs with the SeqCst `fetch_or` in `retire_detour`: a trampoline seen retired
    // here was out of the table and out of the code before this pass's first fetch. (One load
    // per pass, not per fetch: the model's size.)
    let retired = code.retired.load(Ordering::SeqCst);
    let enter = |id: usize| {
        if retired & (1 << id) != 0 {
            Err(format!(
                "entered retired trampoline {id}, retired before the pass began"
            ))
        } else {
            Ok(())
        }
    };
    while pc < LEN {
        let (b, tail) = code.fetch(pc);
        let how = match b {
            0x01..=0x03 => {
                if b != ORIGINAL[pc] {
                    return Err(format!("not the displaced instruction: {b:02x} at {pc}"));
                }
                log.push(b);
                pc += 1;
                Way::Original
            }
            0xCC => match opt.on_breakpoint(&g, pc as u64) {
                Trap::Probe { fire, then } => {
                    fires[pc] += u32::from(fire);
                    match then {
                        Then::Step => {
                            log.push(ORIGINAL[pc]);
                            pc += 1;
                            Way::Stepped
                        }
                        Then::Detour(d) => {
                            let id = (d.displaced - DISPLACED) as usize;
                            enter(id)?;
                            code.trampolines[id].check.check();
                            let n = usize::from(d.len);
                            log.extend_from_slice(&ORIGINAL[pc..pc + n]);
                            pc += n;
                            Way::TrapDetour
                        }
                    }
                }
                Trap::NotOurs => return Err("a trap on our breakpoint answered not ours".into()),
                Trap::Restart => {
                    restarts += 1;
                    if restarts > 3 {
                        return Err("restarted forever".into());
                    }
                    continue;
                }
            },
            0xE9 => {
                if tail & 0x80 == 0 {
                    return Err(format!("a half-written jump: E9 {tail:02x}"));
                }
                let id = usize::from(tail & 0x7F);
                enter(id)?;
                code.trampolines[id].check.check();
                fires[pc] += u32::from(opt.on_trampoline(&g, pc as u64));
                let n = usize::from(JUMP_LEN);
                log.extend_from_slice(&ORIGINAL[pc..pc + n]);
                pc += n;
                Way::Jumped
            }
            t if t & 0x80 != 0 => {
                return Err(format!(
                    "executed the middle of a jump (byte {t:02x} at {pc})"
                ));
            }
            t => return Err(format!("fetched garbage {t:02x}")),
        };
        way.get_or_insert(how);
    }
    drop(g);
    if log != ORIGINAL {
        return Err(format!(
            "an instruction executed twice or skipped: {log:02x?}"
        ));
    }
    if let Some(f) = fires.iter().find(|&&f| f > 1) {
        return Err(format!("consumers fired {f} times in one pass"));
    }
    Ok(Pass {
        way: way.unwrap_or(Way::Original),
        fires,
    })
}

/// After the writer's `wait_for_optimizer`: each probe's code is what its state says, every
/// other byte is original (or under a jump), and trampolines live exactly as long as probes.
fn settled(opt: &Opt) {
    if let Some(bad) = opt.space().bad_free.lock().unwrap().take() {
        panic!("{bad} (the retired trampoline contract)");
    }
    let now = opt.space().bytes();
    let mut covered = [false; LEN];
    for a in 0..LEN as u64 {
        let Ok(st) = opt.state(a) else { continue };
        assert!(!st.queued(), "queued after wait_for_optimizer: {a} {st:?}");
        assert!(!st.unused(), "an unused probe was never freed: {a} {st:?}");
        let mut e = [0; MAX_DETOUR];
        let n = opt.expected_code(a, &mut e).unwrap();
        if st.code == Code::Jump || !covered[a as usize] {
            assert_eq!(
                now[a as usize..a as usize + n],
                e[..n],
                "code differs at {a}: {st:?}"
            );
        }
        for c in &mut covered[a as usize..a as usize + n] {
            *c = true;
        }
    }
    for a in 0..LEN {
        if !covered[a] {
            assert_eq!(now[a], ORIGINAL[a], "a stray byte at {a}");
        }
    }
}

fn world() -> Arc<Opt> {
    Arc::new(Optimizer::new(ModelCode::new(), SlotRcu::new()))
}

/// Runs `writer` on a thread racing one CPU pass; returns the pass and whether the writer's
/// `before` part had returned when the pass began.
fn race(opt: &Arc<Opt>, writer: impl FnOnce(&Opt, &AtomicBool) + Send + 'static) -> (Pass, bool) {
    let flag = Arc::new(AtomicBool::new(false));
    let w = {
        let (opt, flag) = (opt.clone(), flag.clone());
        thread::spawn(move || writer(&opt, &flag))
    };
    let early = flag.load(Ordering::Acquire);
    let p = pass(opt);
    w.join().unwrap();
    (p.unwrap_or_else(|e| panic!("{e}")), early)
}

/// Register a probe and run the optimizer while a CPU passes: the breakpoint becomes a jump.
/// Catches optimizing before the wait (a CPU stopped after the first instruction resumes into
/// the jump's tail) and a live patch that writes the first byte before the tail.
fn optimize_vs_cpu() {
    common::explore(
        "optimizer: register + optimize vs CPU",
        common::unbounded(),
        &[Way::Original, Way::TrapDetour, Way::Jumped],
        || {
            let opt = world();
            let (p, early) = race(&opt, |opt, flag| {
                opt.register(0).unwrap();
                flag.store(true, Ordering::Release);
                opt.wait_for_optimizer();
            });
            if early {
                assert_eq!(p.fires[0], 1, "hit missed a registered probe");
            }
            settled(&opt);
            assert_eq!(opt.space().bytes()[..2], [0xE9, 0x80], "not optimized");
            p.way
        },
    );
}

#[test]
fn optimize_races_cpu() {
    optimize_vs_cpu();
}

#[test]
fn seeded_optimize_before_unoptimize_and_wait() {
    common::must_catch(Bug::OptimizeBeforeUnoptimize, optimize_vs_cpu);
}

#[test]
fn seeded_live_patch_first_byte_first() {
    common::must_catch(Bug::PatchFirstByteFirst, optimize_vs_cpu);
}

/// Unregister an optimized probe while a CPU passes: the jump goes back to the original through
/// the unoptimizing list, the probe and its trampoline are freed. Catches clearing the optimized
/// flag when queuing (the 2019 bug) and freeing before the wait.
fn unoptimize_vs_cpu() {
    common::explore(
        "optimizer: unregister + unoptimize vs CPU",
        common::unbounded(),
        &[Way::Original, Way::TrapDetour, Way::Jumped],
        || {
            let opt = world();
            opt.register(0).unwrap();
            opt.wait_for_optimizer();
            let (p, _) = race(&opt, |opt, _| {
                opt.unregister(0).unwrap();
                opt.wait_for_optimizer();
            });
            settled(&opt);
            assert_eq!(opt.space().bytes(), ORIGINAL);
            assert!(opt.is_empty(), "an unused probe was never freed");
            opt.register(0).expect("re-register after the free");
            p.way
        },
    );
}

#[test]
fn unoptimize_races_cpu() {
    unoptimize_vs_cpu();
}

#[test]
fn seeded_2019_optimized_flag_cleared_early() {
    common::must_catch(Bug::OptimizedFlagClearedEarly, unoptimize_vs_cpu);
}

#[test]
fn seeded_free_before_quiescence() {
    common::must_catch(Bug::FreeBeforeQuiescence, unoptimize_vs_cpu);
}

#[test]
fn seeded_retire_skipped() {
    common::must_catch(Bug::RetireSkipped, unoptimize_vs_cpu);
}

/// Unregister an optimized probe and register it again before any optimizer run, while a CPU
/// passes: the unused probe is revived where it stands (kprobes' `reuse_unused_kprobe`) instead
/// of failing with `Busy`. A pass that begins after the revival returned must fire it; the code
/// ends as the jump, and the probe has its one user. Catches a revival that restores the
/// writer's state but not the hit-visible flags.
fn revival_vs_cpu() {
    common::explore(
        "optimizer: unregister + revive vs CPU",
        common::unbounded(),
        // The jump stays in the code throughout: every pass goes through the trampoline.
        &[Way::Jumped],
        || {
            let opt = world();
            opt.register(0).unwrap();
            opt.wait_for_optimizer();
            opt.unregister(0).unwrap();
            let (p, early) = race(&opt, |opt, flag| {
                opt.register(0).expect("revival, not Busy");
                flag.store(true, Ordering::Release);
                opt.wait_for_optimizer();
            });
            if early {
                assert_eq!(p.fires[0], 1, "hit missed a revived probe");
            }
            settled(&opt);
            let st = opt.state(0).unwrap();
            assert_eq!((st.users, st.enabled, st.code), (1, true, Code::Jump));
            assert_eq!(opt.stats().revived, 1);
            p.way
        },
    );
}

#[test]
fn revival_races_cpu() {
    revival_vs_cpu();
}

#[test]
fn seeded_revival_without_fire() {
    common::must_catch(Bug::RevivalWithoutFire, revival_vs_cpu);
}

/// A probe lands inside an optimized probe's jump while a CPU passes: the optimized one is forced
/// back to a breakpoint at once (and stays blocked); both keep firing at most once, the one
/// enabled throughout exactly once.
fn collision_vs_cpu() {
    common::explore(
        "optimizer: collision (force-unoptimize) vs CPU",
        common::unbounded(),
        &[Way::TrapDetour, Way::Jumped],
        || {
            let opt = world();
            opt.register(0).unwrap();
            opt.wait_for_optimizer();
            let (p, early) = race(&opt, |opt, flag| {
                opt.register(1).unwrap();
                flag.store(true, Ordering::Release);
                opt.wait_for_optimizer();
            });
            assert_eq!(p.fires[0], 1, "hit missed a probe enabled throughout");
            if early {
                assert_eq!(p.fires[1], 1, "hit missed a registered probe");
            }
            settled(&opt);
            assert_eq!(opt.state(0).unwrap().code, Code::Breakpoint);
            assert_eq!(opt.state(1).unwrap().code, Code::Jump);
            p.way
        },
    );
}

#[test]
fn collision_races_cpu() {
    collision_vs_cpu();
}

#[test]
fn seeded_live_patch_first_byte_first_in_force_unoptimize() {
    common::must_catch(Bug::PatchFirstByteFirst, collision_vs_cpu);
}

/// Linux 2023: an unused probe waiting on the unoptimizing list is force-unoptimized by a
/// collision; the next run must still free it, though its unoptimizing list is empty.
fn forced_free_vs_cpu() {
    common::explore(
        "optimizer: force-unoptimized unused probe freed vs CPU",
        common::unbounded(),
        &[Way::Stepped, Way::TrapDetour, Way::Jumped],
        || {
            let opt = world();
            opt.register(0).unwrap();
            opt.wait_for_optimizer();
            opt.unregister(0).unwrap();
            let (p, _) = race(&opt, |opt, _| {
                opt.register(1).unwrap();
                opt.wait_for_optimizer();
            });
            assert!(
                opt.state(0).is_err(),
                "the force-unoptimized unused probe was never freed"
            );
            settled(&opt);
            opt.register(0).expect("re-register after the free");
            p.way
        },
    );
}

#[test]
fn forced_free_races_cpu() {
    forced_free_vs_cpu();
}

#[test]
fn seeded_2023_freeing_list_skipped() {
    common::must_catch(Bug::FreeingListSkipped, forced_free_vs_cpu);
}

/// Linux 2026: a probe blocked by an optimized neighbour inside its range is optimized once that
/// neighbour is unregistered through the unoptimizing list (a liveness rule). Here the blocked
/// probe was optimized first and forced back to its breakpoint by the neighbour's registration
/// (a collision), so it never left the table: its trampoline must never be retired, since the
/// CPU enters it by its trap answer and, once the jump is back, by the jump.
///
/// Catches not retrying the blocked probe, and retiring a trampoline when its jump goes out (what
/// the process embedding did until 2026-12: its quiescence wait then waited for ever on threads
/// hitting the forced probe — the soak's livelock).
fn blocked_retry_vs_cpu() {
    common::explore(
        "optimizer: blocked probe retried vs CPU",
        common::unbounded(),
        &[Way::TrapDetour, Way::Jumped],
        || {
            let opt = world();
            opt.register(0).unwrap();
            opt.wait_for_optimizer();
            opt.register(1).unwrap();
            opt.wait_for_optimizer();
            let (p, _) = race(&opt, |opt, _| {
                opt.unregister(1).unwrap();
                opt.wait_for_optimizer();
            });
            assert_eq!(p.fires[0], 1, "hit missed a probe enabled throughout");
            settled(&opt);
            assert_eq!(
                opt.state(0).unwrap().code,
                Code::Jump,
                "the blocked probe was never retried"
            );
            p.way
        },
    );
}

#[test]
fn blocked_retry_races_cpu() {
    blocked_retry_vs_cpu();
}

#[test]
fn seeded_2026_blocked_probe_not_retried() {
    common::must_catch(Bug::BlockedNotRetried, blocked_retry_vs_cpu);
}

#[test]
fn seeded_retire_live_trampoline() {
    common::must_catch(Bug::RetireLiveTrampoline, blocked_retry_vs_cpu);
}

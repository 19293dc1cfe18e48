//! Unit and property tests of the optimizer.

extern crate std;
use super::*;
use crate::alloc_util::fail_after;
use crate::arch::NotOptimizable;
use crate::rcu::EpochRcu;
use crate::sync::audit::stores_during;
use crate::testing::{ByteCode, TRAMPOLINES};
use alloc::vec;
use proptest::prelude::*;

type Opt = Optimizer<ByteCode, EpochRcu>;

/// 64 one-byte instructions (0x01, 0x02, …), jumps of `jump` bytes.
fn opt(jump: usize) -> Opt {
    Optimizer::new(ByteCode::new((1..=64).collect(), jump), EpochRcu::new())
}

fn code(o: &Opt, addr: u64, n: usize) -> Vec<u8> {
    o.space().current(addr, n)
}

fn jump_at(o: &Opt, addr: u64) -> bool {
    code(o, addr, 1) == [0xE9]
}

/// After a settled optimizer: every probe's code is what its state says (a disarmed probe
/// may lie under another's jump), no patch ever mismatched, and only live probes hold
/// trampolines.
fn audit(o: &Opt) {
    let c = o.space().counts();
    assert_eq!(c.mismatches, 0, "a patch's old bytes were not in the code");
    assert_eq!(c.bad_frees, 0);
    let states: Vec<(u64, ProbeState)> = (0..64)
        .filter_map(|a| o.state(a).ok().map(|s| (a, s)))
        .collect();
    let under_jump = |a: u64| {
        states
            .iter()
            .any(|(b, s)| *b < a && s.code == Code::Jump && a < *b + u64::from(s.jump_len))
    };
    let mut live = 0;
    for (a, st) in &states {
        let mut e = [0; MAX_DETOUR];
        let n = o.expected_code(*a, &mut e).unwrap();
        if under_jump(*a) {
            assert!(st.disarmed(), "an armed probe under a jump at {a}: {st:?}");
        } else {
            assert_eq!(
                code(o, *a, n),
                e[..n],
                "code at {a} differs from its state {st:?}"
            );
        }
        if st.not_optimizable.is_none() {
            live += 1;
        }
    }
    assert_eq!(
        c.live_trampolines, live,
        "trampolines leaked or freed early"
    );
}

fn trap<'g>(o: &'g Opt, g: &'g <EpochRcu as Rcu>::Guard<'_>, a: u64) -> Trap<'g> {
    o.on_breakpoint(g, a)
}

#[test]
fn breakpoint_then_jump_then_original() {
    let o = opt(5);
    assert_eq!(o.register(16).unwrap(), Armed::Optimizing);
    assert_eq!(code(&o, 16, 5), [0xCC, 18, 19, 20, 21]);
    let st = o.state(16).unwrap();
    assert!(st.optimized && st.queued() && st.code == Code::Breakpoint);
    o.wait_for_optimizer();
    assert_eq!(code(&o, 16, 5), [0xE9, 0, 0, 0, 0]);
    assert_eq!(o.state(16).unwrap().code, Code::Jump);
    audit(&o);
    o.unregister(16).unwrap();
    let st = o.state(16).unwrap();
    assert!(st.unused() && st.queued() && st.optimized, "{st:?}");
    assert_eq!(
        code(&o, 16, 5),
        [0xE9, 0, 0, 0, 0],
        "unoptimizing is delayed"
    );
    o.wait_for_optimizer();
    assert_eq!(code(&o, 16, 5), [17, 18, 19, 20, 21]);
    assert!(o.is_empty());
    assert_eq!(o.space().counts().live_trampolines, 0);
    let s = o.stats();
    assert_eq!((s.optimized, s.unoptimized, s.freed), (1, 1, 1));
}

/// The embedder's patch fails (all or nothing): a registration fails and changes nothing;
/// a run keeps its lists and the next one finishes; a disable keeps the disabled probe's
/// harmless breakpoint until the next run removes it; an enable fails and stays disabled.
#[test]
fn a_failed_patch_changes_nothing_and_is_retried() {
    let o = opt(5);
    let before = code(&o, 0, 64);
    o.space().fail_patches(1);
    assert_eq!(o.register(8), Err(Error::Embedder(-5)));
    assert_eq!(
        code(&o, 0, 64),
        before,
        "a failed register changed the code"
    );
    assert!(o.state(8).is_err(), "a failed register left a probe");
    o.wait_for_optimizer();
    assert!(o.is_empty());
    audit(&o);

    // A run whose optimizing batch fails: still a breakpoint, still queued; the next run
    // makes the jump.
    assert_eq!(o.register(8).unwrap(), Armed::Optimizing);
    o.space().fail_patches(1);
    o.run_optimizer();
    let st = o.state(8).unwrap();
    assert_eq!((st.code, st.queue), (Code::Breakpoint, Queue::Optimizing));
    assert_eq!(o.stats().failed_patches, 2);
    o.run_optimizer();
    assert_eq!(o.state(8).unwrap().code, Code::Jump);
    audit(&o);

    // A disable through the queue whose run fails, then succeeds.
    o.disable(8).unwrap();
    o.space().fail_patches(1);
    o.run_optimizer();
    assert_eq!(
        o.state(8).unwrap().code,
        Code::Jump,
        "a failed batch changed the code"
    );
    o.wait_for_optimizer();
    assert_eq!(code(&o, 8, 5), before[8..13]);
    audit(&o);

    // An enable whose breakpoint cannot go in: an error, still disabled, code untouched.
    o.space().fail_patches(1);
    assert_eq!(o.enable(8), Err(Error::Embedder(-5)));
    assert!(!o.state(8).unwrap().enabled);
    assert_eq!(code(&o, 0, 64), before);
    o.enable(8).unwrap();
    assert_eq!(code(&o, 8, 1), [0xCC]);

    // A disable whose immediate patch fails (a breakpoint, not yet a jump): it succeeds, the
    // probe stops firing at once, and the next run takes the breakpoint out.
    o.set_single_step(8, true).unwrap(); // pinned to a breakpoint
    o.space().fail_patches(1);
    o.disable(8).unwrap();
    let st = o.state(8).unwrap();
    assert!(!st.enabled && st.code == Code::Breakpoint && st.queue == Queue::Unoptimizing);
    let r = o.rcu().register().unwrap();
    {
        let g = o.rcu().read_lock(&r);
        assert_eq!(
            o.on_breakpoint(&g, 8),
            Trap::Probe {
                fire: false,
                then: Then::Step
            },
            "a disabled probe's leftover breakpoint must step, not fire"
        );
    }
    o.wait_for_optimizer();
    assert_eq!(code(&o, 0, 64), before);
    o.unregister(8).unwrap();
    o.wait_for_optimizer();
    assert!(o.is_empty());
    audit(&o);
}

#[test]
fn reregistering_an_unused_probe_revives_it() {
    // Optimized, then unregistered: unused on the unoptimizing list, its jump in the code.
    let o = opt(5);
    o.register(8).unwrap();
    o.wait_for_optimizer();
    o.unregister(8).unwrap();
    let st = o.state(8).unwrap();
    assert!(st.unused() && st.queue == Queue::Unoptimizing && st.code == Code::Jump);
    let before = o.stats();
    // Revived where it stands: the jump stays, no patch, no wait, nothing freed.
    assert_eq!(o.register(8).unwrap(), Armed::Optimizing);
    let st = o.state(8).unwrap();
    assert_eq!((st.users, st.enabled, st.optimized), (1, true, true));
    assert_eq!((st.queue, st.code), (Queue::None, Code::Jump));
    o.wait_for_optimizer();
    let after = o.stats();
    assert_eq!(after.revived, before.revived + 1);
    assert_eq!(
        (after.batches, after.freed),
        (before.batches, before.freed),
        "revival rewrote code or freed the probe"
    );
    audit(&o);

    // Unused and force-unoptimized onto the freeing list while still hashed (a probe armed
    // inside its jump range): revival takes it off that list, so no run frees it.
    let o = opt(5);
    o.register(8).unwrap();
    o.wait_for_optimizer();
    o.unregister(8).unwrap();
    o.register(10).unwrap(); // inside 8's jump: 8 is forced back at once
    let st = o.state(8).unwrap();
    assert!(st.unused() && st.queue == Queue::Freeing && st.code == Code::Original);
    // Its breakpoint is back, blocked by the breakpoint at 10.
    assert_eq!(o.register(8).unwrap(), Armed::Blocked);
    o.wait_for_optimizer();
    let st = o.state(8).expect("a revived probe was freed");
    assert_eq!((st.users, st.enabled, st.code), (1, true, Code::Breakpoint));
    audit(&o);
    // The blocker goes: the revived probe is retried and becomes a jump.
    o.unregister(10).unwrap();
    o.wait_for_optimizer();
    assert_eq!(o.state(8).unwrap().code, Code::Jump);
    audit(&o);
}

#[test]
fn bad_input_is_an_error_and_changes_nothing() {
    let o = opt(5);
    assert_eq!(o.unregister(3), Err(Error::UnknownProbe));
    assert_eq!(o.disable(3), Err(Error::UnknownProbe));
    assert_eq!(o.enable(3), Err(Error::UnknownProbe));
    assert_eq!(o.set_single_step(3, true), Err(Error::UnknownProbe));
    assert_eq!(o.state(3), Err(Error::UnknownProbe));
    assert_eq!(o.register(64), Err(Error::OffsetOutOfRange));
    assert_eq!(o.register(u64::MAX), Err(Error::OffsetOutOfRange));
    // A double unregister.
    o.register(3).unwrap();
    o.unregister(3).unwrap();
    assert_eq!(o.unregister(3), Err(Error::UnknownProbe));
    // An existing trap.
    let mut text: Vec<u8> = (1..=64).collect();
    text[9] = 0xCC;
    let o2: Opt = Optimizer::new(ByteCode::new(text, 5), EpochRcu::new());
    assert_eq!(o2.register(9), Err(Error::ExistingTrap));
    // Inside an instruction.
    let o3: Opt = Optimizer::new(
        ByteCode::new((1..=64).collect(), 5).with_lengths(&[3, 2, 4]),
        EpochRcu::new(),
    );
    assert_eq!(o3.register(1), Err(Error::InsideInstruction));
    assert_eq!(o3.register(6), Err(Error::InsideInstruction));
    assert_eq!(o3.register(5).unwrap(), Armed::Optimizing);
    for o in [&o, &o2, &o3] {
        assert_eq!(o.space().counts().mismatches, 0);
    }
    assert!(o2.is_empty());
    assert_eq!(o2.space().current(0, 64), o2.space().original(0, 64));
}

#[test]
fn unoptimizable_probes_stay_working_breakpoints_and_say_why() {
    let o: Opt = Optimizer::new(ByteCode::new((1..=64).collect(), 0), EpochRcu::new());
    assert_eq!(
        o.register(4).unwrap(),
        Armed::Breakpoint(NotOptimizable::Unsupported)
    );
    let o = opt(5);
    o.space().add_branch_target(22);
    o.space().add_unrelocatable(32);
    assert_eq!(
        o.register(20).unwrap(),
        Armed::Breakpoint(NotOptimizable::BranchTarget { addr: 22 })
    );
    assert_eq!(
        o.register(30).unwrap(),
        Armed::Breakpoint(NotOptimizable::Unrelocatable { addr: 32 })
    );
    assert_eq!(
        o.register(61).unwrap(),
        Armed::Breakpoint(NotOptimizable::TooShort)
    );
    // A branch target at the probe itself is fine: nothing lands inside the jump.
    assert_eq!(o.register(22).unwrap(), Armed::Optimizing);
    o.wait_for_optimizer();
    for a in [20, 30, 61] {
        let st = o.state(a).unwrap();
        assert_eq!(st.code, Code::Breakpoint);
        assert!(!st.optimized && st.not_optimizable.is_some());
        let r = o.rcu().register().unwrap();
        let g = o.rcu().read_lock(&r);
        assert_eq!(
            trap(&o, &g, a),
            Trap::Probe {
                fire: true,
                then: Then::Step
            }
        );
    }
    // 22's own jump [22, 27) covers no probe, and 20 (a breakpoint) holds no jump over it.
    assert!(jump_at(&o, 22));
    audit(&o);
}

#[test]
fn queue_rules_dequeue_instead_of_patching() {
    let o = opt(5);
    o.register(10).unwrap();
    let b0 = o.stats().batches;
    // Queued for optimization, then unregistered: just dequeued; the breakpoint goes.
    o.unregister(10).unwrap();
    assert_eq!(
        o.stats().batches,
        b0 + 1,
        "one patch: breakpoint → original"
    );
    o.wait_for_optimizer();
    assert_eq!(o.stats().optimized, 0, "the jump was never written");
    assert!(o.is_empty());

    // Optimized, disabled (queued for unoptimization), enabled again: just dequeued.
    o.register(20).unwrap();
    o.wait_for_optimizer();
    let b1 = o.stats().batches;
    o.disable(20).unwrap();
    assert_eq!(o.state(20).unwrap().queue, Queue::Unoptimizing);
    o.enable(20).unwrap();
    let st = o.state(20).unwrap();
    assert_eq!(
        (st.queue, st.code, st.optimized),
        (Queue::None, Code::Jump, true)
    );
    o.wait_for_optimizer();
    assert_eq!(o.stats().batches, b1, "no code change at all");
    assert!(jump_at(&o, 20));
    audit(&o);
}

#[test]
fn hits_answer_by_state() {
    let o = opt(5);
    let r = o.rcu().register().unwrap();
    o.register(10).unwrap();
    {
        let g = o.rcu().read_lock(&r);
        // Queued for optimization: the trampoline is ready, so a trap already detours.
        let Trap::Probe {
            fire: true,
            then: Then::Detour(d),
        } = trap(&o, &g, 10)
        else {
            panic!("queued probe did not detour")
        };
        assert_eq!((d.len, d.trampoline), (5, TRAMPOLINES));
        assert!(o.on_trampoline(&g, 10));
        // A miss where the code is original: the probe raced away — restart.
        assert_eq!(trap(&o, &g, 11), Trap::Restart);
    }
    o.wait_for_optimizer();
    o.disable(10).unwrap();
    {
        let g = o.rcu().read_lock(&r);
        // Disabled, jump still in the code until the run: detour without consumers.
        assert!(matches!(
            trap(&o, &g, 10),
            Trap::Probe {
                fire: false,
                then: Then::Detour(_)
            }
        ));
        assert!(!o.on_trampoline(&g, 10));
    }
    o.wait_for_optimizer();
    {
        let g = o.rcu().read_lock(&r);
        assert_eq!(
            trap(&o, &g, 10),
            Trap::Probe {
                fire: false,
                then: Then::Step
            }
        );
    }
    // A program's own trap.
    let mut text: Vec<u8> = (1..=64).collect();
    text[40] = 0xCC;
    let o2: Opt = Optimizer::new(ByteCode::new(text, 5), EpochRcu::new());
    let r2 = o2.rcu().register().unwrap();
    let g2 = o2.rcu().read_lock(&r2);
    assert_eq!(o2.on_breakpoint(&g2, 40), Trap::NotOurs);
    assert_eq!(o2.on_breakpoint(&g2, 1 << 40), Trap::NotOurs);
    assert!(!o2.on_trampoline(&g2, 40));
}

#[test]
fn hit_path_stores_nothing() {
    let o = opt(5);
    for a in (0..60).step_by(6) {
        o.register(a).unwrap();
    }
    o.wait_for_optimizer();
    o.register(3).unwrap(); // queued: both answers in one table
    let r = o.rcu().register().unwrap();
    let g = o.rcu().read_lock(&r);
    let probes: Vec<u64> = (0..60).step_by(6).chain([3]).collect();
    let (n, stores) = stores_during(|| {
        let mut n = 0;
        for &a in &probes {
            if let Trap::Probe { fire: true, .. } = o.on_breakpoint(&g, a) {
                n += 1;
            }
            n += usize::from(o.on_trampoline(&g, a));
        }
        n
    });
    assert_eq!(n, 2 * 11);
    assert!(stores.is_empty(), "the hit path stored to {stores:x?}");
}

#[test]
fn collision_forces_unoptimize_and_the_blocked_probe_is_retried() {
    let o = opt(5);
    o.register(10).unwrap();
    o.wait_for_optimizer();
    assert!(jump_at(&o, 10));
    let b = o.stats().batches;
    // Inside 10's jump: 10 goes back to a breakpoint now, not at the next run.
    assert_eq!(o.register(12).unwrap(), Armed::Optimizing);
    assert!(o.stats().batches > b);
    assert_eq!(code(&o, 10, 3), [0xCC, 12, 0xCC]);
    let st = o.state(10).unwrap();
    assert!(!st.optimized && st.code == Code::Breakpoint);
    o.wait_for_optimizer();
    assert_eq!(o.state(10).unwrap().code, Code::Breakpoint, "blocked by 12");
    assert!(jump_at(&o, 12));
    // 12 goes (through the unoptimizing list): 10 is retried in the same run.
    o.unregister(12).unwrap();
    o.wait_for_optimizer();
    assert!(jump_at(&o, 10), "the blocked probe was never retried");
    assert!(o.state(12).is_err());
    audit(&o);
    // The same when the blocker was only a breakpoint (disarmed at once).
    o.set_single_step(10, true).unwrap();
    assert_eq!(
        code(&o, 10, 1),
        [0xCC],
        "single-step forces a breakpoint now"
    );
    o.register(11).unwrap();
    o.set_single_step(10, false).unwrap();
    o.wait_for_optimizer();
    assert_eq!(o.state(10).unwrap().code, Code::Breakpoint, "blocked by 11");
    o.set_single_step(11, true).unwrap();
    o.unregister(11).unwrap();
    o.wait_for_optimizer();
    assert!(jump_at(&o, 10));
    audit(&o);
}

#[test]
fn force_unoptimized_unused_probe_is_still_freed() {
    // Linux 2023: an unused probe waiting on the unoptimizing list is force-unoptimized by a
    // collision; the next run must still free it although its unoptimizing list is empty.
    let o = opt(5);
    o.register(10).unwrap();
    o.wait_for_optimizer();
    o.unregister(10).unwrap();
    o.register(13).unwrap();
    assert_eq!(o.state(10).unwrap().queue, Queue::Freeing);
    o.wait_for_optimizer();
    assert!(o.state(10).is_err(), "never freed");
    assert_eq!(o.register(10).unwrap(), Armed::Blocked);
    audit(&o);
}

#[test]
fn disarm_all_and_arm_all_go_through_the_queues() {
    let o = opt(4);
    for a in [0, 8, 16, 24] {
        o.register(a).unwrap();
    }
    o.register(40).unwrap();
    o.disable(40).unwrap();
    o.wait_for_optimizer();
    let b = o.stats().batches;
    o.disarm_all();
    assert_eq!(code(&o, 0, 64), o.space().original(0, 64));
    assert!(
        o.stats().batches <= b + 2,
        "one batch for the optimized probes"
    );
    assert_eq!(o.register(50).unwrap(), Armed::Disarmed);
    assert_eq!(code(&o, 50, 1), [51]);
    o.arm_all();
    for a in [0, 8, 16, 24, 50] {
        assert_eq!(code(&o, a, 1), [0xCC]);
    }
    assert_eq!(code(&o, 40, 1), [41], "a disabled probe stays out");
    o.wait_for_optimizer();
    for a in [0, 8, 16, 24, 50] {
        assert!(jump_at(&o, a));
    }
    audit(&o);
}

#[test]
fn no_memory_changes_nothing() {
    let o = opt(5);
    o.register(30).unwrap();
    o.wait_for_optimizer();
    let before = code(&o, 0, 64);
    let mut failed = 0;
    for n in 0..8 {
        fail_after(Some(n));
        let r = o.register(20);
        fail_after(None);
        match r {
            Err(Error::NoMemory) => {
                failed += 1;
                assert_eq!(code(&o, 0, 64), before);
                assert!(o.state(20).is_err());
            }
            Ok(_) => {
                o.unregister(20).unwrap();
                o.wait_for_optimizer();
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(failed > 0, "no allocation failure was injected");
    audit(&o);
    assert_eq!(o.space().counts().live_trampolines, 1);
}

#[test]
fn unregistering_10k_optimized_probes_is_one_batch() {
    let n = 10_000u64;
    let o: Opt = Optimizer::new(
        ByteCode::new((0..n * 8).map(|i| (i % 200) as u8 + 1).collect(), 5),
        EpochRcu::new(),
    );
    for i in 0..n {
        o.register(i * 8).unwrap();
    }
    o.wait_for_optimizer();
    let (s0, c0) = (o.stats(), o.space().counts());
    for i in 0..n {
        o.unregister(i * 8).unwrap();
    }
    o.wait_for_optimizer();
    let (s1, c1) = (o.stats(), o.space().counts());
    std::println!(
        "unregister {n} optimized probes: {} optimizer run(s), {} waits, {} patch batch(es) \
         of {} sites, {} embedder quiescence call(s)",
        s1.runs - s0.runs,
        s1.waits - s0.waits,
        s1.batches - s0.batches,
        c1.sites - c0.sites,
        c1.quiesces - c0.quiesces
    );
    assert_eq!(s1.runs - s0.runs, 1);
    assert_eq!(s1.waits - s0.waits, 2);
    assert_eq!(s1.batches - s0.batches, 1);
    assert_eq!(c1.sites - c0.sites, n);
    assert!(o.is_empty());
    assert_eq!(c1.live_trampolines, 0);
    assert_eq!(c1.mismatches, 0);
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Register(u64),
    Unregister(u64),
    Disable(u64),
    Enable(u64),
    SingleStep(u64, bool),
    Run,
    DisarmAll,
    ArmAll,
    /// The embedder's next `n` patches fail (and change nothing).
    FailPatches(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let a = 0u64..24;
    prop_oneof![
        3 => a.clone().prop_map(Op::Register),
        2 => a.clone().prop_map(Op::Unregister),
        1 => a.clone().prop_map(Op::Disable),
        1 => a.clone().prop_map(Op::Enable),
        1 => (a, any::<bool>()).prop_map(|(a, b)| Op::SingleStep(a, b)),
        2 => Just(Op::Run),
        1 => Just(Op::DisarmAll),
        1 => Just(Op::ArmAll),
        1 => (1u64..3).prop_map(Op::FailPatches),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Any sequence of operations, with the embedder's patches failing at random moments:
    /// no panic, no patch against the wrong bytes, a registration or enable that fails on a
    /// patch changes neither the code nor any state, and once the failures stop and the
    /// optimizer is idle, every probe's code is what its state says, no other byte differs
    /// from the original, every trap on our breakpoint finds a probe, and every enabled
    /// probe that nothing blocks is optimized (the 2026 liveness rule).
    #[test]
    fn any_history_settles_to_consistent_code(ops in proptest::collection::vec(op(), 1..40)) {
        let o: Opt = Optimizer::new(
            ByteCode::new((1..=32).collect(), 3).with_lengths(&[1, 2, 1, 1, 3, 1, 2]),
            EpochRcu::new(),
        );
        o.space().add_branch_target(14);
        let mut disarmed = false;
        for op in ops {
            let before = (o.space().current(0, 32), (0..32).map(|a| o.state(a).ok()).collect::<Vec<_>>());
            let r = match op {
                Op::Register(a) => o.register(a).map(|_| ()),
                Op::Unregister(a) => o.unregister(a),
                Op::Disable(a) => o.disable(a),
                Op::Enable(a) => o.enable(a),
                Op::SingleStep(a, b) => o.set_single_step(a, b),
                Op::Run => { o.run_optimizer(); Ok(()) }
                Op::DisarmAll => { o.disarm_all(); disarmed = true; Ok(()) }
                Op::ArmAll => { o.arm_all(); disarmed = false; Ok(()) }
                Op::FailPatches(n) => { o.space().fail_patches(n); Ok(()) }
            };
            if r == Err(Error::Embedder(-5)) {
                let after = (o.space().current(0, 32), (0..32).map(|a| o.state(a).ok()).collect::<Vec<_>>());
                prop_assert!(matches!(op, Op::Register(_) | Op::Enable(_) | Op::SingleStep(..)), "{:?} failed", op);
                prop_assert_eq!(&after.0, &before.0, "a failed {:?} changed the code", op);
                // A failed registration may leave its never-armed site on the freeing list
                // (in the table until the next run), and a failed arm may have forced a
                // covering jump back; every other probe's state is as it was.
                for a in 0..32usize {
                    let same = after.1[a] == before.1[a];
                    let excused = match op {
                        Op::Register(x) => a as u64 == x || before.1[a].is_some_and(|s| s.optimized),
                        Op::Enable(_) | Op::SingleStep(..) => before.1[a].is_some_and(|s| s.optimized),
                        _ => false,
                    };
                    prop_assert!(same || excused, "a failed {:?} changed probe {}: {:?} -> {:?}", op, a, before.1[a], after.1[a]);
                }
            }
            prop_assert_eq!(o.space().counts().mismatches, 0);
        }
        o.space().fail_patches(0);
        o.wait_for_optimizer();
        audit(&o);
        let r = o.rcu().register().unwrap();
        let g = o.rcu().read_lock(&r);
        let mut covered = [false; 32];
        let states: Vec<(u64, ProbeState)> =
            (0..32).filter_map(|a| o.state(a).ok().map(|s| (a, s))).collect();
        for (a, st) in &states {
            prop_assert!(!st.queued(), "queued after wait: {a} {st:?}");
            prop_assert_eq!(st.optimized, st.code == Code::Jump);
            prop_assert!(st.users > 0, "an unused probe survived the run: {}", a);
            let mut e = [0; MAX_DETOUR];
            let n = o.expected_code(*a, &mut e).unwrap();
            if st.code == Code::Jump {
                for c in &mut covered[*a as usize..*a as usize + n] { *c = true; }
            } else {
                covered[*a as usize] = true;
            }
            // Liveness: enabled, armed, optimizable, not pinned, and no enabled probe inside
            // its range ⇔ optimized.
            if st.enabled && !disarmed && !st.single_step && st.not_optimizable.is_none() {
                let end = *a + u64::from(st.jump_len);
                let blocked = states.iter().any(|(b, s)| *b > *a && *b < end && s.enabled);
                prop_assert_eq!(
                    st.optimized, !blocked,
                    "probe {} (blocked: {}) in state {:?}", a, blocked, st
                );
            }
        }
        for a in 0..32u64 {
            let now = o.space().current(a, 1)[0];
            if !covered[a as usize] {
                prop_assert_eq!(now, o.space().original(a, 1)[0], "stray byte at {}", a);
            }
            if now == 0xCC {
                let ours = matches!(o.on_breakpoint(&g, a), Trap::Probe { .. });
                prop_assert!(ours, "our breakpoint at {} found no probe", a);
            }
        }
    }
}

#[test]
fn doc_state_predicates() {
    let st = ProbeState {
        users: 0,
        enabled: false,
        optimized: true,
        queue: Queue::Unoptimizing,
        code: Code::Jump,
        not_optimizable: None,
        single_step: false,
        jump_len: 5,
    };
    assert!(st.unused() && st.queued() && !st.disarmed());
    let st = ProbeState {
        queue: Queue::None,
        code: Code::Original,
        ..st
    };
    assert!(st.disarmed());
    let _ = vec![0u8; 1];
}

//! The hit path allocates and frees nothing: kprobes traps and trampoline calls on one thread,
//! counted by a global allocator, while another thread registers, unregisters, enables,
//! disables and runs the optimizer at the same addresses (so lists are replaced, probes revived
//! and freed, and grace periods end while the hits run).

use probe_core::kprobes::{Kprobe, KprobeTrap, Kprobes, Ran, Reentry};
use probe_core::rcu::{Rcu, SlotRcu};
use probe_core::testing::ByteCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

mod common;
use common::{ALLOCS, COUNTING, FREES};

type K = Kprobes<u64, ByteCode, Arc<SlotRcu>>;

#[test]
fn kprobes_hits_allocate_and_free_nothing() {
    let k: Arc<K> = Arc::new(Kprobes::new(
        ByteCode::new((1..=64).collect(), 5),
        Arc::new(SlotRcu::new()),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (k, stop, done) = (k.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let kps: Vec<_> = (0..3u64)
                    .map(|i| Arc::new(Kprobe::new(8 + 16 * (i % 2), i)))
                    .collect();
                for kp in &kps {
                    k.register(kp.clone()).unwrap();
                }
                k.disable(&kps[0]).unwrap();
                if rounds.is_multiple_of(2) {
                    k.run_optimizer();
                }
                k.enable(&kps[0]).unwrap();
                for kp in &kps {
                    k.unregister(kp).unwrap();
                }
                k.sync();
                rounds += 1;
                done.store(rounds, Ordering::Relaxed);
            }
            rounds
        })
    };
    let reader = k.rcu().register().unwrap();
    let cpu = Reentry::new();
    let (mut ran, mut hits) = (0usize, 0u64);
    ALLOCS.store(0, Ordering::Relaxed);
    FREES.store(0, Ordering::Relaxed);
    // At least 200 000 hits, and on until the writer has finished 100 rounds beside them.
    let mut i = 0u64;
    while i < 200_000 || done.load(Ordering::Relaxed) < 100 {
        i += 1;
        let addr = 8 + 16 * (i % 2);
        COUNTING.with(|c| c.set(true));
        {
            let g = k.read(&reader);
            let r = if i.is_multiple_of(3) {
                g.on_trampoline(addr).run(&cpu, |kp| {
                    std::hint::black_box(kp.handler());
                })
            } else {
                match g.on_breakpoint(addr) {
                    KprobeTrap::Probe { consumers, .. } => consumers.run(&cpu, |kp| {
                        std::hint::black_box(kp.handler());
                    }),
                    _ => Ran::Ran(0),
                }
            };
            if let Ran::Ran(n) = r {
                ran += n;
            }
            hits += 1;
        }
        COUNTING.with(|c| c.set(false));
    }
    let (a, f) = (
        ALLOCS.load(Ordering::Relaxed),
        FREES.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    println!(
        "{hits} kprobe hits ({ran} consumer calls) beside {rounds} writer rounds: {a} allocations, {f} frees on the hitting thread"
    );
    assert!(rounds > 10 && ran > 0, "the writer or the hits did nothing");
    assert_eq!((a, f), (0, 0), "the hit path allocated or freed");
}

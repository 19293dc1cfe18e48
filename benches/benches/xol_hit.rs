//! The breakpoint hit with and without the per-thread cache and slot reuse (seed 004's
//! before/after), as a ratio measured in one run.
//!
//! Each iteration: one hit of one of 64 probes (round robin per thread), through
//! `Task::on_breakpoint` (resolve or cache, take a slot, copy + flush or reuse), then the slot is
//! freed. The patcher is `ByteText`, whose "flush" is a cheap copy between two views — on arm64 a
//! real `DC CVAU`/`IC IVAU` sequence costs far more, so the ratio here understates what reuse
//! saves; the copy and flush counts printed after the run show what it avoids.

#![allow(missing_docs)]

use criterion::{Criterion, Throughput};
use probe_core::mm::{MmId, PAGE_SIZE, VmFlags};
use probe_core::prelude::*;
use probe_core::testing::{ByteText, Int3};
use probe_core::xol::{SpinWait, Step, Task, XolArea};
use std::hint::black_box;
use std::sync::Arc;

type Consumer = dyn Fn() + Send + Sync;
type U = Uprobes<Consumer, EpochRcu, Int3, ByteText>;

fn world() -> (U, Arc<AddressSpace>) {
    let text = ByteText::new();
    text.add_object(
        ObjectId(1),
        (0..4 * PAGE_SIZE).map(|i| (i % 0xC0) as u8).collect(),
    );
    let u: U = Uprobes::new(EpochRcu::new(), text);
    let mm = u.create_mm(MmId(1)).unwrap();
    u.mmap(&mm, 0, 4 * PAGE_SIZE, 0, ObjectId(1), VmFlags::EXEC)
        .unwrap();
    let c: Arc<Consumer> = Arc::new(|| {});
    for i in 0..64 {
        u.register(ProbeKey::new(ObjectId(1), i * 16), c.clone())
            .unwrap();
    }
    (u, mm)
}

fn hits(c: &mut Criterion) {
    let (u, mm) = world();
    let xol = XolArea::new(0x7fff_0000, 64, 128, SpinWait::default()).unwrap();
    let reader = u.registry().rcu().register().unwrap();
    let mut g = c.benchmark_group("xol-hit");
    g.throughput(Throughput::Elements(1));
    let mut counts = Vec::new();
    for (id, cache) in [("without-cache", false), ("with-cache-and-reuse", true)] {
        let mut task = Task::new();
        let mut n = 0u64;
        g.bench_function(id, |b| {
            b.iter(|| {
                n = (n + 1) % 64;
                let guard = u.read(&reader);
                match task
                    .on_breakpoint(&u, &guard, &*mm, &xol, n * 16, cache)
                    .unwrap()
                {
                    Step::Run { probe, slot } => {
                        for c in probe.consumers() {
                            c();
                        }
                        black_box(slot.addr());
                    }
                    _ => unreachable!("every probe is registered"),
                }
            })
        });
        counts.push((id, task.copies(), task.flushes(), task.cache_hits()));
    }
    g.finish();
    println!("\ncopies / flushes / cache hits per task over the whole run:");
    for (id, copies, flushes, cached) in counts {
        println!("  {id:<22} copies {copies:>10}  flushes {flushes:>10}  cache hits {cached:>10}");
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    hits(&mut c);
    c.final_summary();
    let (a, b) = (
        probe_benches::criterion_mean("xol-hit", "without-cache"),
        probe_benches::criterion_mean("xol-hit", "with-cache-and-reuse"),
    );
    if let (Some(a), Some(b)) = (a, b) {
        println!(
            "\nhit: without cache {a:.1} ns, with cache and slot reuse {b:.1} ns: {:.2}x faster",
            a / b
        );
    }
}

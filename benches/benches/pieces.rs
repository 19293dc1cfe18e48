//! The pieces of a probe hit, one thread, no contention, each against the alternative a user
//! would write instead, as ratios measured in one run:
//!
//! * `seqcount-read`  — probe-core's `SeqCount::read` of two words vs the `seqlock` crate's
//!   `SeqLock<(u64, u64)>::read`;
//! * `resolve-1k`     — trap address → mapping → probe → consumers over 1 000 probes: probe-core's
//!   speculative `Uprobes::resolve` vs the report's alternatives (see `probe_benches::contenders`);
//! * `consumers-N`    — lookup + calling N consumers (1, 4 inline, 8 on the heap) vs a `BTreeMap`
//!   of shared slices;
//! * `xol-take-free`  — taking and freeing an XOL slot: `XolArea::try_take` + drop vs a
//!   `Mutex<Vec<usize>>` free list.
//!
//! The contention report (`--bin contention`) measures whole hits under churn on every core;
//! these say where a single hit's time goes.

#![allow(missing_docs)]

use criterion::{Criterion, Throughput};
use probe_benches::contenders::*;
use probe_benches::run::Measure;
use probe_benches::workload::{Regs, Workload};
use probe_core::prelude::*;
use probe_core::seqcount::SeqCount;
use probe_core::xol::{SpinWait, XolArea};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

fn seqcount(c: &mut Criterion) {
    let mut g = c.benchmark_group("seqcount-read");
    g.throughput(Throughput::Elements(1));
    let seq = SeqCount::new();
    let (lo, hi) = (AtomicU64::new(1), AtomicU64::new(1));
    g.bench_function("probe-core", |b| {
        b.iter(|| black_box(seq.read(|| (lo.load(Relaxed), hi.load(Relaxed)))))
    });
    let sl = seqlock::SeqLock::new((1u64, 1u64));
    g.bench_function("seqlock-crate", |b| b.iter(|| black_box(sl.read())));
    g.finish();
}

/// One hit per iteration, cycling through thread 0's stream of the workload.
fn bench_hits<C: Contender>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    c: &C,
    w: &Workload,
) {
    let mut local = c.local();
    let stream = w.stream(0);
    let mut i = 0usize;
    let mut regs = Regs::default();
    g.bench_function(c.name(), |b| {
        b.iter(|| {
            i = (i + 1) % stream.len();
            c.hit(&mut local, &stream[i], &mut regs);
        })
    });
    black_box(regs);
}

fn resolve(c: &mut Criterion) {
    let w = Workload::new(1000, 1);
    let p = Probes::new(&w);
    let mut g = c.benchmark_group("resolve-1k");
    g.throughput(Throughput::Elements(1));
    let core = CoreResolve::<SlotRcu>::new(&w, &p);
    assert_eq!(core.check(&w), Workload::expected(w.stream(0)));
    bench_hits(&mut g, &core, &w);
    bench_hits(&mut g, &CoreResolve::<EpochRcu>::new(&w, &p), &w);
    bench_hits(&mut g, &Seed000Resolve::new(&w, &p), &w);
    bench_hits(&mut g, &RwLockResolve::new(&w, &p), &w);
    bench_hits(&mut g, &SeqLockResolve::new(&w, &p), &w);
    bench_hits(&mut g, &CeilingResolve::new(&w, &p), &w);
    g.finish();
}

type Consumer = dyn Fn() + Send + Sync;

fn consumers(c: &mut Criterion) {
    for n in [1usize, 4, 8] {
        let mut g = c.benchmark_group(format!("consumers-{n}"));
        g.throughput(Throughput::Elements(1));
        let key = ProbeKey::new(ObjectId(1), 0x40);
        let list: Vec<Arc<Consumer>> = (0..n).map(|_| Arc::new(|| {}) as Arc<Consumer>).collect();
        let reg: Registry<Consumer, EpochRcu> = Registry::new(EpochRcu::new());
        for c in &list {
            reg.register(key, c.clone()).unwrap();
        }
        let reader = reg.rcu().register().unwrap();
        g.bench_function("probe-core", |b| {
            b.iter(|| {
                let guard = reg.read(&reader);
                for c in guard.lookup(black_box(&key)).unwrap().consumers() {
                    c();
                }
            })
        });
        let map: BTreeMap<ProbeKey, Arc<[Arc<Consumer>]>> = [(key, Arc::from(list.clone()))].into();
        g.bench_function("btreemap-slice", |b| {
            b.iter(|| {
                for c in map.get(black_box(&key)).unwrap().iter() {
                    c();
                }
            })
        });
        g.finish();
    }
}

fn xol(c: &mut Criterion) {
    let mut g = c.benchmark_group("xol-take-free");
    g.throughput(Throughput::Elements(1));
    let area = XolArea::new(0x7fff_0000, 64, 128, SpinWait::default()).unwrap();
    g.bench_function("probe-core", |b| {
        b.iter(|| black_box(area.try_take().unwrap().addr()))
    });
    let free = Mutex::new((0..128usize).collect::<Vec<_>>());
    g.bench_function("mutex-free-list", |b| {
        b.iter(|| {
            let i = free.lock().unwrap().pop().unwrap();
            black_box(0x7fff_0000 + 64 * i as u64);
            free.lock().unwrap().push(i);
        })
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    seqcount(&mut c);
    resolve(&mut c);
    consumers(&mut c);
    xol(&mut c);
    c.final_summary();
    let mean = probe_benches::criterion_mean;
    let mut rows: Vec<(String, &str, &str)> = vec![
        ("seqcount-read".into(), "probe-core", "seqlock-crate"),
        ("xol-take-free".into(), "probe-core", "mutex-free-list"),
    ];
    for n in [1, 4, 8] {
        rows.push((format!("consumers-{n}"), "probe-core", "btreemap-slice"));
    }
    for alt in [
        "seed-000 mmap_sem+lock+tree",
        "RwLock mm + ArcSwap map",
        "seqlock mm + ArcSwap map",
        "ceiling (private copies)",
    ] {
        rows.push(("resolve-1k".into(), "probe-core", alt));
    }
    println!(
        "\n{:<16} {:>14} {:>14} {:>8}  alternative",
        "piece", "probe-core ns", "alt ns", "ratio"
    );
    for (group, ours, alt) in rows {
        if let (Some(a), Some(b)) = (mean(&group, ours), mean(&group, alt)) {
            println!("{group:<16} {a:>14.1} {b:>14.1} {:>7.2}×  {alt}", a / b);
        }
    }
}

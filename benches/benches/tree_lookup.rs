//! Probe lookup on the hit path, against the alternatives, as ratios measured in one run.
//!
//! Each iteration resolves the same 1024 existing keys (a fixed pseudo-random order) and touches
//! each hit probe's consumers, so every implementation does the same work:
//!
//! * `probe-core/epoch`  — `Registry::read` (crossbeam-epoch pin) + lookup + consumer list
//! * `probe-core/slot`   — the same over `SlotRcu`
//! * `mutex-btreemap`    — `Mutex<BTreeMap>`: lock, get, unlock (seed 000's one lock round a tree)
//! * `rwlock-btreemap`   — `RwLock<BTreeMap>` read side
//! * `arcswap-btreemap`  — `ArcSwap<BTreeMap>`: copy-on-write of the whole map
//! * `btreemap-ceiling`  — an unsynchronized `BTreeMap` lookup: the ceiling
//!
//! The `lookup-N` groups run on one thread (what one lookup costs); the `lookup-N-xT` groups run
//! the same batch on every core at once (T threads, wall time of the slowest), where the ceiling
//! gives each thread a private copy of the map. The contention report (a later issue) adds churn.
//! The write group measures what the copy-on-write tree pays instead: one insert + one remove.
//! After criterion's own report, a table of ratios (time ÷ ceiling time) is printed from the
//! estimates criterion wrote in this run.

#![allow(missing_docs)]

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, Throughput};
use probe_core::prelude::*;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex, RwLock};

type Consumer = dyn Fn() + Send + Sync;
const BATCH: usize = 1024;

fn keys(n: usize) -> Vec<ProbeKey> {
    // 16 objects, probes every 16 bytes.
    (0..n as u64)
        .map(|i| ProbeKey::new(ObjectId(1000 + i % 16), (i / 16) * 16))
        .collect()
}

fn batch(all: &[ProbeKey]) -> Vec<ProbeKey> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..BATCH)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            all[(x % all.len() as u64) as usize]
        })
        .collect()
}

/// Calls every consumer; returns how many.
#[inline(always)]
fn call_all(cs: &[Arc<Consumer>]) -> usize {
    for c in cs {
        c();
    }
    cs.len()
}

/// One iteration: resolve every key of the batch with `hit` (which calls the consumers it finds
/// and returns how many) and check that every key was found, so all implementations do the same
/// work. Generic, so each implementation's closure is inlined.
#[inline(always)]
fn batch_hits(keys: &[ProbeKey], mut hit: impl FnMut(&ProbeKey) -> usize) {
    let found: usize = keys.iter().map(&mut hit).sum();
    assert_eq!(black_box(found), BATCH);
}

/// The maps every implementation holds: the same keys, one consumer each.
struct Fixture {
    probe_keys: Vec<ProbeKey>,
    map: BTreeMap<ProbeKey, Vec<Arc<Consumer>>>,
    epoch: Registry<Consumer, EpochRcu>,
    slot: Registry<Consumer, SlotRcu>,
    mutex: Mutex<BTreeMap<ProbeKey, Vec<Arc<Consumer>>>>,
    rwlock: RwLock<BTreeMap<ProbeKey, Vec<Arc<Consumer>>>>,
    arcswap: ArcSwap<BTreeMap<ProbeKey, Vec<Arc<Consumer>>>>,
}

impl Fixture {
    fn new(n: usize) -> Self {
        let all = keys(n);
        let consumer: Arc<Consumer> = Arc::new(|| {});
        let map: BTreeMap<_, _> = all.iter().map(|k| (*k, vec![consumer.clone()])).collect();
        let epoch = Registry::new(EpochRcu::new());
        let slot = Registry::new(SlotRcu::new());
        for k in &all {
            epoch.register(*k, consumer.clone()).unwrap();
            slot.register(*k, consumer.clone()).unwrap();
        }
        Self {
            probe_keys: batch(&all),
            mutex: Mutex::new(map.clone()),
            rwlock: RwLock::new(map.clone()),
            arcswap: ArcSwap::from_pointee(map.clone()),
            map,
            epoch,
            slot,
        }
    }
}

fn lookups(c: &mut Criterion) {
    for n in [1_000usize, 100_000] {
        let f = Fixture::new(n);
        let keys = &f.probe_keys;
        let mut g = c.benchmark_group(format!("lookup-{n}"));
        g.throughput(Throughput::Elements(BATCH as u64));
        {
            let reader = f.epoch.rcu().register().unwrap();
            g.bench_function("probe-core-epoch", |b| {
                b.iter(|| {
                    batch_hits(keys, |k| {
                        f.epoch
                            .read(&reader)
                            .lookup(k)
                            .map_or(0, |p| call_all(p.consumers()))
                    })
                })
            });
        }
        {
            let reader = f.slot.rcu().register().unwrap();
            g.bench_function("probe-core-slot", |b| {
                b.iter(|| {
                    batch_hits(keys, |k| {
                        f.slot
                            .read(&reader)
                            .lookup(k)
                            .map_or(0, |p| call_all(p.consumers()))
                    })
                })
            });
        }
        g.bench_function("mutex-btreemap", |b| {
            b.iter(|| {
                batch_hits(keys, |k| {
                    f.mutex.lock().unwrap().get(k).map_or(0, |cs| call_all(cs))
                })
            })
        });
        g.bench_function("rwlock-btreemap", |b| {
            b.iter(|| {
                batch_hits(keys, |k| {
                    f.rwlock.read().unwrap().get(k).map_or(0, |cs| call_all(cs))
                })
            })
        });
        g.bench_function("arcswap-btreemap", |b| {
            b.iter(|| {
                batch_hits(keys, |k| {
                    f.arcswap.load().get(k).map_or(0, |cs| call_all(cs))
                })
            })
        });
        g.bench_function("btreemap-ceiling", |b| {
            b.iter(|| batch_hits(keys, |k| f.map.get(k).map_or(0, |cs| call_all(cs))))
        });
        g.finish();
    }
}

/// Runs `work` `iters` times on each of `threads` threads at once (after per-thread `setup`,
/// outside the timing) and returns the wall time of the slowest thread.
fn concurrently<S>(
    iters: u64,
    threads: usize,
    setup: impl Fn() -> S + Sync,
    work: impl Fn(&mut S) + Sync,
) -> std::time::Duration {
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| {
                    let mut st = setup();
                    barrier.wait();
                    let t = std::time::Instant::now();
                    for _ in 0..iters {
                        work(&mut st);
                    }
                    t.elapsed()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).max().unwrap()
    })
}

/// Every thread hits at once: what a lock costs when CPUs contend, and what probe-core is for.
fn concurrent_lookups(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for n in [1_000usize, 100_000] {
        let f = Fixture::new(n);
        let keys = &f.probe_keys;
        let mut g = c.benchmark_group(format!("lookup-{n}-x{threads}"));
        g.throughput(Throughput::Elements((BATCH * threads) as u64));
        g.bench_function("probe-core-epoch", |b| {
            b.iter_custom(|iters| {
                concurrently(
                    iters,
                    threads,
                    || f.epoch.rcu().register().unwrap(),
                    |reader| {
                        batch_hits(keys, |k| {
                            f.epoch
                                .read(reader)
                                .lookup(k)
                                .map_or(0, |p| call_all(p.consumers()))
                        })
                    },
                )
            })
        });
        g.bench_function("mutex-btreemap", |b| {
            b.iter_custom(|iters| {
                concurrently(
                    iters,
                    threads,
                    || (),
                    |_| {
                        batch_hits(keys, |k| {
                            f.mutex.lock().unwrap().get(k).map_or(0, |cs| call_all(cs))
                        })
                    },
                )
            })
        });
        g.bench_function("rwlock-btreemap", |b| {
            b.iter_custom(|iters| {
                concurrently(
                    iters,
                    threads,
                    || (),
                    |_| {
                        batch_hits(keys, |k| {
                            f.rwlock.read().unwrap().get(k).map_or(0, |cs| call_all(cs))
                        })
                    },
                )
            })
        });
        g.bench_function("arcswap-btreemap", |b| {
            b.iter_custom(|iters| {
                concurrently(
                    iters,
                    threads,
                    || (),
                    |_| {
                        batch_hits(keys, |k| {
                            f.arcswap.load().get(k).map_or(0, |cs| call_all(cs))
                        })
                    },
                )
            })
        });
        g.bench_function("btreemap-ceiling", |b| {
            b.iter_custom(|iters| {
                // A private copy per thread: no sharing at all.
                concurrently(
                    iters,
                    threads,
                    || f.map.clone(),
                    |m| batch_hits(keys, |k| m.get(k).map_or(0, |cs| call_all(cs))),
                )
            })
        });
        g.finish();
    }
}

fn writes(c: &mut Criterion) {
    for n in [1_000usize, 100_000] {
        let all = keys(n);
        let consumer: Arc<Consumer> = Arc::new(|| {});
        let extra = ProbeKey::new(ObjectId(7), 0x4242);
        let mut g = c.benchmark_group(format!("insert+remove-{n}"));
        {
            let reg: Registry<Consumer, EpochRcu> = Registry::new(EpochRcu::new());
            for k in &all {
                reg.register(*k, consumer.clone()).unwrap();
            }
            g.bench_function(BenchmarkId::new("probe-core-epoch", n), |b| {
                b.iter(|| {
                    reg.register(extra, consumer.clone()).unwrap();
                    reg.unregister(&extra, &consumer).unwrap();
                })
            });
        }
        {
            let m: Mutex<BTreeMap<ProbeKey, Vec<Arc<Consumer>>>> =
                Mutex::new(all.iter().map(|k| (*k, vec![consumer.clone()])).collect());
            g.bench_function(BenchmarkId::new("mutex-btreemap", n), |b| {
                b.iter(|| {
                    m.lock().unwrap().insert(extra, vec![consumer.clone()]);
                    m.lock().unwrap().remove(&extra);
                })
            });
        }
        {
            let a = ArcSwap::from_pointee(
                all.iter()
                    .map(|k| (*k, vec![consumer.clone()]))
                    .collect::<BTreeMap<_, _>>(),
            );
            g.bench_function(BenchmarkId::new("arcswap-btreemap", n), |b| {
                b.iter(|| {
                    a.rcu(|m| {
                        let mut m = BTreeMap::clone(m);
                        m.insert(extra, vec![consumer.clone()]);
                        m
                    });
                    a.rcu(|m| {
                        let mut m = BTreeMap::clone(m);
                        m.remove(&extra);
                        m
                    });
                })
            });
        }
        g.finish();
    }
}

/// Reads criterion's estimates of this run and prints each lookup time as a ratio to the ceiling.
fn ratios(c: &Criterion) {
    let _ = c;
    let dir = probe_benches::criterion_home();
    let mean = probe_benches::criterion_mean;
    println!(
        "\nlookup: time per {BATCH} hits, and ratio to the unsynchronized BTreeMap ceiling (lower is better)"
    );
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let groups: Vec<String> = ["1000", "100000"]
        .iter()
        .flat_map(|n| [format!("lookup-{n}"), format!("lookup-{n}-x{threads}")])
        .collect();
    for group in groups {
        let Some(ceiling) = mean(&group, "btreemap-ceiling") else {
            println!(
                "  ({group}: no estimates found under {} — run with `cargo bench`)",
                dir.display()
            );
            continue;
        };
        for id in [
            "probe-core-epoch",
            "probe-core-slot",
            "mutex-btreemap",
            "rwlock-btreemap",
            "arcswap-btreemap",
            "btreemap-ceiling",
        ] {
            if let Some(t) = mean(&group, id) {
                let per_batch = if group.contains("-x") {
                    BATCH * threads
                } else {
                    BATCH
                };
                println!(
                    "  {group:<17} {id:<18} {:>9.1} ns/hit (wall)  {:>5.2}x ceiling",
                    t / per_batch as f64,
                    t / ceiling
                );
            }
        }
    }
    println!("\ninsert+remove: time per pair, ratio to Mutex<BTreeMap>");
    for n in ["1000", "100000"] {
        let group = format!("insert+remove-{n}");
        let Some(base) = mean(&group, &format!("mutex-btreemap/{n}")) else {
            continue;
        };
        for id in ["probe-core-epoch", "mutex-btreemap", "arcswap-btreemap"] {
            if let Some(t) = mean(&group, &format!("{id}/{n}")) {
                println!(
                    "  {group:<21} {id:<18} {:>10.0} ns  {:>7.2}x mutex",
                    t,
                    t / base
                );
            }
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    lookups(&mut c);
    concurrent_lookups(&mut c);
    writes(&mut c);
    c.final_summary();
    ratios(&c);
}

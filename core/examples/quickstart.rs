//! probe-core in one screen: register probes, resolve hits from several threads while a writer
//! registers and unregisters, and check every answer.
//!
//! ```text
//! cargo run --release -p probe-core --features std --example quickstart
//! ```

use probe_core::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A consumer: what a tracer attaches to a probe. Here it counts its hits in its own counter
/// (the embedder's choice; probe-core itself never writes shared memory on a hit).
struct Counter {
    name: &'static str,
    hits: AtomicU64,
}

fn main() {
    let reg: Arc<Registry<Counter, EpochRcu>> =
        Arc::new(Registry::new(EpochRcu::with_relax(std::thread::yield_now)));

    // Three "objects" (think: libc, the main binary, a JIT region), 1000 probes each.
    let objects = [ObjectId(0x1_0001), ObjectId(0x1_0002), ObjectId(0x1_0003)];
    let entry = Arc::new(Counter {
        name: "entry",
        hits: AtomicU64::new(0),
    });
    let trace = Arc::new(Counter {
        name: "trace",
        hits: AtomicU64::new(0),
    });
    for obj in objects {
        for i in 0..1000u64 {
            let key = ProbeKey::new(obj, 0x1000 + i * 16);
            reg.register(key, entry.clone()).expect("register");
            if i % 4 == 0 {
                reg.register(key, trace.clone()).expect("register");
            }
        }
    }
    println!(
        "registered {} probes on {} objects",
        reg.len(),
        objects.len()
    );

    // Bad input is an error, never a panic.
    let k = ProbeKey::new(objects[0], 0x1000);
    assert_eq!(
        reg.register(k, entry.clone()),
        Err(Error::DuplicateConsumer)
    );
    assert_eq!(
        reg.unregister(&ProbeKey::new(objects[0], 0x7), &entry),
        Err(Error::UnknownProbe)
    );

    // Mapping a range of an object finds every probe inside it.
    {
        let reader = reg.rcu().register().unwrap();
        let guard = reg.read(&reader);
        let mut n = 0;
        guard.probes_in(objects[1], 0x1000..0x1100, |_| {
            n += 1;
            true
        });
        println!("probes of object 2 in [0x1000, 0x1100): {n}");
        assert_eq!(n, 16);
    }

    // Hits from two threads for one second, while a writer adds and removes a probe over and over.
    let stop = Arc::new(AtomicBool::new(false));
    let churn_key = ProbeKey::new(objects[2], 0xdead0);
    let churn = Arc::new(Counter {
        name: "churn",
        hits: AtomicU64::new(0),
    });
    let hitters: Vec<_> = (0..2)
        .map(|t| {
            let (reg, stop) = (reg.clone(), stop.clone());
            std::thread::spawn(move || {
                let reader = reg.rcu().register().unwrap();
                let (mut resolved, mut missed, mut x) = (0u64, 0u64, 0x9E37_79B9u64 + t);
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let obj = objects[(x % 3) as usize];
                    let key = if x % 64 == 0 {
                        churn_key
                    } else {
                        ProbeKey::new(obj, 0x1000 + (x >> 8) % 1000 * 16)
                    };
                    let guard = reg.read(&reader);
                    match guard.lookup(&key) {
                        Some(p) => {
                            assert_eq!(p.key(), key);
                            for c in p.consumers() {
                                c.hits.fetch_add(1, Ordering::Relaxed);
                            }
                            resolved += 1;
                        }
                        None => {
                            assert_eq!(key, churn_key, "a registered probe went missing");
                            missed += 1;
                        }
                    }
                }
                (resolved, missed)
            })
        })
        .collect();
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        reg.register(churn_key, churn.clone()).unwrap();
        reg.unregister(&churn_key, &churn).unwrap();
        rounds += 1;
        if rounds.is_multiple_of(256) {
            reg.sync(); // two-phase unregister: one grace period for 256 removals
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (mut resolved, mut missed) = (0, 0);
    for h in hitters {
        let (r, m) = h.join().unwrap();
        resolved += r;
        missed += m;
    }
    reg.sync();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "hits resolved: {resolved} ({:.1} M/s over 2 threads), churn-probe misses: {missed}",
        resolved as f64 / secs / 1e6
    );
    println!("writer: {rounds} register+unregister rounds of the churn probe in the same second");
    for c in [&entry, &trace, &churn] {
        println!(
            "consumer {:>5}: {} calls",
            c.name,
            c.hits.load(Ordering::Relaxed)
        );
    }
    assert_eq!(reg.len(), 3000);
    println!("ok: every hit resolved to its own probe; only the churning probe was ever absent");
}

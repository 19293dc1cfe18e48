//! Two address spaces map the same object; probes are registered on it; several threads resolve
//! hits speculatively while another thread maps and unmaps. Prints how many hits took the
//! speculative path and how many the locked path, and checks every answer.
//!
//! ```text
//! cargo run --release -p probe-core --features std --example address_spaces
//! ```

use probe_core::mm::{MmId, PAGE_SIZE, VmFlags};
use probe_core::prelude::*;
use probe_core::testing::{ByteText, Int3};
use probe_core::uprobes::{Hit, Path, Uprobes};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const P: u64 = PAGE_SIZE;
const LIBC: ObjectId = ObjectId(0x11bc);
const OTHER: ObjectId = ObjectId(0x0743);

struct Counter(AtomicU64);

type U = Uprobes<Counter, EpochRcu, Int3, ByteText>;

fn main() {
    // "libc": 16 pages of ordinary code; "other": 4 pages.
    let text = ByteText::new();
    text.add_object(LIBC, vec![0x90; 16 * P as usize]);
    text.add_object(OTHER, vec![0x90; 4 * P as usize]);
    let u: Arc<U> = Arc::new(Uprobes::new(
        EpochRcu::with_relax(std::thread::yield_now),
        text,
    ));

    // Two processes map libc executable, at different addresses.
    let a = u.create_mm(MmId(100)).unwrap();
    let b = u.create_mm(MmId(200)).unwrap();
    u.mmap(&a, 0x40_0000, 16 * P, 0, LIBC, VmFlags::EXEC)
        .unwrap();
    u.mmap(&b, 0x7f00_0000, 16 * P, 0, LIBC, VmFlags::EXEC)
        .unwrap();

    // Probes on 64 functions of libc: each breakpoint lands in both address spaces.
    let offsets: Vec<u64> = (0..64).map(|i| i * 0x3f0 + 0x10).collect();
    let consumer = Arc::new(Counter(AtomicU64::new(0)));
    for &off in &offsets {
        u.register(ProbeKey::new(LIBC, off), consumer.clone())
            .unwrap();
    }
    println!(
        "registered {} probes on libc; code writes so far: {}",
        offsets.len(),
        u.text().writes()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let hitters: Vec<_> = (0..2)
        .map(|t| {
            let (u, a, b, stop, offsets) = (
                u.clone(),
                a.clone(),
                b.clone(),
                stop.clone(),
                offsets.clone(),
            );
            std::thread::spawn(move || {
                let reader = u.registry().rcu().register().unwrap();
                let (mut spec, mut locked, mut n) = (0u64, 0u64, 0usize);
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let off = offsets[(n * 7 + t) % offsets.len()];
                    let (mm, base) = if n % 2 == 0 {
                        (&a, 0x40_0000)
                    } else {
                        (&b, 0x7f00_0000)
                    };
                    let guard = u.read(&reader);
                    let (hit, path) = u.resolve(&guard, &**mm, base + off);
                    match hit {
                        Hit::Run(p) => {
                            assert_eq!(
                                p.key(),
                                ProbeKey::new(LIBC, off),
                                "a hit resolved to the wrong probe"
                            );
                            for c in p.consumers() {
                                c.0.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        other => panic!("libc stays mapped and probed, yet the hit said {other:?}"),
                    }
                    match path {
                        Path::Speculative => spec += 1,
                        Path::Locked => locked += 1,
                    }
                }
                (spec, locked)
            })
        })
        .collect();

    // Meanwhile: map and unmap another object next to libc in both address spaces, as dlopen and
    // dlclose would. Every change is a write section the speculating hits must notice.
    let start = Instant::now();
    let mut churn = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        for (mm, at) in [(&a, 0x80_0000), (&b, 0x8000_0000)] {
            u.mmap(mm, at, 4 * P, 0, OTHER, VmFlags::EXEC).unwrap();
            u.munmap(mm, at, 4 * P).unwrap();
        }
        churn += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut spec, mut locked) = (0u64, 0u64);
    for h in hitters {
        let (s, l) = h.join().unwrap();
        spec += s;
        locked += l;
    }
    let total = spec + locked;
    println!("address-space churn: {churn} map+unmap rounds in each of 2 address spaces");
    println!(
        "hits: {total} in {:.2}s; speculative path {spec} ({:.1}%), locked path {locked} ({:.1}%)",
        start.elapsed().as_secs_f64(),
        100.0 * spec as f64 / total as f64,
        100.0 * locked as f64 / total as f64
    );
    println!("consumer calls: {}", consumer.0.load(Ordering::Relaxed));

    // Unregister everything: every breakpoint is restored in both address spaces.
    for &off in &offsets {
        u.unregister(&ProbeKey::new(LIBC, off), &consumer).unwrap();
    }
    u.sync();
    let reader = u.registry().rcu().register().unwrap();
    let guard = u.read(&reader);
    assert!(matches!(
        u.resolve(&guard, &*a, 0x40_0000 + offsets[0]).0,
        Hit::Restart
    ));
    println!("ok: every hit resolved to its probe; after unregistering, the breakpoints are gone");
}
